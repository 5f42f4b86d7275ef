"""SelfAttention2D and AttentionStem: shapes, parameters, options, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sasa_jax.layers import AttentionStem, SelfAttention2D
from sasa_jax.ops import local_attention


def init_apply(module, x, **kw):
  variables = module.init(jax.random.key(0), x, **kw)
  out = module.apply(variables, x, **kw, mutable=["batch_stats"]) if "train" in kw else \
      module.apply(variables, x)
  return variables, out[0] if isinstance(out, tuple) else out


x = jax.random.normal(jax.random.key(1), (2, 9, 10, 6))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pos", ["relative", "absolute", "none"])
def test_self_attention_shapes_and_params(stride, pos):
  layer = SelfAttention2D(16, kernel_size=5, num_heads=4, stride=stride, positional_encoding=pos)
  variables, y = init_apply(layer, x[:, :8])
  assert y.shape == (2, 8 // stride, 10 // stride, 16)
  params = variables["params"]
  assert {"query", "key", "value"} <= set(params)
  assert all("bias" not in p for p in (params["query"], params["key"], params["value"]))
  if pos == "relative":
    assert params["rel_h"].shape == params["rel_w"].shape == (5, 2)  # [k, d / 2]
  if pos == "absolute":
    assert params["abs_rows"].shape == (8, 2) and params["abs_cols"].shape == (10, 2)


def test_self_attention_is_the_op_on_projections():
  layer = SelfAttention2D(8, kernel_size=3, num_heads=2, impl="reference")
  variables, y = init_apply(layer, x)
  p = variables["params"]
  q, k, v = (x @ p[n]["kernel"] for n in ("query", "key", "value"))
  want = local_attention(q, k, v, p["rel_h"], p["rel_w"], kernel_size=3, num_heads=2)
  np.testing.assert_allclose(y, want, atol=1e-5)
  scaled = SelfAttention2D(8, kernel_size=3, num_heads=2, impl="reference", scale_query=True)
  want = local_attention(q * 0.5, k, v, p["rel_h"], p["rel_w"], kernel_size=3, num_heads=2)
  np.testing.assert_allclose(scaled.apply(variables, x), want, atol=1e-5)


@pytest.mark.parametrize("attention_type", ["qk+qr", "qr"])
def test_absolute_embeddings_are_each_keys_row_and_column(attention_type):
  """positional_encoding="absolute": every head's keys get [rows[y], cols[x]] of the key's
  own position (d/2 channels each); "qr" attends to those positions alone."""
  layer = SelfAttention2D(8, kernel_size=3, num_heads=2, positional_encoding="absolute",
                          attention_type=attention_type, impl="reference")
  variables, y = init_apply(layer, x)
  p = variables["params"]
  rows, cols = np.asarray(p["abs_rows"]), np.asarray(p["abs_cols"])  # [9, 2], [10, 2]
  pos = np.zeros((9, 10, 8), np.float32)
  for head in range(2):
    pos[:, :, 4 * head:4 * head + 2] = rows[:, None, :]
    pos[:, :, 4 * head + 2:4 * head + 4] = cols[None, :, :]
  q, v = x @ p["query"]["kernel"], x @ p["value"]["kernel"]
  k = pos + (x @ p["key"]["kernel"] if attention_type == "qk+qr" else 0 * q)
  want = local_attention(q, k, v, None, None, kernel_size=3, num_heads=2, impl="reference")
  np.testing.assert_allclose(y, want, atol=1e-5)


def test_stride_two_is_the_attention_then_a_2x2_average_of_the_pixels_there():
  """At odd sizes the last row and column of windows average the pixels they cover."""
  layer = SelfAttention2D(8, kernel_size=3, num_heads=2, impl="reference")
  variables, full = init_apply(layer, x)  # [2, 9, 10, 8]
  strided = SelfAttention2D(8, kernel_size=3, num_heads=2, stride=2, impl="reference")
  y = strided.apply(variables, x)
  full = np.asarray(full)
  want = np.stack([np.stack([full[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
                             for j in range(5)], axis=1) for i in range(5)], axis=1)
  assert y.shape == want.shape == (2, 5, 5, 8)
  np.testing.assert_allclose(y, want, atol=1e-5)


def test_qr_attention_has_no_key_projection():
  variables, y = init_apply(SelfAttention2D(8, kernel_size=3, num_heads=2, attention_type="qr"), x)
  assert "key" not in variables["params"] and y.shape == (2, 9, 10, 8)


@pytest.mark.parametrize("kw,match", [
    (dict(positional_encoding="sinusoid"), r"positional_encoding='sinusoid' is not allowed; choose one of"),
    (dict(attention_type="qk"), r"attention_type='qk' is not allowed"),
    (dict(stride=3), r"stride=3 is not allowed; choose one of \(1, 2\)"),
    (dict(num_heads=3), r"num_heads=3: the layer's width 8 must be a multiple of 6"),
    (dict(attention_type="qr", positional_encoding="none"), r"needs positional_encoding"),
])
def test_self_attention_bad_fields(kw, match):
  with pytest.raises(ValueError, match=match):
    SelfAttention2D(8, **kw).init(jax.random.key(0), x)


@pytest.mark.parametrize("stem_type", ["spatially_aware", "stand_alone", "conv_values"])
def test_attention_stem(stem_type):
  img = jax.random.normal(jax.random.key(2), (2, 16, 12, 3))
  stem = AttentionStem(16, stem_type=stem_type, block_size=4, num_mixtures=3)
  variables, y = init_apply(stem, img, train=True)
  assert y.shape == (2, 4, 3, 16)
  params = variables["params"]
  assert variables["batch_stats"]["bn"]["mean"].shape == (16,)
  if stem_type == "spatially_aware":
    assert params["value"].shape == (3, 3, 16)  # [C_in, mixtures, C]
    assert params["mixture"].shape[0] == 3
  if stem_type == "conv_values":
    assert params["value"]["kernel"].shape == (4, 4, 3, 16)


def test_spatially_aware_values_folded_equal_the_papers_form():
  # impl="reference" mixes M value maps per pixel; the default folds the mixture into one
  # matrix per block position first: the same function and the same gradients, jitted.
  img = jax.random.normal(jax.random.key(4), (2, 8, 12, 3))
  ref = AttentionStem(16, block_size=4, num_mixtures=3, impl="reference")
  fast = AttentionStem(16, block_size=4, num_mixtures=3)
  variables = ref.init(jax.random.key(1), img)

  def loss(module):
    return lambda p: jnp.sum(jnp.sin(module.apply({**variables, "params": p}, img)))
  np.testing.assert_allclose(jax.jit(fast.apply)(variables, img),
                             jax.jit(ref.apply)(variables, img), atol=1e-5)
  g_ref, g_fast = (jax.jit(jax.grad(loss(m)))(variables["params"]) for m in (ref, fast))
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_fast)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch,block_size,heads,channels", [(2, 2, 4, 8), (1, 2, 2, 4),
                                                             (2, 4, 2, 32)])
def test_stem_block_attention_fused_equals_einsum(batch, block_size, heads, channels):
  # The two forms the stem picks between by block size (MAX_FUSED_BLOCK_WORK): one function,
  # also when the fused products and sums are compiled whole (XLA:CPU has miscompiled such
  # sums for some shapes under jit only; see the README).
  from sasa_jax.layers.stem import block_attention_einsum, block_attention_fused
  s, d = block_size, channels // heads
  q, k, v = (jax.random.normal(jax.random.key(i), (batch, 4 * s, 2 * s, channels))
             for i in range(3))
  rel = jax.random.normal(jax.random.key(3), (s, s, s, s, d))
  kw = dict(block_size=s, num_heads=heads)
  fused = functools.partial(block_attention_fused, **kw)
  want = block_attention_einsum(q, k, v, rel, **kw)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3))
  g_e = grad(functools.partial(block_attention_einsum, **kw))(q, k, v, rel)
  for f in (fused, jax.jit(fused)):
    np.testing.assert_allclose(f(q, k, v, rel), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_e, jax.jit(grad(f))(q, k, v, rel)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,height,width,cin,channels,heads,block_size", [
    (2, 8, 12, 3, 64, 4, 4),  # the 224 px stem's shape: d = 16, attention by matmuls
    (2, 8, 8, 3, 16, 4, 4),   # d = 4: fused products
    (1, 6, 4, 1, 8, 4, 2),    # one input channel (Fashion-MNIST), s = 2
])
def test_stem_projections_folded_into_the_logits_equal_the_plain_form(
    batch, height, width, cin, channels, heads, block_size):
  # q.k = x A x and q.r = x (W_q r) with the projections folded: one function with the plain
  # form on explicit q = x W_q, k = x W_k, jitted and op by op, and the same gradients.
  from sasa_jax.layers.stem import block_attention_einsum, block_attention_factorized
  s, d = block_size, channels // heads
  keys = jax.random.split(jax.random.key(7), 5)
  x = jax.random.normal(keys[0], (batch, height, width, cin))
  w_q, w_k = (jax.random.normal(k, (cin, channels)) for k in keys[1:3])
  v = jax.random.normal(keys[3], (batch, height, width, channels))
  rel = jax.random.normal(keys[4], (s, s, s, s, d))
  kw = dict(block_size=s, num_heads=heads)

  def plain(x, w_q, w_k, v, rel):
    return block_attention_einsum(x @ w_q, x @ w_k, v, rel, **kw)
  folded = functools.partial(block_attention_factorized, **kw)
  args = (x, w_q, w_k, v, rel)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=range(5))
  want, g_want = plain(*args), grad(plain)(*args)
  for f in (folded, jax.jit(folded)):
    np.testing.assert_allclose(f(*args), want, rtol=1e-5, atol=1e-5)
  for f in (grad(folded), jax.jit(grad(folded))):
    for a, b in zip(g_want, f(*args)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("stem_type", ["spatially_aware", "conv_values"])
def test_attention_stem_in_chunks_equals_one_pass(monkeypatch, stem_type):
  from sasa_jax.layers import stem as stem_lib
  img = jax.random.normal(jax.random.key(5), (4, 8, 8, 3))
  stem = AttentionStem(8, stem_type=stem_type, block_size=4)
  variables = stem.init(jax.random.key(1), img)

  def run():  # traced anew each call: MAX_CHUNK_PIXELS is read at trace time
    y, _ = jax.jit(lambda v: stem.apply(v, img, train=True, mutable=["batch_stats"]))(variables)
    g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(stem.apply(
        {**variables, "params": p}, img, train=True, mutable=["batch_stats"])[0]))))
    return y, g(variables["params"])
  y1, g1 = run()
  monkeypatch.setattr(stem_lib, "MAX_CHUNK_PIXELS", 64)  # one 8x8 image per chunk
  from sasa_jax.ops.chunks import fewest_chunks
  assert fewest_chunks(4, 64, stem_lib.MAX_CHUNK_PIXELS) == 4
  y4, g4 = run()
  np.testing.assert_allclose(y4, y1, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_attention_stem_attends_within_blocks_only():
  # Changing one block of the input leaves the other blocks' outputs untouched.
  img = jax.random.normal(jax.random.key(3), (1, 8, 8, 3))
  stem = AttentionStem(8, block_size=4)
  variables = stem.init(jax.random.key(0), img)
  y0 = stem.apply(variables, img)
  y1 = stem.apply(variables, img.at[:, :4, :4].add(5.0))
  assert not np.allclose(y0[:, 0, 0], y1[:, 0, 0])
  np.testing.assert_allclose(y0[:, 1:], y1[:, 1:], atol=1e-6)
  np.testing.assert_allclose(y0[:, :, 1:], y1[:, :, 1:], atol=1e-6)


def test_attention_stem_bad_input():
  with pytest.raises(ValueError, match="divisible by block_size=4, got 10x8"):
    AttentionStem(8).init(jax.random.key(0), jnp.zeros((1, 10, 8, 3)))
  with pytest.raises(ValueError, match="stem_type='conv' is not allowed"):
    AttentionStem(8, stem_type="conv").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"features=12 must be a multiple of 2 x num_heads=4"):
    AttentionStem(12).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))  # heads of 3 channels


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 5)])
def test_pointwise_conv_equals_the_convolution(stride, size):
  """The 1x1 convolutions of the ResNet blocks: values and both gradients of nn.Conv's lax
  convolution, jitted, at even and odd sizes (stride 2 rounds up as SAME does)."""
  from flax import linen as nn

  from sasa_jax.layers.pointwise import pointwise_conv
  xs = jax.random.normal(jax.random.key(2), (3,) + size + (6,))
  conv = lambda **kw: nn.Conv(5, (1, 1), strides=stride, use_bias=False, **kw)
  variables = conv().init(jax.random.key(0), xs)

  def loss(module):
    return jax.jit(jax.value_and_grad(
        lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), argnums=(0, 1)))(variables, xs)

  (want, (gw_want, gx_want)), (got, (gw, gx)) = loss(conv()), loss(
      conv(conv_general_dilated=pointwise_conv))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(gx, gx_want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw["params"]["kernel"], gw_want["params"]["kernel"], rtol=1e-4,
                             atol=1e-5)
  with pytest.raises(ValueError, match="padding"):
    nn.Conv(5, (1, 1), padding=((1, 1), (1, 1)),
            conv_general_dilated=pointwise_conv).init(jax.random.key(0), xs)


@pytest.mark.parametrize("block", [2, 4])
def test_stem_block_max_equals_max_pool(block):
  """The stem's pooling: values and gradient of nn.max_pool with window = stride, jitted
  (random inputs: no ties); a tie shares the gradient."""
  from flax import linen as nn

  from sasa_jax.layers.stem import block_max
  x = jax.random.normal(jax.random.key(3), (2, 8, 12, 5))
  pools = (block_max, lambda x, s: nn.max_pool(x, (s, s), strides=(s, s)))
  (got, g_got), (want, g_want) = (jax.jit(jax.value_and_grad(
      lambda x, pool=pool: jnp.sum(jnp.sin(pool(x, block))))) (x) for pool in pools)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(g_got, g_want)
  assert block_max(x, block).shape == (2, 8 // block, 12 // block, 5)
  tie = jax.grad(lambda x: block_max(x, block).sum())(jnp.zeros((1, block, block, 1)))
  np.testing.assert_allclose(tie, 1 / block ** 2)


@pytest.mark.parametrize("block,dtype", [(4, jnp.float32), (2, jnp.float32), (2, jnp.bfloat16),
                                         (6, jnp.float32)])  # 6 x 6 > 32 bits: a bool mask
def test_stem_batch_norm_relu_pool_equals_flax_batch_norm_relu_pool(block, dtype):
  """The stem's fused BatchNorm + ReLU + pool, jitted: the same variables, values, running
  statistics and gradients (input, scale, bias) as nn.BatchNorm, nn.relu and block_max,
  in training and evaluation; blocks whose maximum ties or is clipped at 0 by ReLU
  included."""
  from flax import linen as nn

  from sasa_jax.layers.stem import BatchNormReluBlockMax, block_max

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      bn = nn.BatchNorm(use_running_average=not train, momentum=0.8, dtype=dtype, name="bn")
      return block_max(nn.relu(bn(x)), block)

  class Fused(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return BatchNormReluBlockMax(block, momentum=0.8, dtype=dtype, name="bn")(x, train=train)

  x = jax.random.normal(jax.random.key(1), (3, 2 * block, 3 * block, 5)) * 2 + 0.3
  x = x.astype(dtype)
  x = x.at[0, :block, :block, 0].set(3.0)  # a tie: one block all equal (and positive)
  x = x.at[1, :block, :block, 1].set(-9.0)  # a block that ReLU makes all zero
  variables = Plain().init(jax.random.key(0), x)
  assert (jax.tree.map(jnp.shape, Fused().init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, variables))
  params = {"bn": {"scale": jnp.linspace(0.5, 1.5, 5), "bias": jnp.linspace(-0.3, 0.2, 5)}}
  stats = {"bn": {"mean": jnp.linspace(-0.1, 0.1, 5), "var": jnp.linspace(0.9, 1.2, 5)}}
  weights = jax.random.normal(jax.random.key(2), (3, 2, 3, 5))

  def loss(model, params, x):
    out, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"])
    out = out.astype(jnp.float32)
    return jnp.sum(out * weights) + jnp.sum(jnp.sin(out)), (out, new["batch_stats"])

  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  # The reference runs op by op: XLA:CPU at LLVM -O0 miscompiles the gradient of
  # nn.BatchNorm + ReLU + block_max jitted (docs/performance.md).
  (want, (out_want, stats_want)), g_want = jax.value_and_grad(
      functools.partial(loss, Plain()), argnums=(0, 1), has_aux=True)(params, x)
  (got, (out_got, stats_got)), g_got = jax.jit(jax.value_and_grad(
      functools.partial(loss, Fused()), argnums=(0, 1), has_aux=True))(params, x)
  np.testing.assert_allclose(out_got, out_want, **tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats_got, stats_want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32),
                                                       np.asarray(b, np.float32), **tol),
               g_got, g_want)
  evals = [apply({"params": params, "batch_stats": stats}, x)
           for apply in (Plain().apply, jax.jit(Fused().apply))]
  np.testing.assert_allclose(np.asarray(evals[1], np.float32), np.asarray(evals[0], np.float32),
                             **tol)


def _stem_attention_by_hand(x, p, stem_type, s, heads):
  """The attention stem's output before its BatchNorm, one query at a time (NumPy, float64):
  within each s x s block, logits q.k + q.concat(rel_h[e - a], rel_w[f - c]) for query
  (a, c) and key (e, f); "spatially_aware" values mix W_V^m by softmax_m((emb_row[e] +
  emb_col[f]) . nu_m), "stand_alone" values are x W_V."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, h, w, _ = x.shape
  c = p["query"].shape[1]
  d = c // heads
  q, k = x @ p["query"], x @ p["key"]
  if stem_type == "spatially_aware":
    logits = (p["emb_row"][:, None] + p["emb_col"][None, :]) @ p["mixture"].T  # [s, s, M]
    mix = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    v = np.zeros((b, h, w, c))
    for y_ in range(h):
      for x_ in range(w):
        v[:, y_, x_] = np.einsum("bi,imc,m->bc", x[:, y_, x_], p["value"], mix[y_ % s, x_ % s])
  else:
    v = x @ p["value"]
  out = np.zeros((b, h, w, c))
  for n in range(b):
    for y_ in range(h):
      for x_ in range(w):
        a, cq, top, left = y_ % s, x_ % s, y_ - y_ % s, x_ - x_ % s
        for head in range(heads):
          hd = slice(head * d, (head + 1) * d)
          qv = q[n, y_, x_, hd]
          logits, values = [], []
          for e in range(s):
            for f in range(s):
              r = np.concatenate([p["rel_h"][e - a + s - 1], p["rel_w"][f - cq + s - 1]])
              logits.append(qv @ (k[n, top + e, left + f, hd] + r))
              values.append(v[n, top + e, left + f, hd])
          weights = np.exp(np.array(logits) - max(logits))
          out[n, y_, x_, hd] = (weights / weights.sum()) @ np.array(values)
  return out


@pytest.mark.parametrize("stem_type", ["spatially_aware", "stand_alone"])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_attention_stem_is_the_papers_block_attention_by_hand(stem_type, impl):
  """What reaches the stem's BatchNorm, against one query at a time: relative offsets as
  key minus query, the value mixture by the key's position in its block."""
  from flax import linen as nn
  from sasa_jax.layers.stem import BatchNormReluBlockMax
  img = jax.random.normal(jax.random.key(6), (2, 6, 4, 2))
  stem = AttentionStem(8, stem_type=stem_type, block_size=2, num_heads=2, num_mixtures=3,
                       embedding_dim=4, impl=impl)
  variables = stem.init(jax.random.key(1), img)
  seen = []

  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNormReluBlockMax):
      seen.append(args[0])
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(capture):
    stem.apply(variables, img)
  want = _stem_attention_by_hand(img, variables["params"], stem_type, s=2, heads=2)
  np.testing.assert_allclose(seen[0], want, rtol=1e-4, atol=1e-5)
