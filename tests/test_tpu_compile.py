"""Compiling for Cloud TPUs on this CPU-only machine with libtpu's own XLA:TPU compiler
(tools/tpu_compile, tools/step_memory --tpu): the compiler's verdicts on VMEM and HBM."""
import json

from tests import helpers
from tests.conftest import require_compiler


def _libtpu():
  from sasa_jax.tools import tpu_compile  # noqa: PLC0415
  require_compiler(tpu_compile)


def _rows(*args):
  out = helpers.run_module("sasa_jax.tools.tpu_compile", [*args, "--format=json"]).stdout
  return json.loads(out)


def test_the_op_compiles_for_every_tpu_generation_with_and_without_the_kernels():
  """At ResNet-50's 56x56x64 stage, whose per-head maps are the largest, the Mosaic kernels
  (impl="pallas": each program's slabs copied into VMEM, not whole maps) compile for a chip
  of every generation, and impl="auto" (the blocked XLA form on TPU, plain XLA: about 16
  core-seconds of compiling a generation) for a v6e (a v5e's in the estimate test below);
  the kernels at 7x7x512 too (one block per map)."""
  _libtpu()
  rows = _rows("--impls=pallas", "--dtypes=bfloat16", "--batch=8", "--stages=56x64")
  assert [(r["target"], r["device"], r["compiled"]) for r in rows] == [
      ("v4", "TPU v4", True), ("v5e", "TPU v5 lite", True), ("v5p", "TPU v5", True),
      ("v6e", "TPU v6 lite", True)], rows
  auto = _rows("--tpu=v6e", "--impls=auto", "--dtypes=bfloat16", "--batch=8",
               "--stages=56x64")
  assert [(r["target"], r["impl"], r["compiled"], r["blocks"]) for r in auto] == [
      ("v6e", "auto", True, "4x4, 1 chunk")], auto
  for r in rows + auto:
    assert r["kernels"] == (3 if r["impl"] == "pallas" else 0), r  # fwd, dq, dk/dv
    assert r["temp_mib"] > 0, r
    # libtpu's cost model: the XLA operations estimated, the kernels named as not counted
    assert r["cycles"] > 0 and r["unestimated_kernels"] == r["kernels"], r
  (small,) = _rows("--tpu=v5e", "--impls=pallas", "--dtypes=float32", "--batch=8",
                   "--stages=7x512")
  assert small["compiled"] and small["kernels"] == 3


def test_step_memory_plans_a_tpu_chip_and_says_when_the_step_does_not_fit():
  """step_memory --tpu=v5e: the loop's step compiled for a v5e chip, against its 16 GiB; a
  batch whose activations outgrow the HBM does not compile, and its row says so."""
  _libtpu()
  config = [f"--config=configs/fashion_mnist.py:{helpers.TINY_MODEL}", "--devices=1",
            "--tpu=v5e", "--format=json"]
  (fits,) = json.loads(helpers.run_module(
      "sasa_jax.tools.step_memory", [*config, "--config.batch_size=64", "--microbatches=1"]
  ).stdout)
  assert fits["fits"] and fits["device_mib"] == 16384 and 0 < fits["temp_mib"] < 1024
  assert fits["est_mcycles"] > 0 and fits["unestimated_kernels"] == 0, fits
  (too_big,) = json.loads(helpers.run_module(
      "sasa_jax.tools.step_memory", [*config, "--config.batch_size=131072", "--microbatches=1"]
  ).stdout)
  assert too_big["skipped"].startswith("does not compile: RESOURCE_EXHAUSTED: Ran out of "
                                       "memory on HBM"), too_big


VMEM = """
import jax, jax.numpy as jnp, ml_collections
from sasa_jax import train
from sasa_jax.ops import pallas_attention as pa
from sasa_jax.tools import aot, tpu_compile

# Blocks of at least 500K logits (the planner's hold 12K): their float32 logits, probabilities
# and offset tables need more than v5e's 16 MiB of scoped VMEM.
large = min((t for t in pa.candidate_tilings(56, 56, 8, 7, jnp.bfloat16, "tpu",
                                             max_logits=1 << 30) if t.nq * t.nk >= 500_000),
            key=lambda t: t.nq * t.nk)

def loss(*args):
  y = pa.fused_attention(*args, num_heads=8, tiling=large)
  return jnp.sum(jnp.square(y.astype(jnp.float32)))
maps = jax.ShapeDtypeStruct((8, 56, 56, 64), jnp.bfloat16)
rel = jax.ShapeDtypeStruct((7, 4), jnp.bfloat16)
args = aot.placed(tpu_compile.device("v5e"), maps, maps, maps, rel, rel)
config = ml_collections.ConfigDict({"model": {"impl": "pallas"}, "batch_size": 8})
try:
  with train.advise_when_out_of_memory(config, 1):
    jax.jit(jax.grad(loss, argnums=range(5))).lower(*args).compile()
except train.DeviceOutOfMemoryError as e:
  print(e)
"""


