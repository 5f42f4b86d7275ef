"""The attention stem (SASA §3.2, App. A.1) and its Table 7 alternatives."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sasa_jax.layers.attention import check_choice

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
    dense = lambda name: nn.Dense(self.features, use_bias=False, dtype=self.dtype, name=name)
    q, k = dense("query")(x), dense("key")(x)
    if self.stem_type == "spatially_aware":
      cin = x.shape[-1]
      w_v = self.param("value", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                       (cin, self.num_mixtures, self.features))  # the M value matrices
      init = nn.initializers.normal(stddev=1.0)
      emb_row = self.param("emb_row", init, (s, self.embedding_dim))
      emb_col = self.param("emb_col", init, (s, self.embedding_dim))
      nu = self.param("mixture", init, (self.num_mixtures, self.embedding_dim))
      mix = jax.nn.softmax((emb_row[:, None] + emb_col[None, :]) @ nu.T, axis=-1)  # [s, s, M]
      x_in = x.astype(self.dtype)
      if self.impl == "reference":  # the paper's form: M value maps, mixed per pixel
        values = jnp.einsum("bhwi,imc->bhwmc", x_in, w_v.astype(self.dtype))  # [B, H, W, M, C]
        mix_map = jnp.tile(mix, (h // s, w // s, 1)).astype(values.dtype)  # [H, W, M]
        v = jnp.einsum("bhwmc,hwm->bhwc", values, mix_map)
      else:  # the same function with the mixture folded into one matrix per block position
        w_ab = jnp.einsum("abm,imc->abic", mix, w_v).astype(self.dtype)  # [s, s, C_in, C]
        xb = x_in.reshape(bsz, h // s, s, w // s, s, cin)
        v = jnp.einsum("nyaxbi,abic->nyaxbc", xb, w_ab).reshape(bsz, h, w, self.features)
    elif self.stem_type == "conv_values":
      v = nn.Conv(self.features, (s, s), padding="SAME", use_bias=False, dtype=self.dtype,
                  name="value")(x)
    else:
      v = dense("value")(x)

    def blocks(t):  # [B, H, W, C] -> [B, H/s, W/s, N, s*s, d]
      t = t.reshape(bsz, h // s, s, w // s, s, n, -1).transpose(0, 1, 3, 5, 2, 4, 6)
      return t.reshape(bsz, h // s, w // s, n, s * s, -1)

    d = self.features // n
    emb_init = nn.initializers.normal(stddev=d ** -0.5)
    rel_h = self.param("rel_h", emb_init, (2 * s - 1, d // 2))
    rel_w = self.param("rel_w", emb_init, (2 * s - 1, d // 2))
    pos = jnp.arange(s)
    off = pos[None, :] - pos[:, None] + s - 1  # [query, key] offset index along one axis
    rel = jnp.concatenate([  # [s*s queries, s*s keys, d]: r for every query/key pair
        jnp.broadcast_to(rel_h[off][:, None, :, None], (s, s, s, s, d // 2)),
        jnp.broadcast_to(rel_w[off][None, :, None, :], (s, s, s, s, d // 2))], axis=-1)
    rel = rel.reshape(s * s, s * s, d).astype(q.dtype)
    qb = blocks(q)
    logits = (jnp.einsum("...qd,...kd->...qk", qb, blocks(k), preferred_element_type=jnp.float32)
              + jnp.einsum("...qd,qkd->...qk", qb, rel, preferred_element_type=jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("...qk,...kd->...qd", probs, blocks(v))
    y = y.reshape(bsz, h // s, w // s, n, s, s, -1).transpose(0, 1, 4, 2, 5, 3, 6)
    y = y.reshape(bsz, h, w, self.features)
    y = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, dtype=self.dtype,
                     name="bn")(y)
    return nn.max_pool(nn.relu(y), (s, s), strides=(s, s))
