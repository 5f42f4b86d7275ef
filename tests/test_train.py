"""The training framework end to end, on real Fashion-MNIST and fake imagenet2012."""
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tests import helpers

FMNIST = f"configs/fashion_mnist.py:{helpers.TINY_MODEL}"


def test_fashion_mnist_end_to_end_then_rerun(fmnist_dir, tmp_path):
  workdir = tmp_path / "run"
  flags = helpers.tiny_flags(fmnist_dir, 6, ckpt_every=3, log_every=2, eval_every=3)
  proc = helpers.run_main(FMNIST, workdir, flags)
  rows = helpers.read_metrics(workdir)
  train = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in train] == [2, 4, 6]
  assert all(np.isfinite(r["train/loss"]) and 0 <= r["train/accuracy"] <= 1 for r in train)
  assert all(r["learning_rate"] > 0 for r in train)
  assert [r["step"] for r in evals] == [3, 6]
  assert all(r["eval/num_examples"] == 100 for r in evals)  # test[:100], every example once
  assert all(0 <= r["eval/accuracy"] <= r["eval/top5_accuracy"] <= 1 for r in evals)
  assert any("steps_per_sec" in r for r in rows)
  # from step 1 (after compiling), then from the evaluation at step 3
  assert all(r["images_per_sec"] == r["images_per_sec_per_device"] > 0 for r in train)
  assert all(0 <= r["input_wait_fraction"] < 1 for r in train)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert {"3", "6"} <= set(os.listdir(workdir / "checkpoints"))
  assert "ETA" in proc.stderr or "steps/s" in proc.stderr  # clu ReportProgress

  # Run again: a save that died half-way (a temporary directory, at a later step) is never
  # picked, and a finished run resumes from its last step without training.
  params = helpers.restore_params(workdir)
  count = sum(v.size for v in params[1].values())
  assert re.search(rf"model .*: {count / 1e6:.3f}M parameters; 6 steps, 16 per epoch",
                   proc.stderr)
  (workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1234").mkdir()
  (workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1234" / "garbage").write_text("x")
  again = helpers.run_main(FMNIST, workdir, flags)
  assert "resumed from" in again.stderr and "at step 6" in again.stderr
  assert "resuming with a config that differs" not in again.stderr  # the same command
  assert "step 6 is at or past the run's 6 steps: nothing to train" in again.stderr
  assert [r["step"] for r in helpers.read_metrics(workdir) if "train/loss" in r] == [2, 4, 6]
  resumed = helpers.restore_params(workdir)
  assert resumed[0] == params[0] == 6
  for k in params[1]:
    np.testing.assert_array_equal(resumed[1][k], params[1][k])

  # Another model on this workdir: refused before restoring, naming the arrays and the config
  # fields that differ; the checkpoints are left as they were.
  wider = helpers.run_main(FMNIST.replace("width_multiplier=0.125", "width_multiplier=0.25"),
                           workdir, flags + ["--config.ema_decay=0.999"], check=False)
  assert wider.returncode != 0
  assert f"{workdir}/checkpoints/6 holds another state than this config builds" in wider.stderr
  assert "float32[8] in the checkpoint, float32[16] for this config" in wider.stderr
  assert re.search(r"\.\.\. \d+ arrays differ in all", wider.stderr)
  assert "  ema_decay: 0.0 there, 0.999 here\n" in wider.stderr
  assert "  model.width_multiplier: 0.125 there, 0.25 here\n" in wider.stderr
  assert "Event loop is closed" not in wider.stderr
  assert helpers.restore_params(workdir)[0] == 6

  # A longer schedule for the same model: resumed, the changed fields in the log and in
  # the start's row of starts.jsonl.
  longer = helpers.run_main(FMNIST, workdir, flags + ["--config.num_train_steps=8"])
  assert ("differs from the last start's" in longer.stderr
          and "\n  num_train_steps: 6 there, 8 here\n" in longer.stderr)
  starts = [json.loads(line) for line in (workdir / "starts.jsonl").read_text().splitlines()]
  assert [(r["start_step"], r["config_changes"]) for r in starts] == [
      (0, []), (6, []), (6, ["num_train_steps: 6 there, 8 here"])]
  assert helpers.restore_params(workdir)[0] == 8


def test_fake_imagenet_end_to_end(tmp_path):
  data_dir = str(tmp_path / "tfds")
  helpers.prepare_fake_imagenet(data_dir)
  workdir = tmp_path / "run"
  flags = helpers.tiny_flags(data_dir, 2, batch=4, train_split="train", eval_split="validation")
  flags += ["--config.dataset.image_size=64", "--config.dtype=float32",
            "--config.model.num_classes=1000", "--config.profile=true"]
  proc = helpers.run_main("configs/imagenet.py:depth=14,variant=full_attention,"
                          "width_multiplier=0.125,num_heads=2,kernel_size=3", workdir, flags)
  rows = helpers.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  (final,) = [r for r in rows if "eval/accuracy" in r]
  assert final["eval/num_examples"] == 10
  # A run too short for the profiler's usual 5 steps from step 10 still writes a trace of
  # its last step, for TensorBoard's Profile tab.
  assert "profiling 1 step(s) from step 2, and again every hour" in proc.stderr
  (trace,) = (workdir / "plugins" / "profile").glob("*/*.xplane.pb")
  steps = [dict(e.stats).get("step_num") for plane in
           jax.profiler.ProfileData.from_file(str(trace)).planes
           for line in plane.lines for e in line.events if e.name == "train"]
  assert steps == [1]  # StepTraceAnnotation's 0-based number of step 2
  # TensorBoard's HParams dashboard gets every field, the model's and the recipe's included.
  import tensorflow as tf
  from tensorboard.plugins.hparams import plugin_data_pb2
  (events,) = workdir.glob("events.out.tfevents.*")
  (start,) = [data.session_start_info.hparams
              for event in tf.compat.v1.train.summary_iterator(str(events))
              for value in event.summary.value
              if value.metadata.plugin_data.plugin_name == "hparams"
              for data in [plugin_data_pb2.HParamsPluginData.FromString(
                  value.metadata.plugin_data.content)] if data.HasField("session_start_info")]
  assert start["model.kernel_size"].string_value == "3"
  assert start["model.variant"].string_value == "full_attention"
  assert start["model.attention_groups"].string_value == "none"  # the variant's
  assert start["schedule.peak_value"].number_value == 0.1 * 4 / 256
  assert start["dataset.image_size"].number_value == 64


def test_one_and_four_devices_follow_the_same_trajectory(fmnist_dir, tmp_path):
  losses = {}
  for devices in (1, 4):
    workdir = tmp_path / f"d{devices}"
    helpers.run_main(FMNIST, workdir, helpers.tiny_flags(fmnist_dir, 4), devices=devices)
    losses[devices] = [r["train/loss"] for r in helpers.read_metrics(workdir) if "train/loss" in r]
  assert len(losses[1]) == 4
  assert losses[1][-1] != losses[1][0]
  np.testing.assert_allclose(losses[4], losses[1], rtol=2e-4, atol=2e-5)
  # The 4 replicas' arrays (each under MIN_REPLICA_SLICE_BYTES) were written whole by one
  # replica, not cut into 4 slices by programs compiled at the first save.
  import orbax.checkpoint as ocp
  from etils import epath
  step, = [p for p in (tmp_path / "d4" / "checkpoints").iterdir() if p.name.isdigit()]
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step / "default")).tree
  arrays = [a for a in jax.tree.leaves(tree) if a.shape]
  assert arrays and all(a.storage.chunk_shape == a.shape for a in arrays), arrays[0]


