"""impl="shifted": local attention as k² shifted slices of flat, zero-padded maps.

Each head's maps are laid out channel-major and flattened, [B, N, d, positions], with the
keys and values zero-padded by r = k // 2 on every side, so that the key at window offset
(i, j) of every query is one contiguous slice of the flat map, starting i * (W + 2r) + j
further on. The queries take every position of the padded width (W + 2r columns per row;
the 2r extra columns are computed and dropped). Per offset, one elementwise product summed
over the head's d channels gives that offset's logits, [B, N, positions]; the output is the
sum over offsets of each probability times its shifted value slice. No window of keys or
values and no block of masked logits is formed: the logits, [B, N, k², positions] in
float32, are the one large temporary, and all the work is elementwise products and sums
(one matmul: the relative embeddings' gradient).

The backward pass (a custom VJP) recomputes the logits from the saved log-sum-exp and
writes each gradient as one sum over offsets, as the forward writes its output: the key
and value gradients sum shifted slices of the query- and output-side products, zero-padded
on the left by the largest shift (or, with float32 inputs, those products each padded to
the keys' length: `_scatter_sum` says why).

Against the blocked form (`blocked.py`), which computes each block's logits as batched
matmuls over a halo of keys, it trades matrix-unit work on masked logits for k² passes of
vector work; which is faster is the device's to say: `tools/gpu_check` times both
(docs/models.md, "The shifted form").
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The flat layout of [B, H, W, C] maps for a window of k x k (r = k // 2).

  row: W + 2r, a padded row's length; positions: H * row, the flat queries (extra columns
  included); starts: the k² key slices' starts, offset (i, j) at i * k + j; keys: the flat
  padded key and value maps' length, (H + 2r) * row + 2r, the last slice's end."""
  height: int
  width: int
  kernel_size: int
  num_heads: int

  @property
  def radius(self) -> int:
    return self.kernel_size // 2

  @property
  def row(self) -> int:
    return self.width + 2 * self.radius

  @property
  def positions(self) -> int:
    return self.height * self.row

  @property
  def starts(self) -> list[int]:
    return [i * self.row + j for i in range(self.kernel_size) for j in range(self.kernel_size)]

  @property
  def keys(self) -> int:
    return self.positions + self.starts[-1]


def _flat(x, lay: _Layout, padded: bool):
  """[B, H, W, C] -> [B, N, d, L]: each head's channels, flattened row by row. padded: the
  key/value layout (r zeros on every side, then 2r: L = lay.keys); else the query layout (2r
  zero columns on the right of each row: L = lay.positions)."""
  b, h, w, c = x.shape
  r = lay.radius
  x = x.reshape(b, h, w, lay.num_heads, c // lay.num_heads).transpose(0, 3, 4, 1, 2)
  rows, cols = ((r, r), (r, r)) if padded else ((0, 0), (0, 2 * r))
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), rows, cols))
  x = x.reshape(*x.shape[:3], -1)
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, lay.keys - x.shape[-1]))) if padded else x


def _unflat(x, lay: _Layout, padded: bool):
  """`_flat`'s inverse: [B, N, d, L] -> [B, H, W, C], the padding dropped."""
  b, n, d, _ = x.shape
  r, h, w = lay.radius, lay.height, lay.width
  if padded:
    x = x[..., :(h + 2 * r) * lay.row].reshape(b, n, d, h + 2 * r, lay.row)[
        :, :, :, r:r + h, r:r + w]
  else:
    x = x.reshape(b, n, d, h, lay.row)[..., :w]
  return x.transpose(0, 3, 4, 1, 2).reshape(b, h, w, n * d)


def _valid_keys(lay: _Layout) -> np.ndarray:
  """[k², positions] bool: whether window offset i * k + j of the query at flat position
  y * row + x is a key inside the image. The extra columns (x >= W) count every key as
  inside, so that their dropped outputs and gradients stay finite."""
  r, size = lay.radius, lay.kernel_size
  y, x = np.divmod(np.arange(lay.positions), lay.row)
  dy = np.repeat(np.arange(size), size)[:, None] - r
  dx = np.tile(np.arange(size), size)[:, None] - r
  inside = (y + dy >= 0) & (y + dy < lay.height) & (x + dx >= 0) & (x + dx < lay.width)
  return inside | (x >= lay.width)


def _rel(rel_h, rel_w, lay: _Layout, acc):
  """[k², d]: r_{i-r, j-r} = concat(rel_h[i], rel_w[j]) at i * k + j, or None."""
  if rel_h is None:
    return None
  size = lay.kernel_size
  return jnp.concatenate([jnp.repeat(rel_h, size, axis=0), jnp.tile(rel_w, (size, 1))],
                         axis=1).astype(acc)


def _logits(qf, kf, rel, lay: _Layout, acc):
  """[B, N, k², positions]: every query's logit at every offset, -inf outside the image."""
  n = lay.positions
  logits = []
  for o, start in enumerate(lay.starts):
    if kf is None:
      term = qf * rel[o][:, None]
    else:
      keys = kf[..., start:start + n].astype(acc)
      term = qf * (keys if rel is None else keys + rel[o][:, None])
    logits.append(jnp.sum(term, axis=2))
  return jnp.where(_valid_keys(lay), jnp.stack(logits, axis=2), -jnp.inf)


def _gather_sum(weights, x, lay: _Layout, acc):
  """[B, N, d, positions]: sum over offsets o of weights[:, :, o] times x's slice at
  starts[o] (the output from the probabilities and values)."""
  n = lay.positions
  return sum(weights[:, :, o, None, :] * x[..., s:s + n].astype(acc)
             for o, s in enumerate(lay.starts))


