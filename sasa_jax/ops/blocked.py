"""Blocked ("halo") local attention in plain XLA ops: the fast implementation.

The image is cut into query blocks of bh x bw pixels. Each block attends to one
(bh + 2r) x (bw + 2r) key window (its halo, r = kernel_size // 2) with two batched
matrix multiplies, and a static mask keeps, for every query, exactly the keys of its
own pixel-centred k x k window that lie inside the image (HaloNet, arXiv:2103.12731
§2.2, describes SASA's own implementation this way). When one block covers a whole
dimension the halo is dropped: every key outside the image is masked anyway.

Windows are cut with a constant number of reshapes and concatenations whatever the
image size, so the compiled program stays small (one slice per window offset would
unroll k^2 copies per layer). The relative-position logits are one small GEMM per query
(q . rel for each of the 2k offsets), skewed to window positions; they enter the logits
together with the separable mask as a matmul with a 0/1 "spread" matrix. The work runs in
sequential cache-sized chunks, one loop for the forward and one for the backward: groups of
whole images, or horizontal strips of block rows whose keys carry an r-row halo.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.ops.chunks import fewest_chunks

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
# fwd+bwd timings on XLA:CPU at the ResNet-50 stage shapes (see tools/bench.py). A larger
# value plans larger blocks: fewer re-read windows, more masked logits.
KV_COST = 0.4
# KV_COST per lowering platform ("cuda", "rocm", "tpu") where a timing there chose another:
# `tools/gpu_check`'s `blocks` rows time the plans of other values on a GPU. A platform not
# named here plans with KV_COST.
ACCELERATOR_KV_COST: dict[str, float] = {}
MIN_BLOCK = 4


def lowering_platform(name: str) -> str:
  """The lowering platform jax names (`platform_dependent`'s "cpu", "cuda", "rocm", "tpu")
  for a backend name or lowering platform name; jax's "gpu" backend is read as CUDA."""
  return "cuda" if name == "gpu" else name


def kv_cost_for(platform: str) -> float:
  """KV_COST on `platform` (a jax backend or lowering platform name: "cpu", "gpu" (read as
  CUDA), "cuda", "rocm", "tpu")."""
  return ACCELERATOR_KV_COST.get(lowering_platform(platform), KV_COST)


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


@functools.lru_cache(maxsize=None)  # every platform's branch of every layer asks, at trace time
def plan_blocks(h: int, w: int, radius: int, channels: int, num_heads: int,
                kv_cost: float):
  """(plan_h, plan_w) minimising the memory traffic per query pixel:
  padding x [heads x window logits + kv_cost x 2C x window / block] (k and v windows
  are re-read once per block they overlap); kv_cost: KV_COST or a platform's
  (`kv_cost_for`)."""
  def options(size):
    return {_axis_plan(size, radius, b) for b in [size] + list(range(min(MIN_BLOCK, size), size))}

  def cost(ph, pw):
    window, block = ph.window * pw.window, ph.block * pw.block
    padding = ph.num_blocks * ph.block * pw.num_blocks * pw.block / (h * w)
    return padding * (num_heads * window + kv_cost * 2 * channels * window / block)

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


def _skew(t, plan: AxisPlan, axis: int):
  """Relative offsets to window positions: t [..., block (at `axis`), ..., 2r + 1] holds a
  term per query and offset dy + r; returns [..., block, ..., window] whose entry u of query
  y is t[u - offset - y + r] (0 where that offset is outside the kernel)."""
  k, r = 2 * plan.radius + 1, plan.radius
  lo = max(0, plan.block - 1 + plan.offset - r)
  hi = max(0, plan.window - plan.offset + r - k)
  t = jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(lo, hi)])
  rows = [jax.lax.slice_in_dim(t, y, y + 1, axis=axis) for y in range(plan.block)]
  return jnp.concatenate([jax.lax.slice_in_dim(row, r - plan.offset - y + lo,
                                               r - plan.offset - y + lo + plan.window, axis=-1)
                          for y, row in enumerate(rows)], axis=axis)


