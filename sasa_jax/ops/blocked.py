"""Blocked ("halo") local attention in plain XLA ops: the fast implementation.

The image is cut into query blocks of bh x bw pixels. Each block attends to one
(bh + 2r) x (bw + 2r) key window (its halo, r = kernel_size // 2) with two batched
matrix multiplies, and a static mask keeps, for every query, exactly the keys of its
own pixel-centred k x k window that lie inside the image (HaloNet, arXiv:2103.12731
§2.2, describes SASA's own implementation this way). When one block covers a whole
dimension the halo is dropped: every key outside the image is masked anyway.

Windows are cut with a constant number of reshapes and concatenations whatever the
image size, so the compiled program stays small (one slice per window offset would
unroll k^2 copies per layer). The work runs in sequential cache-sized chunks: groups of
whole images, or horizontal strips of block rows whose keys carry an r-row halo.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.ops.chunks import fewest_chunks, map_batch_chunks

# Finite, so that padded query rows that see no key get a harmless uniform softmax
# instead of NaN (they are cropped away); exp(_MASKED - max) is exactly 0 in float32.
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class AxisPlan:
  """How one spatial axis of length `size` is cut into query blocks.

  block: query block length; num_blocks: blocks (the last may be padded);
  window: key window length per block; offset: key window start relative to the
  block start, in pixels (r with a halo, 0 when one block spans the axis).
  """
  size: int
  radius: int
  block: int
  num_blocks: int
  window: int
  offset: int


# Relative cost of moving one key/value channel of a window versus one logit, fitted to
# fwd+bwd timings on XLA:CPU at the ResNet-50 stage shapes (see tools/bench.py).
KV_COST = 0.4
MIN_BLOCK = 4


def _axis_plan(size: int, radius: int, block: int) -> AxisPlan:
  nb = -(-size // block)
  if nb == 1:
    return AxisPlan(size, radius, size, 1, size, 0)
  return AxisPlan(size, radius, block, nb, block + 2 * radius, radius)


def plan_axis(size: int, radius: int, min_block: int = MIN_BLOCK,
              block_overhead: float = 0.0) -> AxisPlan:
  """One axis on its own: the block minimising padded queries x window (tests use this
  to force many small blocks)."""
  def cost(block):
    p = _axis_plan(size, radius, block)
    return p.num_blocks * p.block * p.window / size + block_overhead * p.num_blocks
  candidates = [size] + list(range(min(min_block, size), size))
  return _axis_plan(size, radius, min(candidates, key=lambda b: (cost(b), -b)))


def plan_blocks(h: int, w: int, radius: int, channels: int, num_heads: int):
  """(plan_h, plan_w) minimising the memory traffic per query pixel:
  padding x [heads x window logits + KV_COST x 2C x window / block] (k and v windows
  are re-read once per block they overlap)."""
  def options(size):
    return {_axis_plan(size, radius, b) for b in [size] + list(range(min(MIN_BLOCK, size), size))}

  def cost(ph, pw):
    window, block = ph.window * pw.window, ph.block * pw.block
    padding = ph.num_blocks * ph.block * pw.num_blocks * pw.block / (h * w)
    return padding * (num_heads * window + KV_COST * 2 * channels * window / block)

  pairs = [(ph, pw) for ph in options(h) for pw in options(w)]
  return min(pairs, key=lambda p: (cost(*p), -p[0].block * p[1].block, p[0].block))


def _windows(x, axis, plan: AxisPlan, halo_included: bool = False):
  """Cuts axis `axis` of x into [num_blocks, window] key windows. x's axis holds the
  plan.size pixels, or with halo_included their plan.offset rows of halo on either side."""
  if plan.num_blocks == 1:
    return jnp.expand_dims(x, axis)
  b, nb, win = plan.block, plan.num_blocks, plan.window
  pieces = -(-win // b)  # consecutive blocks that cover one window
  total = (nb + pieces - 1) * b
  before = 0 if halo_included else plan.offset
  pad = [(0, 0)] * x.ndim
  pad[axis] = (before, total - x.shape[axis] - before)
  x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:axis] + (nb + pieces - 1, b) + x.shape[axis + 1:])
  shifted = [jax.lax.slice_in_dim(x, j, j + nb, axis=axis) for j in range(pieces)]
  x = jnp.concatenate(shifted, axis=axis + 1)
  return jax.lax.slice_in_dim(x, 0, win, axis=axis + 1)


def _query_blocks(x, axis, plan: AxisPlan):
  """Pads axis `axis` to num_blocks x block and splits it into [num_blocks, block]."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, plan.num_blocks * plan.block - plan.size)
  x = jnp.pad(x, pad)
  return x.reshape(x.shape[:axis] + (plan.num_blocks, plan.block) + x.shape[axis + 1:])


