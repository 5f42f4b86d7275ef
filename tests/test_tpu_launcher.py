"""launch/tpu_pod.sh: every command it prints through the real gcloud argument parser, and
the whole flow (ship, Python set-up, detached start, status, logs, stop) against a fake
gcloud (tests/fake_gcloud.py) whose 2 workers are process directories on this machine."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests import helpers
from tests.conftest import require, require_compiler

SCRIPT = os.path.join(helpers.ROOT, "launch", "tpu_pod.sh")
FMNIST = f"configs/fashion_mnist.py:{helpers.TINY_MODEL}"
BASE = {"TPU_NAME": "pod", "ZONE": "us-central2-b", "WORKDIR": "gs://b/run",
        "TFDS_DATA_DIR": "gs://b/tfds", "PROJECT": "my-project"}


def _launch(*args, env=None, timeout=120):
  e = {k: v for k, v in os.environ.items() if k not in BASE}
  e.update(env or {})
  return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=e,
                        cwd=helpers.ROOT, timeout=timeout)


def _gcloud_lines(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def test_dry_run_prints_every_command_and_each_parses_in_real_gcloud(tmp_path):
  runs = [_launch("--create", "--dry-run", f"--config={FMNIST}", "--config.seed=3",
                  env={**BASE, "SPOT": "1"}),
          *[_launch(f"--{a}", "--dry-run", env=BASE) for a in ("status", "stop", "check")],
          _launch("--logs", "--worker=3", "--dry-run", env=BASE)]
  for proc in runs:
    assert proc.returncode == 0, proc.stderr
  start = _gcloud_lines(runs[0].stdout)
  verbs = [c[4] for c in start]
  assert verbs == ["create", "scp", "ssh", "ssh"]  # create, ship, set up, start
  assert "--spot" in start[0] and "--accelerator-type=v4-32" in start[0]
  assert "--version=tpu-ubuntu2204-base" in start[0]
  assert all("--worker=all" in c for c in start[1:])
  remote = shlex.split(start[3][-1][len("--command="):])[2]  # bash -c SCRIPT
  assert "nohup setsid" in remote and "--config.seed=3" in remote
  assert "--workdir=gs://b/run" in remote and "--config.dataset.data_dir=gs://b/tfds" in remote
  assert remote.index("--config=") < remote.index("--config.seed")
  assert "every one of the 4 workers of v4-32" in runs[0].stdout
  assert "--worker=3" in _gcloud_lines(runs[-1].stdout)[0]

  require(None if shutil.which("gcloud") else "gcloud (Google Cloud SDK) not installed",
          in_ci=False)
  env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
             CLOUDSDK_CORE_DISABLE_PROMPTS="1")
  commands = [c for proc in runs for c in _gcloud_lines(proc.stdout)]
  assert len(commands) == 8
  for command in commands:
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0  # no credentials here: it fails after parsing
    assert "unrecognized arguments" not in proc.stderr, (command, proc.stderr)
    assert not re.search(r"argument --?\w+", proc.stderr), (command, proc.stderr)
    assert "active account" in proc.stderr or "credential" in proc.stderr.lower(), proc.stderr


@pytest.mark.parametrize("accelerator,runtime,workers,devices", [
    ("v4-32", "tpu-ubuntu2204-base", 4, 16), ("v5litepod-16", "v2-alpha-tpuv5-lite", 4, 16),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1, 8), ("v5p-128", "v2-alpha-tpuv5", 16, 64),
    ("v6e-64", "v2-alpha-tpuv6e", 16, 64), ("v3-128", "tpu-ubuntu2204-base", 16, 128)])
def test_accelerator_defaults_fit_each_generation(accelerator, runtime, workers, devices):
  """Runtime image, hosts and JAX devices (what the preflight check divides the batch by:
  chips, the two TensorCores of a v4 or v5p chip being one device)."""
  proc = _launch("--create", "--dry-run", f"--config={FMNIST}",
                 env={**BASE, "ACCELERATOR_TYPE": accelerator})
  assert f"--version={runtime}" in proc.stdout
  assert (f"every one of the {workers} workers of {accelerator} ({runtime}, {devices} JAX "
          "devices) runs:") in proc.stdout
  override = _launch("--create", "--dry-run", f"--config={FMNIST}",
                     env={**BASE, "ACCELERATOR_TYPE": accelerator, "RUNTIME_VERSION": "mine"})
  assert "--version=mine" in override.stdout


def test_missing_variables_and_unknown_accelerator_are_named():
  proc = _launch(f"--config={FMNIST}", env={"TPU_NAME": "t", "ZONE": "z"})
  assert proc.returncode == 2 and "WORKDIR TFDS_DATA_DIR required" in proc.stderr
  proc = _launch("--status", env={"ZONE": "z"})
  assert proc.returncode == 2 and "TPU_NAME required" in proc.stderr
  proc = _launch("--dry-run", f"--config={FMNIST}", env={**BASE, "ACCELERATOR_TYPE": "v9-8"})
  assert proc.returncode == 2 and "ACCELERATOR_TYPE=v9-8 is not one of" in proc.stderr


def _worker_log(root, i):
  path = root / "pod" / f"worker_{i}" / "sasa_logs" / "train.log"
  return path.read_text() if path.exists() else ""


def _wait(predicate, timeout, what):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, what()
    time.sleep(1)


def _fake_gcloud(tmp_path):
  """(its root, a PATH with tests/fake_gcloud.py as gcloud first)."""
  root = tmp_path / "gcloud"
  bindir = tmp_path / "bin"
  root.mkdir()
  bindir.mkdir()
  (bindir / "gcloud").write_text(
      f"#!/bin/sh\nexec {sys.executable} {helpers.ROOT}/tests/fake_gcloud.py \"$@\"\n")
  (bindir / "gcloud").chmod(0o755)
  return root, f"{bindir}{os.pathsep}{os.environ['PATH']}"


def test_a_run_that_would_fail_creates_and_starts_nothing(fmnist_dir, tmp_path):
  """The preflight check, for the slice's 16 JAX devices (a v4-32: 32 TensorCores, two per
  chip): a batch they do not divide stops the launcher before any gcloud call."""
  root, path = _fake_gcloud(tmp_path)
  env = {**BASE, "WORKDIR": str(tmp_path / "run"), "TFDS_DATA_DIR": fmnist_dir,
         "ACCELERATOR_TYPE": "v4-32", "PYTHON": sys.executable,
         "FAKE_GCLOUD_ROOT": str(root), "PATH": path}
  proc = _launch("--create", f"--config={FMNIST}", "--config.batch_size=24", env=env)
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert ("config.batch_size=24 must be a positive multiple of the device count 16"
          in proc.stderr and "tpu_pod.sh: nothing submitted or started" in proc.stderr)
  assert not (root / "calls.jsonl").exists()


def test_a_step_too_large_for_a_chip_creates_and_starts_nothing(fmnist_dir, tmp_path):
  """The preflight check plans the step on one chip of the slice's generation with libtpu's
  compiler: 8192 images per v5e chip of a wider model need more than its 16 GiB of HBM, and
  the launcher stops before any gcloud call, saying what to change."""
  from sasa_jax.tools import tpu_compile
  require_compiler(tpu_compile)
  root, path = _fake_gcloud(tmp_path)
  env = {**BASE, "WORKDIR": str(tmp_path / "run"), "TFDS_DATA_DIR": fmnist_dir,
         "ACCELERATOR_TYPE": "v5litepod-4", "PYTHON": sys.executable,
         "FAKE_GCLOUD_ROOT": str(root), "PATH": path}
  proc = _launch("--create", f"--config={FMNIST}", "--config.model.width_multiplier=2.0",
                 "--config.batch_size=32768", env=env)
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert ("memory: the step on a TPU v5 lite chip does not compile: RESOURCE_EXHAUSTED: Ran "
          "out of memory on HBM" in proc.stderr), proc.stderr
  assert "--config.num_microbatches=2: the same step" in proc.stderr
  assert "tpu_pod.sh: nothing submitted or started" in proc.stderr
  assert not (root / "calls.jsonl").exists()


def test_whole_flow_on_a_fake_slice(fmnist_dir, tmp_path):
  root, path = _fake_gcloud(tmp_path)
  # The fake workers (each with its own HOME) share the test runner's uv cache, at uv's own
  # default place, as `make install` shares pip's: clones on one machine reuse it.
  uv_cache = os.environ.get("UV_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")), "uv")
  env = helpers.env(FAKE_GCLOUD_ROOT=str(root), FAKE_GCLOUD_WORKERS="2", PIP_EXTRAS="",
                    UV_CACHE_DIR=uv_cache,
                    TPU_NAME="pod", ZONE="z", WORKDIR=str(tmp_path / "run"),
                    TFDS_DATA_DIR=fmnist_dir, SASA_HEARTBEAT_TIMEOUT="30",
                    PYTHON=sys.executable)
  env["PATH"] = path
  flags = [f for f in helpers.tiny_flags(fmnist_dir, 4) if "data_dir" not in f]

  first = _launch("--create", f"--config={FMNIST}", *flags, env=env, timeout=900)
  assert first.returncode == 0, first.stdout + first.stderr
  assert "batch: 16 = 1 per device on 16 device(s)\n" in first.stdout  # v4-32: 16 chips
  assert "preflight: OK\n" in first.stdout
  from sasa_jax.tools import tpu_compile
  assert re.search(r"\n  memory: [\d,]+ MiB per TPU v4 chip of its 32,768 \(state " if
                   tpu_compile.available() else "\n  memory: not planned", first.stdout)
  assert first.stdout.count("code and Python ready (Python 3.11") == 2
  calls = [json.loads(line)[3] for line in (root / "calls.jsonl").read_text().splitlines()]
  assert calls == ["create", "scp", "ssh", "ssh"]
  home = root / "pod" / "worker_1"
  assert (home / "sasa_jax" / "setup.py").exists() and not (home / "sasa_jax" / ".venv").exists()
  finals = lambda: [re.findall(r"final parameters at step (\d+): sha256 (\w+)",  # noqa: E731
                               _worker_log(root, i)) for i in range(2)]
  _wait(lambda: all(finals()), 600, lambda: [_worker_log(root, i)[-2000:] for i in range(2)])
  assert finals()[0] == finals()[1] and finals()[0][0][0] == "4"
  _wait(lambda: _launch("--status", env=env).stdout.count("not running") == 2, 120,
        lambda: _launch("--status", env=env).stdout)

  # A second start replaces the shipped code; --stop saves one agreed step on every worker.
  # (The preflight check ran above; the later starts skip it.)
  env["PREFLIGHT"] = "0"
  flags = [f for f in helpers.tiny_flags(fmnist_dir, 100_000, ckpt_every=100_000)
           if "data_dir" not in f]
  second = _launch(f"--config={FMNIST}", *flags, env={**env, "WORKDIR": str(tmp_path / "b")},
                   timeout=900)
  assert second.returncode == 0, second.stdout + second.stderr
  assert (home / "sasa_jax.prev" / "setup.py").exists()
  assert not (home / "sasa_jax" / "sasa_jax.prev").exists()
  _wait(lambda: all(_worker_log(root, i).count("train/loss=") >= 6 for i in range(2)), 300,
        lambda: [_worker_log(root, i)[-2000:] for i in range(2)])
  assert _launch("--status", env=env).stdout.count(": running (pid") == 2
  again = _launch(f"--config={FMNIST}", *flags, env=env)
  assert again.returncode != 0 and "a run is going" in again.stdout
  stop = _launch("--stop", env=env, timeout=300)
  assert stop.returncode == 0 and stop.stdout.count(": stopped") == 2, stop.stdout
  saved = [re.findall(r"preempted: checkpoint at step (\d+)", _worker_log(root, i))
           for i in range(2)]
  assert saved[0] == saved[1] and len(saved[0]) == 1
  logs = _launch("--logs", "--worker=1", env=env)
  assert "preempted: checkpoint at step" in logs.stdout
