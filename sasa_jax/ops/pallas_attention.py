"""Fused local attention in Pallas: TPU (Mosaic), GPU (Triton), interpret mode on CPU.

Tiling (shared by every backend, sizes chosen per backend in `plan_tiling`):
  * One program per (batch x head, query block). A query block is bh x bw pixels of one
    head ([bh, bw, dp] in on-chip memory, dp = head dim, padded on GPU).
  * Keys and values stay in HBM in a zero-padded per-head map; each program reads one
    kh x kw *slab* of it (its block plus a halo of at least r = kernel_size // 2 on every
    side), computes the [bh*bw, kh*kw] logits q.k + q.r there, applies the window and
    image-border masks, a float32 softmax and the weighted sum of values, and writes only
    the [bh, bw, dp] output and the per-query log-sum-exp (for the backward).
  * Window membership of a (query, key) pair inside a block does not depend on where the
    block is, so it is one static int32 table per tiling ([bh*bw, kh*kw], the relative
    row / column offset index, -1 outside the window); image borders are checked per block
    from the block origin. On GPU a second form (FORMS, `_FactoredOffsets`) reads no such
    table: it computes offsets per axis in the kernel and gets the relative logits and
    their gradients from small matmuls with per-axis shifted tables.
  * Backward (flash-attention style, nothing of size k^2 per channel is stored): one
    kernel per query block recomputes the probabilities from the saved log-sum-exp and
    writes dq and this block's share of d rel_h / d rel_w; one kernel per key block reads
    the slab of *queries* that can see it and writes dk and dv, so no two programs write
    the same output element.

Memory moved per output element (forward): q, o once; k, v (kh * kw) / (bh * bw) times
(about 2-5x with the default blocks) against k^2 = 49x for an unfold (im2col) of a 7x7
window.
"""
import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


_MASKED = -1e30  # finite: padded queries that see no key stay NaN-free (they are cropped)
_TINY = 1e-30
_TARGET = None   # set by `target(...)`: (flavour, interpret) instead of the backend's


