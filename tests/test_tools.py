"""The demo, the small-scale tables, run plots and attention maps on real Fashion-MNIST."""

import re
import shutil

import matplotlib.image
import numpy as np
import pytest

from tests import helpers


def _run(module, *args, timeout=900):
  return helpers.run_module(module, args, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(fmnist_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo") / "run"
  flags = [f"--workdir={workdir}", f"--config.dataset.data_dir={fmnist_dir}",
           "--config.dataset.train_split=train[:384]", "--config.dataset.eval_split=test[:200]",
           "--config.num_train_steps=4", "--config.batch_size=32", "--config.log_every_steps=2",
           "--config.model.depth=14"]
  first = _run("sasa_jax.tools.demo", *flags)
  return workdir, flags, first


def test_demo_reports_accuracy_params_and_time(demo_run):
  workdir, flags, first = demo_run
  out = first.stdout
  assert "test accuracy" in out and "on 200 test images" in out
  assert "parameters" in out and "wall time" in out
  assert re.search(r"training +[\d,]+ images/s, \d+% of the time waiting for input", out)
  assert (workdir / "metrics.jsonl").exists() and (workdir / "config.json").exists()
  again = _run("sasa_jax.tools.demo", *flags)  # existing workdir: resumes, no crash
  assert "resumed from" in again.stderr and "at step 4" in again.stdout
  # Through tests/gc_probe.py: the garbage collector, off while the demo imports, is on again.
  fresh = _run("tests.gc_probe", "sasa_jax.tools.demo", *flags, "--fresh")
  assert "resumed from" not in fresh.stderr and "test accuracy" in fresh.stdout
  assert "garbage collector on at exit: True" in fresh.stdout


def test_attention_maps_png(demo_run):
  workdir, _, _ = demo_run
  out = workdir / "maps.png"
  _run("sasa_jax.tools.attention_maps", f"--workdir={workdir}", "--image=3",
       "--layer=group3_block1", "--queries", "1,1", "3,2", f"--out={out}")
  image = matplotlib.image.imread(out)
  assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_an_image_of_the_eval_split_is_found_in_its_base_split(fmnist_dir):
  """attention_maps --image=N: the N-th image of the run's evaluation split, whatever its
  spec (a held-out run's "train[96%:]" starts at training image 57,600)."""
  import tensorflow_datasets as tfds

  from sasa_jax.tools.attention_maps import example_split
  splits = tfds.builder("fashion_mnist", data_dir=fmnist_dir).info.splits
  assert example_split(splits, "test", 7) == "test[7:8]"
  assert example_split(splits, "test[:200]", 199) == "test[199:200]"
  assert example_split(splits, "train[96%:]", 0) == "train[57600:57601]"
  assert example_split(splits, "train[:3]+test[10:]", 4) == "test[11:12]"
  with pytest.raises(ValueError, match=r"--image=200 is out of range: split 'test\[:200\]' "
                                       r"has 200 images"):
    example_split(splits, "test[:200]", 200)


def test_window_probabilities_mask_the_border():
  from sasa_jax.tools.attention_maps import window_probabilities
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 5, 6, 8))
  rel = rng.normal(size=(3, 2))
  probs = window_probabilities(q, k, rel, rel, 0, 0, kernel_size=3, num_heads=2)
  np.testing.assert_allclose(probs.sum(axis=(1, 2)), 1.0)
  assert (probs[:, 0, :] == 0).all() and (probs[:, :, 0] == 0).all()  # above / left of the image


def test_plot_run(demo_run, tmp_path):
  workdir, _, _ = demo_run
  out = tmp_path / "curves.png"
  _run("sasa_jax.tools.plot_run", str(workdir), str(workdir), f"--out={out}")
  assert matplotlib.image.imread(out).shape[2] in (3, 4)