def _restore_in_subprocess(workdir, env, out):
  """The checkpoint's step and parameters, read by a process that talks to the emulator."""
  helpers.run_module("tests.restore_to_npz", [str(workdir), str(out)], environ=env, timeout=300)
  with np.load(out) as f:
    return int(f["step"]), {k: f[k] for k in f.files if k != "step"}


def test_runs_killed_while_committing_a_checkpoint_and_preempted_resume_to_the_same_parameters(
    gcs, fmnist_dir, tmp_path):
  """Two runs are killed (SIGKILL) in the middle of committing their step-8 checkpoint
  (tests/stalled_commit.py: its arrays written, the commit never finishing), as a run that
  the watchdog, a failed peer or the OOM killer stops may be: one with its workdir and data on
  gs:// (the GCS API emulator, tests/gcs_emulator.py: orbax commits with commit_success.txt),
  one on local disk (a temporary directory renamed). A third, local, gets SIGTERM after its
  step-4 checkpoint. The killed runs resume from step 4, the preempted one from the step it
  saved, and all three end with an uninterrupted run's parameters. All four read their 256
  records in shuffle windows of about 37 for 2.5 epochs: a resume starts within a window
  and reads on through the windows of the epochs after it."""
  steps = 40
  flags = lambda data_dir: helpers.tiny_flags(data_dir, steps, ckpt_every=4) + [  # noqa: E731
      "--config.dataset.shuffle_buffer=16", "--config.dataset.shuffle_window_mib=0.02"]
  helpers.run_main(FMNIST, tmp_path / "straight", flags(fmnist_dir))
  reference = helpers.restore_params(tmp_path / "straight")

  def stalled(name):  # the environment of a run whose step-8 checkpoint never commits
    return {"SASA_TEST_STALL_STEP": "8", "SASA_TEST_STALL_MARKER": str(tmp_path / name)}
  runs = {  # name: (workdir, flags, environment variables added, signal)
      "gs_cut": ("gs://sasa/run", flags("gs://sasa/tfds"), {**gcs.env, **stalled("gs_cut")},
                 signal.SIGKILL),
      "local_cut": (tmp_path / "cut", flags(fmnist_dir), stalled("local_cut"), signal.SIGKILL),
      "preempted": (tmp_path / "preempted", flags(fmnist_dir), {}, signal.SIGTERM)}

  def due(name):  # the moment to signal the run
    if runs[name][3] == signal.SIGKILL:  # the commit of step 8 has begun and waits
      return (tmp_path / name).exists()
    ckpts = runs[name][0] / "checkpoints"
    return ckpts.exists() and "4" in os.listdir(ckpts)

  procs = {name: subprocess.Popen(  # side by side, from scratch as a user's run
      [sys.executable, "-m", "tests.stalled_commit" if sig == signal.SIGKILL else "sasa_jax.main",
       *helpers.main_cmd(FMNIST, workdir, run_flags)[3:]], cwd=helpers.ROOT,
      env=helpers.env(**extra), stderr=subprocess.PIPE, text=True)
      for name, (workdir, run_flags, extra, sig) in runs.items()}
  waiting = list(runs)
  deadline = time.time() + 300
  while waiting:  # each signalled as soon as it is due
    for name in list(waiting):
      if due(name):
        procs[name].send_signal(runs[name][3])
        waiting.remove(name)
      elif procs[name].poll() is not None:
        raise AssertionError(f"{name} ended early: {procs[name].stderr.read()[-3000:]}")
    assert time.time() < deadline, f"timed out waiting for {waiting}"
    time.sleep(0.05)
  for name, proc in procs.items():
    proc.wait(timeout=120)
    stderr = proc.stderr.read()
    if name == "preempted":
      assert proc.returncode == 0, stderr[-3000:]
      assert "preempted: checkpoint at step" in stderr
      assert 4 <= helpers.restore_params(runs[name][0])[0] < steps
    else:
      assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
  # What the killed runs left: step 8's arrays, uncommitted.
  local = os.listdir(tmp_path / "cut" / "checkpoints")
  assert "8" not in local and any(n.startswith("8.orbax-checkpoint-tmp") for n in local), local
  names = gcs.list_objects("sasa", "run/checkpoints/8/")
  assert any(n.startswith("run/checkpoints/8/default/") for n in names), names
  assert "run/checkpoints/8/commit_success.txt" not in names, names

  resumed_at = {}
  for name, (workdir, run_flags, extra, _) in runs.items():
    extra = {k: v for k, v in extra.items() if not k.startswith("SASA_TEST_STALL")}
    resumed = helpers.run_main(FMNIST, workdir, run_flags, env_overrides=extra)
    at = re.search(rf"resumed from {re.escape(str(workdir))}/checkpoints at step (\d+)",
                   resumed.stderr)
    assert at and 4 <= int(at.group(1)) < steps, (name, resumed.stderr[-3000:])
    assert ("training data: 256 records of 'train[:256]' on this host, in 7 shuffle windows "
            f"of about 37 records (a resume reads its window again); from epoch "
            f"{int(at.group(1)) * 16 // 256}, record {int(at.group(1)) * 16 % 256}"
            in resumed.stderr), resumed.stderr[-3000:]
    resumed_at[name] = int(at.group(1))
  assert resumed_at["gs_cut"] == resumed_at["local_cut"] == 4, resumed_at
  names = gcs.list_objects("sasa", "run/")
  assert "run/config.json" in names and "run/metrics.jsonl" in names
  kept = {n.split("/")[2] for n in names if n.startswith("run/checkpoints/") and n.count("/") > 2}
  assert kept and all(f"run/checkpoints/{s}/commit_success.txt" in names for s in kept), names
  local = os.listdir(tmp_path / "cut" / "checkpoints")
  assert local and all(n.isdigit() for n in local), local  # no uncommitted step is left
  # starts.jsonl: one row per start, on object storage too.
  from sasa_jax import run_info
  starts = [json.loads(line) for line in
            gcs.read_object("sasa", "run/starts.jsonl").decode().splitlines()]
  assert [r["start_step"] for r in starts] == [0, 4]
  assert all(r["code"] == run_info.code_version() and r["devices"] == 1 for r in starts)
  assert any(n.startswith("run/events.out.tfevents") for n in names)
  assert any(n.startswith(f"run/checkpoints/{steps}/") for n in names)
  assert not os.path.exists(os.path.join(helpers.ROOT, "gs:"))  # nothing went to a local path
  results = {"gs_cut": _restore_in_subprocess("gs://sasa/run", helpers.env(**gcs.env),
                                              tmp_path / "gcs_params.npz"),
             "local_cut": helpers.restore_params(runs["local_cut"][0]),
             "preempted": helpers.restore_params(runs["preempted"][0])}
  for name, (step, params) in results.items():
    assert step == reference[0] == steps
    for k, v in reference[1].items():
      np.testing.assert_allclose(params[k], v, rtol=1e-6, atol=1e-7, err_msg=f"{name}: {k}")