def _scatter_sum(weights, x, lay: _Layout, pad_each: bool):
  """[B, N, d, keys]: sum over offsets o of weights[:, :, o] * x shifted on by starts[o] (the
  transpose of `_gather_sum` in x: key and value gradients).

  Two ways to write it, equal in value, which XLA fuses differently. pad_each=False zero-pads
  both on the left by the largest shift, so that each shifted term is one slice of the
  padded product; pad_each=True pads each offset's product out to the keys' length. XLA:GPU
  (jaxlib 0.10) keeps every term of the first as its own array where the op's inputs are
  already float32, 1.8 GB of temporaries at 32 x 56² x 64 against 0.7 GB for the second.
  Where the inputs are converted (bfloat16) the first plans less, on GPU and TPU alike
  (docs/models.md, "The shifted form")."""
  n, shift = lay.keys, lay.starts[-1]
  if pad_each:
    return sum(jnp.pad(weights[:, :, o, None, :] * x,
                       ((0, 0),) * 3 + ((s, n - lay.positions - s),))
               for o, s in enumerate(lay.starts))
  pad = ((0, 0),) * 3 + ((shift, n - lay.positions),)
  xp, wp = jnp.pad(x, pad), jnp.pad(weights, pad)
  return sum(wp[:, :, o, None, shift - s:shift - s + n] * xp[..., shift - s:shift - s + n]
             for o, s in enumerate(lay.starts))


def _forward(q, k, v, rel_h, rel_w, lay: _Layout):
  acc = jax.dtypes.canonicalize_dtype(jnp.promote_types(q.dtype, jnp.float32))
  qf = _flat(q, lay, padded=False).astype(acc)
  kf = None if k is None else _flat(k, lay, padded=True)
  logits = _logits(qf, kf, _rel(rel_h, rel_w, lay, acc), lay, acc)
  lse = jax.nn.logsumexp(logits, axis=2)
  out = _gather_sum(jnp.exp(logits - lse[:, :, None]), _flat(v, lay, padded=True), lay, acc)
  return _unflat(out, lay, padded=False).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, rel_h, rel_w, lay: _Layout):
  return _forward(q, k, v, rel_h, rel_w, lay)[0]


def _attention_fwd(q, k, v, rel_h, rel_w, lay: _Layout):
  out, lse = _forward(q, k, v, rel_h, rel_w, lay)
  return out, (q, k, v, rel_h, rel_w, out, lse)


def _attention_bwd(lay: _Layout, residuals, g):
  q, k, v, rel_h, rel_w, out, lse = residuals
  acc = lse.dtype
  qf = _flat(q, lay, padded=False).astype(acc)
  kf = None if k is None else _flat(k, lay, padded=True)
  vf = _flat(v, lay, padded=True)
  rel = _rel(rel_h, rel_w, lay, acc)
  gf = _flat(g, lay, padded=False).astype(acc)  # zero at the extra columns
  probs = jnp.exp(_logits(qf, kf, rel, lay, acc) - lse[:, :, None])
  dprobs = jnp.stack([jnp.sum(gf * vf[..., s:s + lay.positions].astype(acc), axis=2)
                      for s in lay.starts], axis=2)
  delta = jnp.sum(gf * _flat(out, lay, padded=False).astype(acc), axis=2)  # sum_o p dp
  dlogits = probs * (dprobs - delta[:, :, None])  # [B, N, k², positions]
  dq = (0 if kf is None else _gather_sum(dlogits, kf, lay, acc)) + (
      0 if rel is None else jnp.einsum("bnol,od->bndl", dlogits, rel,
                                       precision=jax.lax.Precision.HIGHEST))
  pad_each = q.dtype == acc  # no conversion: see _scatter_sum
  dk = None if k is None else _unflat(_scatter_sum(dlogits, qf, lay, pad_each), lay, padded=True)
  dv = _unflat(_scatter_sum(probs, gf, lay, pad_each), lay, padded=True)
  drel_h = drel_w = None
  if rel is not None:
    drel = jnp.einsum("bnol,bndl->od", dlogits, qf, precision=jax.lax.Precision.HIGHEST)
    drel = drel.reshape(lay.kernel_size, lay.kernel_size, -1)
    half = rel_h.shape[1]
    drel_h = drel[:, :, :half].sum(1).astype(rel_h.dtype)
    drel_w = drel[:, :, half:].sum(0).astype(rel_w.dtype)
  return (_unflat(dq, lay, padded=False).astype(q.dtype),
          None if dk is None else dk.astype(k.dtype), dv.astype(v.dtype), drel_h, drel_w)


_attention.defvjp(_attention_fwd, _attention_bwd)


def logits_count(shape, kernel_size: int, num_heads: int) -> int:
  """The float32 logits the op holds at once for q of [B, H, W, C] `shape`:
  [B, heads, k², H * (W + 2r)], the extra columns included. The form runs unchunked, so
  this is what its temporaries scale with."""
  bsz, h, w, _ = shape
  return bsz * num_heads * kernel_size ** 2 * _Layout(h, w, kernel_size, num_heads).positions


def local_attention_shifted(q, k, v, rel_h, rel_w, *, kernel_size, num_heads):
  """See `sasa_jax.ops.local_attention`. Inputs already validated.

  Args:
    q, v: [B, H, W, C]; k: the same, or None (positional logits only).
    rel_h, rel_w: [kernel_size, d // 2] each, or both None.
  Returns:
    [B, H, W, C] in q's dtype; float32 (or wider) logits, softmax and sums.
  """
  _, h, w, _ = q.shape
  return _attention(q, k, v, rel_h, rel_w, _Layout(h, w, kernel_size, num_heads))