def test_status_of_a_finished_run_and_of_one_writing_its_metrics(demo_run, tmp_path):
  """tools/status on the demo's run: finished, not held; then on a copy whose metrics.jsonl
  ends in a row being written (a local file read mid-append): that row is left out."""
  workdir, _, _ = demo_run
  out = _run("sasa_jax.tools.status", str(workdir)).stdout
  assert re.search(r"tools/demo.py --workdir=.*\n  not running \(no run holds the workdir\)\n"
                   r"  step 4 of 4 \(100.0%\): train/loss [\d.]+", out), out
  assert "checkpoints: 4\n" in out and "last evaluation at step 4: eval/loss" in out
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  assert "device memory" not in out  # the CPU reports none
  with open(copy / "metrics.jsonl", "a") as f:  # as a GPU run logs it
    f.write('{"step": 4, "device_memory_peak_gib": 41.25, "device_memory_limit_gib": 59.3, '
            '"device_memory_peak_fraction": 0.6956}\n{"step": 5, "train/lo')
  out = _run("sasa_jax.tools.status", str(copy)).stdout
  assert "  step 4 of 4 (100.0%)" in out, out
  assert ("  device memory: peak 41.2 GiB of 59.3 GiB (70% on the fullest device) on "
          "process 0's devices\n") in out, out


