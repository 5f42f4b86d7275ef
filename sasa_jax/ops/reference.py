"""Reference local attention: the clearest implementation, the oracle for tests.

Every query's k x k window of the zero-padded keys/values, stacked (k^2 shifted slices),
then one dot product per logit term and one for the output. Memory grows with k^2 and
it is never used for training; its only job is to be obviously right (and quick to
trace: the FLOPS counter traces it at ResNet-50 and RetinaNet scale).
"""
import jax
import jax.numpy as jnp
import numpy as np


def window_logits(q, k, rel_h, rel_w, *, kernel_size, num_heads):
  """The SASA logits of every query over its window: [B, H, W, N, k*k] (float32 or wider),
  -inf for keys outside the image; window position i * k + j is offset (i - r, j - r).

  The one statement of the logit formula (the op's reference, the attention-map tool):
      logit = q.k + q[:d/2].rel_h[dy + r] + q[d/2:].rel_w[dx + r]
  Args as in `local_attention_reference`."""
  b, h, w, c = q.shape
  n, r = num_heads, kernel_size // 2
  # At least float32; float64 only where jax has it enabled (NumPy inputs are float64).
  f32 = jax.dtypes.canonicalize_dtype(jnp.promote_types(q.dtype, jnp.float32))
  qh = q.reshape(b, h, w, n, c // n).astype(f32)
  logits = jnp.zeros((b, h, w, n, kernel_size ** 2), f32)
  if k is not None:
    logits += jnp.einsum("bhwnc,bhwnkc->bhwnk", qh, _windows(k, n, kernel_size, f32))
  if rel_h is not None:  # r_{dy,dx} = concat(r_row[dy], r_col[dx]), the paper's q.r
    rel = jnp.concatenate([jnp.repeat(rel_h, kernel_size, axis=0),
                           jnp.tile(rel_w, (kernel_size, 1))], axis=1).astype(f32)
    logits += jnp.einsum("bhwnc,kc->bhwnk", qh, rel)  # rel[i * k + j] = r_{i - r, j - r}
  inside = np.pad(np.ones((h, w), bool), r)  # which padded pixels are real image pixels
  valid = np.stack([inside[i:i + h, j:j + w] for i in range(kernel_size)
                    for j in range(kernel_size)], axis=-1)  # [H, W, k*k]
  return jnp.where(valid[None, :, :, None, :], logits, -jnp.inf)


def _windows(x, num_heads, kernel_size, dtype):
  """[B, H, W, N, k*k, d]: each pixel's k x k window of x (zero outside the image), by
  heads; window position i * k + j is offset (i - r, j - r)."""
  b, h, w, c = x.shape
  r = kernel_size // 2
  padded = jnp.pad(x.reshape(b, h, w, num_heads, c // num_heads).astype(dtype),
                   ((0, 0), (r, r), (r, r), (0, 0), (0, 0)))
  return jnp.stack([padded[:, i:i + h, j:j + w] for i in range(kernel_size)
                    for j in range(kernel_size)], axis=-2)


def local_attention_reference(q, k, v, rel_h, rel_w, *, kernel_size, num_heads):
  """See `sasa_jax.ops.local_attention`. Inputs already validated.

  Args:
    q: [B, H, W, C] queries.
    k: [B, H, W, C] keys, or None for a logit made of the positional term only.
    v: [B, H, W, C] values.
    rel_h, rel_w: [kernel_size, d // 2] row / column offset embeddings, or None.
  Returns:
    [B, H, W, C] in q's dtype.
  """
  b, h, w, c = q.shape
  logits = window_logits(q, k, rel_h, rel_w, kernel_size=kernel_size, num_heads=num_heads)
  probs = jax.nn.softmax(logits, axis=-1)  # [B, H, W, N, k*k]
  out = jnp.einsum("bhwnk,bhwnkc->bhwnc", probs,
                   _windows(v, num_heads, kernel_size, logits.dtype))
  return out.reshape(b, h, w, c).astype(q.dtype)
