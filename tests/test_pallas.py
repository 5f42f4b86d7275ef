"""impl="pallas": the real kernel bodies (interpret mode) against the reference, and
ahead-of-time lowering of a SASA training step for TPU (Mosaic) and GPU (Triton)."""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from sasa_jax.layers import SelfAttention2D
from sasa_jax.ops import default_impl, local_attention
from sasa_jax.ops import pallas_attention as pa
from sasa_jax.tools.flops import count_flops
from tests import helpers

# (B, H, W, C, heads, kernel): non-square, windows larger than the map, 1 and 8 heads, k 3-11.
SHAPES = [
    (2, 5, 11, 8, 2, 3),
    (1, 3, 4, 8, 1, 7),      # window larger than the map in both directions
    (2, 9, 6, 16, 8, 5),     # 8 heads of d = 2
    (1, 12, 10, 4, 1, 9),
    (1, 7, 13, 8, 2, 11),
    (2, 2, 9, 8, 2, 3),      # 2 rows: too few for the factored form's row matmul on GPU
]
ARGNUMS = (0, 1, 2, 3, 4)


def _inputs(shape, dtype=jnp.float32, seed=0):
  b, h, w, c, n, k = shape
  keys = jax.random.split(jax.random.key(seed), 5)
  qkv = [jax.random.normal(kk, (b, h, w, c), dtype) for kk in keys[:3]]
  rel = [0.5 * jax.random.normal(kk, (k, c // n // 2), dtype) for kk in keys[3:]]
  return (*qkv, *rel), dict(kernel_size=k, num_heads=n)


def _output_and_grads(fn, args):
  """fn(*args) [B, H, W, C] and the gradients of sum(fn(*args) * cos(0, 1, 2, ...)) for
  every argument, with one forward pass (a kernel in interpret mode runs once, not twice)."""
  out, vjp = jax.vjp(fn, *args)
  weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  return out, vjp(weights.astype(out.dtype))


def _reference_output_and_grads(args, kw):
  """`_output_and_grads` of impl="reference", jitted: one compiled program instead of a few
  hundred eager ones (the reference is checked jitted against the NumPy oracle in
  test_ops.py)."""
  return jax.jit(lambda *a: _output_and_grads(
      lambda *b: local_attention(*b, impl="reference", **kw), a))(*args)


# Kernel flavours in interpret mode; "gpu-factored": the GPU kernels with in-kernel, factored
# offsets (pallas_attention.FORMS) instead of the offset tables; "...-bf16x3": with float32
# matmuls as three bfloat16 products (pallas_attention.F32_DOTS).
FORM_FLAVOURS = ["tpu", "gpu", "gpu-factored"]
FLAVOURS = FORM_FLAVOURS + ["gpu-bf16x3", "gpu-factored-bf16x3"]


def _use_flavour(flavour, monkeypatch):
  """pa.target(...) for one of FLAVOURS, with the GPU form and float32 matmuls it names."""
  platform, *options = flavour.split("-")
  monkeypatch.setattr(pa, "GPU_FORM", "factored" if "factored" in options else "tables")
  monkeypatch.setattr(pa, "GPU_F32_DOT", "bf16x3" if "bf16x3" in options else "ieee")
  return pa.target(platform, interpret=True)


def _assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = np.abs(want).max() + 1e-12
  assert np.abs(got - want).max() <= rtol * scale, np.abs(got - want).max() / scale


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_all_gradients_match_reference(flavour, shape, monkeypatch):
  args, kw = _inputs(shape)
  want, want_grads = _reference_output_and_grads(args, kw)
  with _use_flavour(flavour, monkeypatch):
    got, got_grads = _output_and_grads(lambda *a: local_attention(*a, impl="pallas", **kw), args)
  _assert_close(got, want, 1e-4)
  for name, g, w in zip(["q", "k", "v", "rel_h", "rel_w"], got_grads, want_grads):
    assert g.shape == w.shape, name
    _assert_close(g, w, 1e-4)


# Maps larger than one block: halos, slab offsets and border masks inside the grid.
HALO_SHAPES = [(2, 20, 13, 8, 2, 5), (1, 11, 17, 16, 4, 3), (1, 9, 10, 4, 1, 7)]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("shape", HALO_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_many_blocks_with_halos_match_reference(flavour, shape, monkeypatch):
  args, kw = _inputs(shape, seed=3)
  b, h, w, c, n, k = shape
  tiling = pa.plan_tiling(h, w, c // n, k, jnp.float32, flavour.split("-")[0], max_block=8)
  assert tiling.grid_hw[0] > 1 and tiling.grid_hw[1] > 1 and min(tiling.pt, tiling.pl) > 0
  with _use_flavour(flavour, monkeypatch):
    got, got_grads = _output_and_grads(
        lambda *a: pa.local_attention_pallas(*a, max_block=8, **kw), args)
  want, want_grads = _reference_output_and_grads(args, kw)
  _assert_close(got, want, 1e-4)
  for g, w_ in zip(got_grads, want_grads):
    _assert_close(g, w_, 1e-4)


def test_cpu_default_runs_kernels_in_interpret_mode_without_positions_or_keys():
  args, kw = _inputs((1, 6, 5, 8, 2, 3), seed=1)
  q, k, v, _, _ = args
  for keys, rel in ((k, (None, None)), (None, args[3:])):
    want = local_attention(q, keys, v, *rel, impl="reference", **kw)
    _assert_close(local_attention(q, keys, v, *rel, impl="pallas", **kw), want, 1e-4)


@pytest.mark.parametrize("flavour", FORM_FLAVOURS)
def test_bfloat16_inputs_float32_softmax(flavour, monkeypatch):
  """bfloat16 operands (the kernels' matmuls take them as they are) against the float32
  reference: the output and all five gradients."""
  args, kw = _inputs((1, 8, 9, 16, 2, 5), seed=2)
  want, want_grads = _reference_output_and_grads(args, kw)
  with _use_flavour(flavour, monkeypatch):
    got, got_grads = _output_and_grads(
        lambda *a: local_attention(*a, impl="pallas", **kw),
        [a.astype(jnp.bfloat16) for a in args])
  assert got.dtype == jnp.bfloat16
  _assert_close(got, want, 3e-2)
  for g, w in zip(got_grads, want_grads):
    _assert_close(g, w, 3e-2)


@pytest.mark.parametrize("flavour", ["tpu", "gpu"])
@pytest.mark.parametrize("hw,d,k,dtype", [(56, 8, 7, jnp.bfloat16), (7, 64, 7, jnp.float32),
                                          (33, 6, 11, jnp.float32), (5, 32, 3, jnp.bfloat16)])
def test_tiling_satisfies_each_backends_layout_rules(flavour, hw, d, k, dtype):
  t = pa.plan_tiling(hw, hw + 3, d, k, dtype, flavour)
  r = k // 2
  for size, block, slab, pad in ((hw, t.bh, t.kh, t.pt), (hw + 3, t.bw, t.kw, t.pl)):
    if block >= size:  # one block spans the axis: no halo needed
      assert pad == 0 and slab >= size
    else:  # every key a query of the block can see is in the slab
      assert pad >= r and slab >= pad + block + r
  if flavour == "tpu":  # sublane-aligned column offsets and slab widths, full lane dims
    sub = 8 * 4 // jnp.dtype(dtype).itemsize
    assert t.bw % sub == 0 and t.pl % sub == 0 and t.kw % sub == 0 and t.dp == d
  else:  # Triton: power-of-two arrays, matmul dims >= 16, logits within the register cap
    for n in (t.bh, t.bw, t.kh, t.kw, t.dp, t.kp):
      assert n & (n - 1) == 0, t
    assert t.nq >= 16 and t.dp >= 16 and t.nq * t.nk <= 16384


def test_auto_picks_xla_on_accelerators_and_model_impl_selects_pallas():
  assert default_impl("tpu") == default_impl("gpu") == "xla"
  assert default_impl("cpu") == "cpu"  # the compiled kernel (tests/test_ops.py checks it)
  from sasa_jax.models import create_resnet
  model = create_resnet(26, "full_attention", width_multiplier=0.125, num_heads=2,
                        small_images=True, num_classes=10, impl="pallas")
  x = jnp.zeros((1, 28, 28, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))
  assert jaxpr.count("pallas_call") >= 7  # every attention layer of the model


def test_cost_estimate_reaches_the_flops_counter():
  args, kw = _inputs((1, 14, 14, 16, 2, 7))
  exact = count_flops(lambda *a: local_attention(*a, impl="reference", **kw), *args)
  fused = count_flops(lambda *a: local_attention(*a, impl="pallas", **kw), *args)
  assert exact > 0 and fused >= exact  # the kernel's padded work is at least the exact work


def _layer_train_step(hw, channels):
  layer = SelfAttention2D(features=channels, kernel_size=7, num_heads=8, impl="pallas",
                          dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((8, hw, hw, channels), jnp.bfloat16)
  params = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))

  def loss(p, x):
    return jnp.mean(jnp.square(layer.apply(p, x).astype(jnp.float32)))
  return jax.jit(jax.grad(loss)), (params, x)


STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]  # ResNet-50 stage shapes (batch 8)


@pytest.mark.parametrize("platform", ["tpu", "cuda", "cuda-factored"])
def test_training_step_exports_for_accelerators_at_every_resnet50_stage(platform, monkeypatch):
  platform, _, form = platform.partition("-")
  monkeypatch.setattr(pa, "GPU_FORM", form or "tables")
  checks = ([export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
            if platform == "cuda" else [])
  for hw, channels in STAGES:
    step, args = _layer_train_step(hw, channels)
    with pa.target("gpu" if platform == "cuda" else "tpu"):
      exported = export.export(step, platforms=[platform], disabled_checks=checks)(*args)
    text = exported.mlir_module()
    call = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    calls = [line for line in text.splitlines() if call in line and "custom_call" in line]
    assert len(calls) == 3, (hw, len(calls))  # forward, dq and dk/dv kernels
    if platform == "cuda":  # factored: two shifted relative tables instead of four offset tables
      operands = [len(re.search(r"triton\((.*?)\)", c).group(1).split(",")) for c in calls]
      assert operands == ([7, 10, 10] if form else [9, 12, 12]), operands
      # Warps per kernel (pa.kernel_warps): the factored form's one per 16 rows of a block.
      t = pa.plan_tiling(hw, hw, channels // 8, 7, jnp.bfloat16, "gpu")
      warps = [int(re.search(r"num_warps = (\d+)", c).group(1)) for c in calls]
      assert warps == ([min(4, t.nq // 16)] * 2 + [min(4, t.nk // 16)] if form
                       else [pa.NUM_WARPS] * 3), (hw, warps)
    for kernel in ("sasa_fwd_kernel", "sasa_dq_kernel", "sasa_dkv_kernel"):
      assert re.search(kernel, text), kernel


def _exported(step, args, platforms):
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  return export.export(step, platforms=platforms, disabled_checks=checks)(*args)


def test_one_jitted_function_lowers_for_each_platform_without_a_context():
  """The kernel flavour follows the lowering platform (jax.lax.platform_dependent): the same
  jitted training step exports for TPU, then for CUDA, then for both at once, then runs
  here (interpret mode)."""
  step, args = _layer_train_step(14, 128)
  tpu = _exported(step, args, ["tpu"]).mlir_module()
  cuda = _exported(step, args, ["cuda"]).mlir_module()
  both = _exported(step, args, ["tpu", "cuda"]).mlir_module()
  assert tpu.count("tpu_custom_call") == 3 and "__gpu$xla.gpu.triton" not in tpu
  assert cuda.count("__gpu$xla.gpu.triton") == 3 and "tpu_custom_call" not in cuda
  assert both.count("tpu_custom_call") == 3 and both.count("__gpu$xla.gpu.triton") == 3
  layer = SelfAttention2D(features=16, kernel_size=5, num_heads=2, impl="pallas")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 7, 16)), jnp.float32)
  params = layer.init(jax.random.key(0), x)
  want = SelfAttention2D(features=16, kernel_size=5, num_heads=2, impl="reference").apply(
      params, x)
  np.testing.assert_allclose(jax.jit(layer.apply)(params, x), want, rtol=1e-4, atol=1e-5)


def _op_grads(impl):
  def loss(q, k, v, rh, rw):
    y = local_attention(q, k, v, rh, rw, kernel_size=5, num_heads=2, impl=impl)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))
  return jax.jit(jax.grad(loss, argnums=ARGNUMS))


def test_an_export_for_cpu_tpu_and_cuda_runs_the_cpu_branch_here():
  """One module for three platforms: the TPU and GPU kernels are lowered only for their own
  platform (`platform_only`), and calling it here takes the CPU branch, right."""
  args, _ = _inputs((1, 9, 7, 16, 2, 5))
  exported = _exported(_op_grads("pallas"), args, ["cpu", "tpu", "cuda"])
  text = exported.mlir_module()
  assert text.count("tpu_custom_call") == 3 and text.count("__gpu$xla.gpu.triton") == 3
  for got, want in zip(exported.call(*args), _op_grads("reference")(*args)):
    _assert_close(got, want, 1e-4)


def test_only_compiled_kernels_load_the_primitive_extension():
  """sasa_jax.ops.platform_only (jax's primitive-extension interfaces: jax.extend.core,
  jax.interpreters) loads where a compiled kernel is lowered, and not before: the package,
  the model code and impl="auto" lowered for TPU and CUDA run without it."""
  code = """if True:
    import sys
    import jax, jax.numpy as jnp
    from jax import export
    import sasa_jax.train
    from sasa_jax.ops import local_attention
    x, r = jnp.ones((1, 6, 6, 8)), jnp.ones((3, 2))
    def f(impl):
      return lambda x, r: local_attention(x, x, x, r, r, kernel_size=3, num_heads=2, impl=impl)
    loaded = lambda: "sasa_jax.ops.platform_only" in sys.modules
    export.export(jax.jit(f("auto")), platforms=["tpu", "cuda"])(x, r)
    before = loaded()
    export.export(jax.jit(f("pallas")), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, r)
    print(before, loaded())
  """
  assert helpers.run_python(code).stdout.split("\n")[-2] == "False True"


def test_auto_resolves_per_lowering_platform():
  """impl="auto": the blocked XLA op when lowered for TPU and CUDA (tools/tpu_compile and an
  H200 chose it over the kernels), the compiled C++ kernel for the CPU, all from one jitted
  function."""
  args, _ = _inputs((1, 9, 7, 16, 2, 5))
  step = _op_grads("auto")
  tpu = _exported(step, args, ["tpu"]).mlir_module()
  cuda = _exported(step, args, ["cuda"]).mlir_module()
  cpu = export.export(step, platforms=["cpu"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(f"sasa_local_attention_{p}")
      for p in ("fwd", "bwd")])(*args).mlir_module()
  assert "tpu_custom_call" not in tpu and "sasa_local_attention" not in tpu
  assert "tpu_custom_call" not in cuda and "__gpu$xla.gpu.triton" not in cuda
  assert "sasa_local_attention" not in cuda
  assert cpu.count("sasa_local_attention_fwd") == 1 and cpu.count("sasa_local_attention_bwd") == 1
  for got, want in zip(step(*args), _op_grads("reference")(*args)):
    _assert_close(got, want, 1e-4)


@pytest.mark.parametrize("kernels_on", [("cuda",), ("tpu", "cuda", "rocm")])
def test_auto_takes_the_kernels_only_where_accelerator_impl_says(kernels_on, monkeypatch):
  """`ACCELERATOR_IMPL` (what a device's timings set) sends one platform's lowering to its
  kernels while the others keep theirs, and the default branch, any platform jax does not
  name, stays the blocked XLA form even where every accelerator takes the kernels."""
  la = importlib.import_module("sasa_jax.ops.local_attention")  # the module, not the op
  monkeypatch.setattr(la, "ACCELERATOR_IMPL", dict.fromkeys(kernels_on, "pallas"))
  args, _ = _inputs((1, 9, 7, 16, 2, 5))
  step = _op_grads("auto")
  tpu = _exported(step, args, ["tpu"]).mlir_module()
  cuda = _exported(step, args, ["cuda"]).mlir_module()
  assert cuda.count("__gpu$xla.gpu.triton") == 3 and "tpu_custom_call" not in cuda
  assert tpu.count("tpu_custom_call") == (3 if "tpu" in kernels_on else 0)
  assert "__gpu$xla.gpu.triton" not in tpu
  eqns = jax.make_jaxpr(lambda *a: local_attention(*a, kernel_size=5, num_heads=2,
                                                   impl="auto"))(*args).eqns
  dispatch, = [e for e in eqns if e.primitive.name == "cond"]
  branches = dispatch.params["branches"]  # platform_dependent's: the default last
  assert len(branches) == len(kernels_on) + 2  # + the CPU's and the default
  assert "pallas_call" not in str(branches[-1]) and "pallas_call" in str(branches[0])
  for got, want in zip(step(*args), _op_grads("reference")(*args)):  # the CPU's branch
    _assert_close(got, want, 1e-4)


def test_auto_takes_the_shifted_form_from_the_platforms_pixels(monkeypatch):
  """`SHIFTED_FROM_PIXELS` (what a device's timings set) sends one platform's lowering of
  maps of at least that many pixels to the shifted form (elementwise: no dot_general in
  its forward) and keeps the blocked form (batched matmuls) for smaller maps and for the
  other platforms, from one jitted function; the CPU runs its own branch right."""
  la = importlib.import_module("sasa_jax.ops.local_attention")
  monkeypatch.setattr(la, "SHIFTED_FROM_PIXELS", {"cuda": 100})
  kw = dict(kernel_size=5, num_heads=2)
  assert (default_impl("gpu", (1, 16, 16, 8), **kw) == "shifted"
          == default_impl("cuda", (1, 10, 10, 8), **kw))
  assert (default_impl("gpu", (1, 9, 7, 8), **kw) == "xla"
          == default_impl("tpu", (1, 16, 16, 8), **kw))
  assert default_impl("gpu") == "xla"
  for shape, cuda_form in [((1, 16, 16, 16, 2, 5), "shifted"), ((1, 9, 7, 16, 2, 5), "xla")]:
    args, kw = _inputs(shape)
    op = jax.jit(lambda *a, kw=kw: local_attention(*a, **kw, impl="auto"))
    cuda = _exported(op, args, ["cuda"]).mlir_module()
    tpu = _exported(op, args, ["tpu"]).mlir_module()
    assert ("stablehlo.dot_general" not in cuda) == (cuda_form == "shifted"), shape
    assert "stablehlo.dot_general" in tpu
    _assert_close(op(*args), local_attention(*args, **kw, impl="reference"), 1e-4)


def test_auto_takes_the_shifted_form_while_its_logits_fit_one_chunk(monkeypatch):
  """The shifted form runs unchunked: impl="auto" takes it on a platform's large maps only
  while its logits are at most SHIFTED_MAX_LOGITS. TPU's candidate
  setting: at ResNet-50's 56 x 56 stage with 32 images per chip, not 64, nor at 28 x 28."""
  la = importlib.import_module("sasa_jax.ops.local_attention")
  monkeypatch.setattr(la, "SHIFTED_FROM_PIXELS", {"tpu": 56 * 56})
  kw = dict(kernel_size=7, num_heads=8)
  assert default_impl("tpu", (32, 56, 56, 64), **kw) == "shifted"  # 43.6 M logits
  assert default_impl("tpu", (64, 56, 56, 64), **kw) == "xla"  # 87 M logits > 2^26
  assert default_impl("tpu", (32, 28, 28, 128), **kw) == "xla"
  assert default_impl("tpu") == "xla"
  with pytest.raises(ValueError, match="kernel_size and num_heads"):
    default_impl("tpu", (32, 56, 56, 64))
  args, small_kw = _inputs((1, 56, 56, 16, 2, 3))  # 1 x 2 x 9 x 56 x 58 logits

  def forwards(platform):  # the forward's matmuls: the blocked form's, none in the shifted
    op = jax.jit(lambda *a: local_attention(*a, **small_kw, impl="auto"))
    return _exported(op, args, [platform]).mlir_module().count("stablehlo.dot_general")
  assert forwards("tpu") == 0 and forwards("cuda") > 0
  monkeypatch.setattr(la, "SHIFTED_MAX_LOGITS", 50_000)
  assert default_impl("tpu", (32, 56, 56, 64), **kw) == "xla"
  assert forwards("tpu") > 0


def test_auto_sizes_the_blocked_ops_chunks_for_the_lowering_platform(monkeypatch):
  """Where the CPU kernel cannot be built, impl="auto" lowered for the CPU runs the blocked
  op, a ResNet-50 stage in a loop over strips (a chunk's logits stay in cache); the same
  jitted function lowered for CUDA runs it in one chunk (small sequential chunks would
  starve a GPU). Where both cut alike, one branch serves."""
  from sasa_jax.ops import local_attention_cpu
  from sasa_jax.ops.blocked import platform_layout
  monkeypatch.setattr(local_attention_cpu, "available", lambda: False)
  assert default_impl("cpu") == "xla"

  def op(*a):
    return local_attention(*a, kernel_size=7, num_heads=8, impl="auto")
  def branches(a):  # of the platform dispatch; 1: none, one op for every platform
    conds = [e for e in jax.make_jaxpr(op)(*a).eqns if e.primitive.name == "cond"]
    return len(conds[0].params["branches"]) if conds else 1
  args, _ = _inputs((1, 56, 56, 64, 8, 7))
  small, _ = _inputs((1, 9, 7, 64, 8, 7))
  def same_everywhere(shape):
    return platform_layout(shape, 7, 8, "cpu") == platform_layout(shape, 7, 8, "cuda")
  assert not same_everywhere((1, 56, 56, 64)) and same_everywhere((1, 9, 7, 64))
  assert (branches(small), branches(args)) == (1, 2)  # default (+ the CPU's own)
  step = jax.jit(op)
  cpu = _exported(step, args, ["cpu"]).mlir_module()
  cuda = _exported(step, args, ["cuda"]).mlir_module()
  assert "stablehlo.while" in cpu and "stablehlo.while" not in cuda
  assert "sasa_local_attention" not in cpu
  _assert_close(step(*args), local_attention(*args, kernel_size=7, num_heads=8,
                                            impl="reference"), 1e-4)


def test_auto_plans_the_blocked_ops_blocks_with_the_lowering_platforms_kv_cost(monkeypatch):
  """A KV_COST of CUDA's own (`ACCELERATOR_KV_COST`, which a GPU's timings set) plans other
  blocks there only: the same jitted function lowered for CUDA cuts ResNet-50's 56 x 56 stage
  into 14 x 14 blocks with 20 x 20 key windows (400 keys a query), for TPU into the planned
  4 x 4 blocks with 10 x 10 windows (100 keys), and runs right either way."""
  from sasa_jax.ops import blocked
  from sasa_jax.ops.blocked import platform_layout
  monkeypatch.setitem(blocked.ACCELERATOR_KV_COST, "cuda", 25.6)
  assert blocked.kv_cost_for("gpu") == 25.6 and blocked.kv_cost_for("tpu") == blocked.KV_COST
  shape = (1, 56, 56, 64)
  cuda, tpu = (platform_layout(shape, 7, 8, p)[:2] for p in ("cuda", "tpu"))
  assert [(p.block, p.window) for p in cuda] == [(14, 20)] * 2
  assert [(p.block, p.window) for p in tpu] == [(4, 10)] * 2
  args, kw = _inputs((1, 56, 56, 64, 8, 7))
  step = jax.jit(lambda *a: local_attention(*a, **kw, impl="auto"))
  keys = lambda module: {n for n in (100, 400) if f"x{n}x" in module or f"x{n}>" in module}
  assert keys(_exported(step, args, ["cuda"]).mlir_module()) == {400}
  assert keys(_exported(step, args, ["tpu"]).mlir_module()) == {100}
  cuda_op = jax.jit(lambda *a: _output_and_grads(lambda *b: blocked.local_attention_blocked(
      *b, **kw, platform="gpu"), a))  # CUDA's blocks, run here
  for got, want in zip(jax.tree.leaves(cuda_op(*args)),
                       jax.tree.leaves(_reference_output_and_grads(args, kw)), strict=True):
    _assert_close(got, want, 1e-4)


def test_auto_chunks_take_every_image_on_tpu_only():
  """The blocked form's sequential chunks on TPU are strips of block rows of every image
  (XLA:TPU pads a chunk of few images in the lane dimension, `blocked.whole_batch_for`);
  lowered for CUDA, the same jitted function cuts the batch into groups of whole images:
  ResNet-50's 56 x 56 stage at batch 32 slices [32, 28 + 2 x 3 halo rows, 56, 64] key
  strips for TPU and [16, 56, 56, 64] images for CUDA."""
  import re
  from sasa_jax.ops import blocked
  assert blocked.whole_batch_for("tpu") and not any(
      blocked.whole_batch_for(p) for p in ("cuda", "gpu", "rocm", "cpu"))
  maps = jax.ShapeDtypeStruct((32, 56, 56, 64), jnp.bfloat16)
  rel = jax.ShapeDtypeStruct((7, 4), jnp.bfloat16)
  step = jax.jit(lambda *a: local_attention(*a, kernel_size=7, num_heads=8, impl="auto"))
  def slices(platform):
    module = _exported(step, (maps, maps, maps, rel, rel), [platform]).mlir_module()
    return set(re.findall(r"dynamic_slice[^\n]*-> tensor<([0-9x]+)xbf16>", module))
  assert slices("tpu") == {"32x28x56x64", "32x34x56x64"}  # query and key strips
  assert slices("cuda") == {"16x56x56x64"}


SHARDED = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax import export
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sasa_jax.ops import local_attention
mesh = Mesh(np.asarray(jax.devices()), ("data",))
rng = np.random.default_rng(0)
B, H, W, C, N, K = 8, 9, 7, 16, 2, 5
arrays = [rng.normal(size=(B, H, W, C)) for _ in range(3)] + [
    rng.normal(size=(K, C // N // 2)) for _ in range(2)]
args = [jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, P("data") if i < 3 else P()))
        for i, a in enumerate(arrays)]

def grads(impl):
  def loss(*a):
    return jnp.sum(jnp.sin(local_attention(*a, kernel_size=K, num_heads=N, impl=impl)))
  return jax.jit(jax.value_and_grad(loss, argnums=range(5)))

def kernel_batches(impl="pallas", platform="tpu", call="tpu_custom_call"):
  # leading dim of each kernel call's first output (TPU: images x heads; CPU: images)
  checks = [export.DisabledSafetyCheck.custom_call(f"sasa_local_attention_{p}")
            for p in ("fwd", "bwd")]
  text = export.export(grads(impl), platforms=[platform], disabled_checks=checks)(
      *args).mlir_module()
  calls = [line for line in text.splitlines() if call in line and "custom_call" in line]
  return [int(line.split(") -> ")[-1].split("tensor<")[1].split("x")[0]) for line in calls]

want = grads("reference")(*args)
try:
  out = {"unsharded": kernel_batches()}
except NotImplementedError as e:
  out = {"unsharded": str(e)}
with jax.set_mesh(mesh):
  out["sharded_kernel_batches"] = kernel_batches()
  out["sharded_cpu_kernel_batches"] = kernel_batches("cpu", "cpu", "sasa_local_attention")
  for impl in ("pallas", "auto", "cpu"):
    got = grads(impl)(*args)
    out[impl] = max(float(np.max(np.abs(np.asarray(g) - np.asarray(w))) / np.max(np.abs(w)))
                    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print(json.dumps(out))
"""


def test_kernels_map_over_batch_shards_under_a_mesh():
  """A kernel call cannot be partitioned automatically: with batch-sharded inputs and no
  mesh in context, the TPU lowering refuses. Under the training loop's mesh
  (`jax.set_mesh`) the op maps over the devices' batch shards, so each TPU kernel call (and
  the CPU kernel's) sees 2 of the 8 images on 4 devices, and the value and all five gradients still match the
  reference (the relative embeddings' summed over shards)."""
  import json
  out = json.loads(helpers.run_python(SHARDED, devices=4).stdout.strip().splitlines()[-1])
  assert "cannot be automatically partitioned" in out["unsharded"]
  assert out["sharded_kernel_batches"] == [4, 4, 4]  # 2 images x 2 heads per device
  assert out["sharded_cpu_kernel_batches"] == [2, 2]  # the CPU kernel's forward, backward
  assert out["pallas"] < 1e-4 and out["auto"] < 1e-4 and out["cpu"] < 1e-4


def test_vmap_of_the_kernels_lowers_for_each_platform():
  """vmap over a batch of op calls maps the wrapped kernel calls (platform_only's batching
  rule): it lowers for TPU and CUDA, and runs here (interpret mode) like the reference."""
  args, kw = _inputs((1, 6, 5, 16, 2, 3))
  stacked = [jnp.stack([a, 2 * a]) for a in args]
  op = lambda impl: jax.jit(jax.vmap(lambda *a: local_attention(*a, impl=impl, **kw)))
  for platforms in (["tpu"], ["cuda"]):
    text = _exported(op("pallas"), stacked, platforms).mlir_module()
    assert text.count("tpu_custom_call" if platforms == ["tpu"] else "__gpu$xla.gpu.triton") == 1
  _assert_close(op("pallas")(*stacked), op("reference")(*stacked), 1e-4)


def test_kernel_warps_per_form_and_per_rows():
  """pa.kernel_warps: a count for every kernel; "rows", one warp per 16 rows of a kernel's
  logit block (a block's queries for fwd and dq, its slab's for dk/dv), 1 to 4; None, the
  form's own ("tables": NUM_WARPS, "factored": "rows")."""
  t = pa.plan_tiling(56, 56, 8, 7, jnp.bfloat16, "gpu")   # 2 x 8 blocks, 8 x 16 slabs
  assert (t.nq, t.nk) == (16, 128)
  for form in pa.FORMS:
    assert [pa.kernel_warps(t, form, k, "rows") for k in pa.KERNELS] == [1, 1, 4]
    assert [pa.kernel_warps(t, form, k, 8) for k in pa.KERNELS] == [8, 8, 8]
  assert [pa.kernel_warps(t, "tables", k) for k in pa.KERNELS] == [pa.NUM_WARPS] * 3
  assert [pa.kernel_warps(t, "factored", k) for k in pa.KERNELS] == [1, 1, 4]
  small = pa.plan_tiling(3, 3, 8, 7, jnp.bfloat16, "gpu")  # one block: 4 x 4 queries
  assert pa.kernel_warps(small, "factored", "fwd") == 1 and small.nq == 16
