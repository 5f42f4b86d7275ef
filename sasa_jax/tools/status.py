"""Where a run stands, read from its workdir alone (local or gs://), from any machine.

  python -m sasa_jax.tools.status WORKDIR [WORKDIR ...]   # or a folder of workdirs

For each workdir (or each run in a folder of them): whether a run holds it now (its lease:
run, host, pid, SLURM job, how long ago it was renewed), the last logged step of the steps it
trains to, its speed and the time left at that speed, the accelerators' peak memory against
theirs, how long ago metrics.jsonl was last written, the checkpoints, the last evaluation
and the starts (starts.jsonl). Nothing is imported from jax: it answers in a second.
"""
import json
import sys
import time

from absl import app
from etils import epath

from sasa_jax import workdir_lease
from sasa_jax.tools.runs import read_jsonl, workdirs


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 120:
    return f"{seconds} s"
  minutes = seconds // 60
  if minutes < 120:
    return f"{minutes} min"
  return f"{minutes // 60} h {minutes % 60:02d} min"


def _holder(workdir: epath.Path, lease_s: float) -> str:
  lease = workdir_lease.read(workdir)
  if lease is None:
    return "not running (no run holds the workdir)"
  if time.time() - lease.get("renewed", 0.0) > lease_s:
    return (f"not running: the lease of {workdir_lease.describe(lease)} has lapsed (its run "
            "was killed; the next start takes over)")
  return f"running: {workdir_lease.describe(lease)}"


def _last(rows: list[dict], key: str) -> dict | None:
  return next((r for r in reversed(rows) if key in r), None)


def report(workdir: epath.PathLike) -> list[str]:
  """The status lines of one workdir."""
  workdir = epath.Path(workdir)
  if not (workdir / "config.json").exists():
    return [f"{workdir}: no config.json: not a sasa_jax run directory (yet)"]
  config = json.loads((workdir / "config.json").read_text())
  starts = read_jsonl(workdir / "starts.jsonl")
  argv = starts[-1]["argv"] if starts else []
  command = (" ".join(a for a in argv[1:] if a.startswith("--config"))
             if argv and argv[0].endswith("main.py") else " ".join(argv))  # or a tool's run
  lines = [f"{workdir}: {command or config['dataset']['name']}"]
  lines.append("  " + _holder(workdir, float(config.get("workdir_lease_s") or 60.0)))
  total = starts[-1].get("num_train_steps") if starts else None
  metrics_path = workdir / "metrics.jsonl"
  metrics = read_jsonl(metrics_path)
  train = _last(metrics, "train/loss")
  if train:
    line = f"  step {train['step']:,}" + (f" of {total:,} ({train['step'] / total:.1%})"
                                         if total else "")
    line += f": train/loss {train['train/loss']:.4g}"
    speed = _last(metrics, "steps_per_sec")
    if speed:
      line += f", {speed['steps_per_sec']:.3g} steps/s"
      images = _last(metrics, "images_per_sec")
      if images:
        line += (f" ({images['images_per_sec']:,.0f} images/s, "
                 f"{images['images_per_sec_per_device']:,.0f} per device)")
      if total and total > train["step"]:
        left = (total - train["step"]) / speed["steps_per_sec"]
        line += f", {_duration(left)} left at that speed"
    lines.append(line)
    memory = _last(metrics, "device_memory_peak_gib")
    if memory:  # GPUs and TPUs; the CPU reports none
      line = f"  device memory: peak {memory['device_memory_peak_gib']:.3g} GiB"
      if "device_memory_limit_gib" in memory:
        line += (f" of {memory['device_memory_limit_gib']:.3g} GiB "
                 f"({memory['device_memory_peak_fraction']:.0%} on the fullest device)")
      lines.append(line + " on process 0's devices")
    written = time.time() - metrics_path.stat().mtime
    lines.append(f"  metrics.jsonl last written {_duration(written)} ago")
  else:
    lines.append("  no training step logged yet")
  checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*")
                       if p.name.isdigit()) if (workdir / "checkpoints").exists() else []
  lines.append("  checkpoints: " + (", ".join(f"{s:,}" for s in checkpoints) or "none"))
  evaluation = next((r for r in reversed(metrics) if any(k.startswith("eval/") for k in r)),
                    None)
  if evaluation:
    values = ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items()
                       if k.startswith("eval/") and k != "eval/num_examples")
    lines.append(f"  last evaluation at step {evaluation['step']:,}: {values}")
  if starts:
    last = starts[-1]
    hosts = list(dict.fromkeys(last["hosts"]))  # distinct, in process order
    lines.append(f"  {len(starts)} start(s); the last at {last['time']}, from step "
                 f"{last['start_step']:,}, {last['devices']} {last['device_kind']} device(s) "
                 f"in {last['processes']} process(es) on {', '.join(hosts[:4])}"
                 + (f" and {len(hosts) - 4} more hosts" if len(hosts) > 4 else ""))
  return lines


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give one or more workdirs (or folders of them): "
                         "python -m sasa_jax.tools.status WORKDIR")
  for path in argv[1:]:
    try:
      found = workdirs([path])
    except FileNotFoundError:
      found = [path]  # not a run (yet): report() says so
    for workdir in found:
      print("\n".join(report(workdir)))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
