"""The attention stem (SASA §3.2, App. A.1) and its Table 7 alternatives."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sasa_jax.layers.attention import check_choice
from sasa_jax.ops.chunks import fewest_chunks, map_batch_chunks

ATTENTION_STEM_TYPES = ("spatially_aware", "stand_alone", "conv_values")


class AttentionStem(nn.Module):
  """Self-attention inside each block_size x block_size block, BN, ReLU, max pool.

  [B, H, W, C_in] -> [B, H / block_size, W / block_size, features]. Queries, keys and
  values share the receptive field of the max-pool window that follows (§3.2).

  stem_type chooses the values:
    "spatially_aware": v_ab = (sum_m p(a, b, m) W_V^m) x_ab with
        p(a, b, m) = softmax_m((emb_row[a] + emb_col[b]) . nu_m), where (a, b) is the
        ABSOLUTE position inside the block; p is shared by all heads.
    "stand_alone": v = W_V x, plain self-attention (Table 7, first row).
    "conv_values": v = a block_size x block_size convolution of x (Table 7, second row).

  Logits are q.k + q.r with relative offset embeddings inside the block, as in every
  SASA layer (r = concat(r_row[dy], r_col[dx]), shared by the heads).

  impl: "reference" computes the M value maps and mixes them per pixel (the paper's form,
  which the FLOPS counter traces); any other value folds the mixture into one value matrix
  per block position first (same function, 1/M of the value memory and work).
  num_mixtures (m): not given in the paper. We use 4 by default: with 4 mixtures the
  stem adds ~0.1 GFLOPS over the plain value projection, which is what Table 7's
  7.1 -> 7.2 GFLOPS step implies.
  """
  features: int = 64
  stem_type: str = "spatially_aware"
  block_size: int = 4
  num_heads: int = 4
  num_mixtures: int = 4
  embedding_dim: int = 16
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_choice("stem_type", self.stem_type, ATTENTION_STEM_TYPES)
    bsz, h, w, _ = x.shape
    s, n = self.block_size, self.num_heads
    if h % s or w % s:
      raise ValueError(f"AttentionStem needs H and W divisible by block_size={s}, got {h}x{w}")
    if self.features % n:
      raise ValueError(f"features={self.features} must be divisible by num_heads={n}")
    cin, c, d = x.shape[-1], self.features, self.features // n
    x = x.astype(self.dtype)
    kernel = lambda name, shape: self.param(
        name, nn.initializers.lecun_normal(in_axis=0, out_axis=tuple(range(1, len(shape)))),
        shape)
    w_q, w_k = kernel("query", (cin, c)), kernel("key", (cin, c))
    v_full = value_of = None  # values for the whole batch, or a function of an x chunk
    if self.stem_type == "spatially_aware":
      w_v = kernel("value", (cin, self.num_mixtures, c))  # the M value matrices
      init = nn.initializers.normal(stddev=1.0)
      emb_row = self.param("emb_row", init, (s, self.embedding_dim))
      emb_col = self.param("emb_col", init, (s, self.embedding_dim))
      nu = self.param("mixture", init, (self.num_mixtures, self.embedding_dim))
      mix = jax.nn.softmax((emb_row[:, None] + emb_col[None, :]) @ nu.T, axis=-1)  # [s, s, M]
      if self.impl == "reference":  # the paper's form: M value maps, mixed per pixel
        values = jnp.einsum("bhwi,imc->bhwmc", x, w_v.astype(self.dtype))  # [B, H, W, M, C]
        mix_map = jnp.tile(mix, (h // s, w // s, 1)).astype(values.dtype)  # [H, W, M]
        v_full = jnp.einsum("bhwmc,hwm->bhwc", values, mix_map)
      else:  # the same function with the mixture folded into one matrix per block position
        w_ab = jnp.einsum("abm,imc->abic", mix, w_v).astype(self.dtype)  # [s, s, C_in, C]

        def value_of(xc):
          xb = xc.reshape(xc.shape[0], h // s, s, w // s, s, cin)
          return jnp.einsum("nyaxbi,abic->nyaxbc", xb, w_ab).reshape(xc.shape[:3] + (c,))
    elif self.stem_type == "conv_values":
      v_full = nn.Conv(c, (s, s), padding="SAME", use_bias=False, dtype=self.dtype,
                       name="value")(x)
    else:
      w_v = kernel("value", (cin, c))
      value_of = lambda xc: xc @ w_v.astype(self.dtype)

    emb_init = nn.initializers.normal(stddev=d ** -0.5)
    rel_h = self.param("rel_h", emb_init, (2 * s - 1, d // 2))
    rel_w = self.param("rel_w", emb_init, (2 * s - 1, d // 2))
    pos = jnp.arange(s)
    off = pos[None, :] - pos[:, None] + s - 1  # [query, key] offset index along one axis
    rel = jnp.concatenate([  # [s*s queries, s*s keys, d]: r for every query/key pair
        jnp.broadcast_to(rel_h[off][:, None, :, None], (s, s, s, s, d // 2)),
        jnp.broadcast_to(rel_w[off][None, :, None, :], (s, s, s, s, d // 2))], axis=-1)
    rel = rel.reshape(s * s, s * s, d).astype(self.dtype)

    def attend(xc, vc):  # one chunk of images [b, H, W, C_in] -> [b, H, W, C]
      b = xc.shape[0]

      def blocks(t):  # [b, H, W, C] -> [b, H/s, W/s, N, s*s, d]
        t = t.reshape(b, h // s, s, w // s, s, n, -1).transpose(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(b, h // s, w // s, n, s * s, -1)
      qb = blocks(xc @ w_q.astype(self.dtype))
      vc = value_of(xc) if vc is None else vc
      logits = (jnp.einsum("...qd,...kd->...qk", qb, blocks(xc @ w_k.astype(self.dtype)),
                           preferred_element_type=jnp.float32)
                + jnp.einsum("...qd,qkd->...qk", qb, rel, preferred_element_type=jnp.float32))
      probs = jax.nn.softmax(logits, axis=-1).astype(vc.dtype)
      y = jnp.einsum("...qk,...kd->...qd", probs, blocks(vc))
      y = y.reshape(b, h // s, w // s, n, s, s, -1).transpose(0, 1, 4, 2, 5, 3, 6)
      return y.reshape(b, h, w, c)

    # At 224 px the stem's q, k, v and logits have 4x the pixels of any later layer: run the
    # attention one chunk of images at a time and recompute it in the backward pass, so
    # only the chunk's inputs are stored (the batch-norm below still sees the whole batch).
    y = map_batch_chunks(attend, (x, v_full), fewest_chunks(bsz, h * w, MAX_CHUNK_PIXELS),
                         remat=True)
    y = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, dtype=self.dtype,
                     name="bn")(y)
    return nn.max_pool(nn.relu(y), (s, s), strides=(s, s))


# Pixels per sequential chunk of the stem's attention (one 224 px image is 50,176).
MAX_CHUNK_PIXELS = 1 << 16