def test_status_and_the_run_readers_name_what_is_missing(demo_run, tmp_path):
  """tools/status on a folder that is no run, and on a run killed before its first logged
  step (its lease lapsed); the run readers' errors name the path or the allowed values."""
  import json
  import time
  from sasa_jax.tools import runs, status
  workdir, _, _ = demo_run
  assert status.report(tmp_path) == [
      f"{tmp_path}: no config.json: not a sasa_jax run directory (yet)"]
  killed = tmp_path / "killed"
  killed.mkdir()
  shutil.copy(workdir / "config.json", killed)
  (killed / "lease.json").write_text(json.dumps(
      {"run": "0123abcd", "host": "node7", "pid": 4242, "started": "2026-12-06T10:00:00+00:00",
       "renewed": time.time() - 600}))
  lines = status.report(killed)
  assert re.fullmatch(r"  not running: the lease of run 0123abcd on host node7 \(pid 4242\), "
                      r"started 2026-12-06T10:00:00\+00:00, renewed 6\d\d s ago by this "
                      r"machine's clock has lapsed \(its run was killed; the next start takes "
                      r"over\)", lines[1]), lines
  assert lines[2:] == ["  no training step logged yet", "  checkpoints: none"]
  assert [status._duration(t) for t in (90, 600, 7300)] == ["90 s", "10 min", "2 h 01 min"]
  with pytest.raises(FileNotFoundError, match="no config.json in it or in its subfolders"):
    runs.workdirs([str(tmp_path / "killed" / "checkpoints")])
  with pytest.raises(FileNotFoundError, match=r"config.json not found: is .* a sasa_jax run"):
    runs.read_config(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*killed/checkpoints"):
    runs.load_trained(killed)
  with pytest.raises(ValueError, match=r"weights='best' is not allowed; choose one of "
                                       r"\('ema', 'raw'\)"):
    runs.load_trained(workdir, weights="best")


def test_series_follow_the_last_start_of_a_resumed_run():
  """Rows as metrics.jsonl holds them after a run logged steps 1-7 (evaluating at 6), was
  killed and resumed from its step-4 checkpoint: each series repeats no step and keeps the
  resumed run's values from step 5 on; a metric the resumed run has not reached again keeps
  its last value."""
  from sasa_jax.tools.runs import final, series
  rows = [{"step": s, "train/loss": 10.0 - s} for s in range(1, 8)]
  rows.insert(6, {"step": 6, "eval/accuracy": 0.5})  # after step 6's train row
  rows += [{"step": s, "train/loss": 20.0 - s} for s in range(5, 7)]  # the resumed run
  assert series(rows, "train/loss") == ([1, 2, 3, 4, 5, 6], [9.0, 8.0, 7.0, 6.0, 15.0, 14.0])
  assert series(rows, "eval/accuracy") == ([6], [0.5])
  assert final(rows, "train/loss") == 14.0
  rows.append({"step": 6, "eval/accuracy": 0.6})
  assert series(rows, "eval/accuracy") == ([6], [0.6])


def test_tables_quick(fmnist_dir, tmp_path):
  outdir = tmp_path / "tables"
  proc = _run("sasa_jax.tools.tables", "--quick", "--seeds=1", f"--outdir={outdir}",
              f"--data-dir={fmnist_dir}")
  report = (outdir / "report.md").read_text()
  from sasa_jax.tools.tables import RUNS
  for _, labels in RUNS.values():
    for label in labels.values():
      assert f"| {label} (" in report
  assert report.count("The paper's ordering") == 6  # Tables 1 and 3-7
  for png in ("accuracy_vs_step.png", "accuracy_vs_cost.png"):
    assert matplotlib.image.imread(outdir / png).ndim == 3
  assert "total wall time" in proc.stdout


def test_hlo_profile_counts_loop_iterations_and_skips_the_loop():
  import jax
  import jax.numpy as jnp
  from sasa_jax.ops.blocked import local_attention_blocked, plan_axis
  from sasa_jax.tools.hlo_profile import hlo_profile
  # 2 images of 4 x 4 blocks, at most one image's logits per chunk: a loop of 2 chunks.
  plan = plan_axis(8, 1, min_block=4)
  x = jnp.ones((2, 8, 8, 8), jnp.float32)
  rel = jnp.ones((3, 2), jnp.float32)

  def loss(q, k, v):
    return jnp.sum(local_attention_blocked(q, k, v, rel, rel, kernel_size=3, num_heads=2,
                                           plan_h=plan, plan_w=plan, chunk_logits=2 * 4 * 16 * 36))
  exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
  assert "while" in exe.as_text()
  rows = hlo_profile(exe, x, x, x, runs=2)
  assert rows and all(r.ms > 0 and r.calls >= 1 for r in rows)
  assert not any(r.contents.split()[0] in ("while", "call", "conditional") for r in rows)
  assert abs(sum(r.share for r in rows) - 1) < 1e-6
  assert [r.ms for r in rows] == sorted((r.ms for r in rows), reverse=True)
  # The q.k product runs once per chunk in the forward loop and again in the backward's.
  logit_products = [r for r in rows if "dot" in r.contents and r.shape.endswith(",16,36]")]
  assert logit_products and all(r.calls == 2 for r in logit_products)
  assert len(hlo_profile(exe, x, x, x, runs=1, top=3)) == 3
  # Rows name the JAX code they came from (not those the compiler made up, such as copies);
  # the CPU backend records no device events.
  sources = [r.source for r in rows]
  assert all(s == "" or s.startswith("jit(loss)/") for s in sources), sources
  assert sum(s.startswith("jit(loss)/") for s in sources) > len(rows) / 2, sources
  assert any(s.startswith("jit(loss)/jvp()/while") for s in sources) and any(
      s.startswith("jit(loss)/transpose(jvp())/while") for s in sources)  # fwd and bwd loops
  assert hlo_profile(exe, x, x, x, runs=1, planes="device") == []
  assert len(hlo_profile(exe, x, x, x, runs=1, planes="host")) == len(rows)


def test_bench_quick_prints_ratios():
  import json
  out = _run("sasa_jax.tools.bench", "--quick", "--format=json", "--hlo-profile=3").stdout
  rows = [json.loads(line) for line in out.splitlines()]
  from sasa_jax.models import QUICK_DEPTH
  profiles = [r for r in rows if r["kind"] == "hlo_profile"]
  assert [p["program"] for p in profiles] == [
      "op 1x14x14x16 cpu fwd+bwd", "op 1x7x7x32 cpu fwd+bwd",
      "train step configs/fashion_mnist.py",
      f"train step ResNet-{QUICK_DEPTH} conv_stem_attention",
      f"train step ResNet-{QUICK_DEPTH} full_attention"]
  for p in profiles:
    assert len(p["ops"]) == 3 and all(op["ms"] > 0 and op["contents"] for op in p["ops"])
  rows = [r for r in rows if r["kind"] != "hlo_profile"]
  kinds = [r["kind"] for r in rows]
  assert kinds == ["matmul", "op", "op", "demo_step", "breakdown", "train_step", "train_step",
                   "train_step", "breakdown"]
  assert rows[0]["gflops_per_s"] > 0
  for r in rows[1:3]:
    assert r["vs_conv"] > 0 and r["vs_reference"] > 0 and r["temp_mb"] >= 0
    assert r["grad_error_vs_reference"] < 1e-3
  assert rows[3]["vs_baseline"] > 0 and rows[3]["baseline_ms"] > 0
  assert rows[5]["vs_baseline"] == 1.0 and rows[6]["vs_baseline"] > 0
  # The breakdowns found every attention layer (one per block of an attention group of the
  # quick ResNet: the demo's groups, every block in full attention); the parts add up to the step.
  from sasa_jax.models import STAGE_BLOCKS
  from sasa_jax.tools.tables import load_config
  demo_groups = load_config(None).model.attention_groups
  demo, full = rows[4], rows[8]
  assert demo["attention_layers"] == sum(STAGE_BLOCKS[QUICK_DEPTH][g - 1] for g in demo_groups)
  assert full["attention_layers"] == sum(STAGE_BLOCKS[QUICK_DEPTH])
  for r in (demo, full):
    parts = [r[k + "_ms"] for k in ("op", "projections", "stem", "rest")]
    assert r["op_ms"] > 0 and r["stem_ms"] > 0
    assert abs(sum(parts) - r["step_ms"]) < 1e-6 * r["step_ms"]


def test_input_bench_times_the_training_preprocessing():
  """tools/input_bench: the Inception preprocessing over photo-like 500 x 375 JPEGs (far
  larger than flat colour would encode to), images/s per thread count."""
  import json
  out = _run("sasa_jax.tools.input_bench", "--images=64", "--threads=1,2",
             "--format=json").stdout
  rows = [json.loads(line) for line in out.splitlines()]
  assert [r["threads"] for r in rows] == [1, 2]
  for r in rows:
    assert r["kind"] == "input_pipeline" and r["jpeg"] == "500x375" and r["jpeg_kb"] > 30
    assert r["images_per_s"] > 0
    assert r["images_per_s_per_thread"] == pytest.approx(r["images_per_s"] / r["threads"],
                                                         abs=0.1)


def test_step_memory_plans_the_loops_step_per_microbatch_count():
  """tools/step_memory: the loop's own step at the batch each of --devices holds; two
  microbatches halve the temporaries (of this small model, whose activations dominate them),
  a count that does not divide the per-device batch (or into BatchNorm groups) is skipped
  with the reason, and
  config-string arguments and --config flags both reach the config."""
  import json
  out = _run("sasa_jax.tools.step_memory",
             f"--config=configs/fashion_mnist.py:{helpers.TINY_MODEL}", "--config.batch_size=64",
             "--devices=2", "--microbatches=1,2,3", "--format=json").stdout
  one, two, three = json.loads(out)
  assert [r["batch_per_device"] for r in (one, two, three)] == [32, 32, 32]
  assert two["microbatch_per_device"] == 16
  assert three["skipped"] == "32 images per device do not split into 3"
  assert one["state_mib"] == two["state_mib"] > 0
  assert 0.4 < two["temp_mib"] / one["temp_mib"] < 0.6
  assert one["total_mib"] > one["state_mib"] + one["temp_mib"]  # and the batch
  # Against a device's memory (the backend reports none here): the same plan, in MiB.
  import copy
  from sasa_jax.tools import step_memory
  from sasa_jax.tools.tables import load_config
  config = load_config(helpers.TINY_MODEL)
  config.batch_size = 64
  limit = int((one["total_mib"] + two["total_mib"]) / 2 * 2**20)
  fit = step_memory.plan_rows(config, 2, [1, 2], limit)
  assert [(r["fits"], r["device_mib"]) for r in fit] == [(False, limit / 2**20),
                                                          (True, limit / 2**20)]
  assert config.num_microbatches == 1  # the caller's config is left as it was
  import jax
  import jax.numpy as jnp
  from sasa_jax import tasks
  model = tasks.get(config).create_model()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                             train=False))["params"]
  grad_mib = sum(p.size for p in jax.tree.leaves(params)) * 4 / 2**20  # float32 gradients
  assert one["allreduce_mib"] == two["allreduce_mib"] == pytest.approx(grad_mib)
  assert step_memory.format_rows(fit).splitlines()[0] == (
      f"each step all-reduces {grad_mib:.1f} MiB of gradients over the devices")
  # Groups of 16: within each device's microbatch of 16; across both devices' microbatches
  # of 8 (per device, the plan of statistics over its own images); not with microbatches of 4.
  config.batch_norm_group_size = 16
  within, across, neither = step_memory.plan_rows(config, 2, [2, 4, 8])
  assert within["temp_mib"] > 0
  plain = copy.deepcopy(config)
  plain.batch_norm_group_size = 0
  (ungrouped,) = step_memory.plan_rows(plain, 2, [4])
  assert across["temp_mib"] == ungrouped["temp_mib"]
  assert neither["skipped"] == ("BatchNorm groups of 16 neither split a device's microbatch "
                                "of 4 nor span whole devices of the 2")
  bad = helpers.run_module("sasa_jax.tools.step_memory",
                           ["--config=configs/fashion_mnist.py", "--devices=3"], check=False)
  assert bad.returncode == 2
  assert "config.batch_size=128 must be a multiple of --devices=3" in bad.stderr