def test_checkpoints_at_a_multiple_of_keep_checkpoint_every_steps_stay(fmnist_dir, tmp_path):
  """A checkpoint every step, the last 2 kept, and those at multiples of 3 as well."""
  workdir = tmp_path / "run"
  helpers.run_main(FMNIST, workdir, helpers.tiny_flags(fmnist_dir, 9, ckpt_every=1) + [
      "--config.keep_checkpoints=2", "--config.keep_checkpoint_every_steps=3"])
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [3, 6, 8, 9]


def test_steps_per_sec_and_eta_count_finished_steps(fmnist_dir, tmp_path):
  """The progress line's steps/s (and so its ETA) over the steps the device finished, as the
  images/s beside it: not over the steps the host dispatched ahead of it, which put the
  first log step's steps/s at several times its images/s."""
  batch = 32
  helpers.run_main(FMNIST, tmp_path, helpers.tiny_flags(fmnist_dir, 20, batch=batch,
                                                        log_every=10))
  from sasa_jax.tools.runs import series
  rows = helpers.read_metrics(tmp_path)
  steps, steps_per_sec = series(rows, "steps_per_sec")
  image_steps, images_per_sec = series(rows, "images_per_sec")
  assert steps == image_steps == [10, 20]
  assert [s * batch for s in steps_per_sec] == pytest.approx(images_per_sec, rel=0.2)


def test_ctrl_c_saves_the_next_step_and_exits(fmnist_dir, tmp_path):
  """Ctrl-C (SIGINT) to a one-process run: as a preemption notice, the next step is saved
  and the run exits cleanly, so that nothing since the last periodic checkpoint is lost."""
  workdir = tmp_path / "run"
  # Its log goes to a file: a pipe nobody reads until the end fills and blocks the run.
  log = tmp_path / "stderr.log"
  # Started as from a terminal: a test runner started in the background by a shell without
  # job control ignores SIGINT, its children inherit that, and a run started so keeps
  # ignoring Ctrl-C (as Python itself does). An exec resets a handler, not an ignore.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with open(log, "w") as err:
      proc = subprocess.Popen(
          helpers.main_cmd(FMNIST, workdir,
                           helpers.tiny_flags(fmnist_dir, 10_000, ckpt_every=10_000)),
          cwd=helpers.ROOT, env=helpers.env(PYTHONFAULTHANDLER="1"), stderr=err, text=True)
  finally:
    signal.signal(signal.SIGINT, previous)
  try:
    deadline = time.time() + 300
    while not (workdir / "metrics.jsonl").exists() or len(helpers.read_metrics(workdir)) < 3:
      assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
    proc.wait()
    raise AssertionError(f"no exit 120 s after Ctrl-C:\n{log.read_text()[-6000:]}") from None
  stderr = log.read_text()
  assert proc.returncode == 0, stderr[-3000:]
  assert "Ctrl-C: saving a checkpoint at the next step" in stderr
  saved = int(re.search(r"preempted: checkpoint at step (\d+) written", stderr).group(1))
  assert saved >= 3 and helpers.restore_params(workdir)[0] == saved


def test_code_version_is_the_checkouts_own_commit(tmp_path, monkeypatch):
  """run_info.code_version: the commit of the git checkout sasa_jax runs from and whether
  tracked files changed; nothing for a copy that is no checkout's root (an installed package,
  even inside another repository) or outside git."""
  from sasa_jax import run_info
  git = lambda where, *args: subprocess.run(  # noqa: E731
      ["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@t", *args],
      capture_output=True, text=True, check=True).stdout.strip()
  checkout, other, plain = tmp_path / "checkout", tmp_path / "other", tmp_path / "plain"
  for where in (checkout, other / "site-packages", plain):
    where.mkdir(parents=True)
    (where / "setup.py").write_text("# a checkout's file\n")
  for repo in (checkout, other):
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")
  monkeypatch.setattr(run_info, "ROOT", checkout)
  assert run_info.code_version() == {"commit": git(checkout, "rev-parse", "HEAD"),
                                     "uncommitted_changes": False}
  (checkout / "setup.py").write_text("# changed\n")
  assert run_info.code_version()["uncommitted_changes"] is True
  (checkout / "setup.py").write_text("# a checkout's file\n")
  (checkout / "new.py").write_text("")  # untracked: not a change to the code that ran
  assert run_info.code_version()["uncommitted_changes"] is False
  for where in (other / "site-packages", plain):
    monkeypatch.setattr(run_info, "ROOT", where)
    assert run_info.code_version() == {}


def test_metrics_rows_reach_a_local_file_as_they_are_written(tmp_path):
  from sasa_jax.metric_writers import JsonlWriter
  path = tmp_path / "metrics.jsonl"
  writer = JsonlWriter(path)
  writer.write_scalars(1, {"train/loss": np.float32(2.5)})
  assert path.read_text() == '{"step": 1, "train/loss": 2.5}\n'  # not held in a buffer
  writer.write_scalars(2, {"train/loss": 2.0})
  assert len(path.read_text().splitlines()) == 2
  writer.close()


def test_metrics_rows_are_uploaded_to_object_storage_when_due(gcs):
  out = helpers.run_module("tests.jsonl_on_storage", ["gs://sasa/metrics.jsonl"],
                           environ=helpers.env(**gcs.env), timeout=300)
  seen = json.loads(out.stdout.strip().splitlines()[-1])
  assert seen == {"before_upload": 0, "after_flush": 2, "due_at_once": 3, "steps": [1, 2, 3]}