@contextlib.contextmanager
def target(platform: str, interpret: bool = False):
  """Build the kernels for `platform` ("tpu" or "gpu") whatever backend traces them.

  For ahead-of-time lowering on a machine without that accelerator, e.g.
      with target("tpu"): jax.export.export(jax.jit(f), platforms=["tpu"])(...)
  interpret=True runs that platform's tiling in interpret mode on any backend (tests).
  """
  global _TARGET
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")
  prev, _TARGET = _TARGET, (platform, interpret)
  try:
    yield
  finally:
    _TARGET = prev


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(x, 1))))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Static geometry of one kernel launch (all sizes in pixels / channels).

  bh, bw: query block; kh, kw: key slab read per block (block + halo);
  pt, pl: slab rows / columns above and left of the block; dp: head dim as stored
  (padded to a power of two >= 16 on GPU); kp: rows of the relative tables as stored.
  """
  flavour: str
  height: int
  width: int
  kernel_size: int
  bh: int
  bw: int
  kh: int
  kw: int
  pt: int
  pl: int
  dp: int
  kp: int

  @property
  def radius(self):
    return self.kernel_size // 2

  @property
  def grid_hw(self):
    return -(-self.height // self.bh), -(-self.width // self.bw)

  @property
  def nq(self):
    return self.bh * self.bw

  @property
  def nk(self):
    return self.kh * self.kw

  @property
  def block_map(self):  # [hq, wq]: the query grid, padded to whole blocks
    nbh, nbw = self.grid_hw
    return nbh * self.bh, nbw * self.bw

  @property
  def slab_map(self):  # [hs, ws]: the padded map every slab is cut from
    nbh, nbw = self.grid_hw
    return (nbh - 1) * self.bh + self.kh, (nbw - 1) * self.bw + self.kw


# Triton launch settings of the GPU kernels (tools/gpu_check.py --tune times others): the
# tables form's warps (as timed on an H200) and every kernel's pipeline stages.
NUM_WARPS = 4
NUM_STAGES = 1


KERNELS = ("fwd", "dq", "dkv")  # the kernels of a fwd+bwd: `_fwd_kernel`, `_dq_kernel`, ...


def kernel_warps(tiling: Tiling, form: str, kernel: str,
                 num_warps: int | str | None = None) -> int:
  """Triton warps of one GPU kernel (one of KERNELS). num_warps: that many for every kernel;
  "rows": one warp per 16 rows of the kernel's logit block (a block's queries for fwd and
  dq, a slab's for dkv), 1 to 4; None: the form's own, NUM_WARPS for "tables" (the launch an
  H200 timed) and "rows" for "factored". Why rows: Triton gives a matmul whose result feeds
  another (q.k, then p.v) every warp along its rows, 16 rows per tensor-core tile, so past
  rows // 16 warps each further warp repeats the logits' work in that layout (warpsPerCTA
  [num_warps, 1] and warp bases of 0 in the TTGIR; `tools/triton_census.py` counts it)."""
  if num_warps is None:
    num_warps = NUM_WARPS if form == "tables" else "rows"
  if num_warps == "rows":
    rows = tiling.nk if kernel == "dkv" else tiling.nq
    return min(4, max(1, rows // 16))
  return num_warps

# Per-program fixed cost, in logits: grid-step / block-launch overhead and slab loads.
_PROGRAM_OVERHEAD = 2048


def _axis_options(size: int, radius: int, round_to, pad: int, blocks,
                  max_block: int | None) -> list:
  """(block, slab, pad) candidates for one spatial axis.

  One block over the whole axis needs no halo (keys outside the image are masked anyway);
  otherwise the slab holds `pad` pixels before the block and at least `radius` after it.
  """
  whole = round_to(size)
  options = [(whole, whole, 0)] if max_block is None or whole <= max_block else []
  for b in blocks:
    if b < size and (max_block is None or b <= max_block):
      options.append((b, round_to(pad + b + radius), pad))
  return options


def candidate_tilings(height: int, width: int, head_dim: int, kernel_size: int, dtype,
                      flavour: str, max_block: int | None = None,
                      max_logits: int | None = None) -> list[Tiling]:
  """Every legal tiling of one shape for one backend, cheapest first (see `plan_tiling`)."""
  r = kernel_size // 2
  if flavour == "tpu":
    align = 8 * 4 // jnp.dtype(dtype).itemsize
    rows = _axis_options(height, r, lambda x: x, r, (2, 4, 8, 16, 32), max_block)
    cols = _axis_options(width, r, lambda x: _round_up(x, align), _round_up(r, align),
                         (align, 2 * align, 4 * align), max_block)
    dp, kp, min_rows, cap = head_dim, kernel_size, 8, 1 << 17
  else:
    rows = _axis_options(height, r, _next_pow2, r, (2, 4, 8, 16, 32), max_block)
    cols = _axis_options(width, r, _next_pow2, r, (2, 4, 8, 16, 32), max_block)
    dp, kp, min_rows, cap = max(16, _next_pow2(head_dim)), _next_pow2(kernel_size), 16, 1 << 14
  max_logits = max_logits or cap
  scored = []
  for bh, kh, pt in rows:
    for bw, kw, pl_ in cols:
      nq, nk = bh * bw, kh * kw
      if nq * nk > max_logits or (flavour == "gpu" and min(nq, nk) < min_rows):
        continue
      programs = -(-height // bh) * -(-width // bw)
      scored.append((programs * (nq * nk + _PROGRAM_OVERHEAD), len(scored),
                     Tiling(flavour, height, width, kernel_size, bh, bw, kh, kw, pt, pl_, dp,
                            kp)))
  if not scored:
    raise ValueError(f"kernel_size={kernel_size} is too large for the {flavour} kernel's "
                     f"budget of {max_logits} logits per program; use impl='xla'")
  return [t for _, _, t in sorted(scored)]


def plan_tiling(height: int, width: int, head_dim: int, kernel_size: int, dtype,
                flavour: str, max_block: int | None = None) -> Tiling:
  """Block sizes for one shape and backend, within that backend's layout rules.

  Among the legal tilings, the one computing the fewest logits in total (padded query
  blocks x slab keys, plus a fixed cost per program) wins: small blocks waste fewer
  logits per query, large blocks re-read K/V less and launch fewer programs.
  TPU (Mosaic): the last two dims of every VMEM array are (sublane, lane); column
  offsets and slab widths are multiples of the sublane tile (8 rows of 32-bit, 16 of
  16-bit) so slab loads and [bh, bw, d] -> [bh*bw, d] reshapes stay tile-aligned; rows are
  an untiled dim (any offset). GPU (Triton): every in-kernel array has power-of-two dims,
  matmul dims >= 16, and at most 16K float32 logits per program (registers).
  max_block caps the block on both axes (tests use it to force halos on small maps).
  """
  return candidate_tilings(height, width, head_dim, kernel_size, dtype, flavour,
                           max_block)[0]


def _offset_tables(t: Tiling, *, keys_in_slab: bool) -> tuple[np.ndarray, np.ndarray]:
  """Relative-offset index (dy + r, dx + r) of every (row item, column item) pair.

  keys_in_slab=True: rows are the queries of a block, columns the keys of its slab
  ([nq, nk]); False: rows are the queries of a slab, columns the keys of a block
  ([nk, nq]). Pairs outside the k x k window hold -1 in both tables.
  """
  r = t.radius
  a, c = np.divmod(np.arange(t.nq), t.bw)       # block pixel (row, col)
  b, e = np.divmod(np.arange(t.nk), t.kw)       # slab pixel, slab origin at (-pt, -pl)
  if keys_in_slab:   # key - query
    dy = (b[None, :] - t.pt) - a[:, None]
    dx = (e[None, :] - t.pl) - c[:, None]
  else:              # key (block) - query (slab)
    dy = a[None, :] - (b[:, None] - t.pt)
    dx = c[None, :] - (e[:, None] - t.pl)
  inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
  return (np.where(inside, dy + r, -1).astype(np.int32),
          np.where(inside, dx + r, -1).astype(np.int32))


def _slab_positions(t: Tiling, column: bool):
  """Row / column of every slab pixel relative to its block's origin: [1, nk] or [nk, 1]."""
  b, e = np.divmod(np.arange(t.nk), t.kw)
  shape = (t.nk, 1) if column else (1, t.nk)
  return (b - t.pt).astype(np.int32).reshape(shape), (e - t.pl).astype(np.int32).reshape(shape)


# How the kernels multiply float32 operands: "ieee", exactly (on a GPU Triton's FMA loop:
# no tensor cores, and operand layouts that spill registers at the larger blocks), or
# "bf16x3" (GPU only): each operand split into a bfloat16 part and a bfloat16 remainder, and
# three tensor-core products of them, hi.hi + hi.lo + lo.hi (what
# `jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3` names: about 16 significant bits per
# operand). bfloat16 operands go to the tensor cores either way.
F32_DOTS = ("ieee", "bf16x3")
# What `impl="pallas"` runs on GPUs (tools/gpu_check.py times the other).
GPU_F32_DOT = "ieee"