def test_evaluate_reproduces_the_loops_evaluation_and_takes_any_split(demo_run):
  """tools/evaluate on the run's last checkpoint and eval split gives exactly the loop's final
  evaluation; another split and batch size count every example of it once."""
  import json
  workdir, flags, _ = demo_run
  data_dir = next(f.split("=", 1)[1] for f in flags if f.startswith("--config.dataset.data_dir"))
  logged = [r for r in helpers.read_metrics(workdir) if "eval/accuracy" in r][-1]
  same = json.loads(_run("sasa_jax.tools.evaluate", f"--workdir={workdir}").stdout)
  assert same == {**logged, "split": "test[:200]", "weights": "raw"}
  other = json.loads(_run("sasa_jax.tools.evaluate", f"--workdir={workdir}",
                          "--split=test[200:250]", "--batch_size=16",
                          f"--data_dir={data_dir}").stdout)
  assert other["eval/num_examples"] == 50 and other["split"] == "test[200:250]"
  assert 0 <= other["eval/accuracy"] <= other["eval/top5_accuracy"] <= 1
  bad = helpers.run_module("sasa_jax.tools.evaluate", [f"--workdir={workdir}", "--weights=ema"],
                           check=False)
  assert bad.returncode != 0 and "kept no EMA weights (config.ema_decay = 0)" in bad.stderr


