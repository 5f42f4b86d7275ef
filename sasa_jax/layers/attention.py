"""The SASA layer: multi-head local self-attention replacing a k x k convolution."""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from sasa_jax.ops import IMPLS, local_attention

POSITIONAL_ENCODINGS = ("relative", "absolute", "none")
ATTENTION_TYPES = ("qk+qr", "qr")


def check_choice(field: str, value, allowed) -> None:
  """Raises ValueError naming `field`, its `value` and the `allowed` values."""
  if value not in allowed:
    raise ValueError(f"{field}={value!r} is not allowed; choose one of {tuple(allowed)}")


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
  """What a SASA layer is configured with besides its width and stride; the one place where
  the layer's rules are checked (`check`), by the layer itself and by `create_resnet`."""
  kernel_size: int = 7
  num_heads: int = 8
  positional_encoding: str = "relative"
  attention_type: str = "qk+qr"
  scale_query: bool = False
  impl: str = "auto"

  def check(self, features: int | None = None, where: str = "") -> None:
    """Raises ValueError naming the field, its value and what is allowed; `where` says
    which layer (e.g. "group 2")."""
    at = f" ({where})" if where else ""
    check_choice("positional_encoding", self.positional_encoding, POSITIONAL_ENCODINGS)
    check_choice("attention_type", self.attention_type, ATTENTION_TYPES)
    check_choice("impl", self.impl, IMPLS)
    k = self.kernel_size
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0:
      raise ValueError(f"kernel_size={k!r}{at} is not allowed; it must be a positive odd int")
    if not isinstance(self.num_heads, int) or self.num_heads < 1:
      raise ValueError(f"num_heads={self.num_heads!r}{at} must be a positive int")
    if self.attention_type == "qr" and self.positional_encoding == "none":
      raise ValueError("attention_type='qr' needs positional_encoding 'relative' or 'absolute'")
    if features is None:
      return
    positional = self.positional_encoding != "none"
    per_head = 2 * self.num_heads if positional else self.num_heads
    if features % per_head:
      why = ("num_heads x an even head dimension, for the positional embeddings" if positional
             else "num_heads")
      raise ValueError(f"num_heads={self.num_heads}{at}: the layer's width {features} must be "
                       f"a multiple of {per_head} ({why})")


class SelfAttention2D(nn.Module):
  """Stand-alone local self-attention (Ramachandran et al. 2019, §2.2).

  [B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), features]. q, k, v are bias-free
  1x1 projections; every pixel attends to its kernel_size x kernel_size window with
  num_heads heads; stride 2 adds a 2x2 average pool after the attention (§3.1); odd sizes round up.

  Attributes:
    positional_encoding: "relative" (row/column offset embeddings r_h, r_w of d/2
      each, shared by the heads, logit q.k + q.r), "absolute" (learned row/column
      embeddings of the key's position in the image, added to the keys) or "none".
    attention_type: "qk+qr" (content and position) or "qr" (position only, no key
      projection; SASA Table 6). "qr" needs a positional encoding.
    scale_query: multiply q by d^-1/2 (off in the paper's equation).
    value_init: initializer of the value projection (RetinaNet heads use N(0, 0.01)).
  """
  features: int
  kernel_size: int = 7
  num_heads: int = 8
  stride: int = 1
  positional_encoding: str = "relative"
  attention_type: str = "qk+qr"
  scale_query: bool = False
  impl: str = "auto"
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
  value_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

  @classmethod
  def from_settings(cls, settings: AttentionSettings, features: int, **kwargs):
    return cls(features, **dataclasses.asdict(settings), **kwargs)

  def _check(self):
    check_choice("stride", self.stride, (1, 2))
    AttentionSettings(self.kernel_size, self.num_heads, self.positional_encoding,
                      self.attention_type, self.scale_query, self.impl).check(self.features)

  @nn.compact
  def __call__(self, x):
    self._check()
    _, h, w, _ = x.shape
    d = self.features // self.num_heads

    def project(name, init=self.kernel_init):
      return nn.Dense(self.features, use_bias=False, dtype=self.dtype, kernel_init=init,
                      name=name)(x)

    q = project("query")
    k = project("key") if self.attention_type == "qk+qr" else None
    v = project("value", self.value_init)
    if self.scale_query:
      q = q * jnp.asarray(d ** -0.5, q.dtype)

    rel_h = rel_w = None
    emb_init = nn.initializers.normal(stddev=d ** -0.5)
    if self.positional_encoding == "relative":
      rel_h = self.param("rel_h", emb_init, (self.kernel_size, d // 2)).astype(q.dtype)
      rel_w = self.param("rel_w", emb_init, (self.kernel_size, d // 2)).astype(q.dtype)
    elif self.positional_encoding == "absolute":
      rows = self.param("abs_rows", emb_init, (h, d // 2))
      cols = self.param("abs_cols", emb_init, (w, d // 2))
      pos = jnp.concatenate([jnp.broadcast_to(rows[:, None], (h, w, d // 2)),
                             jnp.broadcast_to(cols[None, :], (h, w, d // 2))], axis=-1)
      pos = jnp.tile(pos, (1, 1, self.num_heads)).astype(q.dtype)  # [H, W, C], same per head
      k = pos if k is None else k + pos
      if self.attention_type == "qr":  # q.pos only: rel-free op with keys = positions
        k = jnp.broadcast_to(k, q.shape)

    y = local_attention(q, k, v, rel_h, rel_w, kernel_size=self.kernel_size,
                        num_heads=self.num_heads, impl=self.impl)
    if self.stride == 2:
      # SAME keeps odd sizes in step with a strided conv (7 -> 4); padding is not averaged.
      y = nn.avg_pool(y, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
    return y