def _config(**changes):
  sys.path.insert(0, os.path.join(helpers.ROOT, "configs"))
  import fashion_mnist  # noqa: PLC0415
  config = fashion_mnist.get_config(helpers.TINY_MODEL)
  config.unlock()
  for key, value in changes.items():
    target, *path = key.split(".")
    if path:
      config[target][path[0]] = value
    else:
      config[key] = value
  return config


@pytest.mark.parametrize("changes,match", [
    ({"dataset.name": "cifar10"}, r"config.dataset.name='cifar10' is not allowed; choose one of"),
    ({"model.kernel": 3}, r"config.model has unknown field\(s\) \['kernel'\]; allowed .*'kernel_size'"),
    ({"model.variant": "hybrid"}, r"config.model: variant='hybrid' is not allowed; choose one of"),
    ({"model.dtype": "float32"}, r"config.model.dtype is set by the top-level config.dtype"),
    ({"batch_size": 0}, r"config.batch_size=0 must be a positive multiple of the device count 1"),
    ({"dtype": "float16"}, r"config.dtype='float16' is not allowed"),
    ({"num_microbatches": 0}, r"config.num_microbatches=0 must be a positive integer"),
    ({"num_microbatches": 3}, r"config.batch_size=128 must be a positive multiple of the device "
                              r"count 1 times config.num_microbatches=3 \(3\)"),
    ({"batch_norm_group_size": 48}, r"config.batch_norm_group_size=48 must be 0 \(statistics "
                                    r"over the whole batch\) or a divisor of the 128 images each "
                                    r"of the 1 device\(s\) holds \(config.batch_size=128 / 1\)"),
    ({"batch_norm_group_size": 64, "num_microbatches": 4},
     r"config.batch_norm_group_size=64 must be 0 \(statistics over the whole microbatch\) or a "
     r"divisor of the 32 images .*\(config.batch_size=128 / num_microbatches=4 / 1\)"),
    ({"batch_norm_group_size": -1}, r"config.batch_norm_group_size=-1 must be 0"),
    ({"dataset.shuffle_buffer": 0}, r"config.dataset.shuffle_buffer=0 must be a positive number "
                                    r"of records"),
    ({"dataset.shuffle_window_mib": 0.0}, r"config.dataset.shuffle_window_mib=0.0 must be a "
                                          r"number of MiB > 0"),
    ({"keep_checkpoint_every_steps": 300}, r"config.keep_checkpoint_every_steps=300 must be 0 "
                                           r"\(keep the last config.keep_checkpoints only\) or a "
                                           r"multiple of config.checkpoint_every_steps=200"),
    ({"model.width_multiplier": 0.005}, r"config.model: width_multiplier=0.005 is not allowed; "
                                        r"it must be more than 0.0078125 \(at least one channel "
                                        r"where 1.0 has 64\)"),
])
def test_bad_config_fails_before_compiling(changes, match, tmp_path):
  from sasa_jax import train
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(_config(**changes), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("changes,match", [
    ({"dataset.train_split": "train[:50]"},
     r"config.num_epochs=4.0 of config.dataset.train_split='train\[:50\]' \(50 examples, 0 "
     r"steps of config.batch_size=128 per epoch\) makes no training step"),
    ({"dataset.eval_split": "tset[:100]"},  # would fail at the first evaluation
     r"config.dataset.eval_split='tset\[:100\]': Unknown split 'tset'. Should be one of "
     r"\['train', 'test'\]"),
    ({"dataset.eval_split": "test[:0]"},
     r"config.dataset.eval_split='test\[:0\]' holds no examples; fashion_mnist has train: "
     r"60000, test: 10000"),
    ({"dataset.train_split": "train[70000:]"},
     r"config.dataset.train_split='train\[70000:\]': Requested slice"),
    ({"dataset.train_split": "train[:50]", "num_train_steps": 10},
     r"config.batch_size=128 is larger than config.dataset.train_split='train\[:50\]' \(50 "
     r"examples\): an epoch holds no whole batch"),
])
def test_splits_that_make_no_run_fail_before_creating_anything(fmnist_dir, tmp_path, changes,
                                                               match):
  """An epoch count that makes no step of the split (50 images, batch 128), a batch larger
  than the split, a split TFDS cannot read and an empty one are named, and nothing is
  created."""
  from sasa_jax import train
  config = _config(**{"dataset.data_dir": fmnist_dir, **changes})
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_an_evaluation_that_fails_loses_no_training(fmnist_dir, tmp_path, monkeypatch):
  """The last step's checkpoint is written before its evaluation, which fails here."""
  from sasa_jax import train

  def fail(*args, **kwargs):
    raise RuntimeError("the evaluation failed")
  monkeypatch.setattr(train, "evaluate_split", fail)
  config = _config(**{"dataset.data_dir": fmnist_dir, "dataset.train_split": "train[:256]",
                      "batch_size": 16, "num_train_steps": 3})
  with pytest.raises(RuntimeError, match="the evaluation failed"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert helpers.restore_params(tmp_path / "run")[0] == 3


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  from sasa_jax import train
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match=r"the workdir .*/file is a file; give a directory"):
    train.train_and_evaluate(_config(), str(tmp_path / "file"))


def test_a_step_out_of_device_memory_says_what_to_change(fmnist_dir, tmp_path):
  """A real RESOURCE_EXHAUSTED: XLA:CPU under an 8 GB address-space limit cannot allocate the
  9 GB that 16,384 images need; the error names the fields and gives step_memory's command."""
  flags = helpers.tiny_flags(fmnist_dir, 1, batch=16384, train_split="train[:16384]")
  # util-linux's prlimit sets the limit: a preexec_fn would fork this multithreaded process.
  proc = subprocess.run(["prlimit", f"--as={8 * 10**9}",
                         *helpers.main_cmd(FMNIST, tmp_path / "run", flags)], cwd=helpers.ROOT,
                        env=helpers.env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  error = proc.stderr[proc.stderr.index("DeviceOutOfMemoryError: RESOURCE_EXHAUSTED"):]
  assert ("16384 images per device (config.batch_size=16384 on 1 device(s)) do not fit; "
          "instead:\n  --config.num_microbatches=2: the same step, the activations of 8192 "
          "images at a time\n  --config.dtype=bfloat16: activations in half the bytes\n"
          "  a smaller config.batch_size, or more devices\n") in error
  plan = error[error.index("python -m sasa_jax.tools.step_memory"):].splitlines()[0]
  assert plan == ("python -m sasa_jax.tools.step_memory " + " ".join(
      f"'{f}'" if "[" in f else f for f in [f"--config={FMNIST}", *flags])
      + " --devices=1 --microbatches=1,2,4,8")


def test_out_of_memory_advice_follows_the_batch_norm_groups():
  """16 images per device on 4 devices: groups of 8 allow microbatches of 8, 4 (2 devices'
  groups) and 2 (4 devices'); groups of 16, microbatches of 8 and 4 only; a run already at
  its most microbatches is told so."""
  from sasa_jax import train
  config = _config(batch_size=64, num_microbatches=1, batch_norm_group_size=8)
  assert train.larger_microbatch_counts(config, 4) == [2, 4, 8]
  config.batch_norm_group_size = 16
  assert train.larger_microbatch_counts(config, 4) == [2, 4]
  config.num_microbatches, config.dtype = 4, "bfloat16"
  advice = train.out_of_memory_advice(config, 4, ["main.py", "--config", "configs/x.py:a=1"])
  assert advice == (
      "16 images per device (config.batch_size=64 on 4 device(s), in 4 microbatches of 4) do "
      "not fit; instead:\n  config.num_microbatches=4 is the most that splits them into "
      "BatchNorm groups of config.batch_norm_group_size=16\n  a smaller config.batch_size, or "
      "more devices\nPlan each before running, on a device of this kind: python -m "
      "sasa_jax.tools.step_memory --config configs/x.py:a=1 --devices=4 --microbatches=4")
  assert train.config_flags_of(["main.py", "--config.profile", "--workdir=/w", "--config=c.py",
                                "--config.dataset.eval_split=test[:5]"]) == [
      "--config.profile", "--config=c.py", "'--config.dataset.eval_split=test[:5]'"]


def test_batch_norm_groups_may_be_the_images_of_whole_devices():
  """On 4 devices holding 32 images each, groups of 64 or 128 images are those of 2 or 4
  devices; 48 splits no device's share and 96 is 3 devices', which do not divide 4."""
  from sasa_jax import train
  config = _config()
  for group in (16, 64, 128):
    config.batch_norm_group_size = group
    train.validate_config(config, devices=4)
  for group in (48, 96):
    config.batch_norm_group_size = group
    with pytest.raises(ValueError, match=(
        rf"config.batch_norm_group_size={group} must be 0 \(statistics over the whole batch\), "
        r"a divisor of the 32 images each of the 4 device\(s\) holds \(config.batch_size=128 "
        r"/ 4\), or a multiple of 32 that divides 128 \(groups of whole devices\)$")):
      train.validate_config(config, devices=4)


def test_batch_not_divisible_by_devices_names_the_field(tmp_path):
  # Through tests/gc_probe.py: the garbage collector that sasa_jax.main turns off while it
  # imports is on again when training starts (the batch is checked there).
  args = helpers.main_cmd(FMNIST, tmp_path, ["--config.batch_size=6"])[2:]
  proc = helpers.run_module("tests.gc_probe", args, environ=helpers.env(4), check=False)
  assert proc.returncode != 0
  assert "config.batch_size=6 must be a positive multiple of the device count 4" in proc.stderr
  assert "garbage collector on at exit: True" in proc.stdout


@pytest.mark.parametrize("older", [False, True])
def test_missing_imagenet_says_how_to_prepare(tmp_path, older):
  """Nothing prepared, or only a version that this TFDS release does not read (a shared data
  dir prepared with an older release)."""
  from sasa_jax import train
  data_dir = tmp_path / "tfds"
  if older:
    (data_dir / "imagenet2012" / "5.0.0").mkdir(parents=True)
    (data_dir / "imagenet2012" / "5.0.0" / "dataset_info.json").write_text("{}")
  config = _config(**{"dataset.name": "imagenet2012", "dataset.data_dir": str(data_dir)})
  with pytest.raises(FileNotFoundError) as raised:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(raised.value)
  assert re.search(rf"'imagenet2012' is not prepared in config.dataset.data_dir='{data_dir}': "
                   rf"TFDS reads version 5.1.0 from {data_dir}/imagenet2012/5.1.0", message)
  assert "tfds build imagenet2012" in message
  assert ("it holds version(s) 5.0.0 only, which this tensorflow-datasets release does not "
          "read: prepare 5.1.0 there" in message) == older


def test_config_strings():
  sys.path.insert(0, os.path.join(helpers.ROOT, "configs"))
  import imagenet  # noqa: PLC0415
  config = imagenet.get_config("depth=26,variant=conv_stem_attention,attention_groups=2-3-4,"
                               "holdout=true")
  assert config.model.depth == 26 and config.model.attention_groups == (2, 3, 4)
  assert config.dataset.train_split == "train[:96%]"
  assert config.dataset.eval_split == "train[96%:]"
  assert config.schedule.peak_value == pytest.approx(1.6)  # 0.1 per 256, linearly scaled
  with pytest.raises(ValueError, match=r"config argument 'depht' is not allowed"):
    imagenet.get_config("depht=50")
  from sasa_jax.models import create_resnet
  create_resnet(**config.model)  # config.model is exactly create_resnet's keywords
  assert isinstance(config, ml_collections.ConfigDict)


def test_the_loop_builds_impl_auto_as_its_backends_implementation():
  from sasa_jax import tasks
  from sasa_jax.ops import default_impl
  config = _config()
  assert config.model.get("impl", "auto") == "auto"
  model = tasks.get(config).create_model()
  impls = {s.impl for s in model.group_attention if s is not None}
  assert impls == {default_impl()} == {"cpu"} and model.stem_impl == "cpu"


def test_run_once_compiles_initialisation_with_the_cpu_options(monkeypatch):
  from sasa_jax import run_once as run_once_lib
  from sasa_jax.models import create_resnet
  model = create_resnet(14, "full_attention", num_classes=10, width_multiplier=0.125,
                        num_heads=2, kernel_size=3, small_images=True)
  init = jax.jit(functools.partial(model.init, train=False))
  args = (jax.random.key(3), jnp.zeros((1, 28, 28, 1)))
  once, default = run_once_lib.run_once(init, *args), init(*args)
  assert jax.tree.structure(once) == jax.tree.structure(default)
  for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(default)):  # equal up to contraction
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  monkeypatch.setattr(run_once_lib, "CPU_OPTIONS", {"xla_no_such_option": 1})
  with pytest.raises(Exception, match="xla_no_such_option"):  # the options reach XLA
    run_once_lib.run_once(jax.jit(lambda: jnp.ones(3) * 2))


def _sgd_step_fn():
  """(state, batch, step(batch, **config changes) -> (state, metrics)): the loop's train_step
  on the tiny model with plain SGD at learning rate 1 (the parameter change is minus the
  gradient), from one initial state, on 8 random Fashion-MNIST-shaped images."""
  from sasa_jax import tasks, train
  config = _config()
  task = tasks.get(config)
  model = task.create_model()
  tx = optax.sgd(1.0)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  init, _, _ = train.initial_state(config, model, tx, mesh, (28, 28, 1))
  state = jax.jit(init)()
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, (8,))}

  def step(batch, **changes):
    config.update({"num_microbatches": 1, "batch_norm_group_size": 0, **changes})
    return jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                     schedule=optax.constant_schedule(1.0), config=config,
                                     task=task))(state, batch)
  return batch, step


