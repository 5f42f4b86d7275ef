"""create_resnet: the model zoo's one entry point; its keyword arguments are config.model."""
import inspect
from typing import Sequence

import jax.numpy as jnp

from sasa_jax.layers import ATTENTION_STEM_TYPES, AttentionSettings
from sasa_jax.layers.attention import check_choice
from sasa_jax.models.resnet import STAGE_BLOCKS, STAGE_WIDTHS, STEM_WIDTH, SASAResNet

VARIANTS = {
    # variant: (attention_groups, stem_type) when not given
    "baseline": ((), "conv"),
    "conv_stem_attention": ((1, 2, 3, 4), "conv"),
    "full_attention": ((1, 2, 3, 4), "spatially_aware"),
}
STEM_TYPES = ("conv",) + ATTENTION_STEM_TYPES
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PER_GROUP = ("kernel_size", "num_heads")  # one value, or one per attention group


def create_resnet(depth: int = 50, variant: str = "full_attention", *,
                  num_classes: int = 1000,
                  width_multiplier: float = 1.0,
                  kernel_size: int | Sequence[int] = 7,
                  num_heads: int | Sequence[int] = 8,
                  attention_groups: Sequence[int] | None = None,
                  positional_encoding: str = "relative",
                  attention_type: str = "qk+qr",
                  scale_query: bool = False,
                  stem_type: str | None = None,
                  stem_mixtures: int = 4,
                  small_images: bool = False,
                  bn_momentum: float = 0.9,
                  dtype: str = "float32",
                  impl: str = "auto") -> SASAResNet:
  """Builds a ResNet of the SASA paper.

  depth: 26, 38 or 50 (blocks per group [1,2,4,1], [2,3,5,2], [3,4,6,3]).
  variant: "baseline" (convolutions everywhere: attention_groups and stem_type do not
    apply), "conv_stem_attention" (attention in attention_groups, default all four, conv
    stem) or "full_attention" (the same with an attention stem, default spatially aware).
  attention_groups: which groups (1-4) use attention (Table 3); None: the variant's.
  kernel_size, num_heads: one value for every attention group, or one per group of
    attention_groups (e.g. kernel_size=(7, 7, 5) with attention_groups=(2, 3, 4)).
  stem_type: "conv" or an attention stem (Table 7); None: the variant's.
  small_images: a stem for 28-32 px inputs (3x3 conv + 2x2 max pool, or 2x2 attention blocks).
  dtype: "float32" or "bfloat16" (activations and matmuls; parameters stay float32).
  impl: the op implementation of every attention layer and the attention stem.
  Raises ValueError naming the keyword, its value and what is allowed.
  """
  check_choice("depth", depth, tuple(STAGE_BLOCKS))
  check_choice("variant", variant, tuple(VARIANTS))
  check_choice("dtype", dtype, tuple(DTYPES))
  if not width_multiplier > 0:
    raise ValueError(f"width_multiplier={width_multiplier!r} is not allowed; it must be > 0")
  default_groups, default_stem = VARIANTS[variant]
  if variant == "baseline":
    groups, stem = (), "conv"
  else:
    groups = tuple(default_groups if attention_groups is None else attention_groups)
    stem = default_stem if stem_type is None else stem_type
  for g in groups:
    check_choice("attention_groups entry", g, (1, 2, 3, 4))
  if len(set(groups)) != len(groups):
    raise ValueError(f"attention_groups={groups!r} names a group twice")
  check_choice("stem_type", stem, STEM_TYPES)
  per_group = {name: _per_group(name, value, groups)
               for name, value in (("kernel_size", kernel_size), ("num_heads", num_heads))}
  group_attention = [None] * 4
  for i, g in enumerate(sorted(groups)):
    settings = AttentionSettings(
        kernel_size=per_group["kernel_size"][groups.index(g)],
        num_heads=per_group["num_heads"][groups.index(g)],
        positional_encoding=positional_encoding, attention_type=attention_type,
        scale_query=scale_query, impl=impl)
    settings.check(int(round(STAGE_WIDTHS[g - 1] * width_multiplier)), where=f"group {g}")
    group_attention[g - 1] = settings
  if not groups:  # the settings still must be valid values
    AttentionSettings(positional_encoding=positional_encoding, attention_type=attention_type,
                      impl=impl).check()
  if stem != "conv" and int(round(STEM_WIDTH * width_multiplier)) % 4:
    raise ValueError(f"width_multiplier={width_multiplier}: the attention stem's width "
                     f"{int(round(STEM_WIDTH * width_multiplier))} must be a multiple of its "
                     "4 heads")
  return SASAResNet(
      stage_blocks=STAGE_BLOCKS[depth], num_classes=num_classes,
      width_multiplier=width_multiplier, group_attention=tuple(group_attention),
      stem_type=stem, small_images=small_images, stem_mixtures=stem_mixtures, stem_impl=impl,
      bn_momentum=bn_momentum, dtype=DTYPES[dtype])


def _per_group(name, value, groups) -> tuple:
  """One value per attention group, from one value or a sequence of one per group."""
  if isinstance(value, (list, tuple)):
    if len(value) == 1:
      return tuple(value) * len(groups)
    if len(value) != len(groups):
      raise ValueError(f"{name}={tuple(value)!r} gives {len(value)} values for "
                       f"{len(groups)} attention group(s) {tuple(groups)}; give one value or "
                       "one per group")
    return tuple(value)
  return (value,) * len(groups)


# Every keyword create_resnet accepts besides depth and variant, with its default.
OVERRIDES = {name: p.default for name, p in inspect.signature(create_resnet).parameters.items()
             if p.kind == p.KEYWORD_ONLY}
