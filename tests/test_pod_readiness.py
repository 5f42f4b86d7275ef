"""What a multi-host run needs beyond the loop's basics: start-up on every cluster, per-process
augmentation, per-epoch file order, uint8 transfer, divergence, compilation cache."""
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sasa_jax import distributed, shared_workdir
from sasa_jax.data import input_pipeline, preprocessing
from tests import helpers
from tests.conftest import require

FMNIST = f"configs/fashion_mnist.py:{helpers.TINY_MODEL}"


class _Metadata(http.server.BaseHTTPRequestHandler):
  """A GCE metadata server that knows one attribute (answers 404 to others)."""
  attributes = {}

  def do_GET(self):  # noqa: N802 - the http.server interface
    key = self.path.rsplit("/", 1)[-1]
    ok = self.headers.get("Metadata-Flavor") == "Google" and key in self.attributes
    body = self.attributes.get(key, "not found").encode()
    self.send_response(200 if ok else 404)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def metadata_server():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield server
  server.shutdown()
  server.server_close()


def _plan(env, *, chips=False, metadata=lambda key: None):
  return distributed.plan_startup(env, metadata=metadata, tpu_chips=lambda: chips)


def test_single_process_starts_nothing():
  assert _plan({}).kind == "single"
  assert _plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).kind == "single"
  assert _plan({"TPU_WORKER_HOSTNAMES": "one-host"}).kind == "single"
  assert _plan({}, chips=True, metadata=lambda key: "10.0.0.2").kind == "single"  # 1 worker


def test_explicit_variables():
  plan = _plan({"SASA_NUM_PROCESSES": "4", "SASA_COORDINATOR_ADDRESS": "h:1234",
                "SASA_PROCESS_ID": "3", "SASA_HEARTBEAT_TIMEOUT": "30",
                "SASA_STARTUP_TIMEOUT": "600"})
  assert plan.kind == "explicit" and plan.kwargs == dict(
      coordinator_address="h:1234", num_processes=4, process_id=3, heartbeat_timeout_seconds=30,
      initialization_timeout=600)
  with pytest.raises(ValueError, match="SASA_NUM_PROCESSES=2 needs SASA_PROCESS_ID"):
    _plan({"SASA_NUM_PROCESSES": "2", "SASA_COORDINATOR_ADDRESS": "h:1"})