def _assert_state_is_the_average(got, got_metrics, steps):
  """Parameters, BatchNorm statistics and loss of `got` are the averages of `steps`'
  (each a (state, metrics) pair)."""
  for name in ("params", "batch_stats"):
    want = jax.tree.map(lambda *xs: sum(xs) / len(xs), *(getattr(s, name) for s, _ in steps))
    for value, expected in zip(jax.tree.leaves(getattr(got, name)), jax.tree.leaves(want)):
      np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_metrics["train/loss"],
                             np.mean([m["train/loss"] for _, m in steps]), rtol=1e-6)


def _max_difference(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                             jax.tree.leaves(b)))


def test_throughput_counts_images_and_the_wait_for_input_between_log_steps():
  """train.Throughput on a driven clock: images/s over all devices and per device, and the
  share of the interval spent in next(iterator); a restart (after an evaluation) drops
  what came before, and a log step that is the restart's step reports nothing."""
  from sasa_jax import train
  now = [10.0]

  def slow_batches():
    while True:
      now[0] += 0.5  # each batch takes 0.5 s to arrive
      yield "batch"
  batches = slow_batches()
  meter = train.Throughput(batch_size=8, devices=4, step=1, clock=lambda: now[0])
  for _ in range(4):
    assert meter.next_batch(batches) == "batch"
    now[0] += 1.5  # the rest of the step
  assert meter.since_last(5) == {"images_per_sec": 4.0, "images_per_sec_per_device": 1.0,
                                 "input_wait_fraction": 0.25}
  meter.next_batch(batches)
  meter.restart(6)  # an evaluation: its time and the wait before it are left out
  assert meter.since_last(6) == {}
  meter.next_batch(batches)
  now[0] += 0.5
  assert meter.since_last(7) == {"images_per_sec": 8.0, "images_per_sec_per_device": 2.0,
                                 "input_wait_fraction": 0.5}


