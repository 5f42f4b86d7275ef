"""Shared test helpers: tiny training runs through the real command line."""
import datetime
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as inet

from tests import preloaded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = "depth=14,width_multiplier=0.125,num_heads=2,kernel_size=3"


def doc_example(page: str, marker: str) -> str:
  """The ```python block right after `<!-- marker -->` in docs/`page`, its indent (a list
  item's) removed: tests run the documented code itself, so that the page stays true."""
  text = (pathlib.Path(ROOT) / "docs" / page).read_text()
  match = re.search(rf"<!-- {re.escape(marker)} -->\n( *)```python\n(.*?)\n\1```", text, re.S)
  assert match, f"docs/{page} has no '{marker}' example"
  return textwrap.dedent(match.group(2))


def tiny_flags(data_dir, steps, *, batch=16, ckpt_every=1000, log_every=1, eval_every=1000,
               train_split="train[:256]", eval_split="test[:100]"):
  return [f"--config.dataset.data_dir={data_dir}", f"--config.dataset.train_split={train_split}",
          f"--config.dataset.eval_split={eval_split}", f"--config.batch_size={batch}",
          f"--config.num_train_steps={steps}", f"--config.checkpoint_every_steps={ckpt_every}",
          f"--config.log_every_steps={log_every}", f"--config.eval_every_steps={eval_every}",
          "--config.dataset.shuffle_buffer=256"]


def main_cmd(config_arg, workdir, flags):
  return [sys.executable, "-m", "sasa_jax.main", f"--config={config_arg}",
          f"--workdir={workdir}", *flags]


def env(devices=1, **extra):
  e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
           **extra)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  e["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])
  e["LOCAL_XLA_FLAGS"] = " ".join(flags)  # launch/local.sh sets its own device count
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  return e


def run_module(module, args, *, environ=None, check=True, timeout=600):
  """`python -m module *args` in ROOT with `environ` (default: env()), in a process forked
  with the heavy imports done (tests/preloaded.py); a subprocess.CompletedProcess."""
  proc = preloaded.run_module(module, args, env=env() if environ is None else environ,
                              cwd=ROOT, timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
  return proc


def run_python(code, *, devices=1, timeout=600):
  """`python -c code` in ROOT with env(devices), in a fresh process (none of the test
  process's imports or settings carried over); a subprocess.CompletedProcess that exited 0."""
  proc = subprocess.run([sys.executable, "-c", code], env=env(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
  return proc


def run_main(config_arg, workdir, flags, devices=1, check=True, timeout=600,
             env_overrides=None):
  """Runs sasa_jax.main; env_overrides: variables to set (None: remove)."""
  e = env(devices)
  for k, v in (env_overrides or {}).items():
    e.pop(k, None) if v is None else e.__setitem__(k, v)
  return run_module("sasa_jax.main", main_cmd(config_arg, workdir, flags)[3:], environ=e,
                    check=check, timeout=timeout)


def hanging_copy(data_dir, dest, split="test"):
  """A copy at `dest` of the TFDS data_dir `data_dir` whose fashion_mnist `split` file is a
  named pipe nobody writes: reading it blocks, as a read from a hung NFS mount does. Returns
  recover(), which puts the real file in the pipe's place."""
  shutil.copytree(data_dir, dest)
  (file,) = pathlib.Path(dest).glob(f"fashion_mnist/*/fashion_mnist-{split}.tfrecord-*")
  real = file.with_name("real")
  file.rename(real)
  os.mkfifo(file)
  return lambda: os.replace(real, file)


def free_port() -> int:
  """A TCP port on loopback that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(argv_of, n, *, timeout, **environ):
  """n JAX processes on loopback, one simulated device each, joined through the SASA_*
  start-up variables; argv_of(i): process i's command. Waits for all of them (killing what
  is left after `timeout` seconds); returns their exit codes and stderr texts."""
  port = free_port()
  procs = [subprocess.Popen(
      argv_of(i), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env(1, SASA_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SASA_NUM_PROCESSES=str(n),
              SASA_PROCESS_ID=str(i), **environ)) for i in range(n)]
  try:
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [p.returncode for p in procs], errors


def logged_at(stderr, message):
  """time.time() of the first absl log line holding `message` (its header, e.g.
  "W1207 18:24:12.494691", holds the local date and time of day, without the year)."""
  header = re.search(rf"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) .*{re.escape(message)}",
                     stderr, re.M)
  assert header, f"no log line with {message!r} in: {stderr[-3000:]}"
  month, day, hour, minute = map(int, header.groups()[:4])
  now = datetime.datetime.now()
  at = now.replace(month=month, day=day, hour=hour, minute=minute, second=0, microsecond=0)
  if at > now:  # logged on the 31st of December, read on the 1st of January
    at = at.replace(year=at.year - 1)
  return at.timestamp() + float(header.group(5))


def read_metrics(workdir):
  from sasa_jax.tools.runs import read_metrics as read
  return read(workdir)


def restore_params(workdir, step=None):
  """The parameters of checkpoint `step` (default: latest) as numpy, keyed by path."""
  import jax
  from sasa_jax.tools.runs import restore_state
  step, state = restore_state(workdir, step)
  flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


class FakeImagenet(inet.Builder, skip_registration=True):
  """imagenet2012 with a few random JPEGs of random sizes: real pipeline, fake pixels."""
  name = "imagenet2012"

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(24, 0), "validation": self._generate_examples(10, 1)}

  def _generate_examples(self, n, seed):  # pylint: disable=arguments-differ
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = rng.integers(40, 90, size=2)
      pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
      yield i, {"image": tf.io.encode_jpeg(pixels).numpy(), "label": int(rng.integers(1000)),
                "file_name": f"fake_{seed}_{i}.JPEG"}


def prepare_fake_imagenet(data_dir, num_shards=None):
  builder = FakeImagenet(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=data_dir, num_shards=num_shards))
  return builder


def prepare_fake_coco(data_dir):
  """coco/2017 with a few random JPEGs of random sizes and random boxes: TFDS's own coco
  builder and features, fake pixels."""
  from tensorflow_datasets.object_detection import coco

  class FakeCoco(coco.Coco, skip_registration=True):
    name = "coco"

    def _split_generators(self, dl_manager):
      return {"train": self._fake(12, 0), "validation": self._fake(7, 1)}

    def _fake(self, n, seed):
      import tensorflow as tf
      rng = np.random.default_rng(seed)
      for i in range(n):
        h, w = (int(v) for v in rng.integers(50, 120, size=2))
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        objects = []
        for j in range(int(rng.integers(1, 4))):
          y0, x0 = rng.uniform(0, 0.6, 2)
          y1, x1 = y0 + rng.uniform(0.1, 0.4), x0 + rng.uniform(0.1, 0.4)
          objects.append({"id": 100 * i + j, "area": int((y1 - y0) * (x1 - x0) * h * w),
                          "bbox": tfds.features.BBox(y0, x0, y1, x1),
                          "label": int(rng.integers(80)), "is_crowd": j == 2})
        image_id = 1000 * seed + i + 1
        yield image_id, {"image": tf.io.encode_jpeg(pixels).numpy(),
                         "image/filename": f"{image_id}.jpg", "image/id": image_id,
                         "objects": objects}

  builder = FakeCoco(config="2017", data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def mesh_step(kind: str, name: str, topology: str) -> dict:
  """tests/mesh_step.py's JSON for the loop's step (TINY_MODEL) on the devices of a described
  TPU slice or GPU cluster, run in its own process (libtpu or the CUDA plugin kept out of
  this one)."""
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_step.py"), kind,
                         name, topology, TINY_MODEL], env=env(), cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])
