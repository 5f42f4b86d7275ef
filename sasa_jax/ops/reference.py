"""Reference local attention: the clearest implementation, the oracle for tests.

One shifted slice of the zero-padded keys/values per window offset. Slow to compile
for large kernels and never used for training; its only job is to be obviously right.
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
  n, d, r = num_heads, c // num_heads, kernel_size // 2
  f32 = jnp.promote_types(q.dtype, jnp.float32)  # at least float32
  qh = q.reshape(b, h, w, n, d).astype(f32)
  kh = None
  if k is not None:
    kh = _padded_heads(k, n, r, f32)
  inside = np.pad(np.ones((h, w), bool), r)  # which padded pixels are real image pixels
  logits = []
  for i in range(kernel_size):  # row offset i - r
    for j in range(kernel_size):  # column offset j - r
      logit = jnp.zeros((b, h, w, n), f32)
      if kh is not None:
        logit += jnp.einsum("bhwnc,bhwnc->bhwn", qh, kh[:, i:i + h, j:j + w])
      if rel_h is not None:  # r_{dy,dx} = concat(r_row[dy], r_col[dx]), the paper's q.r
        r_ij = jnp.concatenate([rel_h[i], rel_w[j]]).astype(f32)
        logit += jnp.einsum("bhwnc,c->bhwn", qh, r_ij)
      valid = inside[i:i + h, j:j + w][None, :, :, None]
      logits.append(jnp.where(valid, logit, -jnp.inf))
  return jnp.stack(logits, axis=-1)


def _padded_heads(x, num_heads, r, dtype):
  b, h, w, c = x.shape
  return jnp.pad(x.reshape(b, h, w, num_heads, c // num_heads).astype(dtype),
                 ((0, 0), (r, r), (r, r), (0, 0), (0, 0)))


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
  r = kernel_size // 2
  logits = window_logits(q, k, rel_h, rel_w, kernel_size=kernel_size, num_heads=num_heads)
  vh = _padded_heads(v, num_heads, r, logits.dtype)
  values = [vh[:, i:i + h, j:j + w] for i in range(kernel_size) for j in range(kernel_size)]
  probs = jax.nn.softmax(logits, axis=-1)  # [B, H, W, N, k*k]
  out = jnp.einsum("bhwnk,kbhwnc->bhwnc", probs, jnp.stack(values))
  return out.reshape(b, h, w, c).astype(q.dtype)
