"""launch/gpu_slurm.sh on a real single-node SLURM cluster (tests/slurm_cluster.py): two fake
GPUs, the ranks training on the CPU (one CPU device per GPU of a task)."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers, slurm_cluster
from tests.conftest import require

FMNIST = f"configs/fashion_mnist.py:{helpers.TINY_MODEL}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  require(slurm_cluster.unavailable_reason())
  c = slurm_cluster.start(str(tmp_path_factory.mktemp("slurm")))
  yield c
  c.stop()


def _submit(cluster, workdir, data_dir, steps, *, per_gpu, ckpt_every=1000, job_name="sasa",
            gpus=slurm_cluster.GPUS, extra_flags=(), eval_every=1000, output=None, **environ):
  """Submits through launch/gpu_slurm.sh with `environ` added to its environment (its
  preflight check off unless PREFLIGHT=1 is given); job_name None: the launcher's own name;
  output: a list the launcher's stdout is appended to."""
  env = helpers.env()
  env["XLA_FLAGS"] = env["LOCAL_XLA_FLAGS"]  # device counts come from the task's GPUs
  env.update(cluster.env, NODES="1", GPUS_PER_NODE=str(gpus),
             WORKDIR=str(workdir), TFDS_DATA_DIR=data_dir, PYTHON=sys.executable,
             CPUS_PER_TASK="1", MEM="1024",
             **({"JOB_NAME": job_name} if job_name else {}), **{"PREFLIGHT": "0", **environ})
  flags = helpers.tiny_flags(data_dir, steps, batch=12, ckpt_every=ckpt_every,
                             eval_every=eval_every) + list(extra_flags)
  flags = [f for f in flags if not f.startswith("--config.dataset.data_dir")]  # TFDS_DATA_DIR
  proc = subprocess.run([os.path.join(helpers.ROOT, "launch", "gpu_slurm.sh"),
                         *(["--per-gpu"] if per_gpu else []), f"--config={FMNIST}", *flags],
                        cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr
  if output is not None:
    output.append(proc.stdout)
  return re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)


def _rank_logs(logdir, job, name="sasa"):
  logs = {}
  for file in sorted(os.listdir(logdir)):
    m = re.fullmatch(rf"{name}_{job}_rank(\d+)\.log", file)
    if m:
      logs[int(m.group(1))] = (logdir / file).read_text()
  return logs


def _wait_for_training(logdir, job, ranks, cluster, steps=2, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    logs = _rank_logs(logdir, job)
    if len(logs) == ranks and all(len(re.findall(r"train/loss=", t)) >= steps
                                  for t in logs.values()):
      return logs
    assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), cluster.job(job)
    time.sleep(0.5)
  raise AssertionError(f"no progress: {_rank_logs(logdir, job)}")


def _finals(logs):
  return {r: re.findall(r"final parameters at step (\d+): sha256 (\w+)", t) for r, t in logs.items()}


def test_scancel_term_and_term_to_ranks_at_different_moments_save_one_step(
    cluster, fmnist_dir, tmp_path):
  # One rank per node uses every GPU of the node; scancel --signal=TERM reaches it.
  job = _submit(cluster, tmp_path / "a", fmnist_dir, 100_000, per_gpu=False)
  logs = _wait_for_training(tmp_path / "a" / "logs", job, 1, cluster)
  assert list(logs) == [0] and "2 local / 2 global devices" in logs[0]
  cluster.run("scancel", "--signal=TERM", job)
  assert cluster.wait_for(job)["JobState"] == "COMPLETED"
  saved = re.findall(r"preempted: checkpoint at step (\d+)",
                     _rank_logs(tmp_path / "a" / "logs", job)[0])
  assert len(saved) == 1 and helpers.restore_params(tmp_path / "a")[0] == int(saved[0])

  # Two ranks per node, TERM to each at a different moment: both save the same step.

  job = _submit(cluster, tmp_path / "b", fmnist_dir, 100_000, per_gpu=True)
  logs = _wait_for_training(tmp_path / "b" / "logs", job, 2, cluster)
  pids = {r: int(re.search(r"\(pid (\d+)\)", t).group(1)) for r, t in logs.items()}
  os.kill(pids[1], signal.SIGTERM)
  # Less than a step later. The ranks agree, save and exit 0.3-0.7 s after the first notice
  # on this machine; rank 0 gone already is no failure (the asserts below still hold).
  time.sleep(0.2)
  with contextlib.suppress(ProcessLookupError):
    os.kill(pids[0], signal.SIGTERM)
  assert cluster.wait_for(job)["JobState"] == "COMPLETED"
  logs = _rank_logs(tmp_path / "b" / "logs", job)
  steps = {r: re.findall(r"preempted: checkpoint at step (\d+)", t) for r, t in logs.items()}
  assert steps[0] == steps[1] and len(steps[0]) == 1, logs
  assert helpers.restore_params(tmp_path / "b")[0] == int(steps[0][0])