def _terms(qb, rel_h, rel_w, mask_h, lay: _Layout, acc):
  """Row and column terms of every query's logits [B, nbh, nbw, N, nq, wh + ww] in `acc`:
  the mask (0 / _MASKED) plus, with rel_h, the relative-position logits (q's first d/2
  channels . rel_h of the key row's offset; last d/2 . rel_w of the key column's)."""
  ph, pw, d = lay.ph, lay.pw, lay.d
  rows, cols = _mask_terms(mask_h, lay, acc)
  shape = lay.lead + (ph.block, pw.block)
  if rel_h is not None:
    # Every offset's term by one plain GEMM (no batch dimensions), then skewed to windows.
    k = rel_h.shape[0]  # kernel_size
    zeros = jnp.zeros((d // 2, k), rel_h.dtype)
    table = jnp.block([[rel_h.T, zeros], [zeros, rel_w.T]]).astype(qb.dtype)  # [d, 2k]
    t = jnp.einsum("...c,cj->...j", qb.reshape(shape + (d,)), table, preferred_element_type=acc)
    rows = rows + _skew(t[..., :k], ph, axis=-3)
    cols = cols + _skew(t[..., k:], pw, axis=-2)
  rows, cols = (jnp.broadcast_to(x, shape + x.shape[-1:]) for x in (rows, cols))
  return jnp.concatenate([rows, cols], axis=-1).reshape(lay.lead + (lay.nq, -1))


def _spread(lay: _Layout, dtype):
  """[wh + ww, wh * ww] 0/1: row term u and column term v go to key (u, v)."""
  u, v = np.divmod(np.arange(lay.nk), lay.pw.window)
  return jnp.asarray(np.concatenate([u[None, :] == np.arange(lay.ph.window)[:, None],
                                     v[None, :] == np.arange(lay.pw.window)[:, None]]), dtype)


def _logits(qb, kw, terms, lay: _Layout, acc):
  """Masked logits [B, nbh, nbw, N, nq, nk] in `acc` (float32 or wider): keys outside a
  query's window or the image get about _MASKED (twice it where both axes are out).
  The row and column terms enter as a matmul with the 0/1 _spread matrix: one plain GEMM
  over all queries (no batch dimensions), which XLA:CPU runs at several times the batched
  q.k product's GFLOP/s; a broadcast add of the terms ran 4% slower at 56 x 56 x 64, and the
  terms' products summed in place were miscompiled by XLA 0.10's YNN fusions."""
  logits = jnp.einsum("...j,jk->...k", terms, _spread(lay, acc), preferred_element_type=acc)
  if kw is not None:
    logits = logits + jnp.einsum("...qd,...dk->...qk", qb, kw, preferred_element_type=acc)
  return logits


def _forward(q, k, v, rel_h, rel_w, mask_h, lay: _Layout):
  """(output [B, H, W, C], log-sum-exp of each query's logits [B, nbh, nbw, N, nq])."""
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qb = _to_blocks(q, lay)
  kw = None if k is None else _to_windows(k, lay, keys_last=True)
  logits = _logits(qb, kw, _terms(qb, rel_h, rel_w, mask_h, lay, acc), lay, acc)
  # One exponential per logit: normalise the [nq, d] output, not the [nq, nk] weights.
  top = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - top)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("...qk,...kd->...qd", weights.astype(v.dtype), _to_windows(v, lay, False),
                   preferred_element_type=acc) / total
  return _from_blocks(out, lay).astype(q.dtype), (top + jnp.log(total))[..., 0]


def _backward(q, k, v, rel_h, rel_w, mask_h, out, lse, g, lay: _Layout):
  """Flash-attention-style backward of one chunk, (dq, dk, dv, drel_h, drel_w), each in
  its input's dtype: probabilities recomputed from the saved log-sum-exp."""
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qb, q_vjp = jax.vjp(lambda x: _to_blocks(x, lay), q)
  # Windows with keys last ([..., d, nk]) and queries transposed ([..., d, nq], small) keep
  # every product below in the layout XLA's batched dot is fastest at (2-3x on XLA:CPU).
  vw, v_vjp = jax.vjp(lambda x: _to_windows(x, lay, True), v)
  qbt = jnp.swapaxes(qb, -1, -2)
  kw = k_vjp = None
  if k is not None:
    kw, k_vjp = jax.vjp(lambda x: _to_windows(x, lay, True), k)
  terms, terms_vjp = jax.vjp(lambda x, a, b: _terms(x, a, b, mask_h, lay, acc), qb, rel_h, rel_w)
  probs = jnp.exp(_logits(qb, kw, terms, lay, acc) - lse[..., None])
  gb = _to_blocks(g, lay)
  gbt = jnp.swapaxes(gb, -1, -2)
  delta = jnp.sum(gb.astype(acc) * _to_blocks(out, lay).astype(acc), axis=-1, keepdims=True)
  dprobs = jnp.einsum("...qd,...dk->...qk", gb, vw, preferred_element_type=acc)
  dlogits = (probs * (dprobs - delta)).astype(q.dtype)
  dv = v_vjp(jnp.einsum("...dq,...qk->...dk", gbt, probs.astype(v.dtype),
                        preferred_element_type=acc).astype(v.dtype))[0]
  dqb = jnp.zeros(qb.shape, acc)
  dk = drel_h = drel_w = None
  if k is not None:
    dqb += jnp.einsum("...qk,...dk->...qd", dlogits, kw, preferred_element_type=acc)
    dk = k_vjp(jnp.einsum("...dq,...qk->...dk", qbt, dlogits,
                          preferred_element_type=acc).astype(k.dtype))[0]
  if rel_h is not None:
    dterms = jnp.einsum("...k,jk->...j", dlogits, _spread(lay, dlogits.dtype),
                        preferred_element_type=acc)
    dq_pos, drel_h, drel_w = terms_vjp(dterms)
    dqb += dq_pos
  dq = q_vjp(dqb.astype(q.dtype))[0]
  return dq, dk, dv, drel_h, drel_w


@dataclasses.dataclass(frozen=True)
class _Chunks:
  """The batch cut into `count` sequential chunks: `images` images at a time, each image in
  `strips` horizontal strips of `height` query rows whose keys carry `halo` rows of the
  image (or zeros) above and below."""
  images: int
  groups: int
  strips: int
  height: int
  halo: int

  @property
  def count(self):
    return self.groups * self.strips

  @property
  def query_rows(self):  # of the padded images: every strip whole
    return self.strips * self.height

  @property
  def key_rows(self):  # of one chunk's keys and values
    return self.height + 2 * self.halo

  def start(self, i):
    """(first image, first query row) of chunk i."""
    return (i // self.strips) * self.images, (i % self.strips) * self.height


def _pad_rows(x, before: int, after: int):
  if x is None or before == after == 0:
    return x
  return jnp.pad(x, ((0, 0), (before, after), (0, 0), (0, 0)))


def _cut(x, i, rows: int, ch: _Chunks):
  """Chunk i of x [B, rows_total, W, C]: [images, rows, W, C] from its strip's first row."""
  if x is None:
    return None
  b, y = ch.start(i)
  return jax.lax.dynamic_slice(x, (b, y, 0, 0), (ch.images, rows) + x.shape[2:])


def _paste(x, part, i, ch: _Chunks, add: bool = False):
  """x with chunk i's rows set to (or, with add, increased by) part."""
  if x is None:
    return None
  b, y = ch.start(i)
  if add:
    part = part + jax.lax.dynamic_slice(x, (b, y, 0, 0), part.shape)
  return jax.lax.dynamic_update_slice(x, part.astype(x.dtype), (b, y, 0, 0))


def _each_chunk(body, init, ch: _Chunks):
  """init threaded through body(i, carry) for every chunk i, in a loop when there are several."""
  if ch.count == 1:
    return body(0, init)
  return jax.lax.fori_loop(0, ch.count, body, init)


def _mask(masks, i, ch: _Chunks):
  """Chunk i's rows mask [images, nbh, bh, wh] from the masks of each strip [strips, ...]."""
  m = masks[0] if ch.strips == 1 else masks[i % ch.strips]
  return jnp.broadcast_to(m, (ch.images,) + m.shape)


def _run_forward(q, k, v, rel_h, rel_w, masks, lay: _Layout, ch: _Chunks):
  """(padded q, k, v; padded output [B, strips * height, W, C]; lse [count, *lead, nq]).
  Keys and values carry ch.halo zero rows above and below; q and the output are padded
  at the bottom to whole strips."""
  h = q.shape[1]
  qp = _pad_rows(q, 0, ch.query_rows - h)
  kp, vp = (_pad_rows(x, ch.halo, ch.query_rows - h + ch.halo) for x in (k, v))

  def body(i, carry):
    out, lse = carry
    o, l = _forward(_cut(qp, i, ch.height, ch), _cut(kp, i, ch.key_rows, ch),
                    _cut(vp, i, ch.key_rows, ch), rel_h, rel_w, _mask(masks, i, ch), lay)
    return _paste(out, o, i, ch), jax.lax.dynamic_update_index_in_dim(lse, l, i, 0)

  acc = jnp.promote_types(q.dtype, jnp.float32)
  init = (jnp.zeros(qp.shape, q.dtype), jnp.zeros((ch.count,) + lay.lead + (lay.nq,), acc))
  out, lse = _each_chunk(body, init, ch)
  return (qp, kp, vp), out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, rel_h, rel_w, masks, lay, ch):
  return _run_forward(q, k, v, rel_h, rel_w, masks, lay, ch)[1][:, :q.shape[1]]


def _attention_fwd(q, k, v, rel_h, rel_w, masks, lay, ch):
  padded, out, lse = _run_forward(q, k, v, rel_h, rel_w, masks, lay, ch)
  # Residuals: the (padded) inputs, output and one float per query and head; no k x k tensor.
  return out[:, :q.shape[1]], (padded, rel_h, rel_w, masks, out, lse)


def _attention_bwd(lay, ch, residuals, g):
  """Each chunk's backward in turn: dq written in place, dk and dv (whose halos overlap the
  neighbouring strips') accumulated in place, rel gradients summed."""
  (qp, kp, vp), rel_h, rel_w, masks, out, lse = residuals
  h = g.shape[1]
  gp = _pad_rows(g, 0, ch.query_rows - h)
  acc = jnp.promote_types(qp.dtype, jnp.float32)
  zeros = lambda x, dtype=None: None if x is None else jnp.zeros(
      x.shape, x.dtype if dtype is None else dtype)

  def body(i, carry):
    dq, dk, dv, drel_h, drel_w = carry
    grads = _backward(_cut(qp, i, ch.height, ch), _cut(kp, i, ch.key_rows, ch),
                      _cut(vp, i, ch.key_rows, ch), rel_h, rel_w, _mask(masks, i, ch),
                      _cut(out, i, ch.height, ch),
                      jax.lax.dynamic_index_in_dim(lse, i, 0, keepdims=False),
                      _cut(gp, i, ch.height, ch), lay)
    if drel_h is not None:  # summed over chunks in float32
      drel_h, drel_w = drel_h + grads[3].astype(acc), drel_w + grads[4].astype(acc)
    return (_paste(dq, grads[0], i, ch), _paste(dk, grads[1], i, ch, add=True),
            _paste(dv, grads[2], i, ch, add=True), drel_h, drel_w)

  dq, dk, dv, drel_h, drel_w = _each_chunk(
      body, (zeros(qp), zeros(kp), zeros(vp), zeros(rel_h, acc), zeros(rel_w, acc)), ch)
  crop = lambda x: None if x is None else x[:, ch.halo:ch.halo + h]
  cast = lambda x, like: None if x is None else x.astype(like.dtype)
  return (dq[:, :h], crop(dk), crop(dv), cast(drel_h, rel_h), cast(drel_w, rel_w), None)


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
                            plan_h: AxisPlan | None = None, plan_w: AxisPlan | None = None,
                            chunk_logits: int | None = None, platform: str | None = None,
                            whole_batch: bool | None = None):
  """See `sasa_jax.ops.local_attention`. Inputs already validated.

  Matrix multiplies run in the input dtype with float32 accumulation; the softmax is
  float32. The backward pass recomputes the logits from the saved log-sum-exp, so the
  only residuals are the inputs, the output and one float per query and head.

  The work runs in sequential chunks of whole images or, when one image's logits exceed
  CHUNK_LOGITS, of horizontal strips of query-block rows whose keys and values carry a
  halo of r rows (on TPUs, strips of every image: `whole_batch_for`): each chunk is sliced
  from the (once padded) inputs, attended and, in the backward, its gradients written (dk,
  dv: added) in place while it is in cache, which bounds the op's temporary memory too.
  platform: whose planning constants size the blocks (`kv_cost_for`) and chunks
  (`chunk_logits_for`, `whole_batch_for`); default jax's default backend
  (`impl="auto"` passes the lowering platform). plan_h, plan_w, chunk_logits (the most
  logits per chunk), whole_batch: given, they replace the platform's.
  """
  bsz, h, w, c = q.shape
  platform = platform or jax.default_backend()
  if plan_h is None or plan_w is None:
    plan_h, plan_w = plan_blocks(h, w, kernel_size // 2, c, num_heads, kv_cost_for(platform))
  ch = plan_chunks(q.shape, num_heads, plan_h, plan_w,
                   chunk_logits or chunk_logits_for(platform),
                   whole_batch_for(platform) if whole_batch is None else whole_batch)
  if ch.strips == 1:  # whole images
    inner_h, keys_padded = plan_h, False
    masks = _axis_mask(plan_h)[None]
  else:  # strips of `ch.height` query rows
    inner_h = AxisPlan(ch.height, plan_h.radius, plan_h.block, ch.height // plan_h.block,
                       plan_h.window, plan_h.offset)
    keys_padded = True
    masks = np.stack([_axis_mask(inner_h, start=s * ch.height, size=h)
                      for s in range(ch.strips)])
  lay = _Layout(ch.images, inner_h.size, w, num_heads, c // num_heads, inner_h, plan_w,
                keys_padded)
  return _attention(q, k, v, rel_h, rel_w, jnp.asarray(masks), lay, ch)


def plan_chunks(shape, num_heads: int, plan_h: AxisPlan, plan_w: AxisPlan,
                limit: int, whole_batch: bool = False) -> _Chunks:
  """The sequential chunks of a [B, H, W, C] input with at most `limit` logits each:
  groups of whole images, or one image's strips of block rows when an image exceeds it.
  whole_batch (`whole_batch_for`): strips of block rows of every image instead, the images
  split into groups only when one block row of them all exceeds the limit."""
  bsz, h = shape[:2]
  per_block_row = (num_heads * plan_w.num_blocks * plan_h.block * plan_w.block
                   * plan_h.window * plan_w.window)
  if whole_batch:
    groups = fewest_chunks(bsz, per_block_row, limit)
    rows = strip_rows(plan_h, bsz // groups * per_block_row, limit)
  else:
    rows = strip_rows(plan_h, per_block_row, limit)
    groups = fewest_chunks(bsz, plan_h.num_blocks * per_block_row, limit) if (
        rows == plan_h.num_blocks) else bsz
  if rows == plan_h.num_blocks:
    return _Chunks(bsz // groups, groups, 1, h, 0)
  return _Chunks(bsz // groups, groups, -(-plan_h.num_blocks // rows), rows * plan_h.block,
                 plan_h.radius)


def platform_layout(shape, kernel_size: int, num_heads: int, platform: str):
  """(plan_h, plan_w, chunks): how `platform` (as `local_attention_blocked`'s) cuts a
  [B, H, W, C] input; platforms with equal layouts trace the op alike (one branch serves)."""
  plans = plan_blocks(shape[1], shape[2], kernel_size // 2, shape[3], num_heads,
                      kv_cost_for(platform))
  return (*plans, plan_chunks(shape, num_heads, *plans, chunk_logits_for(platform),
                              whole_batch_for(platform)))


# Logits per sequential chunk (float32): one chunk's logits and probabilities stay in a
# core's cache; at 56 x 56 x 64 strips of 2 block rows ran the op ~1.5x faster on XLA:CPU
# than chunks of whole images. On GPU/TPU small sequential chunks would starve the device:
# there chunks only bound memory.
CHUNK_LOGITS = 1 << 20
ACCELERATOR_CHUNK_LOGITS = 1 << 26


# Lowering platforms whose chunks take every image of the batch (strips of block rows of
# them all; `plan_chunks`' whole_batch). XLA:TPU lays the windows and logits out with the
# images in the 128-wide minor (lane) dimension, so a chunk of 16 images pads them 8-fold: at
# ResNet-50's 56 x 56 stage, batch 128, libtpu plans 1,337 MiB of temporaries for strips of
# all the images against 2,979 MiB for groups of 16, and its cost model estimates 4.5x less
# device time (docs/models.md, `tools/tpu_compile`). CPUs and GPUs keep groups of images.
WHOLE_BATCH_CHUNKS = frozenset({"tpu"})


def whole_batch_for(platform: str) -> bool:
  """Whether the chunks on `platform` (as `chunk_logits_for`'s) take every image."""
  return lowering_platform(platform) in WHOLE_BATCH_CHUNKS


def chunk_logits_for(platform: str) -> int:
  """Logits per sequential chunk on `platform` (a jax backend or lowering platform name:
  "cpu", "gpu", "cuda", "rocm", "tpu")."""
  return CHUNK_LOGITS if platform == "cpu" else ACCELERATOR_CHUNK_LOGITS
