"""make gpu-check's script in its CPU smoke mode, with the libraries an accelerator image
lacks (TensorFlow, TFDS, clu, ml_collections) made unimportable."""
import importlib
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sasa_jax.models import QUICK_DEPTH, create_resnet
from sasa_jax.ops import default_impl
from sasa_jax.ops import pallas_attention as pa
from tests import helpers

BLOCK = """
import sys
# What `import X` and importlib.util.find_spec("X") meet where X is not installed.
sys.modules.update(dict.fromkeys(['tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections']))
from sasa_jax.tools import gpu_check
sys.exit(gpu_check.main(sys.argv[1:]))
"""


def test_cpu_smoke_writes_results(tmp_path):
  proc = subprocess.run([sys.executable, "-c", BLOCK, "--cpu-smoke", "--tune", "--jobs=2",
                         f"--out={tmp_path}"],
                        cwd=helpers.ROOT, env=helpers.env(), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "; budget none" in proc.stdout.splitlines()[0]  # the GPU run's default: 360 s
  assert "the budget left rows" not in proc.stdout
  report = json.loads((tmp_path / "results.json").read_text())
  kinds = [r["kind"] for r in report["rows"]]
  # the default order: the cheap sections first, the Triton kernels' tuning last (docs/gpu.md)
  assert list(dict.fromkeys(kinds)) == ["env", "export", "correctness", "op", "torch", "blocks",
                                        "train_step", "tune"], kinds
  checks = [r for r in report["rows"] if r["kind"] == "correctness"]  # 2 shapes x 2 dtypes,
  other = next(f for f in pa.FORMS if f != pa.GPU_FORM)  # the other form, impl="xla" and
  assert [(r["impl"], r.get("form")) for r in checks] == (  # impl="shifted"
      [("pallas", pa.GPU_FORM)] * 4 + [("pallas", other)] + [("xla", None)] * 4
      + [("shifted", None)] * 4)
  assert all(r["ok"] for r in checks)
  for impl in ("xla", "shifted"):  # f32, then bf16
    assert [r.get("matmul_precision") for r in checks if r["impl"] == impl] == [
        "highest"] * 2 + [None] * 2
  assert kinds.count("op") == 4 and kinds.count("train_step") == 2 and "torch" in kinds
  assert not [r for r in report["rows"] if "error" in r]
  ops = [r for r in report["rows"] if r["kind"] == "op"]
  assert all(r["pallas_ms"] > 0 and r["xla_ms"] > 0 and r["conv_ms"] > 0
             and r["shifted_ms"] > 0 and r["shifted_fwd_ms"] > 0 and r["shifted_temp_mb"] > 0
             and r["shifted_vs_xla"] == r["shifted_ms"] / r["xla_ms"]
             and r[f"pallas_{other}_ms"] > 0 for r in ops)
  # float32 rows: both forms with the other float32 matmuls too; bfloat16 rows: no such rows
  other_dot = next(m for m in pa.F32_DOTS if m != pa.GPU_F32_DOT)
  assert sorted(r["dtype"] for r in ops) == ["bfloat16"] * 2 + ["float32"] * 2
  for r in ops:
    timed = sorted(name for name in r if name.endswith(f"_{other_dot}_ms"))
    assert timed == ([f"pallas_{f}_{other_dot}_ms" for f in sorted(pa.FORMS)]
                     if r["dtype"] == "float32" else []), (r["dtype"], timed)
    assert all(r[name] > 0 for name in timed)
  # grad_mb: the float32 parameters' bytes, what a data-parallel step all-reduces
  for r in (r for r in report["rows"] if r["kind"] == "train_step"):
    model = create_resnet(QUICK_DEPTH, r["model"].split()[-1], width_multiplier=0.125,
                          num_heads=2)
    params = jax.eval_shape(lambda m=model: m.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    assert r["grad_mb"] == pytest.approx(
        4 * sum(p.size for p in jax.tree.leaves(params)) / 2**20), r
  # the step's time by part of the model: the attention layers' in the attention model's
  steps = {r["model"].split()[-1]: r for r in report["rows"] if r["kind"] == "train_step"}
  assert any(line.endswith("% blocks/attention") for line in steps["full_attention"][
      "step_parts"]) and any(line.endswith("% blocks/conv2") for line in steps["baseline"][
          "step_parts"]), steps
  assert not any("attention" in line for line in steps["baseline"]["step_parts"])
  env, = [r for r in report["rows"] if r["kind"] == "env"]
  assert env["backend"] == "cpu" and env["auto_impl"] == "cpu"
  assert env["auto_impl_stages"] == "cpu/cpu/cpu/cpu"
  exports = {r["platforms"]: r for r in report["rows"] if r["kind"] == "export"}
  assert exports["tpu"]["tpu_custom_calls"] == 3 and exports["cuda"]["triton_calls"] == 3
  assert exports["tpu+cuda"]["tpu_custom_calls"] == exports["tpu+cuda"]["triton_calls"] == 3
  tune = [r for r in report["rows"] if r["kind"] == "tune"]
  assert len(tune) == 4 and sum(r["planned"] for r in tune) == 1  # 2 launches x 2 forms
  assert sorted(r["form"] for r in tune) == sorted(2 * pa.FORMS)
  assert all(r["ms"] > 0 and r["grad_error"] < 1e-4 for r in tune)
  # each kernel's profiled time, in the tune rows and for impl="pallas" in the op rows
  for r in tune:
    assert all(r[f"{part}_ms"] > 0 for part in pa.KERNELS) and r["rest_ms"] >= 0, r
  for r in ops:
    assert all(r[f"split_{part}_ms"] > 0 for part in pa.KERNELS), r
    for impl in ("xla", "shifted"):
      assert len(r[f"{impl}_top_ops"]) == 6 and all(" ms x" in line
                                                    for line in r[f"{impl}_top_ops"])
  # impl="xla" in other block plans: 4x4 (planned here), 4x12 and 12x12 blocks at 12 x 12
  blocks = [r for r in report["rows"] if r["kind"] == "blocks"]
  assert [(r["block"], r["planned"]) for r in blocks] == [
      ("4x4", True), ("4x12", False), ("12x12", False)]
  assert all(r["ms"] > 0 and r["grad_error"] < 1e-5 for r in blocks)
  markdown = (tmp_path / "results.md").read_text()
  assert "## correctness" in markdown and "## train_step" in markdown and "## tune" in markdown
  assert "## decisions" in markdown and "- tune " in markdown and "- KV_COST over 1 " in markdown
  assert markdown.count("xla_top_ops, ") == 4 and "| xla_top_ops |" not in markdown
  assert markdown.count("shifted_top_ops, ") == 4 and '- impl="shifted" beats ' in markdown
  assert "step_parts, ResNet-14 full_attention pallas float32:" in markdown


def test_a_row_that_raises_is_recorded_and_the_check_goes_on(tmp_path, monkeypatch):
  from sasa_jax.tools import gpu_check  # noqa: PLC0415

  def broken(*args, **kwargs):
    raise RuntimeError("kernel exploded")
  monkeypatch.setattr(gpu_check, "local_attention", broken)
  status = gpu_check.main(["--cpu-smoke", "--sections=env,correctness", f"--out={tmp_path}"])
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert status == 1 and [r["kind"] for r in rows] == ["env"] + ["correctness"] * 13
  assert all("kernel exploded" in r["error"] and r["ok"] is False for r in rows[1:])
  assert "kernel exploded" in (tmp_path / "results.md").read_text()


def test_sections_run_in_the_order_given_and_tune_once(tmp_path, capsys):
  """--sections sets the order (the cheap sections first, for a short device budget); --tune
  adds "tune" only where --sections does not place it. A budget already spent records every
  row as skipped without compiling it, and the last line gives the call that runs them."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  gpu_check.main(["--cpu-smoke", "--tune", "--sections=tune,env", "--budget-s=1e-9",
                  f"--out={tmp_path}"])
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [r["kind"] for r in rows] == ["tune"] * 4 + ["env"]
  assert all(r["skipped"] == "time budget" for r in rows)
  last = capsys.readouterr().out.rstrip().splitlines()[-1]
  assert last == ("gpu_check: the budget left rows of tune, env unrun; to run those sections: "
                  "PYTHONPATH=. python3 -m sasa_jax.tools.gpu_check --out "
                  f"{tmp_path / 'rest'} --cpu-smoke --sections=env,tune --budget-s SECONDS"), last


def test_a_budget_spent_while_compiling_still_runs_what_was_compiled():
  """The budget runs out during the first row's compilation: that row is still timed (its
  compiling was the cost), the rows whose compilation had not started are skipped."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  spent = []

  def row(i):
    def prepare():
      spent.append(i)  # this compilation uses up the budget
      return lambda: {"ms": float(i)}
    return {"shape": str(i)}, prepare
  rows = list(gpu_check._section_rows("op", lambda: (row(i) for i in range(3)), 1,
                                      lambda: bool(spent)))
  assert spent == [0]
  assert rows == [{"kind": "op", "shape": "0", "ms": 0.0},
                  {"kind": "op", "shape": "1", "skipped": "time budget"},
                  {"kind": "op", "shape": "2", "skipped": "time budget"}]


def test_decisions_name_the_fastest_right_launches(monkeypatch):
  """results.md's decisions: per op row the fastest kernel launch (and how impl="pallas"'s
  time splits between its kernels, where profiled); how often each launch impl="pallas"
  does not run beats the one it runs, and some launch beats impl="xla"; per tune shape the
  fastest launch whose gradients are right, and each kernel's fastest warps in its form,
  tiling and stages."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  monkeypatch.setattr(pa, "GPU_FORM", "tables")
  monkeypatch.setattr(pa, "GPU_F32_DOT", "ieee")
  op = {"kind": "op", "pallas_fwd_ms": 0.1}
  tune = {"kind": "tune", "shape": "32x7x7x512", "dtype": "bfloat16", "form": "factored",
          "block": "8x8", "num_warps": "4/4/4", "num_stages": 1}
  rows = [
      {**op, "shape": "a", "dtype": "bfloat16", "pallas_ms": 10, "pallas_factored_ms": 5,
       "xla_ms": 6, "split_fwd_ms": 2, "split_dq_ms": 6, "split_dkv_ms": 1.5,
       "split_rest_ms": 0.5},
      {**op, "shape": "b", "dtype": "bfloat16", "pallas_ms": 10, "pallas_factored_ms": 12,
       "xla_ms": 4},
      {**op, "shape": "c", "dtype": "float32", "pallas_ms": 10, "pallas_factored_ms": 11,
       "pallas_tables_bf16x3_ms": 4, "pallas_factored_bf16x3_ms": 3, "xla_ms": 5},
      {**tune, "planned": True, "ms": 3.0, "grad_error": 1e-3},
      {**tune, "planned": False, "ms": 1.0, "grad_error": 0.5, "block": "4x4"},  # wrong
      {**tune, "planned": False, "ms": 2.5, "grad_error": 1e-3, "block": "2x8",
       "fwd_ms": 0.5, "dq_ms": 1.5, "dkv_ms": 0.5},
      {**tune, "planned": False, "ms": 2.6, "grad_error": 1e-3, "block": "2x8",
       "num_warps": "1/1/4", "fwd_ms": 0.4, "dq_ms": 1.7, "dkv_ms": 0.5},
      {**tune, "planned": False, "ms": 2.7, "grad_error": 1e-3, "block": "2x8",
       "num_warps": "2/2/4", "num_stages": 2, "fwd_ms": 0.1, "dq_ms": 0.1, "dkv_ms": 0.1},
      {"kind": "op", "shape": "d", "dtype": "bfloat16", "skipped": "time budget"},
  ]
  lines = gpu_check.decisions(rows)
  runs, auto = 'impl="pallas" (tables, ieee)', repr(default_impl("gpu"))
  assert lines == [
      f"- op a bfloat16: fastest kernels `pallas_factored` 5 ms; {runs} 10 ms (profiled, ms: "
      'fwd 2, dq 6, dkv 1.5, rest 0.5); impl="xla" 6 ms',
      f'- op b bfloat16: fastest kernels `pallas` 10 ms; {runs} 10 ms; impl="xla" 4 ms',
      f'- op c float32: fastest kernels `pallas_factored_bf16x3` 3 ms; {runs} 10 ms; '
      'impl="xla" 5 ms',
      f"- `pallas_factored` beats {runs} at 1 of 2 bfloat16 stages",
      f'- some launch beats impl="xla" at 1 of 2 bfloat16 stages (impl="auto" takes '
      f"{auto} on GPUs)",
      f"- `pallas_factored` beats {runs} at 0 of 1 float32 stages",
      f"- `pallas_factored_bf16x3` beats {runs} at 1 of 1 float32 stages",
      f"- `pallas_tables_bf16x3` beats {runs} at 1 of 1 float32 stages",
      f'- some launch beats impl="xla" at 1 of 1 float32 stages (impl="auto" takes '
      f"{auto} on GPUs)",
      "- tune 32x7x7x512: fastest factored, 2x8 blocks, 4/4/4 warps, 1 stage(s): 2.5 ms "
      "against the planned launch's 3",
      "- tune 32x7x7x512, factored with 2x8 blocks, 1 stage(s), per kernel (profiled): fwd at "
      "1 warps (0.4 ms), dq at 4 warps (1.5 ms), dkv at 4 warps (0.5 ms)",
  ], lines


def test_shifted_decisions_name_the_stages_it_wins(monkeypatch):
  """A decision line per dtype: the op rows' stages at which impl="shifted" ran faster than
  impl="xla"; for bfloat16, the fewest pixels from which it won at every larger stage, as
  the value SHIFTED_FROM_PIXELS should hold for the check's platform, where it differs."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  la = importlib.import_module("sasa_jax.ops.local_attention")
  monkeypatch.setattr(la, "SHIFTED_FROM_PIXELS", {})
  op = {"kind": "op", "dtype": "bfloat16"}
  rows = [{"kind": "env", "backend": "gpu"},
          {**op, "shape": "32x7x7x512", "shifted_ms": 0.1, "xla_ms": 0.2},  # below a loss
          {**op, "shape": "32x56x56x64", "shifted_ms": 1.0, "xla_ms": 3.0},
          {**op, "shape": "32x14x14x256", "shifted_ms": 2.0, "xla_ms": 0.5},
          {**op, "shape": "32x28x28x128", "shifted_ms": 0.5, "xla_ms": 1.0},
          {**op, "shape": "32x56x56x64", "dtype": "float32", "shifted_ms": 4.0, "xla_ms": 3.0},
          {**op, "shape": "32x28x28x128", "dtype": "float32", "xla_ms": 3.0}]  # it failed
  times = ("32x7x7x512 0.1 against 0.2 ms; 32x56x56x64 1 against 3 ms; 32x14x14x256 2 "
           "against 0.5 ms; 32x28x28x128 0.5 against 1 ms")
  f32 = '- impl="shifted" beats impl="xla" at 0 of 1 float32 stages (32x56x56x64 4 against 3 ms)'
  assert gpu_check.decisions(rows) == [
      f'- impl="shifted" beats impl="xla" at 3 of 4 bfloat16 stages ({times}): '
      "local_attention.SHIFTED_FROM_PIXELS['cuda'] = 784", f32]
  monkeypatch.setitem(la.SHIFTED_FROM_PIXELS, "cuda", 784)  # as the rows say: nothing to do
  assert gpu_check.decisions(rows)[0].endswith(f"({times})")
  for r in rows[1:]:
    r["xla_ms"] = 0.01  # it wins nowhere: the setting goes
  assert gpu_check.decisions(rows)[0].endswith(
      ": remove local_attention.SHIFTED_FROM_PIXELS['cuda'] (now 784)")
  step = {"kind": "train_step", "model": "ResNet-50 conv_stem_attention"}
  rows += [{**step, "impl": "xla", "ms": 110.0, "memory_gb": 9.6},
           {**step, "impl": "shifted", "ms": 88.0, "memory_gb": 12.8},
           {**step, "model": "ResNet-50 full_attention", "impl": "shifted", "ms": 1.0,
            "memory_gb": 1.0}]  # no xla step of that model to compare with
  assert gpu_check.decisions(rows)[2:] == [
      '- ResNet-50 conv_stem_attention step with impl="shifted": 88 ms, 12.8 GB planned, '
      'against impl="xla"\'s 110 ms, 9.6 GB (1.25x the images/s)']


def test_blocks_rows_cut_the_chunks_both_ways(monkeypatch):
  """Where the chunk limit cuts a batch, the blocks rows time the platform's chunks (here the
  CPU's groups of whole images) and the other way (strips of every image, the TPU's), and
  a strips row's gradients agree with impl="xla"'s."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  monkeypatch.setattr(gpu_check, "BLOCK_CHUNK_LOGITS", (200_000,))
  rows = list(gpu_check.blocks_rows([(12, 16)], 4, jnp.float32, 1))
  cuts = [(r["block"], r["chunks"], r["chunk_images"], r["whole_batch"]) for r, _ in rows]
  assert cuts == [("4x4", 1, 4, False), ("4x4", 4, 1, False), ("4x4", 3, 4, True),
                  ("4x12", 1, 4, False), ("4x12", 4, 1, False), ("4x12", 3, 4, True),
                  ("12x12", 1, 4, False), ("12x12", 4, 1, False)], cuts
  strips = rows[2][1]()()  # compiled, then run
  assert strips["grad_error"] < 1e-5 and strips["ms"] > 0, strips


def test_block_decisions_name_the_fastest_right_layout_and_kv_cost():
  """Per shape the fastest layout whose gradients are right, against the planned one; the
  KV_COST whose plans (each at its fastest chunks) sum to the least time over the shapes,
  named for blocked.ACCELERATOR_KV_COST on the check's platform; and how often fewer
  sequential chunks ran faster."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  row = {"kind": "blocks", "dtype": "bfloat16", "grad_error": 1e-3, "planned": False}
  a, b = {**row, "shape": "32x56x56x64"}, {**row, "shape": "32x28x28x128"}
  rows = [
      {"kind": "env", "backend": "gpu"},
      {**a, "block": "4x4", "window": "10x10", "chunks": 2, "kv_costs": "0.4", "ms": 4.0,
       "planned": True},
      {**a, "block": "4x4", "window": "10x10", "chunks": 1, "kv_costs": "0.4", "ms": 3.8},
      {**a, "block": "8x8", "window": "14x14", "chunks": 4, "kv_costs": "6.4", "ms": 2.0},
      {**a, "block": "8x8", "window": "14x14", "chunks": 1, "kv_costs": "6.4", "ms": 2.2},
      {**a, "block": "14x14", "window": "20x20", "chunks": 8, "kv_costs": "25.6", "ms": 1.0,
       "grad_error": 0.5},  # wrong
      {**b, "block": "4x4", "window": "10x10", "chunks": 1, "kv_costs": "0.4", "ms": 1.2,
       "planned": True},
      {**b, "block": "7x28", "window": "13x28", "chunks": 2, "kv_costs": "6.4/25.6",
       "ms": 1.5},
      {**b, "block": "28x28", "window": "28x28", "chunks": 4, "kv_costs": "25.6",
       "skipped": "time budget"},
  ]
  assert gpu_check.decisions(rows) == [
      "- blocks 32x56x56x64 bfloat16: fastest 8x8 blocks (14x14 windows, 4 chunk(s); KV_COST "
      "6.4) 2 ms against the planned 4x4's (2 chunk(s)) 4 ms",
      "- blocks 32x28x28x128 bfloat16: fastest 4x4 blocks (10x10 windows, 1 chunk(s); KV_COST "
      "0.4) 1.2 ms against the planned 4x4's (1 chunk(s)) 1.2 ms",
      "- KV_COST over 2 shape(s), each plan at its fastest chunks: 6.4 3.5 ms against the "
      "planned 0.4's 5 ms: blocked.ACCELERATOR_KV_COST['cuda'] = 6.4",
      "- fewer sequential chunks ran faster in 1 of 2 pairs of one plan (chunk limit now "
      "67,108,864 logits)"]
  # chunks of every image against groups of images, same plan and limit (the TPU's way)
  tpu = [{**a, "block": "4x4", "window": "10x10", "chunks": 8, "kv_costs": "0.4",
          "chunk_logits": 1 << 26, "whole_batch": True, "ms": 1.5, "planned": True},
         {**a, "block": "4x4", "window": "10x10", "chunks": 2, "kv_costs": "0.4",
          "chunk_logits": 1 << 26, "whole_batch": False, "ms": 6.0}]
  assert gpu_check._block_decisions(tpu, "tpu") == [
      "- blocks 32x56x56x64 bfloat16: fastest 4x4 blocks (10x10 windows, 8 chunk(s) of every "
      "image; KV_COST 0.4) 1.5 ms against the planned 4x4's (8 chunk(s) of every image) 1.5 ms",
      "- KV_COST over 1 shape(s), each plan at its fastest chunks: 0.4 1.5 ms",
      "- chunks of every image (strips of block rows) ran faster than groups of whole images "
      "in 1 of 1 pairs of one plan and limit (on tpu now: strips of every image)"]
  cuda = [{**r, "planned": not r["planned"]} for r in tpu]
  assert gpu_check._block_decisions(cuda, "cuda")[-1].endswith(
      "(on cuda now: groups of images): blocked.WHOLE_BATCH_CHUNKS should name 'cuda'")


def test_a_run_cut_short_leaves_its_results(tmp_path, monkeypatch):
  """results.json and results.md hold every finished row whenever the run stops (here an
  interrupt in the second section, as a time limit's kill would come)."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415

  def interrupted():
    raise KeyboardInterrupt
  monkeypatch.setattr(gpu_check, "export_rows", interrupted)
  with pytest.raises(KeyboardInterrupt):
    gpu_check.main(["--cpu-smoke", "--sections=env,export", f"--out={tmp_path}"])
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [r["kind"] for r in rows] == ["env"]
  assert "## env" in (tmp_path / "results.md").read_text()


def test_a_row_that_never_finishes_ends_the_check_naming_it(tmp_path):
  """A row whose run outlasts --row-timeout-s (here one that sleeps, as a GPU kernel that
  never finishes would wait) ends the check with status 1 and every thread's stack, and
  results.json holds the rows before it and that row, marked as unfinished."""
  script = """
import sys, time
from sasa_jax.tools import gpu_check
def hangs():
  def run():
    time.sleep(120)
  yield {"platforms": "tpu"}, lambda: run
gpu_check.export_rows = hangs
sys.exit(gpu_check.main(sys.argv[1:]))
"""
  proc = subprocess.run([sys.executable, "-c", script, "--cpu-smoke", "--sections=env,export",
                         "--row-timeout-s=3", f"--out={tmp_path}"], cwd=helpers.ROOT,
                        env=helpers.env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "Timeout (0:00:03)!" in proc.stderr and "in run" in proc.stderr, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [r["kind"] for r in rows] == ["env", "export"] and "error" not in rows[0]
  assert rows[1]["platforms"] == "tpu" and "did not finish within 3 s" in rows[1]["error"]


def test_on_a_tpu_the_gpu_kernels_sections_stand_aside(tmp_path, monkeypatch):
  """Where impl="pallas" runs the Mosaic kernels (a TPU VM), the check leaves out what only
  the Triton kernels have: the other form's correctness rows, the op rows' other launches
  and the tune section (one skipped row); impl="pallas" itself, impl="xla" and
  impl="shifted" are still checked."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  monkeypatch.setattr(gpu_check, "_gpu_kernels_run_here", lambda: False)
  assert gpu_check._gpu_variant_programs(8, 16, 2, jnp.float32) == {}
  status = gpu_check.main(["--cpu-smoke", "--sections=correctness,tune", f"--out={tmp_path}"])
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert status == 0
  assert [(r["kind"], r["impl"], r.get("form")) for r in rows[:-1]] == (
      [("correctness", "pallas", pa.TPU_FORM)] * 4 + [("correctness", "xla", None)] * 4
      + [("correctness", "shifted", None)] * 4)
  assert all(r["ok"] for r in rows[:-1]) and rows[-1]["kind"] == "tune"
  assert "a GPU's" in rows[-1]["skipped"]


def test_the_tune_plan_crosses_both_forms_with_the_rows_rule():
  """--tune's launches at 56 x 56 (none compiled here): the 4 cheapest tilings x (each
  form's own warps, one warp per 16 rows, 4, 8) x both forms, plus two pipeline stages,
  each launch that runs alike once; the tables form gets the rows rule too."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  labels = [labels for labels, _ in gpu_check.tune_rows(
      [(56, 64)], 32, jnp.bfloat16, 1, 4, (None, "rows", 4, 8))]
  launches = [(r["form"], r["block"], r["num_warps"], r["num_stages"]) for r in labels]
  assert len(launches) == len(set(launches))
  assert ("tables", "2x8", "1/1/4", 1) in launches and ("tables", "2x8", "4/4/4", 1) in launches
  assert ("factored", "2x8", "1/1/4", 1) in launches
  assert [r["planned"] for r in labels].count(True) == 1


@pytest.mark.parametrize("when", ["build", "run"])
def test_an_op_program_that_fails_spares_the_rest(when, tmp_path, monkeypatch):
  """One launch that does not build or does not run (here every factored-form program) is
  recorded as <name>_error in its op row; the row's other programs are still timed."""
  from sasa_jax.tools import gpu_check  # noqa: PLC0415
  fused = pa.fused_attention

  def refuse(*_):
    raise RuntimeError("triton refused it")

  def factored_fails(*args, form="tables", **kwargs):
    if form == "factored" and when == "build":
      refuse()
    y = fused(*args, form=form, **kwargs)
    if form == "factored":  # compiles, then raises when run
      jax.debug.callback(refuse, y)
    return y
  monkeypatch.setattr(pa, "fused_attention", factored_fails)
  op_rows = gpu_check.op_rows  # one row: the first stage in float32, with its other dots
  monkeypatch.setattr(gpu_check, "op_rows", lambda stages, batch, dtype, repeats: op_rows(
      stages[:1], batch, dtype, repeats) if dtype == jnp.float32 else iter(()))
  status = gpu_check.main(["--cpu-smoke", "--sections=op", f"--out={tmp_path}"])
  (r,) = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert status == 0 and r["dtype"] == "float32"
  assert "triton refused it" in r["pallas_factored_error"], r
  assert "pallas_factored_ms" not in r and "pallas_factored_vs_xla" not in r
  assert r["pallas_ms"] > 0 and r["xla_ms"] > 0 and r["pallas_vs_xla"] > 0
  other_dot = next(m for m in pa.F32_DOTS if m != pa.GPU_F32_DOT)
  assert r[f"pallas_{pa.GPU_FORM}_{other_dot}_ms"] > 0, r
  assert "- op " in (tmp_path / "results.md").read_text()