def test_time_limit_saves_requeues_and_resumes_to_the_end(cluster, fmnist_dir, tmp_path):
  """SLURM's time-limit signal: both ranks save one step, the job requeues and the ranks
  resume there and train to the end. Enough steps that the signal's path (batch script, then
  TERM to the ranks: about 2 s) cannot outlast the run at the tiny model's 10 steps/s."""
  total = 120
  job = _submit(cluster, tmp_path, fmnist_dir, total, per_gpu=True)
  _wait_for_training(tmp_path / "logs", job, 2, cluster)
  # What SLURM does TIME_WARNING seconds before the limit (--signal=B:USR1@...).
  cluster.run("scancel", "--batch", "--signal=USR1", job)
  deadline = time.time() + 300
  while cluster.job(job).get("Restarts", "0") == "0":
    assert time.time() < deadline, cluster.job(job)
    time.sleep(1)
  info = cluster.wait_for(job, timeout=600)
  logs = _rank_logs(tmp_path / "logs", job)
  assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, logs)
  assert set(logs) == {0, 1}  # one task per GPU, each line labelled with its rank
  assert all(line.startswith(f"{r}: ") for r, t in logs.items() for line in t.splitlines())
  assert all("start-up slurm: process" in t and "of 2" in t and "1 local / 2 global devices" in t
             for t in logs.values())
  for text in logs.values():  # one log per rank, both runs appended
    saved = re.findall(r"preempted: checkpoint at step (\d+)", text)
    assert len(saved) == 1 and f"resumed from {tmp_path}/checkpoints at step {saved[0]}" in text
  finals = _finals(logs)
  assert finals[0][-1] == finals[1][-1] and finals[0][-1][0] == str(total)
  batch = (tmp_path / "logs" / f"sasa_{job}.batch.log").read_text()
  assert "time limit near" in batch and batch.count(f"job {job} starts") == 2


def test_a_second_job_for_one_workdir_waits_for_the_first(cluster, fmnist_dir, tmp_path):
  """The same submission twice (one GPU each, so that both would fit on the node's two): the
  launcher names both jobs after the workdir and SLURM runs one of that name at a time. The
  second waits (Reason=Dependency) while the first trains, then resumes at its last step."""
  workdir = tmp_path / "r50"
  first = _submit(cluster, workdir, fmnist_dir, 12, per_gpu=False, job_name=None, gpus=1)
  second = _submit(cluster, workdir, fmnist_dir, 12, per_gpu=False, job_name=None, gpus=1)
  name = cluster.job(first)["JobName"]
  assert re.fullmatch(r"sasa_r50_[0-9a-f]{6}", name) and cluster.job(second)["JobName"] == name
  deadline, seen_waiting = time.time() + 300, False
  while cluster.job(first).get("JobState") != "COMPLETED":
    assert time.time() < deadline, cluster.job(first)
    if cluster.job(first).get("JobState") == "RUNNING":
      waiting = cluster.job(second)
      assert waiting["JobState"] == "PENDING", waiting  # never both at once
      seen_waiting |= waiting["Reason"] == "Dependency"
    time.sleep(0.5)
  assert seen_waiting
  assert cluster.wait_for(second)["JobState"] == "COMPLETED"
  (log,) = _rank_logs(workdir / "logs", second, name).values()
  assert f"resumed from {workdir}/checkpoints at step 12" in log
  assert "nothing to train" in log


