"""One run per workdir (sasa_jax/workdir_lease.py), with real training processes."""
import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests import helpers

FMNIST = f"configs/fashion_mnist.py:{helpers.TINY_MODEL}"
LEASE_S = 6


def _flags(fmnist_dir, steps, **kw):
  return helpers.tiny_flags(fmnist_dir, steps, **kw) + [f"--config.workdir_lease_s={LEASE_S}"]


def _start(workdir, flags, processes=1):
  """A training run of `processes` processes in the background, once it has trained a step;
  the list of processes, process 0 first."""
  port = helpers.free_port()
  joined = lambda i: dict(SASA_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",  # noqa: E731
                          SASA_NUM_PROCESSES=str(processes), SASA_PROCESS_ID=str(i))
  procs = [subprocess.Popen(helpers.main_cmd(FMNIST, workdir, flags), cwd=helpers.ROOT,
                            env=helpers.env(**(joined(i) if processes > 1 else {})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  deadline = time.time() + 300
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and '"train/loss"' in metrics.read_text()):
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      for p in procs:
        p.kill()
      raise AssertionError([p.stderr.read()[-3000:] for p in procs])
    time.sleep(0.1)
  return procs


def _status(workdir):
  return helpers.run_module("sasa_jax.tools.status", [str(workdir)]).stdout


def _lease(workdir):
  return json.loads((workdir / "lease.json").read_text())


def test_a_second_run_stops_naming_the_first_which_trains_on_and_releases_the_workdir(
    fmnist_dir, tmp_path):
  """The launch command run again on a workdir in use, as two processes (a slice's workers):
  both exit 1 within seconds, process 0 naming the run that holds the workdir; that run is
  untouched. Stopped with SIGTERM, it saves and releases the workdir, and the next start
  resumes from its checkpoint without waiting."""
  workdir = tmp_path / "run"
  (first,) = _start(workdir, _flags(fmnist_dir, 100_000, log_every=5))
  try:
    held = _lease(workdir)
    assert held["pid"] == first.pid and held["host"] == os.uname().nodename
    codes, errors = helpers.run_processes(
        lambda i: helpers.main_cmd(FMNIST, workdir, _flags(fmnist_dir, 100_000)), 2,
        timeout=150, SASA_HEARTBEAT_TIMEOUT="100")
    both_exited = time.time()
    assert codes == [1, 1], [e[-3000:] for e in errors]
    # From process 0 starting to watch the lease (after start-up, whose time follows the
    # machine's load) to both exits: one renewal seen, process 1 stopped well before the
    # 100 s heartbeat timeout would have stopped it.
    assert both_exited - helpers.logged_at(errors[0], "watching it for") < 60
    assert re.search(rf"WorkdirInUseError: the workdir {workdir} is in use by run "
                     rf"{held['run']} on host {held['host']} \(pid {first.pid}\)", errors[0])
    assert "process 0 failed" in errors[1] and "WorkdirInUseError" in errors[1]
    assert first.poll() is None and _lease(workdir)["run"] == held["run"]
    assert _lease(workdir)["renewals"] > held["renewals"]
    status = _status(workdir)
    assert re.search(rf"^  running: run {held['run']} on host {held['host']} \(pid {first.pid}\)",
                     status, re.M), status
    assert re.search(r"^  step [\d,]+ of 100,000 \(\d+\.\d%\): train/loss [\d.]+, [\d.]+ steps/s "
                     r"\([\d,]+ images/s, [\d,]+ per device\), \d+ (s|min|h \d+ min) left at "
                     r"that speed$", status, re.M), status
  finally:
    first.send_signal(signal.SIGTERM)
    stderr = first.communicate(timeout=120)[1]
  assert first.returncode == 0, stderr[-3000:]
  saved = int(re.search(r"preempted: checkpoint at step (\d+) written", stderr).group(1))
  assert not (workdir / "lease.json").exists()
  status = _status(workdir)
  assert "  not running (no run holds the workdir)" in status
  assert re.search(rf"^  checkpoints: .*{saved:,}$", status, re.M), status
  assert "1 start(s); the last at" in status
  resumed = helpers.run_main(FMNIST, workdir, _flags(fmnist_dir, saved + 1))
  assert f"at step {saved}" in resumed.stderr and "lease.json" not in resumed.stderr
  assert not (workdir / "lease.json").exists()


@pytest.mark.parametrize("holder", ["killed_here", "silent_elsewhere"])
def test_the_lease_of_a_run_that_is_gone_is_taken_over(fmnist_dir, tmp_path, holder):
  """killed_here: a run killed with SIGKILL on this host (its lease stays): taken over at once,
  since its process is not running. silent_elsewhere: the lease of a run on another host,
  renewed just now by the clock but never again (a VM that was deleted): taken over after
  config.workdir_lease_s seconds without a renewal."""
  workdir = tmp_path / "run"
  if holder == "killed_here":
    (gone,) = _start(workdir, _flags(fmnist_dir, 100_000))
    gone.kill()
    gone.communicate()
    held = _lease(workdir)
  else:
    workdir.mkdir()
    held = {"run": "0123456789ab", "host": "worker-elsewhere", "pid": 4242,
            "slurm_job_id": None, "started": "2026-12-05T10:00:00+00:00",
            "renewed": time.time(), "renewals": 3}
    (workdir / "lease.json").write_text(json.dumps(held))
  t0 = time.time()
  run = helpers.run_main(FMNIST, workdir, _flags(fmnist_dir, 2))
  took = time.time() - t0
  if holder == "killed_here":
    assert (f"taking over {workdir}/lease.json from run {held['run']}" in run.stderr
            and f"its process {held['pid']} is not running on this host" in run.stderr)
    assert "watching it" not in run.stderr
  else:
    assert f"names run {held['run']} on host worker-elsewhere (pid 4242)" in run.stderr
    assert f"was not renewed for {LEASE_S} s: its run is gone; taking over" in run.stderr
    assert took > LEASE_S
  assert helpers.restore_params(workdir)[0] == 2
  assert not (workdir / "lease.json").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_whose_workdir_is_taken_over_stops_without_writing_to_it_again(
    fmnist_dir, tmp_path, processes):
  """Another run's lease written over this run's (as when this run stalled past
  config.workdir_lease_s and was taken over): at its next renewal process 0 sees it and
  stops before its next step, with every other process; nothing more is saved and the other
  run's lease stays in place."""
  workdir = tmp_path / "run"
  procs = _start(workdir, _flags(fmnist_dir, 100_000, ckpt_every=3), processes)
  other = dict(_lease(workdir), run="fedcba987654", host="worker-elsewhere", pid=4242,
               renewed=time.time(), renewals=0)
  (workdir / "lease.json").write_text(json.dumps(other))
  taken_over = time.time()
  try:
    errors = [p.communicate(timeout=60)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [1] * processes, [e[-3000:] for e in errors]
  lost = (r"WorkdirLeaseLostError: .*lease.json now names run fedcba987654 on host "
          r"worker-elsewhere \(pid 4242\)")
  assert re.search(lost, errors[0]), errors[0][-3000:]
  if processes == 2:
    assert re.search(r"process 0 failed \(.*: " + lost, errors[1]), errors[1][-3000:]
  assert _lease(workdir) == other
  saved = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert all(p.stat().st_mtime < taken_over + LEASE_S / 6 + 5 for p in saved)


@pytest.mark.parametrize("holder,gone", [
    (dict(host="elsewhere", pid=1, slurm_job_id="77", slurm_restart_count="0"),
     "it belongs to start 0 of this SLURM job (77), requeued since"),
    (dict(host="elsewhere", pid=1, slurm_job_id="77", slurm_restart_count="1"), None),
    (dict(host="elsewhere", pid=1, slurm_job_id="78", slurm_restart_count="0"), None),
    (dict(host="elsewhere", pid=1, renewed_ago=LEASE_S + 200), "it was last renewed 20"),
    (dict(host="here", pid="this process's"), "its process {pid} is not running"),
], ids=["earlier_start_of_this_job", "this_start_of_this_job", "another_job", "long_silent",
        "this_process"])
def test_which_holders_are_gone_for_sure(tmp_path, monkeypatch, holder, gone):
  """This process is start 1 of SLURM job 77 on host "here": a lease of start 0 of that job is
  a requeued job's (taken over at once); one of start 1 is a second job step of this very
  start, running beside it, and one of another job may be running: both are watched."""
  from sasa_jax import workdir_lease
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
  monkeypatch.setattr(workdir_lease.socket, "gethostname", lambda: "here")
  lease = workdir_lease.WorkdirLease(tmp_path, LEASE_S)
  held = dict(holder, renewed=time.time() - holder.pop("renewed_ago", 0))
  if held["pid"] == "this process's":  # a lease of this process (an earlier run in it)
    held["pid"], gone = os.getpid(), gone.format(pid=os.getpid())
  reason = lease._gone(held)  # pylint: disable=protected-access
  if gone is None:
    assert reason is None, reason
  else:
    assert reason and reason.startswith(gone), reason
