"""Blocked ("halo") local attention in plain XLA ops: the fast implementation.

The image is cut into query blocks of bh x bw pixels. Each block attends to one
(bh + 2r) x (bw + 2r) key window (its halo, r = kernel_size // 2) with two batched
matrix multiplies, and a static mask keeps, for every query, exactly the keys of its
own pixel-centred k x k window that lie inside the image (HaloNet, arXiv:2103.12731
§2.2, describes SASA's own implementation this way). When one block covers a whole
dimension the halo is dropped: every key outside the image is masked anyway.

Windows are cut with a constant number of reshapes and concatenations whatever the
image size, so the compiled program stays small (one slice per window offset would
unroll k^2 copies per layer).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

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


def _windows(x, axis, plan: AxisPlan):
  """Cuts axis `axis` of x (length plan.size) into [num_blocks, window] key windows."""
  if plan.num_blocks == 1:
    return jnp.expand_dims(x, axis)
  b, nb, win = plan.block, plan.num_blocks, plan.window
  pieces = -(-win // b)  # consecutive blocks that cover one window
  total = (nb + pieces - 1) * b
  pad = [(0, 0)] * x.ndim
  pad[axis] = (plan.offset, total - plan.size - plan.offset)
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


def _axis_mask(plan: AxisPlan):
  """[num_blocks, block, window] bool: key u is in query y's window and in the image."""
  i = np.arange(plan.num_blocks)[:, None, None]
  y = np.arange(plan.block)[None, :, None]
  u = np.arange(plan.window)[None, None, :]
  dy = u - plan.offset - y
  key = i * plan.block + u - plan.offset
  return (np.abs(dy) <= plan.radius) & (key >= 0) & (key < plan.size)


def _axis_embedding(rel, plan: AxisPlan):
  """[block, window, d/2]: rel[dy + r] for query y and key u (zeros outside the window)."""
  y = np.arange(plan.block)[:, None]
  u = np.arange(plan.window)[None, :]
  idx = u - plan.offset - y + plan.radius
  inside = (idx >= 0) & (idx < rel.shape[0])
  return jnp.where(inside[..., None], rel[np.clip(idx, 0, rel.shape[0] - 1)], 0)


def local_attention_blocked(q, k, v, rel_h, rel_w, *, kernel_size, num_heads,
                            plan_h: AxisPlan | None = None, plan_w: AxisPlan | None = None):
  """See `sasa_jax.ops.local_attention`. Inputs already validated.

  Matrix multiplies run in the input dtype with float32 accumulation; the softmax
  is float32.
  """
  bsz, h, w, c = q.shape
  n, d, r = num_heads, c // num_heads, kernel_size // 2
  if plan_h is None or plan_w is None:
    plan_h, plan_w = plan_blocks(h, w, r, c, n)
  ph, pw = plan_h, plan_w
  f32 = jnp.promote_types(q.dtype, jnp.float32)  # at least float32

  # Queries: [B, nbh, nbw, N, bh, bw, d]
  qb = _query_blocks(_query_blocks(q.reshape(bsz, h, w, n, d), 1, ph), 3, pw)
  qb = qb.transpose(0, 1, 3, 5, 2, 4, 6)
  lead = qb.shape[:4]
  nq, nk = ph.block * pw.block, ph.window * pw.window

  def key_windows(x, channels_last=True):  # [B, H, W, C] -> [B, nbh, nbw, N, wh * ww, d]
    x = _windows(_windows(x.reshape(bsz, h, w, n, d), 1, ph), 3, pw)
    if channels_last:
      return x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(lead + (nk, d))
    return x.transpose(0, 1, 3, 5, 6, 2, 4).reshape(lead + (d, nk))  # [..., d, wh * ww]

  logits = jnp.zeros(lead + (ph.block, pw.block, ph.window, pw.window), f32)
  if k is not None:
    # Keys as [d, window]: with d as small as 8, a contraction whose output rows are
    # contiguous runs ~1.5x faster on XLA:CPU than [window, d].
    qk = jnp.einsum("...qd,...dk->...qk", qb.reshape(lead + (nq, d)), key_windows(k, False),
                    preferred_element_type=f32)
    logits += qk.reshape(logits.shape)
  if rel_h is not None:
    emb_h = _axis_embedding(rel_h.astype(q.dtype), ph)  # [bh, wh, d/2]
    emb_w = _axis_embedding(rel_w.astype(q.dtype), pw)  # [bw, ww, d/2]
    rows = jnp.einsum("...yxc,yuc->...yxu", qb[..., : d // 2], emb_h, preferred_element_type=f32)
    cols = jnp.einsum("...yxc,xvc->...yxv", qb[..., d // 2:], emb_w, preferred_element_type=f32)
    logits += rows[..., :, None] + cols[..., None, :]

  mh, mw = _axis_mask(ph), _axis_mask(pw)  # [nbh, bh, wh], [nbw, bw, ww]
  mask = jnp.logical_and(mh[:, None, None, :, None, :, None], mw[None, :, None, None, :, None, :])
  logits = jnp.where(mask, logits, _MASKED).reshape(lead + (nq, nk))
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("...qk,...kd->...qd", probs.astype(v.dtype), key_windows(v),
                   preferred_element_type=f32)
  out = out.reshape(lead + (ph.block, pw.block, d)).transpose(0, 1, 4, 2, 5, 3, 6)
  out = out.reshape(bsz, ph.num_blocks * ph.block, pw.num_blocks * pw.block, c)
  return out[:, :h, :w].astype(q.dtype)