def test_start_up_goes_around_an_http_proxy_set_for_the_internet():
  """A cluster whose environment sends HTTPS through a proxy (one that refuses everything
  here) and lists no host in no_proxy: the coordination service's gRPC connects to the
  coordinator directly, and both processes start (jax.distributed alone waits for the
  proxy until its start-up timeout)."""
  with socket.socket() as refusing:
    refusing.bind(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{refusing.getsockname()[1]}"
    codes, errors = helpers.run_processes(
        lambda i: [helpers.sys.executable, "-m", "sasa_jax.distributed"], 2, timeout=120,
        https_proxy=proxy, http_proxy=proxy, no_proxy="", NO_PROXY="")
  assert codes == [0, 0], errors  # each printed its process index and the 2 global devices


def test_a_process_that_never_joins_is_said_before_jax_aborts():
  """Process 1 of 2 never starts (its host failed): process 0 waits SASA_STARTUP_TIMEOUT
  seconds, says what is missing and where to look, then jax aborts it."""
  port = helpers.free_port()
  proc = subprocess.run(
      [sys.executable, "-m", "sasa_jax.distributed"], cwd=helpers.ROOT, capture_output=True,
      text=True, timeout=120, env=helpers.env(
          SASA_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SASA_NUM_PROCESSES="2",
          SASA_PROCESS_ID="0", SASA_STARTUP_TIMEOUT="8"))
  assert proc.returncode != 0
  said = proc.stderr.index(
      f"start-up explicit: not every process joined the run's coordinator (127.0.0.1:{port}) "
      "within 8 s (SASA_STARTUP_TIMEOUT): a process never started")
  assert said < proc.stderr.index("DEADLINE_EXCEEDED")  # before jax's own abort


def test_slurm_gives_a_task_every_gpu_of_its_node():
  base = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
  one_per_node = _plan({**base, "SLURM_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": "0,1"})
  assert one_per_node.kind == "slurm" and one_per_node.kwargs["local_device_ids"] == [0, 1]
  per_gpu = _plan({**base, "SLURM_TASKS_PER_NODE": "2", "SLURM_LOCALID": "1",
                   "CUDA_VISIBLE_DEVICES": "0,1"})
  assert per_gpu.kwargs["local_device_ids"] == [1]
  bound = _plan({**base, "SLURM_NTASKS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "1"})
  assert bound.kwargs["local_device_ids"] == [0]
  cpu_only = _plan(base)
  assert cpu_only.kind == "slurm" and "local_device_ids" not in cpu_only.kwargs


def test_gke_tpu():
  assert _plan({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}).kind == "gke_tpu"
  assert _plan({"TPU_PROCESS_ADDRESSES": "w-0:8476,w-1:8476"}).kind == "gke_tpu"


def test_cloud_tpu_vm_asks_the_metadata_server(metadata_server):
  env = {"GCE_METADATA_IP": "127.0.0.1:%d" % metadata_server.server_address[1]}
  fetch = lambda key: distributed.tpu_vm_metadata(key, env)  # noqa: E731
  _Metadata.attributes = {"worker-network-endpoints": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}
  assert fetch("worker-network-endpoints").count(",") == 3
  assert _plan(env, chips=True, metadata=fetch).kind == "tpu_vm"
  assert _plan(env, chips=False, metadata=fetch).kind == "single"  # a GCE VM without TPUs
  _Metadata.attributes = {"worker-network-endpoints": "10.0.0.2"}
  assert _plan(env, chips=True, metadata=fetch).kind == "single"  # a one-worker TPU VM
  assert distributed.tpu_vm_metadata("anything", {"GCE_METADATA_IP": "127.0.0.1:1"}) is None


def test_tpu_chips_are_found_on_the_pci_bus(tmp_path):
  for i, vendor in enumerate(["0x8086", "0x1ae0"]):
    (tmp_path / f"0000:00:0{i}.0").mkdir()
    (tmp_path / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
  assert distributed.has_tpu_chips(str(tmp_path))
  (tmp_path / "0000:00:01.0" / "vendor").write_text("0x10de\n")
  assert not distributed.has_tpu_chips(str(tmp_path))


def _flips(process_index, n=64):
  """Whether example i of this process is flipped, through the real train preprocessing."""
  image = tf.reshape(tf.range(28 * 28, dtype=tf.int32) % 256, [28, 28, 1])
  encoded = tf.io.encode_png(tf.cast(image, tf.uint8))
  flips = []
  for i in range(n):
    seed = input_pipeline.augmentation_seed(0, process_index, i)
    out = preprocessing.small_train(encoded, seed, image_size=28, channels=1, pad=0)
    flips.append(bool(np.any(out.numpy() != image.numpy())))
  return flips


def test_each_process_draws_its_own_augmentation():
  p0, p1 = _flips(0), _flips(1)
  assert p0 == _flips(0)  # deterministic
  assert 16 < sum(p0) < 48 and 16 < sum(p1) < 48
  assert sum(a != b for a, b in zip(p0, p1)) > 16


def test_file_order_changes_every_epoch(tmp_path):
  builder = helpers.prepare_fake_imagenet(str(tmp_path), num_shards=6)
  assert len(builder.info.splits["train"].file_instructions) == 6

  def order(epoch):
    records = input_pipeline._epoch_records(builder, "train", seed=0, epoch=tf.constant(
        epoch, tf.int64), shuffle_buffer=1)  # no example shuffle: the file order shows
    records = records.map(input_pipeline._deserialize(builder))
    return [r["file_name"] for r in records.as_numpy_iterator()]

  first = order(0)
  assert sorted(first) == sorted(order(1)) and len(first) == 24
  assert first == order(0) and first != order(1) and order(1) != order(2)


def test_a_stream_started_at_any_step_is_the_uninterrupted_streams_rest(fmnist_dir, caplog):
  """train_dataset(start_step=s) yields the batches from batch s of the stream from step 0,
  across epochs; each epoch holds every example of the process's slice once, in a new
  order, and the two processes' slices are disjoint."""
  from sasa_jax import data
  builder = data.get_builder("fashion_mnist", fmnist_dir)

  def batches(process, start_step, count):  # 20 examples per process, 8 per batch
    ds = data.train_dataset(builder, split="train[:40]", per_host_batch=8, image_size=28,
                            seed=3, start_step=start_step, crop_padding=0,
                            process_index=process, process_count=2)
    return [b for _, b in zip(range(count), ds.as_numpy_iterator())]

  def unflipped(x):  # an image's pixels whether it came flipped or not
    return min(x.tobytes(), x[:, ::-1].tobytes())

  def examples(stream):  # (image up to its flip, label) per example, in stream order
    return [(unflipped(x), int(y)) for b in stream for x, y in zip(b["image"], b["label"])]

  whole = batches(1, 0, 10)  # 80 examples: epochs 0-3 of 20
  with caplog.at_level("INFO"):
    batches(1, 7, 1)
  assert ("training data: 20 records of 'train[:40]' on this host, streamed through a shuffle "
          "buffer of 20; from epoch 2, record 16") in caplog.text
  for start in (1, 2, 3, 7):  # from examples 8, 16 (a batch across epochs 0-1), 24 and 56
    resumed = batches(1, start, 3)
    assert len(resumed) == 3
    for got, want in zip(resumed, whole[start:start + 3]):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  seen = examples(whole)
  epochs = [seen[20 * e:20 * e + 20] for e in range(4)]
  assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 20 for e in epochs)
  assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
  assert not set(epochs[0]) & set(examples(batches(0, 0, 3))[:20])
  # augmentation is seeded by the position in the run, not in the epoch: the flips at the
  # epochs' same positions differ
  original = {unflipped(ex["image"]): ex["image"].tobytes()
              for ex in tfds.as_numpy(builder.as_dataset("train[:40]"))}
  flips = [x.tobytes() != original[key] for b in whole
           for x, (key, _) in zip(b["image"], examples([b]))]
  assert flips[:20] != flips[20:40]


def test_a_slice_of_several_windows_resumes_exactly_and_reads_no_earlier_window(tmp_path,
                                                                                 caplog):
  """A host slice larger than a shuffle window (ImageNet on a few hosts) is shuffled window
  by window. A stream started at any step is the uninterrupted stream's rest, across windows
  and epochs; each epoch holds every example once, in a new order; and a resume reads no
  file that only the windows before its position hold: they are deleted here first."""
  builder = helpers.prepare_fake_imagenet(str(tmp_path / "data"), num_shards=6)  # 6 x 4

  def batches(start_step, count, process=1):  # 12 examples per process, 3 per batch
    ds = input_pipeline.train_dataset(builder, split="train", per_host_batch=3, image_size=24,
                                      seed=5, start_step=start_step, window=3,
                                      process_index=process, process_count=2)
    return [b for _, b in zip(range(count), ds.as_numpy_iterator())]

  with caplog.at_level("INFO"):
    whole = batches(0, 12)  # epochs 0-2
  assert ("training data: 12 records of 'train' on this host, in 4 shuffle windows of about 3 "
          "records (a resume reads its window again); from epoch 0, record 0") in caplog.text
  for start in (1, 3, 4, 9):  # mid-epoch windows, an epoch's first batch, epoch 2
    for got, want in zip(batches(start, 3), whole[start:start + 3], strict=True):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  labels = [int(y) for b in whole for y in b["label"]]
  epochs = [labels[12 * e:12 * e + 12] for e in range(3)]
  assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and len(set(map(tuple, epochs))) == 3
  assert not set(epochs[0]) & {int(y) for b in batches(0, 4, process=0) for y in b["label"]}

  host = input_pipeline._host_split("train", 1, 2, drop_remainder=True)
  pieces = input_pipeline._file_pieces(builder, host, 3)
  assert max(pieces["take"]) == 3 and len(pieces["take"]) > len(set(pieces["path"]))

  def records(offset):  # epoch 0 from `offset` on: [(position, serialized record)]
    ds = input_pipeline._epoch_windows(pieces, seed=5, epoch=tf.constant(0, tf.int64),
                                       window=3, offset=tf.constant(offset, tf.int64))
    return list(ds.as_numpy_iterator())

  epoch = records(0)
  assert [p for p, _ in epoch] == list(range(12))
  plan = {k: v.numpy() for k, v in input_pipeline._window_plan(
      pieces, seed=5, epoch=tf.constant(0, tf.int64), window=3).items()}
  assert len(plan["size"]) > 2 and max(plan["size"]) <= 6 and sum(plan["size"]) == 12
  k = max(w for w in range(1, len(plan["size"])) if plan["size"][w] > 1)
  later = {pieces["path"][p] for p, w in zip(plan["order"], plan["window"]) if w >= k}
  unread = set(pieces["path"]) - later
  assert unread  # files that only the windows before window k hold
  for path in unread:
    os.remove(path)
  position = plan["start"][k] + 1  # window k's second record on
  assert records(position) == epoch[position:]


def test_a_shuffle_window_is_the_buffer_or_256_mib_of_records(fmnist_dir):
  """Fashion-MNIST's 60,000 records of 545 bytes (31 MiB) stream as one window."""
  from sasa_jax import data
  builder = data.get_builder("fashion_mnist", fmnist_dir)
  window = input_pipeline.window_records(builder, 16_384)
  assert 490_000 < window < 495_000
  assert input_pipeline.window_records(builder, 10**6) == 10**6
  assert input_pipeline.window_records(builder, 16, window_mib=0.02) == 38  # 20,971 bytes
  from sasa_jax import base_config
  assert base_config.get_config().dataset.shuffle_window_mib == input_pipeline.WINDOW_MIB == 256


def test_images_cross_to_the_device_as_uint8(fmnist_dir):
  from sasa_jax import data
  builder = data.get_builder("fashion_mnist", fmnist_dir)
  batch = next(data.train_dataset(builder, split="train[:64]", per_host_batch=16,
                                  image_size=28, seed=0).as_numpy_iterator())
  assert batch["image"].dtype == np.uint8 and batch["image"].nbytes == 16 * 28 * 28
  spec = data.DATASETS["fashion_mnist"]
  x = np.asarray(data.normalize(batch["image"], "fashion_mnist"))
  want = (batch["image"].astype(np.float64) - spec.mean[0]) / spec.std[0]
  np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
  ev = next(data.eval_dataset(builder, split="test[:10]", per_host_batch=16, image_size=28,
                              num_steps=1).as_numpy_iterator())
  assert ev["image"].dtype == np.uint8 and list(ev["mask"]) == [1] * 10 + [0] * 6


@pytest.mark.parametrize("started", [False, True])
def test_tensorflow_sees_no_gpu_once_the_pipeline_is_imported(started):
  """A CUDA build of TensorFlow would reserve most of each GPU's memory at its first
  operation. Importing sasa_jax.data hides the GPUs from it, before TensorFlow has started
  its devices, and leaves the CPU to tf.data. Where the importer started them first (the
  call raises then), the import goes on and says so."""
  code = f"""if True:
    import tensorflow as tf
    calls, hide = [], tf.config.set_visible_devices
    def recorded(devices, device_type=None):
      calls.append((list(devices), device_type))
      if {started}:
        raise RuntimeError("Visible devices cannot be modified after being initialized")
      hide(devices, device_type)
    tf.config.set_visible_devices = recorded
    import sasa_jax.data
    print(calls, [d.device_type for d in tf.config.get_visible_devices()])
  """
  proc = helpers.run_python(code)
  assert proc.stdout.split("\n")[-2] == "[([], 'GPU')] ['CPU']"
  assert ("TensorFlow's devices were started before" in proc.stderr) == started


def test_the_training_stream_has_no_autotune_model_and_every_cpu(fmnist_dir, monkeypatch):
  """An endless iterator with tf.data's autotune model waits, GIL held, for the model
  thread's next round when deleted (up to a minute, at every run's end and preemption;
  TensorFlow 2.21). The training stream runs without the model, its map on the CPUs the
  process may use (a SLURM task's share: 3 of them here)."""
  from sasa_jax import data
  monkeypatch.setattr(input_pipeline.os, "sched_getaffinity", lambda pid: {0, 1, 2})
  builder = data.get_builder("fashion_mnist", fmnist_dir)
  ds = data.train_dataset(builder, split="train[:64]", per_host_batch=16, image_size=28, seed=0)
  assert ds.options().autotune.enabled is False
  graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())  # noqa: SLF001
  nodes = {n.name: n for n in graph.node}
  (parallel_map,) = [n for n in graph.node if n.op == "ParallelMapDatasetV2"]
  calls = nodes[parallel_map.input[-1]]  # its num_parallel_calls input, a constant
  assert tf.make_ndarray(calls.attr["value"].tensor) == 3


def test_divergence_stops_at_the_next_check_and_keeps_finite_checkpoints(fmnist_dir, tmp_path):
  flags = helpers.tiny_flags(fmnist_dir, 40, ckpt_every=2, log_every=5)
  flags += ["--config.schedule.peak_value=62.5", "--config.schedule.warmup_epochs=2",
            "--config.keep_checkpoints=2"]
  proc = helpers.run_main(FMNIST, tmp_path, flags, check=False)
  assert proc.returncode != 0
  match = re.search(r"training diverged: non-finite loss, gradient or parameters at step (\d+); "
                    r"the last finite checkpoint is step (\d+) in (\S+)\.", proc.stderr)
  assert match, proc.stderr[-3000:]
  bad, last = int(match.group(1)), int(match.group(2))
  assert 0 < last < bad <= last + 2  # checked before every save
  assert match.group(3) == str(tmp_path / "checkpoints")
  steps = sorted(int(s.name) for s in (tmp_path / "checkpoints").iterdir() if s.name.isdigit())
  assert steps[-1] == last and len(steps) == 2
  for step in steps:
    assert all(np.isfinite(v).all() for v in helpers.restore_params(tmp_path, step)[1].values())


def test_an_empty_cache_dir_turns_the_cache_off_for_its_own_run_only(tmp_path):
  import jax
  import ml_collections
  from jax.experimental.compilation_cache import compilation_cache
  from sasa_jax import train
  env_dir = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR (conftest.py)
  enabled = jax.config.jax_enable_compilation_cache
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  configs = lambda d: ml_collections.ConfigDict({"compilation_cache_dir": d})  # noqa: E731
  try:
    assert train.set_compilation_cache(configs(""), tmp_path) is None
    assert not jax.config.jax_enable_compilation_cache
    assert train.set_compilation_cache(configs(None), tmp_path) == env_dir
    assert jax.config.jax_enable_compilation_cache
  finally:  # this pytest worker's cache as it was, also if an assertion failed midway
    jax.config.update("jax_enable_compilation_cache", enabled)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    compilation_cache.reset_cache()


def test_compilation_cache_defaults_to_the_workdir(fmnist_dir, tmp_path):
  env_flags = helpers.tiny_flags(fmnist_dir, 1)
  proc = helpers.run_main(FMNIST, tmp_path / "run", env_flags, env_overrides={
      "JAX_COMPILATION_CACHE_DIR": None})
  assert proc.returncode == 0
  assert any((tmp_path / "run" / "compilation_cache").iterdir())
  # "" turns it off, also where the environment names a cache
  env_cache = tmp_path / "env_cache"
  off = helpers.run_main(FMNIST, tmp_path / "off", env_flags + [
      "--config.compilation_cache_dir="], env_overrides={"JAX_COMPILATION_CACHE_DIR":
                                                         str(env_cache)})
  assert off.returncode == 0 and not (tmp_path / "off" / "compilation_cache").exists()
  assert not env_cache.exists() or not any(env_cache.iterdir())


def _own_disk_unavailable() -> str | None:
  """Why this machine cannot give a process a directory of its own at a shared path."""
  if os.geteuid() != 0 or not shutil.which("unshare"):
    return "needs root and unshare(1): a mount namespace stands for another host's own disk"
  if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
    return "unshare -m is refused here (no CAP_SYS_ADMIN)"
  return None


@pytest.mark.parametrize("mount,problem", [
    # another host's own disk: an empty tmpfs over the workdir
    ('mount -t tmpfs none "$0"', "wrote no file there that process 0 ({host}) sees; "
                                  "process(es) [1] (host(s) ['{host}']) do not see the file "
                                  "process 0 wrote"),
    # the shared directory, mounted read-only on the second host
    ('mount --bind "$0" "$0" && mount -o remount,ro,bind "$0"',
     "wrote no file there that process 0 ({host}) sees. Checkpoints need"),
], ids=["own_disk", "read_only"])
def test_a_workdir_that_a_host_cannot_share_fails_before_training(fmnist_dir, tmp_path, mount,
                                                                  problem):
  """2 processes; the second, in a mount namespace of its own, sees the workdir as an empty
  directory of its own or cannot write to it. Both fail at start, naming the process and
  host, instead of training until the first checkpoint and failing there 10 minutes later
  with nothing saved."""
  require(_own_disk_unavailable())
  workdir = tmp_path / "run"
  workdir.mkdir()
  cmd = helpers.main_cmd(FMNIST, workdir, helpers.tiny_flags(fmnist_dir, 4, ckpt_every=2))
  other_host = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', workdir]
  codes, errors = helpers.run_processes(lambda i: (other_host if i else []) + cmd, 2,
                                        timeout=180, SASA_HEARTBEAT_TIMEOUT="30")
  host = socket.gethostname()
  message = (f"the workdir {workdir} is not one writable directory for all 2 processes: "
             f"process(es) [1] (host(s) ['{host}']) " + problem.format(host=host))
  for code, err in zip(codes, errors):
    assert code != 0 and message in err, err[-3000:]
  assert sorted(os.listdir(workdir)) == []  # no checkpoint, no check file left


def test_two_processes_on_object_storage(gcs, tmp_path):
  """A TPU pod's case on loopback: 2 processes (launch/local.sh) with workdir and data on
  gs:// (the GCS API emulator). Both see the workdir (the start-up check's object is gone
  afterwards), both write their part of every checkpoint, and they end at one set of
  parameters. The workdir holds the lease of a run on another host that is never renewed (a
  deleted VM): taken over after config.workdir_lease_s, and released at the end."""
  lease = json.dumps({"run": "0123456789ab", "host": "worker-elsewhere", "pid": 4242,
                      "renewed": time.time(), "renewals": 3})
  subprocess.run([sys.executable, "-c", "import sys; from etils import epath; "
                  "epath.Path('gs://sasa/two/lease.json').write_text(sys.argv[1])", lease],
                 env=helpers.env(**gcs.env), check=True, timeout=120)
  cmd = helpers.main_cmd(FMNIST, "gs://sasa/two",
                         helpers.tiny_flags("gs://sasa/tfds", 4, ckpt_every=2, log_every=2)
                         + ["--config.workdir_lease_s=3"])
  logs = tmp_path / "logs"
  proc = subprocess.run([os.path.join(helpers.ROOT, "launch", "local.sh"), "2", *cmd[3:]],
                        cwd=helpers.ROOT, env=helpers.env(**gcs.env, LOGDIR=str(logs)),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  fingerprints = [re.search(r"final parameters at step 4: sha256 (\w+)",
                            (logs / f"process_{i}.log").read_text()).group(1) for i in range(2)]
  assert fingerprints[0] == fingerprints[1]
  assert ("lease.json was not renewed for 3 s: its run is gone; taking over"
          in (logs / "process_0.log").read_text())
  objects = [o for o in gcs.list_objects("sasa") if o.startswith("two/")]
  assert not [o for o in objects if "lease.json" in o]  # released, no temporary left
  for step in (2, 4):
    assert {f"two/checkpoints/{step}/commit_success.txt",
            f"two/checkpoints/{step}/default/array_metadatas/process_0",
            f"two/checkpoints/{step}/default/array_metadatas/process_1"} <= set(objects)
  assert not [o for o in objects if shared_workdir.TOKEN_PREFIX in o]
  # The tools read the run where it is: its status, curves to a local file, attention maps
  # into the run.
  environ = helpers.env(**gcs.env)
  status = helpers.run_module("sasa_jax.tools.status", ["gs://sasa/two"], environ=environ).stdout
  assert re.search(r"^  not running \(no run holds the workdir\)\n  step 4 of 4 \(100.0%\): "
                   r"train/loss .*\n.*\n  checkpoints: 2, 4\n  last evaluation at step 4: "
                   r"eval/loss [\d.]+, eval/accuracy", status, re.M), status
  assert re.search(r"1 start\(s\); .* 4 cpu device\(s\) in 2 process\(es\) on \S+$", status,
                   re.M), status
  helpers.run_module("sasa_jax.tools.plot_run", ["gs://sasa/two", f"--out={tmp_path}/c.png"],
                     environ=environ)
  assert (tmp_path / "c.png").stat().st_size > 10_000
  out = helpers.run_module("sasa_jax.tools.attention_maps",
                           ["--workdir=gs://sasa/two", "--image=1"], environ=environ).stdout
  assert out.split() == ["gs://sasa/two/attention_image1_group3_block1.png"]
  assert len(gcs.read_object("sasa", "two/attention_image1_group3_block1.png")) > 10_000
  # The bucket's root as a folder of runs (tfds/ holds none), its report written beside them.
  report = helpers.run_module("sasa_jax.tools.compare_paper",
                              ["gs://sasa", "--out=gs://sasa/report.md"], environ=environ).stdout
  assert "1 run(s) read: 0 count for paper rows, 1 for none." in report
  assert "- gs://sasa/two: fashion_mnist, not a dataset of the paper's tables" in report
  assert gcs.read_object("sasa", "report.md").decode() + "\n" == report