def test_peak_memory_of_the_devices_that_report_it():
  """device_memory.peak_memory: the largest peak, the smallest limit and the largest peak
  share over devices whose backend reports memory (as GPUs and TPUs do: the dict each
  device's memory_stats() returns); nothing for the CPU's devices, which report none."""
  from sasa_jax.device_memory import peak_memory

  class Reporting:  # a device's memory_stats(), as jax's GPU and TPU devices return it
    def __init__(self, peak, limit):
      self.stats = {"peak_bytes_in_use": peak * 2**30, "bytes_limit": limit * 2**30,
                    "bytes_in_use": 1}

    def memory_stats(self):
      return self.stats
  assert peak_memory([Reporting(30, 80), Reporting(60, 78)]) == {
      "device_memory_peak_gib": 60, "device_memory_limit_gib": 78,
      "device_memory_peak_fraction": 60 / 78}
  assert peak_memory(jax.local_devices()) == {}


def test_microbatches_make_one_step_of_the_microbatch_steps_average():
  """num_microbatches=2: one step whose parameter change, BatchNorm statistics and loss are
  the averages of single steps on rows 0, 2, 4, ... and rows 1, 3, 5, ..."""
  batch, step = _sgd_step_fn()
  split, split_metrics = step(batch, num_microbatches=2)
  halves = [step(jax.tree.map(lambda x, i=i: x[i::2], batch)) for i in range(2)]
  _assert_state_is_the_average(split, split_metrics, halves)
  # Not the whole batch's step: each microbatch has its own BatchNorm statistics.
  assert _max_difference(split.params, step(batch)[0].params) > 1e-3


def test_batch_norm_groups_make_one_step_of_the_groups_steps_average():
  """batch_norm_group_size=4 on 8 images: BatchNorm over rows 0-3 and rows 4-7 apart, so the
  step is the average of single steps on each half (and, at once, what 2 microbatches of
  those rows make); not the whole batch's step."""
  batch, step = _sgd_step_fn()
  grouped, grouped_metrics = step(batch, batch_norm_group_size=4)
  halves = [step(jax.tree.map(lambda x, i=i: x[4 * i:4 * i + 4], batch)) for i in range(2)]
  _assert_state_is_the_average(grouped, grouped_metrics, halves)
  assert _max_difference(grouped.params, step(batch)[0].params) > 1e-3
  # With 2 microbatches too: microbatch i takes rows i::2 and groups its contiguous pairs,
  # so with rows interleaved thus the four groups are the batch's quarters.
  interleaved = jax.tree.map(
      lambda x: np.swapaxes(x.reshape(2, 4, *x.shape[1:]), 0, 1).reshape(x.shape), batch)
  both, both_metrics = step(interleaved, num_microbatches=2, batch_norm_group_size=2)
  quarters = [step(jax.tree.map(lambda x, i=i: x[2 * i:2 * i + 2], batch)) for i in range(4)]
  _assert_state_is_the_average(both, both_metrics, quarters)


# A training step of the tiny model with the attention stem (its BatchNorm,
# layers.stem.BatchNormReluBlockMax, crosses devices too) on a random batch of BATCH images,
# in one process or in several (SASA_NUM_PROCESSES).
STEM_STEP_SETUP = """
import json, re, sys
from sasa_jax import distributed
distributed.initialize_from_env()
import jax, numpy as np, optax
from jax import export
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, "configs")
import fashion_mnist
from tests import helpers
from sasa_jax import tasks, train
from sasa_jax.data import input_pipeline
config = fashion_mnist.get_config(helpers.TINY_MODEL + ",stem_type=spatially_aware")
config.batch_size = BATCH
task = tasks.get(config)
model = task.create_model()
tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
mesh = Mesh(np.asarray(jax.devices()), ("data",))
init, state, state_sharding = train.initial_state(config, model, tx, mesh, (28, 28, 1))
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 256, (BATCH, 28, 28, 1), dtype=np.uint8),
         "label": rng.integers(0, 10, (BATCH,)).astype(np.int32)}
"""