def test_a_kernel_that_overflows_vmem_is_not_blamed_on_the_batch():
  """The loop's advice for XLA's RESOURCE_EXHAUSTED: a VMEM overflow (Pallas kernels with
  blocks far larger than the planner's, compiled by libtpu for v5e) points at impl, not at
  microbatches."""
  _libtpu()
  out = helpers.run_python(VMEM).stdout
  assert "RESOURCE_EXHAUSTED" in out and "(VMEM)" in out, out
  assert "--config.model.impl=auto" in out and "microbatches do not change that" in out
  assert "--config.num_microbatches=" not in out


def test_the_loops_step_compiles_for_a_v5e_slice_with_batch_norm_groups_of_neighbour_chips():
  """The loop's own step (train.jit_train_step) compiled by libtpu for the 8 chips of a
  v5e-8 slice (two hosts) on the loop's 1-D mesh: BatchNorm over groups of 16 images, two
  chips' 8 each (all-reduces within chip pairs, each pair ICI neighbours on one host); and as
  2 microbatches with groups of 4 within each chip's microbatch."""
  _libtpu()
  result = helpers.mesh_step("tpu", "v5e", "2x4")
  pairs = [g for g in result["16/1"] if g.count("{") == 5]  # {{a,b},{c,d},{e,f},{g,h}}
  assert pairs, result
  for pair in pairs[0].strip("{}").split("},{"):
    a, b = (result["devices"][i] for i in pair.split(","))
    assert a[0] == b[0], (pair, a, b)  # one host
    assert sum(abs(x - y) for x, y in zip(a[1:], b[1:])) == 1, (pair, a, b)  # neighbours
  assert "{{0,1,2,3,4,5,6,7}}" in result["4/2"] and "{{0,1,2,3,4,5,6,7}}" in result["16/1"]


ESTIMATE = """
import json, jax, jax.numpy as jnp
from sasa_jax.tools import aot, tpu_compile

def tanh_matmuls(n):  # n dependent 1024^3 matmuls in a loop
  return lambda x: jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ y), x)
x = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
out = {n: aot.estimated_cycles(aot.compile_for(tpu_compile.device("v5e"), tanh_matmuls(n), x)[0])
       for n in (4, 16)}
out["cpu"] = aot.estimated_cycles(jax.jit(tanh_matmuls(4)).lower(x).compile())
print(json.dumps(out))
"""


def test_libtpus_estimate_counts_each_loop_iteration_and_the_op_against_a_conv():
  """aot.estimated_cycles reads libtpu's cost model off the compiled program: a loop's body
  once per iteration (16 matmuls cost 4x 4 of them, each near the v5e's 197 bf16 TFLOP/s at
  its 1.5 GHz), None where the compiler writes no estimate (XLA:CPU). tools/tpu_compile puts
  the op's fwd+bwd next to a 3x3 convolution's, with the block plans of other KV_COSTs."""
  _libtpu()
  est = json.loads(helpers.run_python(ESTIMATE).stdout)
  assert est["16"]["cycles"] == 4 * est["4"]["cycles"], est
  assert est["4"]["unknown_loops"] == est["4"]["unestimated_kernels"] == 0, est
  seconds_per_matmul = est["4"]["cycles"] / 4 / 1.5e9
  assert 0.5 < 2 * 1024**3 / seconds_per_matmul / 197e12 < 1.5, est
  assert est["cpu"] is None
  rows = _rows("--tpu=v5e", "--impls=auto,conv3x3", "--kv_costs=25.6", "--dtypes=bfloat16",
               "--batch=8", "--stages=56x64")
  (auto, conv, planned) = rows
  assert (auto["impl"], conv["impl"], planned["impl"], planned["kv_cost"]) == (
      "auto", "conv3x3", "auto", 25.6), rows
  assert auto["compiled"] and auto["blocks"] == "4x4, 1 chunk" and auto["temp_mib"] > 0, auto
  assert auto["unestimated_kernels"] == auto["kernels"] == 0, auto
  # on TPU the chunks take every image: strips of block rows (`blocked.whole_batch_for`)
  assert planned["blocks"] == "14x14, 2 chunks (8 images x 28 rows)" != auto["blocks"], rows
  assert 0 < conv["cycles"] < min(auto["cycles"], planned["cycles"]), rows
  small_windows = _rows("--tpu=v5e", "--impls=auto", "--dtypes=bfloat16", "--batch=8",
                        "--stages=56x64", "--kernel_size=3")  # Table 4's k = 3
  assert small_windows[0]["kernel_size"] == 3 and auto["kernel_size"] == 7
  assert small_windows[0]["cycles"] < auto["cycles"], (small_windows, auto)
  even = helpers.run_module("sasa_jax.tools.tpu_compile", ["--kernel_size=4"], check=False)
  assert even.returncode == 2 and "--kernel_size=4: a positive odd window size" in even.stderr
  header, row = helpers.run_module("sasa_jax.tools.tpu_compile", [
      "--tpu=v5e", "--impls=conv3x3", "--dtypes=bfloat16", "--batch=8", "--stages=7x512"]
  ).stdout.splitlines()
  assert "est. Mcycles  / conv" in header and row.split()[-1] == "1.0", (header, row)
