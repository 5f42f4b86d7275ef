"""Launchers: dry runs, missing tools, and real multi-process runs on loopback."""
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from tests import helpers

LAUNCH = os.path.join(helpers.ROOT, "launch")
TRICKY = ["--config=configs/imagenet.py:depth=50,variant=full_attention",
          "--config.dataset.train_split=train[:96%]", "--config.dataset.data_dir=/data/with space"]


def script(name, *args, env=None, check=True):
  e = dict(os.environ, **(env or {}))
  proc = subprocess.run([os.path.join(LAUNCH, name), *args], capture_output=True, text=True,
                        env=e, cwd=helpers.ROOT, timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def test_local_dry_run_commands_are_well_formed():
  out = script("local.sh", "3", "--dry-run", "--workdir=/tmp/w", *TRICKY,
               env={"PORT": "4567"}).stdout.splitlines()
  assert len(out) == 3
  for i, line in enumerate(out):
    argv = shlex.split(line)
    assert argv[0] == "env" and f"SASA_PROCESS_ID={i}" in argv
    assert "SASA_NUM_PROCESSES=3" in argv and "SASA_COORDINATOR_ADDRESS=127.0.0.1:4567" in argv
    assert argv[argv.index("-m") + 1] == "sasa_jax.main"
    assert all(flag in argv for flag in TRICKY)  # quoting survives
    assert argv[-4:] == [">", f"/tmp/w/logs/process_{i}.log", "2>&1", "&"]


def test_tpu_dry_run_keeps_quoting():
  env = {"TPU_NAME": "pod", "ZONE": "us-central2-b", "WORKDIR": "gs://b/run",
         "TFDS_DATA_DIR": "gs://b/tfds", "PROJECT": "p"}
  lines = script("tpu_pod.sh", "--create", "--dry-run", *TRICKY, env=env).stdout.splitlines()
  cmds = [shlex.split(line) for line in lines if line.startswith("gcloud ")]
  assert cmds[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--project=p" in cmds[0]
  bash = shlex.split(cmds[-1][-1][len("--command="):])  # bash -c SCRIPT
  assert bash[:2] == ["bash", "-c"]
  argv = shlex.split(bash[2].split(">>")[0].split("nohup setsid")[1])
  assert argv[argv.index("-m") + 1] == "sasa_jax.main"
  assert all(flag in argv for flag in TRICKY)
  assert argv.index(TRICKY[0]) < argv.index("--config.dataset.data_dir=gs://b/tfds")


def test_slurm_dry_run_script():
  env = {"NODES": "2", "GPUS_PER_NODE": "8", "WORKDIR": "/shared/run", "PARTITION": "gpu",
         "TFDS_DATA_DIR": "/data/tfds"}
  out = script("gpu_slurm.sh", "--dry-run", "--per-gpu", *TRICKY, env=env).stdout
  assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=8" in out
  assert "#SBATCH --cpus-per-task=8" in out and "#SBATCH --open-mode=append" in out
  assert "#SBATCH --partition=gpu" in out and "#SBATCH --requeue" in out
  lines = out.replace("\\\n", " ").splitlines()
  srun = shlex.split(next(line for line in lines if line.lstrip().startswith("srun")))
  assert "--output=/shared/run/logs/%x_%j_rank%t.log" in srun and "--label" in srun
  assert all(flag in srun for flag in TRICKY) and "--workdir=/shared/run" in srun
  # TFDS_DATA_DIR after --config: ml_collections rejects --config.X before --config
  assert srun.index(TRICKY[0]) < srun.index("--config.dataset.data_dir=/data/tfds")


def _bin_without_cloud_tools(tmp_path):
  """A PATH directory with only what the scripts need besides gcloud/sbatch."""
  import shutil
  bindir = tmp_path / "bin"
  bindir.mkdir()
  for tool in ("bash", "dirname", "sed", "cat", "mkdir", "env"):
    os.symlink(shutil.which(tool), bindir / tool)
  return str(bindir)


@pytest.mark.parametrize("name,env,missing", [
    ("tpu_pod.sh", {"ZONE": "z", "WORKDIR": "w", "TFDS_DATA_DIR": "d"}, "TPU_NAME"),
    ("tpu_pod.sh", {"TPU_NAME": "t", "ZONE": "z", "WORKDIR": "w", "TFDS_DATA_DIR": "d",
                    "PATH": None}, "gcloud not found"),
    ("gpu_slurm.sh", {"WORKDIR": "w"}, "NODES GPUS_PER_NODE required"),
    ("gpu_slurm.sh", {"NODES": "1", "GPUS_PER_NODE": "1", "WORKDIR": "w",
                      "PATH": None}, "sbatch not found"),
    ("gpu_slurm.sh", {"NODES": "1", "GPUS_PER_NODE": "1", "WORKDIR": "gs://b/r50"},
     "WORKDIR=gs://b/r50 is a URL, and SLURM writes its logs to files: set LOGDIR to a "
     "directory that every node shares (LOGDIR=$HOME/sasa_logs/r50, say)"),
])
def test_missing_variable_or_tool_is_named(name, env, missing, tmp_path):
  if "PATH" in env:
    env = {**env, "PATH": _bin_without_cloud_tools(tmp_path)}
  base = {k: v for k, v in os.environ.items()
          if k not in ("TPU_NAME", "ZONE", "WORKDIR", "TFDS_DATA_DIR", "NODES", "GPUS_PER_NODE",
                       "LOGDIR")}
  proc = subprocess.run(["bash", os.path.join(LAUNCH, name), "--config=configs/imagenet.py"],
                        capture_output=True, text=True, env={**base, **env}, timeout=60)
  assert proc.returncode != 0 and missing in proc.stderr


def test_help_is_the_scripts_whole_header_comment():
  names = sorted(n for n in os.listdir(LAUNCH) if n.endswith(".sh"))
  assert len(names) == 4
  for name in names:
    with open(os.path.join(LAUNCH, name)) as f:
      header = [line[2:].rstrip() for line in f.read().split("\nset -")[0].splitlines()[1:]]
    assert name == "restart_when_hung.sh" or "--dry-run" in "\n".join(header)
    assert script(name, "--help").stdout.splitlines() == header


def test_restart_when_hung_starts_a_hung_run_again_until_it_finishes(fmnist_dir, tmp_path):
  """launch/restart_when_hung.sh (what tpu_pod.sh runs on every worker) around a real run
  whose evaluation data hangs (a named pipe nobody writes) at step 3: it exits 75 and starts
  again; the "mount" recovers meanwhile (the real file replaces the pipe), and the second
  start resumes from step 2 and finishes with status 0."""
  data = tmp_path / "tfds"
  recover = helpers.hanging_copy(fmnist_dir, data)
  workdir = tmp_path / "run"
  flags = helpers.tiny_flags(str(data), 6, ckpt_every=2, eval_every=3) + [
      "--config.hang_timeout_s=20"]
  proc = subprocess.Popen([os.path.join(LAUNCH, "restart_when_hung.sh"), "1",
                           *helpers.main_cmd(f"configs/fashion_mnist.py:{helpers.TINY_MODEL}",
                                             workdir, flags)],
                          cwd=helpers.ROOT, env=helpers.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    restarted = proc.stdout.readline()  # the script's own line, once the run exited 75
    recover()
    _, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert "the run hung (status 75): starting it again (1 of 1)" in restarted, restarted
  assert proc.returncode == 0, stderr[-3000:]
  assert re.search(r"no progress for \d+ s since step 3 \(config.hang_timeout_s=20\)", stderr)
  assert f"resumed from {workdir}/checkpoints at step 2" in stderr
  assert helpers.restore_params(workdir)[0] == 6


def _fingerprints(logdir):
  found = {}
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name)) as f:
      m = re.search(r"process (\d) final parameters at step (\d+): sha256 (\w+)", f.read())
    if m:
      found[int(m.group(1))] = (int(m.group(2)), m.group(3))
  return found


@pytest.mark.parametrize("failing", [0, 1])
def test_a_process_that_raises_stops_every_process_at_once(fmnist_dir, tmp_path, failing):
  """Data staged to each node's own disk, one copy cut short: that process raises at its
  first batch while the other waits for it in the first step's collectives. Left to jax,
  both would wait 5 minutes (the failing one in jax's shutdown barrier) and abort; here both
  exit with status 1 within seconds, the other naming the failed process, its host and its
  error. Process 0 hosts the coordination service, so it is tried as the failing one too."""
  copy = tmp_path / "node_local_tfds"
  shutil.copytree(fmnist_dir, copy)
  (train_file,) = copy.glob("fashion_mnist/*/fashion_mnist-train.tfrecord-*")
  os.truncate(train_file, 10_000)  # a copy interrupted after a dozen images
  flags = helpers.tiny_flags(fmnist_dir, 2)
  cmd = helpers.main_cmd(f"configs/fashion_mnist.py:{helpers.TINY_MODEL}", tmp_path / "run",
                         flags)
  codes, errors = helpers.run_processes(
      lambda i: cmd + [f"--config.dataset.data_dir={copy}"] * (i == failing), 2, timeout=150,
      SASA_HEARTBEAT_TIMEOUT="100")
  both_exited = time.time()
  other = 1 - failing
  assert codes == [1, 1], [e[-3000:] for e in errors]
  # From the failure to both exits (start-up, whose time follows the machine's load, left
  # out): under the heartbeat timeout, so no process waited for it.
  elapsed = both_exited - helpers.logged_at(errors[failing], "failed; stopping every process")
  assert elapsed < 100, elapsed
  assert f"process {failing} failed; stopping every process" in errors[failing]
  assert re.search("DataLossError: .*truncated record", errors[failing])  # the traceback
  assert re.search(rf"process {failing} failed \({re.escape(os.uname().nodename)}: "
                   rf"DataLossError: .*truncated record .*\); process {other} stops too",
                   errors[other]), errors[other][-3000:]
  assert not any("Aborted" in e or "Fatal Python error" in e for e in errors)


def test_a_hung_process_stops_every_process_with_every_threads_stack(fmnist_dir, tmp_path):
  """Process 1's evaluation data on a filesystem that hangs (a named pipe nobody writes:
  reading it blocks, as a read from a hung NFS mount does) while process 0 waits for it in
  the evaluation's collectives. Both are alive and heartbeating, so jax never stops them;
  the watchdog does: config.hang_timeout_s after its last step process 1 shows where each
  thread was and exits 75 (EX_TEMPFAIL: worth starting again), and process 0 (given a longer
  timeout, so that process 1 acts first) exits 75 too, naming process 1's hang."""
  copy = tmp_path / "hung_tfds"
  helpers.hanging_copy(fmnist_dir, copy)
  flags = helpers.tiny_flags(fmnist_dir, 1000, eval_every=3)
  cmd = helpers.main_cmd(f"configs/fashion_mnist.py:{helpers.TINY_MODEL}", tmp_path / "run",
                         flags)
  codes, errors = helpers.run_processes(
      lambda i: cmd + ([f"--config.dataset.data_dir={copy}", "--config.hang_timeout_s=20"]
                       if i == 1 else ["--config.hang_timeout_s=90"]),
      2, timeout=150, SASA_HEARTBEAT_TIMEOUT="100")
  assert codes == [75, 75], [e[-3000:] for e in errors]
  hung = r"no progress for (\d+) s since step 3 \(config.hang_timeout_s=20\): the run is hung"
  waited = re.search(hung, errors[1])
  assert waited and 20 <= int(waited.group(1)) <= 35, errors[1][-3000:]
  # every thread's Python stack: the main thread's waits in the evaluation's input
  assert re.search(r"Thread 0x\w+ \(most recent call first\):\n(  File .*\n)*  File "
                   r'".*/sasa_jax/train.py", line \d+ in evaluate_split', errors[1])
  assert re.search(rf"process 1 failed \({re.escape(os.uname().nodename)}: Hung: {hung}\); "
                   r"process 0 stops too", errors[0]), errors[0][-3000:]
  assert not any("Aborted" in e or "Fatal Python error" in e for e in errors)


def test_a_first_step_that_never_completes_is_a_hang_too(fmnist_dir, tmp_path):
  """Process 1's training data hangs, so it never joins the first step's all-reduce, while
  process 0 has compiled and dispatched that step and waits in it (as NCCL set-up hangs on a
  GPU cluster). Process 0's watchdog (process 1's has a longer timeout), which does not
  time the step's compilation but its execution, stops both."""
  copy = tmp_path / "hung_tfds"
  helpers.hanging_copy(fmnist_dir, copy, split="train")
  cmd = helpers.main_cmd(f"configs/fashion_mnist.py:{helpers.TINY_MODEL}", tmp_path / "run",
                         helpers.tiny_flags(fmnist_dir, 1000))
  codes, errors = helpers.run_processes(
      lambda i: cmd + ([f"--config.dataset.data_dir={copy}", "--config.hang_timeout_s=90"]
                       if i == 1 else ["--config.hang_timeout_s=20"]), 2, timeout=150,
      SASA_HEARTBEAT_TIMEOUT="100")
  assert codes == [75, 75], [e[-3000:] for e in errors]
  hung = r"no progress for \d+ s since step 1 \(config.hang_timeout_s=20\): the run is hung"
  assert re.search(hung, errors[0]), errors[0][-3000:]
  assert re.search(rf"process 0 failed \(.*: Hung: {hung}\); process 1 stops too", errors[1]), (
      errors[1][-3000:])


def test_a_start_that_never_reads_its_first_batch_is_a_hang(fmnist_dir, tmp_path):
  """One process whose training data hangs from the start: before any step, but after
  config.hang_timeout_s of start-up (restoring, reading), it exits 75 with its stack."""
  copy = tmp_path / "hung_tfds"
  helpers.hanging_copy(fmnist_dir, copy, split="train")
  proc = helpers.run_main(f"configs/fashion_mnist.py:{helpers.TINY_MODEL}", tmp_path / "run",
                          helpers.tiny_flags(str(copy), 10) + ["--config.hang_timeout_s=20"],
                          check=False, timeout=120)
  assert proc.returncode == 75, proc.stderr[-3000:]
  assert re.search(r"no progress for \d+ s since start-up \(config.hang_timeout_s=20\): the run "
                   r"is hung", proc.stderr), proc.stderr[-3000:]
  assert re.search(r'File ".*/sasa_jax/train.py", line \d+ in next_batch', proc.stderr)


def test_killed_peer_fails_the_other_then_the_pair_and_one_process_resume(fmnist_dir, tmp_path):
  workdir = tmp_path / "run"
  flags = helpers.tiny_flags(fmnist_dir, 400, ckpt_every=2, eval_every=1000)
  cmd = helpers.main_cmd(f"configs/fashion_mnist.py:{helpers.TINY_MODEL}", workdir, flags)
  port = subprocess.run([helpers.sys.executable, "-c", "import socket; s=socket.socket(); "
                         "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"],
                        capture_output=True, text=True).stdout.strip()
  procs = [subprocess.Popen(cmd, cwd=helpers.ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=helpers.env(
                                devices=2, SASA_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                SASA_NUM_PROCESSES="2", SASA_PROCESS_ID=str(i),
                                SASA_HEARTBEAT_TIMEOUT="10"))
           for i in range(2)]
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 300
  while not (ckpts.exists() and "2" in os.listdir(ckpts)):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGKILL)
  t0 = time.time()
  rc = procs[0].wait(timeout=120)  # bounded: the heartbeat timeout plus shutdown
  assert rc != 0, "the surviving process must fail, not hang or pretend success"
  assert time.time() - t0 < 120
  # local.sh relaunches the pair, which resumes from the last checkpoint both processes wrote.
  resumed_at = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  rows_before = len(helpers.read_metrics(workdir))
  events = lambda: [f for f in os.listdir(workdir) if f.startswith("events.out")]  # noqa: E731
  events_before = len(events())
  relaunch = subprocess.run(
      [os.path.join(LAUNCH, "local.sh"), "2", *cmd[3:-len(flags)],
       *helpers.tiny_flags(fmnist_dir, resumed_at + 2, ckpt_every=2)],
      cwd=helpers.ROOT, env=helpers.env(), capture_output=True, text=True, timeout=600)
  assert relaunch.returncode == 0, relaunch.stderr + relaunch.stdout
  log0 = (workdir / "logs" / "process_0.log").read_text()
  assert f"resumed from {ckpts} at step {resumed_at}" in log0
  prints = _fingerprints(workdir / "logs")
  assert set(prints) == {0, 1} and prints[0] == prints[1] and prints[0][0] == resumed_at + 2
  rows = helpers.read_metrics(workdir)[rows_before:]  # by process 0 alone: one row per step
  assert [r["step"] for r in rows if "train/loss" in r] == [resumed_at + 1, resumed_at + 2]
  (final,) = [r for r in rows if "eval/accuracy" in r]
  assert final["step"] == resumed_at + 2 and final["eval/num_examples"] == 100
  assert len(events()) == events_before + 1  # process 0's alone
  # One process takes over the pair's checkpoint.
  single = helpers.run_main(f"configs/fashion_mnist.py:{helpers.TINY_MODEL}", workdir,
                            helpers.tiny_flags(fmnist_dir, resumed_at + 4, ckpt_every=2,
                                               eval_every=100))
  assert "resumed from" in single.stderr and f"at step {resumed_at + 2}" in single.stderr
  assert helpers.restore_params(workdir)[0] == resumed_at + 4