def test_a_hung_run_starts_again_in_its_allocation_and_finishes(cluster, fmnist_dir, tmp_path):
  """Both ranks read their evaluation data from a named pipe nobody writes (reading blocks,
  as on a hung NFS mount) at step 3: hang_timeout_s later both exit 75 and the batch script
  starts them again in the same allocation (HANG_RESTARTS=1). Meanwhile the mount "recovers"
  (the pipe is replaced by the real file): the second attempt resumes from the checkpoint of
  step 2 and the job completes, with no requeue."""
  data = tmp_path / "tfds"
  recover = helpers.hanging_copy(fmnist_dir, data)
  workdir = tmp_path / "run"
  job = _submit(cluster, workdir, str(data), 6, per_gpu=True, ckpt_every=2, eval_every=3,
                extra_flags=["--config.hang_timeout_s=20"], HANG_RESTARTS="1")
  batch = workdir / "logs" / f"sasa_{job}.batch.log"
  deadline = time.time() + 300
  while not (batch.exists() and "the run hung: starting it again" in batch.read_text()):
    assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), (
        cluster.job(job), _rank_logs(workdir / "logs", job))
    time.sleep(0.5)
  recover()
  info = cluster.wait_for(job, timeout=300)
  logs = _rank_logs(workdir / "logs", job)
  assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, logs)
  text = batch.read_text()
  assert re.search(r"ranks exited with status 75\n.* the run hung: starting it again \(1 of 1\), "
                   r"from its last checkpoint\n(.*\n)*.* ranks exited with status 0", text), text
  assert any(re.search(r"no progress for \d+ s since step 3 \(config.hang_timeout_s=20\)", t)
             for t in logs.values()), logs
  for t in logs.values():
    assert f"resumed from {workdir}/checkpoints at step 2" in t
  finals = _finals(logs)
  assert finals[0][-1] == finals[1][-1] and finals[0][-1][0] == "6"


def test_workdir_and_data_on_object_storage_logs_on_a_shared_directory(cluster, gcs, tmp_path):
  """WORKDIR and TFDS_DATA_DIR on gs:// (the GCS API emulator, its address in the submitting
  environment, which sbatch passes on), the logs in LOGDIR: both ranks train, write their
  parts of each checkpoint there and end at one set of parameters. GPU_TYPE=h100: the
  preflight check planned the step's memory on an H100 (jax's CUDA plugin, where installed)."""
  from sasa_jax.tools import gpu_compile  # noqa: PLC0415
  logdir, output = tmp_path / "logs", []
  job = _submit(cluster, "gs://sasa/slurm", "gs://sasa/tfds", 4, per_gpu=True, ckpt_every=2,
                LOGDIR=str(logdir), PREFLIGHT="1", GPU_TYPE="h100", output=output, **gcs.env)
  # The launcher's preflight check read the data and the workdir there before submitting.
  memory = (r"  memory: [\d,.]+ MiB per NVIDIA H100 80GB HBM3 of the 60,746 MiB .*\n"
            if gpu_compile.available() else r"  memory: not planned .*\n")
  assert re.search(r"  batch: 12 = 6 per device on 2 device\(s\)\n  data: fashion_mnist in "
                   r"gs://sasa/tfds/fashion_mnist/3.0.1: train\[:256\] 256 examples, "
                   r"test\[:100\] 100\n  steps: 4 .*\n" + memory +
                   r"  workdir gs://sasa/slurm: new\npreflight: OK\n", output[0]), output[0]
  info = cluster.wait_for(job, timeout=600)
  logs = _rank_logs(logdir, job)
  assert info["JobState"] == "COMPLETED", (info, logs)
  finals = _finals(logs)
  assert set(finals) == {0, 1} and finals[0] == finals[1] and finals[0][-1][0] == "4"
  saved = gcs.list_objects("sasa", "slurm/checkpoints/")
  assert {name.split("/")[2] for name in saved} - {""} == {"2", "4"}, saved
  assert (logdir / f"sasa_{job}.batch.log").exists()


def test_a_run_that_would_fail_is_not_submitted(cluster, fmnist_dir, tmp_path):
  """The launcher's preflight check: a misspelt flag, or a batch that the job's GPUs do not
  divide, stops it before sbatch (no job, no log directory)."""
  env = dict(helpers.env(), **cluster.env, NODES="1", GPUS_PER_NODE="2", PYTHON=sys.executable,
             WORKDIR=str(tmp_path / "run"), TFDS_DATA_DIR=fmnist_dir, JOB_NAME="never")
  for flag, error in [("--config.model.kernal_size=3", "the config has no field 'kernal_size'"),
                      ("--config.batch_size=13", "config.batch_size=13 must be a positive "
                                                 "multiple of the device count 2")]:
    proc = subprocess.run([os.path.join(helpers.ROOT, "launch", "gpu_slurm.sh"),
                           f"--config={FMNIST}", flag], cwd=helpers.ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert error in proc.stderr and "gpu_slurm.sh: nothing submitted or started" in proc.stderr
  assert "never" not in subprocess.run(["squeue", "-h", "-o", "%j"], env=env, text=True,
                                       capture_output=True).stdout
  assert not (tmp_path / "run").exists()