def _dot(a, b, contract, f32_dot: str = "ieee"):
  """a, b 2-D, one dtype; contract = (dim of a, dim of b); float32 accumulation; float32
  operands multiplied as f32_dot (one of F32_DOTS) says. The bf16x3 split is written out
  rather than asked of the preset, which XLA:CPU ignores: interpret mode rounds as a GPU."""
  dims = ((contract[:1], contract[1:]), ((), ()))

  def dot(x, y, precision=None):
    return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32,
                               precision=precision)
  if a.dtype != jnp.float32:
    return dot(a, b)
  if f32_dot == "ieee":
    return dot(a, b, jax.lax.Precision.HIGHEST)

  def split(x):  # x = hi + lo, both bfloat16
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  (a_hi, a_lo), (b_hi, b_lo) = split(a), split(b)
  return (dot(a_hi, b_lo) + dot(a_lo, b_hi)) + dot(a_hi, b_hi)


def _terms_by_offset(x, rel_ref, k: int, at_offset, terms):
  """terms + x[n].rel[i] wherever at_offset(i) holds, for i < k: the relative logits one
  offset at a time. x [n, dp]; rel_ref [kp, dp]; at_offset(i) and terms broadcast to one
  [n, m] shape."""
  xf = x.astype(jnp.float32)
  for i in range(k):
    xr = jnp.sum(xf * rel_ref[pl.ds(i, 1), :].astype(jnp.float32), axis=1, keepdims=True)
    terms = jnp.where(at_offset(i), terms + xr, terms)
  return terms


def _grads_by_offset(values, x, rel_ref, out_ref, k: int, at_offset):
  """Their gradients one offset at a time: g_i = sum over m of values where at_offset(i),
  out_ref's row i = sum over n of g_i x (zero past k); returns dq's share sum_i g_i rel[i].
  values [n, m] (d logits, or their sums along the other axis); x [n, dp]."""
  xf, dq = x.astype(jnp.float32), 0.0
  for i in range(out_ref.shape[0]):
    if i < k:
      g = jnp.sum(jnp.where(at_offset(i), values, 0.0), axis=1, keepdims=True)   # [n, 1]
      dq = dq + g * rel_ref[pl.ds(i, 1), :].astype(jnp.float32)
      out_ref[pl.ds(i, 1), :] = jnp.sum(g * xf, axis=0, keepdims=True)
    else:  # padding rows of the tables (GPU)
      out_ref[pl.ds(i, 1), :] = jnp.zeros((1, out_ref.shape[1]), jnp.float32)
  return dq


class _TableOffsets:
  """Where each (row item, column item) pair lies, read from static [n, m] tables.

  The rows are a block's queries against its slab's keys (`keys_in_slab`), or a slab's
  queries against a block's keys; th, tw hold the relative offset index (dy + r, dx + r),
  -1 outside the window, and srow, scol the slab pixels' positions relative to the block.
  """

  def __init__(self, t: Tiling, th_ref, tw_ref, srow_ref, scol_ref):
    by, bx = pl.program_id(1), pl.program_id(2)
    self.t, self.th, self.tw = t, th_ref[...], tw_ref[...]
    rows, cols = by * t.bh + srow_ref[...], bx * t.bw + scol_ref[...]
    self.valid = ((self.th >= 0) & (rows >= 0) & (rows < t.height) & (cols >= 0)
                  & (cols < t.width))

  def logit_terms(self, x, rh_ref, rw_ref):
    """q.r of every pair, rel[i, j] = x[i].rel_h[th[i, j]] + x[i].rel_w[tw[i, j]], and which
    pairs are valid: [n, m] each. x: the row items' vectors [n, dp]. The tables hold
    full-width [kp, dp] rows, so no lane slicing at d/2 is needed in the kernel."""
    k = self.t.kernel_size
    rel = _terms_by_offset(x, rh_ref, k, lambda i: self.th == i,
                           jnp.zeros(self.th.shape, jnp.float32))
    return _terms_by_offset(x, rw_ref, k, lambda i: self.tw == i, rel), self.valid

  def relative_grads(self, ds, x, rel_refs, out_refs):
    """The gradients through the relative logits of a query block: writes this program's
    d rel_h, d rel_w rows to out_refs ([rows, dp] each; rows past k zero) and returns dq's
    share [n, dp]. ds: d logits [n, m]; x: the queries [n, dp]; rel_refs: [kp, dp] tables."""
    return sum(_grads_by_offset(ds, x, rel_ref, out_ref, self.t.kernel_size,
                                lambda i, table=table: table == i)
               for table, rel_ref, out_ref in zip((self.th, self.tw), rel_refs, out_refs))


def _shift_index(t: Tiling, *, keys_in_slab: bool):
  """Offset index (key - query + r, -1 outside the window) per (row item's own position p,
  column item's position q) on each axis, as [P * Q] vectors, rows then columns.

  keys_in_slab: p is the query's row in its block (bh of them), q the key's row in the slab
  (kh); otherwise p is the query's row in the slab (kh), q the key's row in the block (bh).
  Columns alike with bw, kw.
  """
  r, k = t.radius, t.kernel_size

  def axis(block, slab, pad):
    if keys_in_slab:
      p, q = np.arange(block)[:, None], np.arange(slab)[None, :] - pad
    else:
      p, q = np.arange(slab)[:, None] - pad, np.arange(block)[None, :]
    idx = (q - p + r).reshape(-1)
    return np.where((idx >= 0) & (idx < k), idx, -1).astype(np.int32)
  return axis(t.bh, t.kh, t.pt), axis(t.bw, t.kw, t.pl)