GROUPED_ON_FOUR_DEVICES = "BATCH = 16" + STEM_STEP_SETUP + """
out = {"collectives": {}, "replica_groups": {}, "difference": {}}
for group in (0, 2, 8):  # the whole batch; 2 of each device's 4 images; 2 devices' 8
  config.batch_norm_group_size = group
  train.validate_config(config)
  step = train.jit_train_step(config, task, model, tx, schedule, state_sharding,
                              NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    text = step.lower(state, batch).compile().as_text()
  ops = re.findall(r"\\b(all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\\(", text)
  out["collectives"][group] = {op: ops.count(op) for op in set(ops)}
  out["replica_groups"][group] = sorted(set(re.findall(r"replica_groups=(\\S+?),? ", text)))
  if group:  # the same step on one device, its groups by vmap alone
    one_device = jax.jit(lambda s, b: train.train_step(
        s, b, model=model, tx=tx, schedule=schedule, config=config, task=task))
    state = jax.jit(init)()
    single, _ = one_device(jax.device_put(state, jax.devices()[0]), batch)
    with jax.set_mesh(mesh):
      sharded, _ = step(state, batch)  # donates state
    out["difference"][group] = {
        name: max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(getattr(sharded, name)),
                                  jax.tree.leaves(getattr(single, name))))
        for name in ("params", "batch_stats")}
config.model.impl = "pallas"  # the TPU kernels, lowered within each device's model
model = task.create_model()
_, state, _ = train.initial_state(config, model, tx, mesh, (28, 28, 1))
out["tpu_kernels"] = {}
for group in (2, 8):
  config.batch_norm_group_size = group
  step = train.jit_train_step(config, task, model, tx, schedule, state_sharding,
                              NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    text = export.export(step, platforms=["tpu"])(state, batch).mlir_module()
  out["tpu_kernels"][group] = text.count("tpu_custom_call")
out["attention_layers"] = sum(s is not None for s in model.group_attention)
print(json.dumps(out))
"""


def test_batch_norm_groups_on_four_devices_stay_on_their_devices():
  """4 images per device, the model run per device: with batch_norm_group_size=2 the
  compiled step's only collective is the all-reduce of gradients and running statistics
  (BatchNorm over the global batch all-reduces in every layer); with 8, every layer's
  statistics are all-reduced within devices {0, 1} and {2, 3} alone. Each step equals the
  same grouped step on one device; with impl="pallas" both lower for TPU with every
  attention layer's kernels."""
  proc = helpers.run_python(GROUPED_ON_FOUR_DEVICES, devices=4)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  collectives, groups = out["collectives"], out["replica_groups"]
  assert set(collectives["0"]) == {"all-reduce"} and collectives["0"]["all-reduce"] > 10
  assert collectives["2"] == {"all-reduce": 1} and groups["2"] == ["{{0,1,2,3}}"]
  assert set(collectives["8"]) == {"all-reduce"} and collectives["8"]["all-reduce"] > 10
  assert groups["8"] == ["{{0,1,2,3}}", "{{0,1},{2,3}}"]  # the gradients'; the statistics'
  for group in ("2", "8"):
    assert max(out["difference"][group].values()) < 1e-5, out["difference"]
  for kernels in out["tpu_kernels"].values():
    assert kernels == 3 * out["attention_layers"] > 0  # fwd, dq, dk/dv


GROUPED_STEP = "BATCH = 8" + STEM_STEP_SETUP + """
batch_sharding = NamedSharding(mesh, P("data"))
i, n = jax.process_index(), jax.process_count()  # this process's rows, as the loop's shards
batch = input_pipeline.to_global(jax.tree.map(lambda x: x[i * 8 // n:(i + 1) * 8 // n], batch),
                                 batch_sharding)
for group in map(int, sys.argv[2:]):
  config.batch_norm_group_size = group
  train.validate_config(config)
  state = jax.jit(init, out_shardings=state_sharding)()  # as the loop builds it
  step = train.jit_train_step(config, task, model, tx, schedule, state_sharding,
                              batch_sharding)
  with jax.set_mesh(mesh):
    state, _ = step(state, batch)
  if i == 0:
    np.savez(f"{sys.argv[1]}_{group}.npz", *[np.asarray(x) for x in jax.tree.leaves(
        {"params": state.params, "batch_stats": state.batch_stats})])
"""