def _axis_mask(plan: AxisPlan, start: int = 0, size: int | None = None):
  """[num_blocks, block, window] bool: key u is in query y's window and in the image,
  for blocks that begin at pixel `start` of an axis of `size` pixels (default plan.size)."""
  i = np.arange(plan.num_blocks)[:, None, None]
  y = np.arange(plan.block)[None, :, None]
  u = np.arange(plan.window)[None, None, :]
  dy = u - plan.offset - y
  key = start + i * plan.block + u - plan.offset
  return (np.abs(dy) <= plan.radius) & (key >= 0) & (key < (plan.size if size is None else size))


def _axis_embedding(rel, plan: AxisPlan):
  """[block, window, d/2]: rel[dy + r] for query y and key u (zeros outside the window)."""
  y = np.arange(plan.block)[:, None]
  u = np.arange(plan.window)[None, :]
  idx = u - plan.offset - y + plan.radius
  inside = (idx >= 0) & (idx < rel.shape[0])
  return jnp.where(inside[..., None], rel[np.clip(idx, 0, rel.shape[0] - 1)], 0)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static shapes of one call: image (or strip of rows), heads and the two axis plans.
  keys_padded: k and v hold ph.offset extra rows above and below the query rows."""
  batch: int
  h: int
  w: int
  heads: int
  d: int
  ph: AxisPlan
  pw: AxisPlan
  keys_padded: bool = False

  @property
  def lead(self):  # [B, nbh, nbw, N]: the batch dimensions of every block matmul
    return (self.batch, self.ph.num_blocks, self.pw.num_blocks, self.heads)

  @property
  def nq(self):
    return self.ph.block * self.pw.block

  @property
  def nk(self):
    return self.ph.window * self.pw.window


def _to_blocks(x, lay: _Layout):
  """[B, H, W, C] -> query blocks [B, nbh, nbw, N, bh * bw, d] (zero padded)."""
  x = _query_blocks(_query_blocks(x.reshape(lay.batch, lay.h, lay.w, lay.heads, lay.d), 1,
                                  lay.ph), 3, lay.pw)
  return x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(lay.lead + (lay.nq, lay.d))


def _from_blocks(xb, lay: _Layout):
  """Inverse of _to_blocks (padding cropped): [B, nbh, nbw, N, nq, d] -> [B, H, W, C]."""
  ph, pw = lay.ph, lay.pw
  x = xb.reshape(lay.lead + (ph.block, pw.block, lay.d)).transpose(0, 1, 4, 2, 5, 3, 6)
  x = x.reshape(lay.batch, ph.num_blocks * ph.block, pw.num_blocks * pw.block, -1)
  return x[:, :lay.h, :lay.w]


def _to_windows(x, lay: _Layout, keys_last: bool):
  """[B, H, W, C] -> key windows [B, nbh, nbw, N, wh * ww, d], or [..., d, wh * ww]."""
  x = x.reshape(lay.batch, x.shape[1], lay.w, lay.heads, lay.d)
  x = _windows(_windows(x, 1, lay.ph, lay.keys_padded), 3, lay.pw)
  if keys_last:  # with d as small as 8, q.k runs ~1.5x faster on XLA:CPU in this layout
    return x.transpose(0, 1, 3, 5, 6, 2, 4).reshape(lay.lead + (lay.d, lay.nk))
  return x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(lay.lead + (lay.nk, lay.d))


def _mask_terms(mask_h, lay: _Layout, acc):
  """The mask as two additive terms, 0 inside and _MASKED outside: rows [B, nbh, 1, 1, bh,
  1, wh] from the rows' mask of each image (or strip) mask_h [B, nbh, bh, wh], and columns
  [nbw, 1, 1, bw, ww]. The mask is separable, so adding them to the logits' row and column
  terms replaces a select over every logit."""
  rows = jnp.where(mask_h, 0, _MASKED).astype(acc)[:, :, None, None, :, None, :]
  cols = np.where(_axis_mask(lay.pw), 0, _MASKED).astype(acc)[:, None, None, :, :]
  return rows, cols


def _logits(qb, kw, emb_h, emb_w, mask_h, lay: _Layout, acc):
  """Masked logits [B, nbh, nbw, N, nq, nk] in `acc` (float32 or wider): keys outside a
  query's window or the image get about _MASKED (twice it where both axes are out)."""
  ph, pw, d = lay.ph, lay.pw, lay.d
  shape = lay.lead + (ph.block, pw.block, ph.window, pw.window)
  rows, cols = _mask_terms(mask_h, lay, acc)
  if emb_h is not None:
    # Products summed over d/2 channels, fused: as batched dots (the block position is a
    # batch dimension of both operands) they ran ~1.3x slower in the whole op on XLA:CPU.
    q5 = qb.reshape(lay.lead + (ph.block, pw.block, 1, d)).astype(acc)
    rows = rows + jnp.sum(q5[..., : d // 2] * emb_h[:, None].astype(acc), axis=-1)
    cols = cols + jnp.sum(q5[..., d // 2:] * emb_w[None].astype(acc), axis=-1)
  logits = rows[..., :, None] + cols[..., None, :]  # [..., bh, bw, wh, ww]
  if kw is not None:
    logits = logits + jnp.einsum("...qd,...dk->...qk", qb, kw,
                                 preferred_element_type=acc).reshape(shape)
  return jnp.broadcast_to(logits, shape).reshape(lay.lead + (lay.nq, lay.nk))


def _embeddings(rel_h, rel_w, lay: _Layout, dtype):
  if rel_h is None:
    return None, None
  return (_axis_embedding(rel_h.astype(dtype), lay.ph), _axis_embedding(rel_w.astype(dtype), lay.pw))


def _forward(q, k, v, rel_h, rel_w, mask_h, lay: _Layout):
  """(output [B, H, W, C], log-sum-exp of each query's logits [B, nbh, nbw, N, nq])."""
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qb = _to_blocks(q, lay)
  kw = None if k is None else _to_windows(k, lay, keys_last=True)
  logits = _logits(qb, kw, *_embeddings(rel_h, rel_w, lay, q.dtype), mask_h, lay, acc)
  # One exponential per logit: normalise the [nq, d] output, not the [nq, nk] weights.
  top = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - top)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("...qk,...kd->...qd", weights.astype(v.dtype), _to_windows(v, lay, False),
                   preferred_element_type=acc) / total
  return _from_blocks(out, lay).astype(q.dtype), (top + jnp.log(total))[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, rel_h, rel_w, mask_h, lay):
  return _forward(q, k, v, rel_h, rel_w, mask_h, lay)[0]


def _attention_fwd(q, k, v, rel_h, rel_w, mask_h, lay):
  out, lse = _forward(q, k, v, rel_h, rel_w, mask_h, lay)
  return out, (q, k, v, rel_h, rel_w, mask_h, out, lse)  # no k x k tensor is kept


def _attention_bwd(lay, residuals, g):
  """Flash-attention-style backward: recompute probabilities from the saved log-sum-exp."""
  q, k, v, rel_h, rel_w, mask_h, out, lse = residuals
  acc = jnp.promote_types(q.dtype, jnp.float32)
  d = lay.d
  qb, q_vjp = jax.vjp(lambda x: _to_blocks(x, lay), q)
  # Windows with keys last ([..., d, nk]) and queries transposed ([..., d, nq], small) keep
  # every product below in the layout XLA's batched dot is fastest at (2-3x on XLA:CPU).
  vw, v_vjp = jax.vjp(lambda x: _to_windows(x, lay, True), v)
  qbt = jnp.swapaxes(qb, -1, -2)
  kw = k_vjp = None
  if k is not None:
    kw, k_vjp = jax.vjp(lambda x: _to_windows(x, lay, True), k)
  emb_h = emb_w = None
  if rel_h is not None:
    (emb_h, emb_w), emb_vjp = jax.vjp(lambda a, b: _embeddings(a, b, lay, q.dtype), rel_h, rel_w)
  probs = jnp.exp(_logits(qb, kw, emb_h, emb_w, mask_h, lay, acc) - lse[..., None])
  gb = _to_blocks(g, lay)
  gbt = jnp.swapaxes(gb, -1, -2)
  delta = jnp.sum(gb.astype(acc) * _to_blocks(out, lay).astype(acc), axis=-1, keepdims=True)
  dprobs = jnp.einsum("...qd,...dk->...qk", gb, vw, preferred_element_type=acc)
  dlogits = (probs * (dprobs - delta)).astype(q.dtype)
  dv = v_vjp(jnp.einsum("...dq,...qk->...dk", gbt, probs.astype(v.dtype),
                        preferred_element_type=acc).astype(v.dtype))[0]
  dqb = jnp.zeros(qb.shape, acc)
  dk = None
  if k is not None:
    dqb += jnp.einsum("...qk,...dk->...qd", dlogits, kw, preferred_element_type=acc)
    dk = k_vjp(jnp.einsum("...dq,...qk->...dk", qbt, dlogits,
                          preferred_element_type=acc).astype(k.dtype))[0]
  drel_h = drel_w = None
  if rel_h is not None:
    ph, pw = lay.ph, lay.pw
    # dlogits summed over key columns (rows) and over key rows (cols) in one pass, as a
    # matmul with a 0/1 [wh * ww, wh + ww] matrix: ~1.3x faster than two reductions.
    u, v_ = np.divmod(np.arange(lay.nk), pw.window)
    sums = np.concatenate([u[:, None] == np.arange(ph.window),
                           v_[:, None] == np.arange(pw.window)], axis=1)
    rc = jnp.einsum("...k,kj->...j", dlogits, sums.astype(dlogits.dtype),
                    preferred_element_type=acc)
    rc = rc.reshape(lay.lead + (ph.block, pw.block, ph.window + pw.window))
    rows, cols = rc[..., :ph.window], rc[..., ph.window:]
    q5 = qb.reshape(lay.lead + (ph.block, pw.block, d))
    dq5 = jnp.concatenate([
        jnp.einsum("...yxu,yuc->...yxc", rows, emb_h.astype(acc)),
        jnp.einsum("...yxv,xvc->...yxc", cols, emb_w.astype(acc))], axis=-1)
    dqb += dq5.reshape(dqb.shape)
    demb_h = jnp.einsum("...yxu,...yxc->yuc", rows, q5[..., : d // 2].astype(acc))
    demb_w = jnp.einsum("...yxv,...yxc->xvc", cols, q5[..., d // 2:].astype(acc))
    drel_h, drel_w = emb_vjp((demb_h.astype(q.dtype), demb_w.astype(q.dtype)))
  dq = q_vjp(dqb.astype(q.dtype))[0]
  return dq, dk, dv, drel_h, drel_w, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def strip_rows(plan_h: AxisPlan, per_block_row: int, limit: int) -> int:
  """Block rows per strip: as many as keep one strip's logits within `limit` (at least 1),
  fewest padded rows first; all of them when the whole image fits."""
  nbh = plan_h.num_blocks
  fit = max(1, limit // per_block_row)
  if fit >= nbh:
    return nbh
  return min(range(1, fit + 1), key=lambda s: (-(-nbh // s) * s, -s))


def local_attention_blocked(q, k, v, rel_h, rel_w, *, kernel_size, num_heads,
                            plan_h: AxisPlan | None = None, plan_w: AxisPlan | None = None):
  """See `sasa_jax.ops.local_attention`. Inputs already validated.

  Matrix multiplies run in the input dtype with float32 accumulation; the softmax is
  float32. The backward pass recomputes the logits from the saved log-sum-exp, so the
  only residuals are the inputs, the output and one float per query and head.

  The work runs in sequential chunks of whole images or, when one image's logits exceed
  CHUNK_LOGITS, of horizontal strips of query-block rows whose keys and values carry a
  halo of r rows: each chunk is cut, attended and (in the backward) scattered back while
  it is in cache, which bounds the op's temporary memory too.
  """
  bsz, h, w, c = q.shape
  r = kernel_size // 2
  if plan_h is None or plan_w is None:
    plan_h, plan_w = plan_blocks(h, w, r, c, num_heads)
  per_block_row = (num_heads * plan_w.num_blocks * plan_h.block * plan_w.block
                   * plan_h.window * plan_w.window)
  limit = CHUNK_LOGITS if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_LOGITS
  rows = strip_rows(plan_h, per_block_row, limit)
  if rows == plan_h.num_blocks:  # whole images, as many per chunk as fit
    strips, keys_padded, inner_h = 1, False, plan_h
    q_s, k_s, v_s = q, k, v
    image_mask = _axis_mask(plan_h)  # [nbh, bh, wh]
    mask_h = np.broadcast_to(image_mask, (bsz,) + image_mask.shape)
    chunks = fewest_chunks(bsz, plan_h.num_blocks * per_block_row, limit)
  else:  # one strip per chunk
    height = rows * plan_h.block
    strips, keys_padded = -(-plan_h.num_blocks // rows), True
    inner_h = AxisPlan(height, r, plan_h.block, rows, plan_h.window, plan_h.offset)
    strip_plan = AxisPlan(h, r, height, strips, height + 2 * r, r)
    flat = lambda x: x.reshape((bsz * strips,) + x.shape[2:])  # [B, strips, ...] -> [B * strips, ...]
    q_s = flat(_query_blocks(q, 1, strip_plan))  # [B * strips, height, W, C]
    k_s, v_s = (None if x is None else flat(_windows(x, 1, strip_plan)) for x in (k, v))
    mask_h = np.stack([_axis_mask(inner_h, start=g * height, size=h) for g in range(strips)])
    mask_h = flat(np.broadcast_to(mask_h, (bsz,) + mask_h.shape))
    chunks = bsz * strips
  lay = _Layout((bsz * strips) // chunks, inner_h.size, w, num_heads, c // num_heads, inner_h,
                plan_w, keys_padded)
  out = map_batch_chunks(lambda q_, k_, v_, m_: _attention(q_, k_, v_, rel_h, rel_w, m_, lay),
                         (q_s, k_s, v_s, jnp.asarray(mask_h)), chunks)
  return out.reshape(bsz, strips * inner_h.size, w, c)[:, :h]


# Logits per sequential chunk (float32): one chunk's logits and probabilities stay in a
# core's cache; at 56 x 56 x 64 strips of 2 block rows ran the op ~1.5x faster on XLA:CPU
# than chunks of whole images. On GPU/TPU (where impl="auto" takes the Pallas kernels)
# small sequential chunks would starve the device: there chunks only bound memory.
CHUNK_LOGITS = 1 << 20
ACCELERATOR_CHUNK_LOGITS = 1 << 26