def _shifted_tables(t: Tiling, rht, rwt, *, keys_in_slab: bool):
  """The relative tables [kp, dp] gathered per (p, q) of `_shift_index` (zero outside the
  window): [P_h * Q_h, dp] and [P_w * Q_w, dp], so that one matmul gives every row item's
  q.r against each position it can meet (`_FactoredOffsets.logit_terms`)."""
  def gather(table, idx):
    return jnp.where(idx[:, None] >= 0, table[np.maximum(idx, 0)], 0).astype(table.dtype)
  ih, iw = _shift_index(t, keys_in_slab=keys_in_slab)
  return gather(rht, ih), gather(rwt, iw)


class _FactoredOffsets:
  """The same as `_TableOffsets`, computed in the kernel and factored by axis (GPU only).

  A pair's row offset depends only on the query's row and the key's row, so the row terms
  are an [n, A] array over the column items' A rows and the column terms an [n, B] array
  over their B columns; the [n, A * B] logit terms are one broadcast sum of the two. Each
  axis's terms come from one matmul of the row items against that axis's shifted table
  (`_shifted_tables`: every row they can meet at every own position), keeping each row
  item's own position; the backward's are matmuls too (`relative_grads`).
  """

  def __init__(self, t: Tiling, sh_ref, sw_ref, *, keys_in_slab: bool, dot):
    by, bx = pl.program_id(1), pl.program_id(2)
    iota = jax.lax.broadcasted_iota
    if keys_in_slab:   # a block's queries [nq, 1] against slab rows [1, kh] / columns [1, kw]
      i = iota(jnp.int32, (t.nq, 1), 0)
      a, c = i // t.bw, i % t.bw
      u = iota(jnp.int32, (1, t.kh), 1) - t.pt
      e = iota(jnp.int32, (1, t.kw), 1) - t.pl
      self.dy, self.dx, qy, qx = u - a, e - c, u, e      # key - query
      self.own = (a, c)                                  # p of `_shift_index`, per row item
    else:              # a slab's queries [nk, 1] against block rows [1, bh] / columns [1, bw]
      j = iota(jnp.int32, (t.nk, 1), 0)
      u, e = j // t.kw - t.pt, j % t.kw - t.pl
      a, c = iota(jnp.int32, (1, t.bh), 1), iota(jnp.int32, (1, t.bw), 1)
      self.dy, self.dx, qy, qx = a - u, c - e, u, e
      self.own = (u + t.pt, e + t.pl)
    rows, cols = by * t.bh + qy, bx * t.bw + qx          # the slab items' image positions
    r = t.radius
    self.ok_h = (jnp.abs(self.dy) <= r) & (rows >= 0) & (rows < t.height)
    self.ok_w = (jnp.abs(self.dx) <= r) & (cols >= 0) & (cols < t.width)
    self.t, self.keys_in_slab, self.tables, self.dot = t, keys_in_slab, (sh_ref, sw_ref), dot

  def _pairs(self, row_terms, col_terms):
    n, a = row_terms.shape
    b = col_terms.shape[1]
    return (row_terms[:, :, None] + col_terms[:, None, :]).reshape(n, a * b)

  def logit_terms(self, x, rh_ref, rw_ref):
    terms = []
    for table_ref, rel_ref, own, offset in zip(self.tables, (rh_ref, rw_ref), self.own,
                                               (self.dy, self.dx)):
      n, width = offset.shape                            # [n, Q]: the positions met
      if table_ref.shape[0] >= _MIN_DOT:
        g = self.dot(x, table_ref[...], (1, 1))          # [n, P * Q]
        g = g.reshape(n, g.shape[1] // width, width)
        p = jax.lax.broadcasted_iota(jnp.int32, (1, g.shape[1], 1), 1)
        terms.append(jnp.sum(jnp.where(p == own[:, :, None], g, 0.0), axis=1))
      else:  # too few (p, q) for a Triton matmul (maps of 1-2 rows): offset by offset
        terms.append(_terms_by_offset(
            x, rel_ref, self.t.kernel_size,
            lambda i, offset=offset: offset == i - self.t.radius,
            jnp.zeros(offset.shape, jnp.float32)))
    valid = self._pairs(self.ok_h.astype(jnp.float32), self.ok_w.astype(jnp.float32)) > 1.5
    return self._pairs(*terms), valid

  def relative_grads(self, ds, x, rel_refs, out_refs):
    """As `_TableOffsets.relative_grads`. ds's row and column sums ([n, A], [n, B]) are
    placed at each query's own position ([n, P * Q], P * Q = the shifted table's rows), so
    that dq's share is a matmul with the shifted table, and the tables' gradients a matmul
    with the 0/1 matrix S [rows, P * Q] that sums each offset's (p, q) (then one with x).
    The matmuls take the input dtype, as dq's ds @ k does; rows >= 16 (a matmul's)."""
    assert self.keys_in_slab, "the gradients of the tables come from the query blocks"
    t, r = self.t, self.t.radius
    ds3 = ds.reshape(t.nq, t.kh, t.kw)
    per_axis = (jnp.sum(ds3, axis=2), jnp.sum(ds3, axis=1))        # [nq, kh], [nq, kw]
    dq = 0.0
    for by, offset, own, pad, table_ref, rel_ref, out_ref in zip(
        per_axis, (self.dy, self.dx), self.own, (t.pt, t.pl), self.tables, rel_refs,
        out_refs):
      n, width = offset.shape
      rows, pq = out_ref.shape[0], table_ref.shape[0]
      if pq >= _MIN_DOT:
        p = jax.lax.broadcasted_iota(jnp.int32, (1, pq // width, 1), 1)
        placed = jnp.where(p == own[:, :, None], by[:, None, :], 0.0).reshape(n, pq)
        placed = placed.astype(x.dtype)
        dq = dq + self.dot(placed, table_ref[...], (1, 0))        # [n, dp]
        col = jax.lax.broadcasted_iota(jnp.int32, (rows, pq), 1)
        offset_of = (col % width - pad) - col // width + r          # `_shift_index`'s, unmasked
        sums = (jax.lax.broadcasted_iota(jnp.int32, (rows, pq), 0) == offset_of)
        per_offset = self.dot(sums.astype(x.dtype), placed, (1, 1))    # [rows, n]
        out_ref[...] = self.dot(per_offset.astype(x.dtype), x, (1, 0))
      else:  # too few (p, q) for a Triton matmul: offset by offset
        dq = dq + _grads_by_offset(by, x, rel_ref, out_ref, t.kernel_size,
                                   lambda i, offset=offset: offset == i - r)
    return dq


FORMS = ("tables", "factored")
_MIN_DOT = 16  # Triton's smallest matmul dimension
# What `impl="pallas"` runs on GPUs (tools/gpu_check.py --tune times both) and on TPUs.
GPU_FORM = "tables"
TPU_FORM = "tables"


def _offsets(refs, t: Tiling, form: str, dot, *, keys_in_slab: bool):
  """(the kernel's offsets, its remaining refs): the "tables" form takes four offset-table
  refs first, the "factored" form two shifted relative tables (`_Launch.offset_inputs`)."""
  if form == "tables":
    return _TableOffsets(t, *refs[:4]), refs[4:]
  return _FactoredOffsets(t, *refs[:2], keys_in_slab=keys_in_slab, dot=dot), refs[2:]


def _slab(ref, t: Tiling):
  """This program's kh x kw slab -> [kh * kw, c]: on TPU the ref is the slab itself (its
  window, `_Launch.map_spec`); on GPU the whole padded map [hs, ws, c], sliced here."""
  if t.flavour == "tpu":
    x = ref[...]
  else:
    by, bx = pl.program_id(1), pl.program_id(2)
    x = ref[pl.ds(by * t.bh, t.kh), pl.ds(bx * t.bw, t.kw), :]
  return x.reshape(t.nk, x.shape[-1])


def _block(ref, t: Tiling):
  x = ref[...]
  return x.reshape(t.nq, x.shape[-1])


def _query_logits(offsets, dot, q, kk, rh_ref, rw_ref):
  """Masked logits [nq, nk] of a query block against its key slab, and the mask."""
  rel, valid = offsets.logit_terms(q, rh_ref, rw_ref)
  return jnp.where(valid, dot(q, kk, (1, 1)) + rel, _MASKED), valid


def _fwd_kernel(*refs, t: Tiling, form: str, f32_dot: str):
  dot = functools.partial(_dot, f32_dot=f32_dot)
  offsets, (q_ref, k_ref, v_ref, rh_ref, rw_ref, o_ref, lse_ref) = _offsets(
      refs, t, form, dot, keys_in_slab=True)
  q = _block(q_ref, t)
  kk, vv = _slab(k_ref, t), _slab(v_ref, t)
  s, valid = _query_logits(offsets, dot, q, kk, rh_ref, rw_ref)
  m = jnp.max(s, axis=1, keepdims=True)
  p = jnp.where(valid, jnp.exp(s - m), 0.0)
  denom = jnp.maximum(jnp.sum(p, axis=1, keepdims=True), _TINY)
  o = dot(p.astype(vv.dtype), vv, (1, 0)) / denom
  o_ref[...] = o.reshape(o_ref.shape).astype(o_ref.dtype)
  lse_ref[...] = (m + jnp.log(denom)).reshape(lse_ref.shape)


def _dq_kernel(*refs, t: Tiling, form: str, f32_dot: str):
  dot = functools.partial(_dot, f32_dot=f32_dot)
  offsets, (q_ref, k_ref, v_ref, rh_ref, rw_ref, do_ref, lse_ref, dd_ref, dq_ref, drh_ref,
            drw_ref) = _offsets(refs, t, form, dot, keys_in_slab=True)
  q = _block(q_ref, t)
  kk, vv = _slab(k_ref, t), _slab(v_ref, t)
  s, valid = _query_logits(offsets, dot, q, kk, rh_ref, rw_ref)
  lse, dd = _block(lse_ref, t), _block(dd_ref, t)
  p = jnp.where(valid, jnp.exp(s - lse), 0.0)
  do = _block(do_ref, t)
  ds = p * (dot(do, vv, (1, 1)) - dd)                               # [nq, nk]
  dq = dot(ds.astype(kk.dtype), kk, (1, 0))                         # [nq, dp]
  dq = dq + offsets.relative_grads(ds, q, (rh_ref, rw_ref), (drh_ref, drw_ref))
  dq_ref[...] = dq.reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(*refs, t: Tiling, form: str, f32_dot: str):
  """dk, dv of one key block from the slab of queries whose windows can reach it."""
  dot = functools.partial(_dot, f32_dot=f32_dot)
  offsets, (q_ref, do_ref, lse_ref, dd_ref, k_ref, v_ref, rh_ref, rw_ref, dk_ref,
            dv_ref) = _offsets(refs, t, form, dot, keys_in_slab=False)
  qs, dos = _slab(q_ref, t), _slab(do_ref, t)      # [nk, dp]
  lse, dd = _slab(lse_ref, t), _slab(dd_ref, t)    # [nk, 1]
  kb, vb = _block(k_ref, t), _block(v_ref, t)                          # [nq, dp]
  rel, valid = offsets.logit_terms(qs, rh_ref, rw_ref)                 # [nk, nq]
  s = dot(qs, kb, (1, 1)) + rel
  p = jnp.where(valid, jnp.exp(jnp.where(valid, s, 0.0) - lse), 0.0)  # [nk, nq]
  ds = p * (dot(dos, vb, (1, 1)) - dd)
  dk_ref[...] = dot(ds.astype(qs.dtype), qs, (0, 0)).reshape(
      dk_ref.shape).astype(dk_ref.dtype)
  dv_ref[...] = dot(p.astype(dos.dtype), dos, (0, 0)).reshape(
      dv_ref.shape).astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Launch:
  """Everything static about one call: shapes, tiling and how to compile."""
  batch: int
  heads: int
  head_dim: int
  tiling: Tiling
  interpret: bool
  # Interpret the TPU flavour with TPU semantics (pltpu.InterpretParams: io callbacks), or
  # with the generic interpreter (plain jax ops, no effects: fit for a platform_dependent
  # branch beside compiled ones).
  tpu_interpreter: bool = True
  num_warps: int | str | None = None  # Triton only: `kernel_warps`' num_warps
  num_stages: int = NUM_STAGES
  form: str = "tables"         # how the kernels find each pair's offsets: FORMS
  f32_dot: str = "ieee"        # how they multiply float32 operands: F32_DOTS

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
    if self.f32_dot not in F32_DOTS:
      raise ValueError(f"f32_dot must be one of {F32_DOTS}, got {self.f32_dot!r}")
    for name, value in (("form", self.form), ("f32_dot", self.f32_dot)):
      if value not in ("tables", "ieee") and self.tiling.flavour != "gpu":
        raise ValueError(f"{name}={value!r} is written for the GPU (Triton) flavour only")

  @property
  def grid(self):
    return (self.batch * self.heads, *self.tiling.grid_hw)

  def compiler_params(self, kernel: str):
    if self.interpret:
      return None
    if self.tiling.flavour == "tpu":
      from jax.experimental.pallas import tpu as pltpu
      return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(
        num_warps=kernel_warps(self.tiling, self.form, kernel, self.num_warps),
        num_stages=self.num_stages)

  def interpret_mode(self):
    if not self.interpret:
      return False
    if self.tiling.flavour == "gpu" or not self.tpu_interpreter:
      return True
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()

  # Layouts: [B, H, W, N*d] <-> per-head maps [B*N, rows, cols, dp].
  def to_heads(self, x, channels=None):
    b, h, w, _ = x.shape
    c = channels or self.head_dim
    x = x.reshape(b, h, w, self.heads, c).transpose(0, 3, 1, 2, 4)
    return x.reshape(b * self.heads, h, w, c)

  def to_blocks(self, x, pad_channels=True):
    """[BN, H, W, c] -> the query grid [BN, hq, wq, dp (or c)], zero-padded."""
    t = self.tiling
    hq, wq = t.block_map
    cp = t.dp - x.shape[-1] if pad_channels else 0
    return jnp.pad(x, ((0, 0), (0, hq - t.height), (0, wq - t.width), (0, cp)))

  def to_slabs(self, x, pad_channels=True):
    """[BN, H, W, c] -> the slab map [BN, hs, ws, dp (or c)], image at (pt, pl)."""
    t = self.tiling
    hs, ws = t.slab_map
    cp = t.dp - x.shape[-1] if pad_channels else 0
    return jnp.pad(x, ((0, 0), (t.pt, hs - t.pt - t.height), (t.pl, ws - t.pl - t.width),
                       (0, cp)))

  def from_blocks(self, x):
    t = self.tiling
    x = x[:, :t.height, :t.width, :self.head_dim]
    bn, h, w, d = x.shape
    x = x.reshape(self.batch, self.heads, h, w, d).transpose(0, 2, 3, 1, 4)
    return x.reshape(self.batch, h, w, self.heads * d)

  def rel_table(self, rel, half: int):
    """rel_h / rel_w [k, d/2] as a [kp, dp] table acting on the full head vector."""
    t, d = self.tiling, self.head_dim
    lo = 0 if half == 0 else d // 2
    return jnp.pad(rel, ((0, t.kp - t.kernel_size), (lo, t.dp - lo - d // 2)))

  # BlockSpecs.
  def block_spec(self, channels):
    t = self.tiling
    return pl.BlockSpec((None, t.bh, t.bw, channels), lambda i, y, x: (i, y, x, 0))

  def map_spec(self, channels):
    """A padded map [BN, hs, ws, c] as each program reads it. TPU: its own kh x kw slab, an
    overlapping window (element offsets y * bh, x * bw) that the pipeline copies into VMEM,
    so VMEM holds a slab and not the map. GPU: the whole map, sliced in the kernel."""
    t = self.tiling
    if t.flavour == "tpu":
      return pl.BlockSpec((None, pl.Element(t.kh), pl.Element(t.kw), pl.Element(channels)),
                          lambda i, y, x: (i, y * t.bh, x * t.bw, 0))
    hs, ws = t.slab_map
    return pl.BlockSpec((None, hs, ws, channels), lambda i, y, x: (i, 0, 0, 0))

  @staticmethod
  def const_spec(shape):
    return pl.BlockSpec(shape, lambda i, y, x: (0,) * len(shape))

  def offset_inputs(self, rht, rwt, *, keys_in_slab: bool):
    """What the kernels' offsets read first: the static tables of `_TableOffsets`, or the
    shifted relative tables of `_FactoredOffsets` (from rht, rwt: `rel_table`'s)."""
    if self.form == "factored":
      return list(_shifted_tables(self.tiling, rht, rwt, keys_in_slab=keys_in_slab))
    return [*_offset_tables(self.tiling, keys_in_slab=keys_in_slab),
            *_slab_positions(self.tiling, column=not keys_in_slab)]

  def table_specs(self, tables):
    return [self.const_spec(a.shape) for a in tables]

  def cost(self, matmuls: int, exps: int, bytes_accessed: int):
    t = self.tiling
    programs = math.prod(self.grid)
    pairs = t.nq * t.nk
    flops = programs * (2 * matmuls * pairs * t.dp + 4 * t.kernel_size * pairs)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(programs * pairs * exps),
                           bytes_accessed=int(bytes_accessed))

  def call(self, kernel, out_shape, in_specs, out_specs, cost):
    """The pallas_call of `kernel`; compiled kernels are lowered only for their platform, so
    a function holding both flavours exports for TPU and GPU at once (`platform_only`)."""
    call = pl.pallas_call(
        functools.partial(kernel, t=self.tiling, form=self.form, f32_dot=self.f32_dot),
        out_shape=out_shape,
        grid=self.grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=self.compiler_params(kernel.__name__[1:].removesuffix("_kernel")),
        interpret=self.interpret_mode(), cost_estimate=cost,
        name=f"sasa_{kernel.__name__.strip('_')}")
    if self.interpret:
      return call
    # Imported here: only compiled kernels need jax's primitive-extension interfaces
    # (jax.extend.core, jax.interpreters), so that every other impl imports without them.
    from sasa_jax.ops.platform_only import platform_only  # noqa: PLC0415
    platforms = ("tpu",) if self.tiling.flavour == "tpu" else ("cuda", "rocm")
    return lambda *args: platform_only(call, platforms, *args)


def _nbytes(*xs):
  return sum(x.size * x.dtype.itemsize for x in xs)


def _forward(cfg: _Launch, qb, ks, vs, rh, rw):
  """qb [BN, hq, wq, dp] blocks; ks, vs [BN, hs, ws, dp] slab maps -> out, lse (blocks)."""
  t = cfg.tiling
  tables = cfg.offset_inputs(rh, rw, keys_in_slab=True)
  hq, wq = t.block_map
  out_shape = (jax.ShapeDtypeStruct(qb.shape, qb.dtype),
               jax.ShapeDtypeStruct((qb.shape[0], hq, wq, 1), jnp.float32))
  in_specs = [*cfg.table_specs(tables), cfg.block_spec(t.dp), cfg.map_spec(t.dp),
              cfg.map_spec(t.dp), cfg.const_spec(rh.shape), cfg.const_spec(rw.shape)]
  out_specs = (cfg.block_spec(t.dp), cfg.block_spec(1))
  cost = cfg.cost(2, 1, _nbytes(qb, ks, vs, qb) + 4 * qb[..., :1].size)
  return cfg.call(_fwd_kernel, out_shape, in_specs, out_specs, cost)(
      *tables, qb, ks, vs, rh, rw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Launch, q, k, v, rh, rw):
  return _attention_fwd(cfg, q, k, v, rh, rw)[0]


def _attention_fwd(cfg: _Launch, q, k, v, rh, rw):
  qb = cfg.to_blocks(cfg.to_heads(q))
  out, lse = _forward(cfg, qb, cfg.to_slabs(cfg.to_heads(k)), cfg.to_slabs(cfg.to_heads(v)),
                      cfg.rel_table(rh, 0), cfg.rel_table(rw, 1))
  return cfg.from_blocks(out), (q, k, v, rh, rw, out, lse)


def _attention_bwd(cfg: _Launch, res, g):
  q, k, v, rh, rw, out, lse = res
  t = cfg.tiling
  rht, rwt = cfg.rel_table(rh, 0), cfg.rel_table(rw, 1)
  qh, kh_, vh = cfg.to_heads(q), cfg.to_heads(k), cfg.to_heads(v)
  gb = cfg.to_blocks(cfg.to_heads(g))
  # D = rowsum(dO * O), the softmax-backward correction, per query: [BN, hq, wq, 1].
  dd = jnp.sum(gb.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  qb = cfg.to_blocks(qh)
  ks, vs = cfg.to_slabs(kh_), cfg.to_slabs(vh)
  nblocks = math.prod(cfg.grid)
  # d rel rows per program: the factored form writes them as one matmul's result.
  rows = t.kp if cfg.form == "tables" else max(t.kp, _MIN_DOT)
  rel_shape = (cfg.grid[0], *t.grid_hw, rows, t.dp)
  rel_spec = pl.BlockSpec((None, None, None, rows, t.dp), lambda i, y, x: (i, y, x, 0, 0))

  tables = cfg.offset_inputs(rht, rwt, keys_in_slab=True)
  dq, drh, drw = cfg.call(
      _dq_kernel,
      (jax.ShapeDtypeStruct(qb.shape, q.dtype), jax.ShapeDtypeStruct(rel_shape, jnp.float32),
       jax.ShapeDtypeStruct(rel_shape, jnp.float32)),
      [*cfg.table_specs(tables), cfg.block_spec(t.dp), cfg.map_spec(t.dp),
       cfg.map_spec(t.dp), cfg.const_spec(rht.shape), cfg.const_spec(rwt.shape),
       cfg.block_spec(t.dp), cfg.block_spec(1), cfg.block_spec(1)],
      (cfg.block_spec(t.dp), rel_spec, rel_spec),
      cfg.cost(3, 1, _nbytes(qb, ks, vs, gb, qb) + 8 * dd.size + 8 * nblocks * t.kp * t.dp),
  )(*tables, qb, ks, vs, rht, rwt, gb, lse, dd)

  def slabs_of_blocks(x):  # a [BN, hq, wq, c] block-layout array as a slab map
    return cfg.to_slabs(x[:, :t.height, :t.width], pad_channels=False)

  tables = cfg.offset_inputs(rht, rwt, keys_in_slab=False)
  qs, gs = cfg.to_slabs(qh), slabs_of_blocks(gb)
  lses, dds = slabs_of_blocks(lse), slabs_of_blocks(dd)
  kb, vb = cfg.to_blocks(kh_), cfg.to_blocks(vh)
  dk, dv = cfg.call(
      _dkv_kernel,
      (jax.ShapeDtypeStruct(kb.shape, k.dtype), jax.ShapeDtypeStruct(vb.shape, v.dtype)),
      [*cfg.table_specs(tables), cfg.map_spec(t.dp), cfg.map_spec(t.dp), cfg.map_spec(1),
       cfg.map_spec(1), cfg.block_spec(t.dp), cfg.block_spec(t.dp), cfg.const_spec(rht.shape),
       cfg.const_spec(rwt.shape)],
      (cfg.block_spec(t.dp), cfg.block_spec(t.dp)),
      cfg.cost(4, 1, _nbytes(qs, gs, kb, vb, kb, vb) + 8 * lses.size),
  )(*tables, qs, gs, lses, dds, kb, vb, rht, rwt)

  d = cfg.head_dim
  drh = jnp.sum(drh, axis=(0, 1, 2))[:t.kernel_size, :d // 2].astype(rh.dtype)
  drw = jnp.sum(drw, axis=(0, 1, 2))[:t.kernel_size, d // 2:2 * (d // 2)].astype(rw.dtype)
  return cfg.from_blocks(dq), cfg.from_blocks(dk), cfg.from_blocks(dv), drh, drw


_attention.defvjp(_attention_fwd, _attention_bwd)


def local_attention_pallas(q, k, v, rel_h=None, rel_w=None, *, kernel_size: int,
                           num_heads: int, max_block: int | None = None,
                           platform: str | None = None):
  """The fused kernels behind `local_attention`'s contract (arguments checked there).

  k=None (positional logits only) runs the kernels with zero keys; rel_h = rel_w = None
  with zero tables. The kernel flavour is chosen per lowering platform
  (`jax.lax.platform_dependent`): Mosaic on TPU, Triton on CUDA/ROCm, and the TPU flavour's
  kernel bodies in interpret mode anywhere else (the CPU). So one jitted function exports
  for ["tpu"], ["cuda"] or both at once from any host (`platform_only`). platform="tpu" or
  "gpu": that flavour's compiled kernels alone, with no dispatch (for a caller that already
  dispatches per platform). `target(...)` forces one flavour (and interpret mode, for tests).
  max_block: see `plan_tiling`.
  """
  d = q.shape[-1] // num_heads
  if k is None:
    k = jnp.zeros_like(q)
  if rel_h is None:
    rel_h = rel_w = jnp.zeros((kernel_size, d // 2), q.dtype)

  b, h, w, _ = q.shape

  def flavoured(flavour, interpret, tpu_interpreter=True):
    tiling = plan_tiling(h, w, d, kernel_size, q.dtype, flavour, max_block)
    gpu = flavour == "gpu"
    return functools.partial(_attention, _Launch(
        b, num_heads, d, tiling, interpret, tpu_interpreter,
        form=GPU_FORM if gpu else TPU_FORM, f32_dot=GPU_F32_DOT if gpu else "ieee"))

  def or_blocked(flavour, interpret, **kw):
    """Every branch is traced whatever the platform: a shape that a flavour's tiling cannot
    take runs the blocked XLA op on that platform instead of failing everywhere."""
    try:
      return flavoured(flavour, interpret, **kw)
    except ValueError:
      from sasa_jax.ops.blocked import local_attention_blocked  # noqa: PLC0415
      return functools.partial(local_attention_blocked, kernel_size=kernel_size,
                               num_heads=num_heads, platform="cpu" if interpret else flavour)

  args = (q, k, v, rel_h, rel_w)
  if _TARGET is not None:
    return flavoured(*_TARGET)(*args)
  if platform is not None:
    return or_blocked(platform, False)(*args)
  return jax.lax.platform_dependent(
      *args, tpu=or_blocked("tpu", False), cuda=or_blocked("gpu", False),
      rocm=or_blocked("gpu", False), default=or_blocked("tpu", True, tpu_interpreter=False))


def fused_attention(q, k, v, rel_h, rel_w, *, num_heads: int, tiling: Tiling,
                    num_warps: int | str | None = None, num_stages: int = NUM_STAGES,
                    form: str = "tables", f32_dot: str = "ieee", interpret: bool = False):
  """The kernels in one given tiling and launch configuration, with no platform dispatch:
  for timing candidates against each other on one device (`tools/gpu_check --tune`).
  Arguments as `local_attention`'s, all five arrays given; tiling from `candidate_tilings`;
  form: one of FORMS and f32_dot one of F32_DOTS (the second of each on the GPU flavour
  only); num_warps: as `kernel_warps`' (every kernel's, "rows", or None for the form's).
  """
  launch = _Launch(q.shape[0], num_heads, q.shape[-1] // num_heads, tiling, interpret,
                   num_warps=num_warps, num_stages=num_stages, form=form, f32_dot=f32_dot)
  return _attention(launch, q, k, v, rel_h, rel_w)
