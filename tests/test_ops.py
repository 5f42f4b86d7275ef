"""local_attention: every implementation against a brute-force NumPy oracle."""
import dataclasses
import functools

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest

from sasa_jax.ops import local_attention, shifted
from sasa_jax.ops.blocked import local_attention_blocked, plan_axis


def oracle(q, k, v, rel_h, rel_w, kernel_size, num_heads):
  """The op's definition as loops: only in-image keys enter each softmax."""
  b_, h_, w_, c = q.shape
  d, r = c // num_heads, kernel_size // 2
  out = np.zeros(q.shape, np.float64)
  for b in range(b_):
    for y in range(h_):
      for x in range(w_):
        for n in range(num_heads):
          sl = slice(n * d, (n + 1) * d)
          qq, logits, values = q[b, y, x, sl], [], []
          for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
              if 0 <= y + dy < h_ and 0 <= x + dx < w_:
                logit = 0.0 if k is None else qq @ k[b, y + dy, x + dx, sl]
                if rel_h is not None:
                  logit += qq[: d // 2] @ rel_h[dy + r] + qq[d // 2:] @ rel_w[dx + r]
                logits.append(logit)
                values.append(v[b, y + dy, x + dx, sl])
          p = np.exp(np.array(logits) - max(logits))
          out[b, y, x, sl] = (p / p.sum()) @ np.array(values)
  return out


def small_blocks(q, k, v, rel_h=None, rel_w=None, *, kernel_size, num_heads):
  """The blocked form forced into many tiny blocks, to exercise halos and padding."""
  _, h, w, _ = q.shape
  r = kernel_size // 2
  return local_attention_blocked(
      q, k, v, rel_h, rel_w, kernel_size=kernel_size, num_heads=num_heads,
      plan_h=plan_axis(h, r, min_block=2, block_overhead=0),
      plan_w=plan_axis(w, r, min_block=3, block_overhead=0))


IMPLS = {
    "reference": lambda *a, **kw: local_attention(*a, impl="reference", **kw),
    "xla": lambda *a, **kw: local_attention(*a, impl="xla", **kw),
    "xla_small_blocks": small_blocks,
    "cpu": lambda *a, **kw: local_attention(*a, impl="cpu", **kw),
    "shifted": lambda *a, **kw: local_attention(*a, impl="shifted", **kw),
}

# (B, H, W, C, heads, kernel): non-square, windows larger than the image, 1 and many heads.
SHAPES = [
    (2, 5, 7, 8, 2, 3),
    (1, 3, 4, 4, 1, 7),       # window larger than the image in both directions
    (1, 11, 9, 16, 8, 5),
    (2, 20, 13, 8, 1, 3),
    (1, 19, 17, 12, 3, 5),
    (1, 6, 1, 4, 2, 9),       # a one-pixel-wide image
    (1, 16, 16, 32, 8, 7),    # a ResNet stage's heads and kernel, 4 x 4 blocks with halos
]


def inputs(shape, seed=0, with_k=True, with_rel=True, dtype=np.float32):
  b, h, w, c, n, ks = shape
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(b, h, w, c)).astype(dtype) for _ in range(3))
  rel = [rng.normal(size=(ks, c // n // 2)).astype(dtype) for _ in range(2)]
  return (q, k if with_k else None, v, *(rel if with_rel else (None, None))), dict(
      kernel_size=ks, num_heads=n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_oracle(impl, shape):
  """Compiled as a whole (as in a training step) and op by op: XLA 0.10's CPU fusions once
  computed the blocked op's relative-position terms wrongly under jit only."""
  args, kw = inputs(shape)
  want = oracle(*args, **kw)
  op = functools.partial(IMPLS[impl], **kw)
  for fn in (op, jax.jit(op)):
    np.testing.assert_allclose(np.asarray(fn(*args)), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_k,with_rel", [(True, False), (False, True)])
def test_without_content_or_position_term(impl, with_k, with_rel):
  args, kw = inputs((1, 9, 6, 8, 2, 5), seed=1, with_k=with_k, with_rel=with_rel)
  np.testing.assert_allclose(np.asarray(IMPLS[impl](*args, **kw)), oracle(*args, **kw),
                             atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_border_keys_get_zero_probability(impl):
  # Constant logits: each output is the plain mean of the values of the in-image keys
  # of its window. Zero-padded keys taking part would shrink the corners' means.
  h, w, ks = 5, 4, 3
  v = np.arange(h * w, dtype=np.float32).reshape(1, h, w, 1) + 1.0
  q = np.zeros_like(v)
  out = np.asarray(IMPLS[impl](q, q, v, kernel_size=ks, num_heads=1))
  assert out[0, 0, 0, 0] == pytest.approx(np.mean(v[0, :2, :2]), abs=1e-6)
  assert out[0, h - 1, w - 1, 0] == pytest.approx(np.mean(v[0, -2:, -2:]), abs=1e-6)
  assert out[0, 2, 1, 0] == pytest.approx(np.mean(v[0, 1:4, 0:3]), abs=1e-6)
  # Window larger than the image: every pixel sees the whole image.
  big = np.asarray(IMPLS[impl](q, q, v, kernel_size=11, num_heads=1))
  np.testing.assert_allclose(big, np.full_like(v, v.mean()), atol=1e-5)


def _loss(fn, kw, cot):
  return lambda q, k, v, rh, rw: jnp.sum(fn(q, k, v, rh, rw, **kw) * cot)


@pytest.mark.parametrize("impl", ["xla", "xla_small_blocks", "cpu", "shifted"])
def test_gradients_match_reference(impl):
  args, kw = inputs((2, 7, 9, 8, 2, 5), seed=2)
  cot = np.random.default_rng(3).normal(size=args[0].shape).astype(np.float32)
  want = jax.grad(_loss(IMPLS["reference"], kw, cot), argnums=range(5))(*args)
  got = jax.jit(jax.grad(_loss(IMPLS[impl], kw, cot), argnums=range(5)))(*args)
  for name, g, w in zip(["q", "k", "v", "rel_h", "rel_w"], got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("impl", ["xla", "shifted"])
@pytest.mark.parametrize("with_k,with_rel", [(True, False), (False, True)])
def test_gradients_without_content_or_position_term(impl, with_k, with_rel):
  """Each gradient the op has (none for an absent k or relative embeddings) against
  impl="reference"'s, jitted."""
  args, kw = inputs((2, 6, 9, 8, 2, 5), seed=8, with_k=with_k, with_rel=with_rel)
  cot = np.random.default_rng(9).normal(size=args[0].shape).astype(np.float32)
  given = [i for i, a in enumerate(args) if a is not None]

  def grads(fn):
    def loss(*present):
      full = [present[given.index(i)] if i in given else None for i in range(5)]
      return jnp.sum(fn(*full, **kw) * cot)
    return jax.jit(jax.grad(loss, argnums=range(len(given))))(*(args[i] for i in given))
  for i, g, w in zip(given, grads(IMPLS[impl]), grads(IMPLS["reference"])):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"argument {i}")


@pytest.mark.parametrize("height,width,kernel_size", [(5, 6, 3), (3, 4, 7)])
def test_shifted_scatter_sum_both_ways_is_gather_sums_transpose(height, width, kernel_size):
  """The shifted form's key/value gradient sum, either way it is written (the backward
  takes one by the inputs' dtype), against jax's transpose of its forward sum."""
  lay = shifted._Layout(height, width, kernel_size, num_heads=2)
  rng = np.random.default_rng(10)
  weights = jnp.asarray(rng.normal(size=(2, 2, kernel_size ** 2, lay.positions)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 2, 3, lay.positions)), jnp.float32)
  keys = jax.ShapeDtypeStruct((2, 2, 3, lay.keys), jnp.float32)
  (want,) = jax.linear_transpose(
      lambda kv: shifted._gather_sum(weights, kv, lay, jnp.float32), keys)(x)
  for pad_each in (False, True):
    got = jax.jit(shifted._scatter_sum, static_argnums=(2, 3))(weights, x, lay, pad_each)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{pad_each=}")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_finite_differences(impl):
  # The compiled CPU kernel computes in float32 whatever the input dtype: its finite
  # differences are float32's (central differences, eps 1e-2: error ~1e-4 relative).
  dtype, eps, tol = (np.float32, 1e-2, 2e-3) if impl == "cpu" else (np.float64, None, 1e-6)
  with jax.enable_x64(True):
    args, kw = inputs((1, 4, 5, 4, 2, 3), seed=4, dtype=dtype)
    cot = np.random.default_rng(5).normal(size=args[0].shape).astype(dtype)
    jax.test_util.check_grads(jax.jit(_loss(IMPLS[impl], kw, cot)), args, order=1,
                              modes=["rev"], atol=tol, rtol=tol, eps=eps)


@pytest.mark.parametrize("impl", ["reference", "xla", "cpu", "shifted"])
def test_bfloat16(impl):
  args, kw = inputs((2, 8, 8, 16, 2, 5), seed=6)
  want = oracle(*args, **kw)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in args]
  got = jax.jit(lambda *a: local_attention(*a, impl=impl, **kw))(*bf)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.05)
  loss = lambda *a: jnp.sum(local_attention(*a, impl=impl, **kw).astype(jnp.float32))
  grads = jax.jit(jax.grad(loss, argnums=range(5)))(*bf)
  assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
             for g in grads)


def test_auto_picks_a_known_impl():
  args, kw = inputs(SHAPES[0])
  np.testing.assert_allclose(np.asarray(local_attention(*args, **kw)), oracle(*args, **kw),
                             atol=2e-5)


x = np.zeros((1, 4, 4, 8), np.float32)
rel = np.zeros((3, 2), np.float32)


@pytest.mark.parametrize("call,match", [
    (lambda: local_attention(x[0], x[0], x[0], kernel_size=3, num_heads=2), r"q must have shape \[B, H, W, C\], got shape \(4, 4, 8\)"),
    (lambda: local_attention(x, x, x, kernel_size=4, num_heads=2), r"kernel_size must be a positive odd int, got 4"),
    (lambda: local_attention(x, x, x, kernel_size=3, num_heads=3), r"num_heads=3 .* C=8"),
    (lambda: local_attention(x, x[:, :3], x, kernel_size=3, num_heads=2), r"k must have q's shape \(1, 4, 4, 8\), got shape \(1, 3, 4, 8\)"),
    (lambda: local_attention(x, x, x.astype(np.float16), kernel_size=3, num_heads=2), r"v must have q's dtype float32, got float16"),
    (lambda: local_attention(x, x, x, rel, rel[:2], kernel_size=3, num_heads=2), r"rel_w must have shape \[kernel_size, d // 2\] = \(3, 2\), got shape \(2, 2\)"),
    (lambda: local_attention(x, x, x, rel, None, kernel_size=3, num_heads=2), r"rel_h and rel_w must both be"),
    (lambda: local_attention(x, x, x, kernel_size=3, num_heads=2, impl="cuda"), r"impl='cuda' is not one of"),
    (lambda: local_attention(x, None, x, kernel_size=3, num_heads=2), r"k=None .* needs rel_h"),
    (lambda: local_attention(x, x, None, kernel_size=3, num_heads=2), r"v must be an array of shape \[B, H, W, C\], got None"),
    (lambda: local_attention(x, x, x, rel[:, :1], rel[:, :1], kernel_size=3, num_heads=8), r"relative embeddings need an even head dimension d = C / num_heads, got d=1 \(C=8, num_heads=8\)"),
    (lambda: local_attention(x, x, x, rel.astype(np.float16), rel.astype(np.float16), kernel_size=3, num_heads=2), r"rel_h must have q's dtype float32, got float16"),
])
def test_bad_input_is_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("with_k,with_rel", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("chunking", ["strips", "images", "all images, strips",
                                      "all images, groups and strips"])
def test_chunks_keep_values_and_gradients(monkeypatch, chunking, with_k, with_rel):
  """The op run in sequential chunks (strips of block rows with a halo, or groups of whole
  images; on TPUs strips of every image, `whole_batch_for`, split into groups of images
  only when one block row of them all exceeds the limit) gives the unchunked values and
  gradients; the last block row is padded."""
  from sasa_jax.ops import blocked
  b, h, w, c, n, ks = 4, 11, 7, 8, 2, 3
  args, kw = inputs((b, h, w, c, n, ks), seed=7, with_k=with_k, with_rel=with_rel)
  plan_h, plan_w = plan_axis(h, 1, min_block=2, block_overhead=0), plan_axis(w, 1, min_block=w)
  assert (plan_h.block, plan_h.num_blocks) == (2, 6) and plan_w.num_blocks == 1
  platform = "tpu" if chunking.startswith("all images") else None  # None: jax's default
  op = lambda *a: local_attention_blocked(*a, **kw, plan_h=plan_h, plan_w=plan_w,
                                          platform=platform)
  jaxpr = lambda: str(jax.make_jaxpr(lambda *a: op(*a))(*args))  # a new function: no cache
  diff = [i for i, a in enumerate(args) if a is not None]

  def run(*a):  # compiled whole, traced anew at every call (the chunk limit changes)
    loss = lambda *x: jnp.sum(jnp.sin(op(*[x[diff.index(i)] if i in diff else None
                                           for i in range(5)])))
    both = lambda *a: (op(*a), jax.grad(loss, argnums=range(len(diff)))(*[a[i] for i in diff]))
    return jax.jit(both)(*a)
  want, want_grads = run(*args)
  assert "scan" not in jaxpr()  # all of it fits one chunk
  per_block_row = n * plan_w.num_blocks * plan_h.block * plan_w.block * plan_h.window * plan_w.window
  limit, chunks = {  # (images, groups, strips, height, halo) of the chunks
      "strips": (4 * per_block_row, (1, 4, 2, 6, 1)),  # 3 of the 6 block rows per strip
      "images": (2 * 6 * per_block_row, (2, 2, 1, h, 0)),
      "all images, strips": (4 * 3 * per_block_row, (4, 1, 2, 6, 1)),
      "all images, groups and strips": (3 * per_block_row, (2, 2, 6, 2, 1)),
  }[chunking]
  monkeypatch.setattr(blocked, "ACCELERATOR_CHUNK_LOGITS" if platform == "tpu"
                      else "CHUNK_LOGITS", limit)
  assert dataclasses.astuple(blocked.plan_chunks(
      args[0].shape, n, plan_h, plan_w, limit, platform == "tpu")) == chunks
  assert "scan" in jaxpr()
  got, got_grads = run(*args)
  np.testing.assert_allclose(got, oracle(*args, **kw), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w_ in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-5)
  if platform is None:
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # chunks there only bound memory
    assert "scan" not in jaxpr()


def test_cpu_kernel_builds_once_into_its_cache(monkeypatch, tmp_path):
  from sasa_jax.ops import local_attention_cpu
  monkeypatch.setenv("SASA_KERNEL_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a compiler that always fails
  with pytest.raises(RuntimeError, match="compiling the CPU attention kernel failed: false"):
    local_attention_cpu.build()
  assert list(tmp_path.iterdir()) == []  # no half-written library left behind
  monkeypatch.delenv("CXX")
  path = local_attention_cpu.build()
  assert path.parent == tmp_path and path.stat().st_size > 0
  monkeypatch.setenv("CXX", "false")
  assert local_attention_cpu.build() == path  # from the cache: no compiler run


def test_cpu_impl_runs_the_kernel_unless_the_window_covers_the_map():
  def calls(shape):
    args, kw = inputs(shape)
    jaxpr = str(jax.make_jaxpr(lambda *a: local_attention(*a, impl="cpu", **kw))(*args))
    return jaxpr.count("sasa_local_attention_fwd")
  assert calls((1, 7, 7, 8, 2, 7)) == 1  # r = 3 < 6: a window sees part of the map
  assert calls((1, 4, 4, 8, 2, 7)) == 0  # r = 3 >= 3: dense attention, the blocked form
  assert calls((1, 4, 9, 8, 2, 7)) == 1


def test_cpu_kernel_under_vmap_is_one_call_over_all_images():
  """jax.vmap over groups of images (BatchNorm groups map the model so) merges the mapped
  axis into the kernel's images: one forward and one backward call, no loop, the value and
  all five gradients as the reference's; per-element embeddings take one call each."""
  args, kw = inputs((6, 9, 7, 16, 2, 5), seed=3)
  grouped = [x.reshape(3, 2, *x.shape[1:]) for x in args[:3]]
  rel_h, rel_w = args[3:]

  def grads(impl):
    def loss(q, k, v, rel_h, rel_w):
      out = jax.vmap(lambda q, k, v: local_attention(q, k, v, rel_h, rel_w, impl=impl, **kw))(
          q, k, v)
      return jnp.sum(jnp.sin(out))
    return jax.jit(jax.value_and_grad(loss, argnums=range(5)))
  got, want = grads("cpu")(*grouped, rel_h, rel_w), grads("reference")(*grouped, rel_h, rel_w)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
  text = grads("cpu").lower(*grouped, rel_h, rel_w).as_text()
  assert text.count("sasa_local_attention_fwd") == text.count("sasa_local_attention_bwd") == 1
  assert "while" not in text
  rels = jnp.stack([rel_h, 2 * rel_h, -rel_h])
  per_element = lambda impl: jax.jit(jax.vmap(
      lambda q, k, v, rel_h: local_attention(q, k, v, rel_h, rel_w, impl=impl, **kw)))
  np.testing.assert_allclose(per_element("cpu")(*grouped, rels),
                             per_element("reference")(*grouped, rels), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", [(1, 6, 9, 32, 2, 3), (2, 5, 10, 64, 2, 5),
                                   (1, 4, 9, 64, 1, 3), (1, 5, 6, 48, 2, 3)], ids=str)
def test_cpu_kernel_at_each_compiled_head_dim(shape):
  """The kernel is compiled for d = 8, 16, 32, 64 (and any d at run time): d = 16, 32, 64
  and 24 here (8 in SHAPES), values and all five gradients against the oracle/reference."""
  args, kw = inputs(shape, seed=8)
  got = jax.jit(functools.partial(IMPLS["cpu"], **kw))(*args)
  np.testing.assert_allclose(np.asarray(got), oracle(*args, **kw), atol=2e-5, rtol=2e-5)
  cot = np.random.default_rng(9).normal(size=args[0].shape).astype(np.float32)
  want = jax.grad(_loss(IMPLS["reference"], kw, cot), argnums=range(5))(*args)
  grads = jax.jit(jax.grad(_loss(IMPLS["cpu"], kw, cot), argnums=range(5)))(*args)
  for name, g, w in zip(["q", "k", "v", "rel_h", "rel_w"], grads, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=name)
