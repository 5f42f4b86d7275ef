"""tools/triton_census: the GPU kernels compiled by Triton's own compiler for an H100
(sm_90), on this CPU-only machine, and read back from the machine code."""
import importlib.util

from tests.conftest import require


def test_both_forms_compile_for_sm90_with_tensor_core_matmuls():
  require(None if importlib.util.find_spec("triton") else
          "triton is not installed (`make test` installs the [census] extra)")
  from sasa_jax.ops import pallas_attention as pa  # noqa: PLC0415
  from sasa_jax.tools import triton_census  # noqa: PLC0415
  rows = triton_census.census(stages=[(7, 512)], batch=2)
  kernels = [r for r in rows if r["kernel"] != "op"]
  assert sorted((r["form"], r["kernel"]) for r in kernels) == sorted(
      (f, k) for f in pa.FORMS for k in pa.KERNELS)
  for r in kernels:
    assert r["instructions"] > 100 and 0 < r["registers"] <= 255, r
    assert r["tensor_core_ops"] > 0, r  # the kernels' matmuls run on tensor cores
    assert r["programs"] == 2 * 8 and r["planned"], r  # one 8 x 8 block per image and head
  ops = {r["form"]: r for r in rows if r["kernel"] == "op"}
  for form, op in ops.items():
    assert op["warp_instructions"] == sum(r["warp_instructions"] for r in kernels
                                          if r["form"] == form)
    assert op["per_logit"] > 0
  markdown = triton_census.to_markdown(rows)
  assert markdown.count("\n") == len(rows) + 1 and "| factored | dq |" in markdown


def test_float32_matmuls_reach_the_tensor_cores_only_as_bfloat16_products():
  """pa.F32_DOTS: "ieee" float32 matmuls are Triton's FMA loop, "bf16x3" three bfloat16
  tensor-core products."""
  require(None if importlib.util.find_spec("triton") else
          "triton is not installed (`make test` installs the [census] extra)")
  import jax.numpy as jnp  # noqa: PLC0415
  from sasa_jax.tools import triton_census  # noqa: PLC0415
  rows = triton_census.census(stages=[(8, 64)], batch=1, dtype=jnp.float32,
                              forms=("factored",), f32_dots=("ieee", "bf16x3"))
  kernels = [r for r in rows if r["kernel"] != "op"]
  assert sorted(r["f32_dot"] for r in kernels) == ["bf16x3"] * 3 + ["ieee"] * 3
  for r in kernels:
    assert (r["tensor_core_ops"] > 0) == (r["f32_dot"] == "bf16x3"), r


def test_resident_warps_follow_the_first_limit_reached():
  """Warps of a kernel resident on one sm_90 SM: registers (allocated 256 per warp), shared
  memory (1 KB reserved per block), at most 32 blocks and 64 warps."""
  from sasa_jax.tools.triton_census import resident_warps  # noqa: PLC0415
  assert resident_warps(32, 0, 4, 90) == 64           # the warp limit
  assert resident_warps(64, 0, 1, 90) == 32           # the block limit
  assert resident_warps(167, 2048, 1, 90) == 12       # registers: 168 x 32 -> 5376 a warp
  assert resident_warps(255, 8192, 4, 90) == 8        # registers: two blocks of 4 warps
  assert resident_warps(64, 100 * 1024, 4, 90) == 8   # shared memory: 2 blocks of 101 KB
  assert resident_warps(64, 0, 4, 75) is None         # an architecture without limits here