def test_the_documented_python_example_gives_the_evaluations_outputs(demo_run, capsys):
  """docs/training.md's load_trained example, taken from the page and run on the demo run:
  its logits give tools/evaluate's loss and accuracy on the same images."""
  import json
  import optax
  workdir, _, _ = demo_run
  code = helpers.doc_example("training.md", "python-example: trained")
  namespace = {}
  exec(code.replace('"runs/demo"', repr(str(workdir))), namespace)  # noqa: S102
  trained, logits, labels = namespace["trained"], namespace["logits"], namespace["examples"]["label"]
  assert logits.shape == (8, 10) and (trained.step, trained.weights) == (4, "raw")
  assert capsys.readouterr().out.startswith("4 raw [")
  want = json.loads(_run("sasa_jax.tools.evaluate", f"--workdir={workdir}",
                         "--split=test[:8]", "--batch_size=8").stdout)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  assert float(loss) == pytest.approx(want["eval/loss"], rel=1e-5)
  assert float((logits.argmax(-1) == labels).mean()) == want["eval/accuracy"]
  from sasa_jax.tools import runs
  with pytest.raises(ValueError, match="kept no EMA weights"):
    runs.load_trained(workdir, weights="ema")


def test_preflight_of_a_runs_workdir_and_of_missing_data(demo_run, tmp_path):
  """tools/preflight (what the launchers run before submitting): the plan for 2 devices, the
  demo's workdir as a run this start resumes, with the fields it changes; an ImageNet run
  whose data_dir holds no ImageNet fails with status 3 and how to prepare it."""
  workdir, flags, _ = demo_run
  proc = _run("sasa_jax.tools.preflight", "--config=configs/fashion_mnist.py", *flags,
              "--config.num_train_steps=6", "--devices=2")
  out = proc.stdout
  assert re.search(r"  model: ResNet-14 conv_stem_attention, 0\.\d+M parameters, float32\n"
                   r"  batch: 32 = 16 per device on 2 device\(s\)\n"
                   r"  data: fashion_mnist in .*/fashion_mnist/3.0.1: train\[:384\] 384 "
                   r"examples, test\[:200\] 200\n  steps: 6 \(0.5 epochs of 12 steps\)\n"
                   rf"  workdir {workdir}: a run's; this start resumes it\n", out), out
  assert "    step 4 of 4 (100.0%)" in out and "    checkpoints: 4\n" in out
  assert ("  config fields this start changes: num_train_steps: 4 there, 6 here\n"
          "preflight: OK\n") in out
  missing = helpers.run_module(
      "sasa_jax.tools.preflight", ["--config=configs/imagenet.py", f"--workdir={tmp_path}/r",
                                   f"--config.dataset.data_dir={tmp_path}", "--devices=8"],
      check=False)
  assert missing.returncode == 3
  assert (f"preflight: FAILED: dataset 'imagenet2012' is not prepared in "
          f"config.dataset.data_dir='{tmp_path}'") in missing.stderr
  assert not (tmp_path / "r").exists()
