"""Checks a run before it is submitted: what the loop checks at its start, on this machine.

  python -m sasa_jax.tools.preflight --config=configs/imagenet.py:depth=50 \
      --workdir=gs://B/sasa/r50 --devices=64 [--tpu=v5e] [--config.dataset.data_dir=...]

The config (every field; the model built abstractly; the batch against `--devices`, the
run's device count, with microbatches and BatchNorm groups), the dataset (prepared in
data_dir, both splits readable and not empty) and the steps it trains, then the workdir: new,
or a run's (its state as tools/status says it, and the config fields this start changes).
With --tpu=GEN (what launch/tpu_pod.sh passes), also the training step's memory on one chip
of that TPU generation, compiled by libtpu's XLA:TPU compiler where libtpu is installed here
(`make tpu-compiler`; tools/step_memory --tpu): a step that does not fit the chip fails.
--gpu=h100|h200|a100 (launch/gpu_slurm.sh's GPU_TYPE) does the same for one such GPU
instead, with jax's CUDA plugin (`make gpu-compiler`; tools/step_memory --gpu).
`launch/gpu_slurm.sh` and `launch/tpu_pod.sh` run it before they submit or start anything,
so that a typo or a missing dataset fails in seconds rather than after a queue wait.
Exit status 0, or 3 with the error (what `train_and_evaluate` would stop with). It runs on
the CPU (JAX_PLATFORMS=cpu): a login node's GPUs stay free.
"""
import os
import sys

# The checks need no accelerator: a login node's GPUs stay free (jax would take 75% of one).
os.environ["JAX_PLATFORMS"] = "cpu"

from absl import app, flags, logging  # noqa: E402

from sasa_jax import cli  # noqa: E402

FAILED = 3  # the run would fail; other statuses: preflight itself could not run
cli.ERROR_STATUS = FAILED  # a bad flag or config argument too

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's workdir (local or gs://).")
flags.DEFINE_integer("devices", 0, "The run's device count (0: this machine's).")
flags.DEFINE_string("tpu", None, "The TPU generation the run is for (v4, v5e, v5p, v6e): "
                    "plan the step on one of its chips, where libtpu is installed here.")
flags.DEFINE_string("gpu", None, "The GPU the run is for (h100, h200, a100): plan the step "
                    "on one, where jax's CUDA plugin is installed here.")
cli.define_config()
flags.mark_flags_as_required(["config", "workdir"])


def describe(config, plan, devices: int) -> list[str]:
  """The plan's lines: model, batch, data, steps."""
  num, group = config.num_microbatches, config.batch_norm_group_size
  per_device = config.batch_size // devices
  model = config.model
  name = (f"RetinaNet, {model.backbone_variant} ResNet-{model.depth} backbone, {model.heads} "
          "FPN and heads" if config.task == "detection" else
          f"ResNet-{model.depth} {model.variant}")
  lines = [f"  model: {name}, {plan.num_params / 1e6:.2f}M parameters, {config.dtype}",
           f"  batch: {config.batch_size:,} = {per_device:,} per device on {devices} device(s)"
           + (f", as {num} microbatches of {per_device // num}" if num > 1 else "")
           + (f"; BatchNorm over groups of {group}" if group else ""),
           f"  data: {config.dataset.name} in {plan.builder.data_dir}: "
           f"{config.dataset.train_split} {plan.num_train:,} examples, "
           f"{config.dataset.eval_split} {plan.num_eval:,}",
           f"  steps: {plan.num_steps:,} ({plan.num_steps / plan.steps_per_epoch:.4g} epochs of "
           f"{plan.steps_per_epoch:,} steps)"]
  return lines


def memory_lines(config, devices: int, kind: str, name: str) -> tuple[list[str], bool]:
  """(lines, whether the run would fail): the training step compiled for one device `name`
  of `kind` ("tpu": a chip of that generation, by libtpu; "gpu": that GPU, by jax's CUDA
  plugin: tools/step_memory's plan), against its memory."""
  from sasa_jax import train  # noqa: PLC0415
  from sasa_jax.tools import step_memory  # noqa: PLC0415
  compiler = step_memory.COMPILERS[kind]
  if name not in compiler.TARGETS:
    return [f"  memory: not planned for {kind.upper()} {name} (tools/{kind}_compile knows "
            f"{', '.join(compiler.TARGETS)})"], False
  if not compiler.available():
    return [f"  memory: not planned ({compiler.NOT_INSTALLED})"], False
  device = compiler.device(name)
  limit = compiler.memory_bytes(name)
  (row,) = step_memory.plan_rows(config, devices, [config.num_microbatches], limit, device)
  what = f"{device.device_kind} chip" if kind == "tpu" else device.device_kind
  if "skipped" in row:
    return [f"  memory: the step on a {what} {row['skipped']}",
            f"  {train.memory_advice(config, devices, row['skipped'])}"], True
  of = (f"of its {limit / 2**20:,.0f}" if kind == "tpu" else
        f"of the {limit / 2**20:,.0f} MiB that jax's allocator takes on it")
  lines = [f"  memory: {row['total_mib']:,.0f} MiB per {what} {of} (state "
           f"{row['state_mib']:,.0f}, temporaries {row['temp_mib']:,.0f}; "
           f"XLA:{kind.upper()}'s plan)"]
  if not row["fits"]:
    lines.append(f"  {train.out_of_memory_advice(config, devices, sys.argv)}")
  return lines, not row["fits"]


def workdir_lines(config, workdir) -> list[str]:
  from sasa_jax.checkpoint_match import config_differences  # noqa: PLC0415
  from sasa_jax.tools import status  # noqa: PLC0415
  if not (workdir / "config.json").exists():
    return [f"  workdir {workdir}: new"]
  changes = config_differences(workdir / "config.json", config)
  return ([f"  workdir {workdir}: a run's; this start resumes it"]
          + ["  " + line for line in status.report(workdir)]
          + [f"  config fields this start changes: {', '.join(changes) or 'none'}"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import jax  # noqa: PLC0415

  from sasa_jax import train  # noqa: PLC0415
  from sasa_jax.tools import step_memory  # noqa: PLC0415
  try:
    target = step_memory.planned_device(FLAGS)
  except ValueError as e:
    raise app.UsageError(str(e), exitcode=FAILED) from e
  config = FLAGS.config
  devices = FLAGS.devices or jax.device_count()
  print(f"preflight: {' '.join(a for a in sys.argv[1:] if a.startswith('--config'))} on "
        f"{devices} device(s)", flush=True)
  try:
    plan = train.plan_run(config, FLAGS.workdir, devices)
  except (ValueError, FileNotFoundError) as e:
    print(f"preflight: FAILED: {e}", file=sys.stderr)
    sys.exit(FAILED)
  lines = describe(config, plan, devices)
  if target:
    memory, failed = memory_lines(config, devices, *target)
    if failed:
      print("\n".join(lines + memory) + "\npreflight: FAILED: the step does not fit",
            file=sys.stderr)
      sys.exit(FAILED)
    lines += memory
  print("\n".join(lines + workdir_lines(config, plan.workdir)) + "\npreflight: OK",
        flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