def test_batch_norm_groups_across_processes_equal_one_process(tmp_path):
  """4 processes x 1 device (gloo on loopback), the attention stem, 2 images per device,
  batch_norm_group_size=4: BatchNorm statistics all-reduced within processes {0, 1} and
  {2, 3}. The step equals the same step in 1 process x 4 devices (itself equal to one
  device's, test above), and differs from BatchNorm over the whole batch."""
  codes, errors = helpers.run_processes(
      lambda i: [sys.executable, "-c", GROUPED_STEP, str(tmp_path / "processes"), "4"], 4,
      timeout=600)
  assert codes == [0] * 4, errors[0][-3000:]
  proc = subprocess.run([sys.executable, "-c", GROUPED_STEP, str(tmp_path / "devices"), "4",
                         "0"], env=helpers.env(devices=4), cwd=helpers.ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got, want, whole = (list(np.load(tmp_path / f"{name}.npz").values())
                      for name in ("processes_4", "devices_4", "devices_0"))
  assert len(got) == len(want) > 50
  assert _max_difference(got, want) < 1e-5
  assert _max_difference(got, whole) > 1e-3


@pytest.mark.parametrize("group", [0, 2, 4])
def test_microbatches_on_four_devices_move_no_images_and_evaluate_everything(
    fmnist_dir, tmp_path, group):
  """Through the command line on 4 devices: each microbatch takes its rows from every
  device's share of the batch without moving them (no all-to-all, all-gather or
  collective-permute in the compiled step), with BatchNorm over each microbatch, over
  groups of 2 images on each device or of 2 devices' 2 images, and evaluation in batches of
  one microbatch's size sees every example once."""
  workdir, dump = tmp_path / "run", tmp_path / "hlo"
  environ = helpers.env(4, JAX_ENABLE_COMPILATION_CACHE="false")  # compile, so XLA dumps
  environ["XLA_FLAGS"] += f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*train_step.*"
  flags = helpers.tiny_flags(fmnist_dir, 2, eval_every=2) + [
      "--config.num_microbatches=2", f"--config.batch_norm_group_size={group}"]
  config = FMNIST + ",stem_type=spatially_aware"  # its BatchNorm and embeddings per device
  proc = helpers.run_module("sasa_jax.main", helpers.main_cmd(config, workdir, flags)[3:],
                            environ=environ)
  assert ("batch 16: 4 per device on 4 device(s) in 1 process(es), as 2 microbatches of 2"
          + (f"; BatchNorm statistics over groups of {group} images" if group else "")
          + (", each across 2 devices" if group == 4 else "") + "\n" in proc.stderr)
  rows = helpers.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  (timed,) = [r for r in rows if "images_per_sec" in r]  # step 2: the clock starts at 1
  assert timed["images_per_sec_per_device"] == pytest.approx(timed["images_per_sec"] / 4)
  (final,) = [r for r in rows if "eval/accuracy" in r]
  assert final["eval/num_examples"] == 100
  (hlo,) = [p for p in dump.iterdir() if p.name.endswith("after_optimizations.txt")]
  text = hlo.read_text()
  assert re.search(r"all-reduce(-start)?\(", text)  # the gradients: the dump is the step's
  assert not re.search(r"(all-to-all|all-gather|collective-permute)(-start)?\(", text)
  assert ("replica_groups={{0,1},{2,3}}" in text) == (group == 4)  # statistics of 2 devices


@pytest.mark.parametrize("config_file,data_fixture", [
    ("fashion_mnist", "fmnist_dir"), ("fashion_mnist_detection", "detection_dir")])
def test_a_tasks_train_batch_spec_is_what_its_pipeline_makes(config_file, data_fixture,
                                                            request):
  """What tools/step_memory compiles the step for, against the real pipeline's batches."""
  from sasa_jax import data as data_lib
  from sasa_jax import tasks, train
  sys.path.insert(0, os.path.join(helpers.ROOT, "configs"))
  config = __import__(config_file).get_config()
  task = tasks.get(config)
  builder = data_lib.get_builder(config.dataset.name, request.getfixturevalue(data_fixture))
  size = config.dataset.image_size
  ds = data_lib.train_dataset(builder, split="train[:64]", per_host_batch=4, image_size=size,
                              seed=0, shuffle_buffer=64,
                              detection_options=train._detection_options(task, config))
  made = {k: (x.shape, x.dtype) for k, x in next(ds.as_numpy_iterator()).items()}
  channels = len(data_lib.DATASETS[config.dataset.name].mean)
  spec = {k: (s.shape, s.dtype) for k, s in
          task.train_batch_spec(4, (size, size, channels)).items()}
  assert made == spec


def _one_device_loop(config):
  """The loop's task, model, optimizer and jitted step for `config` on one device, its
  state's init(), abstract state and sharding: the pieces train_and_evaluate builds."""
  import types
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from sasa_jax import optim, tasks, train
  task = tasks.get(config)
  model = task.create_model()
  schedule = optim.create_schedule(config.schedule, 10, 100)
  tx = optim.create_optimizer(config.optimizer, schedule)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  init, abstract_state, state_sharding = train.initial_state(config, model, tx, mesh,
                                                             (28, 28, 1))
  data = NamedSharding(mesh, P("data"))
  step = train.jit_train_step(config, task, model, tx, schedule, state_sharding, data)
  return types.SimpleNamespace(task=task, model=model, mesh=mesh, init=init,
                               abstract_state=abstract_state, state_sharding=state_sharding,
                               data=data, step=step)


@pytest.mark.parametrize("microbatches,group", [(2, 0), (1, 2)])
def test_the_microbatched_step_exports_for_tpu_and_cuda_with_the_kernels(microbatches, group):
  """The loop's own step (train.jit_train_step, impl="pallas") lowers for TPU and CUDA under
  a mesh, as 2 microbatches (one loop) or with BatchNorm over groups of 2 images (the model
  mapped over them): every attention layer's kernels."""
  from jax import export
  config = _config(**{"model.impl": "pallas", "num_microbatches": microbatches,
                      "batch_norm_group_size": group, "batch_size": 8})
  loop = _one_device_loop(config)
  task, model, mesh, step = loop.task, loop.model, loop.mesh, loop.step
  state = loop.abstract_state
  layers = sum(s is not None for s in model.group_attention)
  for platform, call in (("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")):
    with jax.set_mesh(mesh):
      text = export.export(step, platforms=[platform], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
              state, task.train_batch_spec(8, (28, 28, 1))).mlir_module()
    assert text.count("stablehlo.while") == (microbatches > 1)  # the microbatch loop
    assert text.count(call) == 3 * layers  # fwd, dq and dk/dv kernels per attention layer


def test_ema_trails_the_parameters_with_a_warming_decay_and_evaluation_reads_it():
  """config.ema_decay = d: after step t (from 0) ema = c ema + (1 - c) params with
  c = min(d, (1 + t) / (10 + t)); the eval step runs the EMA weights."""
  from sasa_jax import data as data_lib, train
  config = _config(ema_decay=0.2, batch_size=4)
  loop = _one_device_loop(config)
  task, model, mesh, step = loop.task, loop.model, loop.mesh, loop.step
  state = jax.jit(loop.init)()
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (4, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, (4,), dtype=np.int32)}
  want = jax.device_get(state.params)
  for t in range(3):  # c = 0.1, 2/11, then d = 0.2 (below 3/12)
    with jax.set_mesh(mesh):
      state, _ = step(state, batch)
    c = min(0.2, (1 + t) / (10 + t))
    want = jax.tree.map(lambda e, p: c * e + (1 - c) * p, want, jax.device_get(state.params))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(state.ema_params))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  eval_batch = {**batch, "mask": np.ones(4, np.float32)}
  evaluate = train.jit_eval_step(config, task, model, loop.state_sharding, loop.data)
  with jax.set_mesh(mesh):
    sums = jax.device_get(evaluate(state, eval_batch))
    on_params = jax.device_get(evaluate(state.replace(ema_params=state.params), eval_batch))
  logits = model.apply({"params": state.ema_params, "batch_stats": state.batch_stats},
                       data_lib.normalize(batch["image"], "fashion_mnist"), train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).sum()
  np.testing.assert_allclose(sums["loss"], loss, rtol=1e-5)
  assert abs(float(sums["loss"]) - float(on_params["loss"])) > 1e-4


def test_classification_loss_smooths_labels_and_eval_sums_count_masked_hits():
  from sasa_jax import tasks
  task = tasks.get(_config(label_smoothing=0.2))
  p = jnp.array([[0.7, 0.2, 0.05, 0.05, 0.0, 0.0],     # label 0: top-1
                 [0.14, 0.13, 0.12, 0.11, 0.0, 0.5],   # label 3: 5th
                 [0.6, 0.1, 0.1, 0.1, 0.05, 0.05],     # label 0: top-1, masked out
                 [0.3, 0.3, 0.2, 0.1, 0.07, 0.03]])    # label 5: last
  logits, labels = jnp.log(p + 1e-9), jnp.array([0, 3, 0, 5])
  loss, metrics = task.loss(logits, {"label": labels})
  target = 0.8 * jax.nn.one_hot(labels, 6) + 0.2 / 6  # smoothing spreads 0.2 over 6 classes
  p = jax.nn.softmax(logits)
  np.testing.assert_allclose(loss, -(target * jnp.log(p)).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["train/accuracy"], 0.5)
  sums = task.eval_outputs(logits, {"label": labels, "mask": jnp.array([1.0, 1.0, 0.0, 1.0])})
  assert (float(sums["top1"]), float(sums["top5"]), float(sums["count"])) == (1, 2, 3)
  np.testing.assert_allclose(sums["loss"], -jnp.log(p[[0, 1, 3], [0, 3, 5]]).sum(), rtol=1e-5)
