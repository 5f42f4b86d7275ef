"""create_resnet: the model zoo's one entry point; its keyword arguments are config.model."""
import inspect
from typing import TYPE_CHECKING, Sequence

import jax.numpy as jnp

from sasa_jax.layers import ATTENTION_STEM_TYPES, AttentionSettings, AttentionStem
from sasa_jax.layers.attention import check_choice
from sasa_jax.models.resnet import STAGE_BLOCKS, STAGE_WIDTHS, STEM_WIDTH, SASAResNet

if TYPE_CHECKING:  # the module imports this one
  from sasa_jax.models.retinanet import RetinaNet

STEM_HEADS = AttentionStem.num_heads  # SASAResNet keeps the stem's default

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

  depth: 26, 38 or 50 (blocks per group [1,2,4,1], [2,3,5,2], [3,4,6,3]: the paper's), or 14
    ([1,1,1,1]: quick experiments and tests).
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
  narrowest = min(STEM_WIDTH, *STAGE_WIDTHS)
  if not width_multiplier > 0 or int(round(narrowest * width_multiplier)) < 1:
    raise ValueError(f"width_multiplier={width_multiplier!r} is not allowed; it must be more "
                     f"than {0.5 / narrowest} (at least one channel where 1.0 has {narrowest})")
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
  if stem != "conv" and int(round(STEM_WIDTH * width_multiplier)) % (2 * STEM_HEADS):
    raise ValueError(f"width_multiplier={width_multiplier}: the attention stem's width "
                     f"{int(round(STEM_WIDTH * width_multiplier))} must be a multiple of "
                     f"{2 * STEM_HEADS} (its {STEM_HEADS} heads x an even head dimension, for "
                     "the relative embeddings)")
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


HEADS = ("conv", "attention")
P6_INPUTS = ("p5", "c5")


def create_retinanet(backbone_variant: str = "full_attention", heads: str = "attention", *,
                     depth: int = 50,
                     num_classes: int = 80,
                     min_level: int = 3,
                     max_level: int = 7,
                     num_scales: int = 3,
                     aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                     anchor_scale: float = 4.0,
                     fpn_width: int = 256,
                     head_layers: int = 4,
                     head_kernel_size: int = 7,
                     head_num_heads: int = 8,
                     p6_input: str | None = None,
                     width_multiplier: float = 1.0,
                     kernel_size: int | Sequence[int] = 7,
                     num_heads: int | Sequence[int] = 8,
                     attention_groups: Sequence[int] | None = None,
                     positional_encoding: str = "relative",
                     attention_type: str = "qk+qr",
                     scale_query: bool = False,
                     stem_type: str | None = None,
                     stem_mixtures: int = 4,
                     bn_momentum: float = 0.99,
                     dtype: str = "float32",
                     impl: str = "auto") -> "RetinaNet":
  """Builds the RetinaNet of the SASA paper's Table 2.

  backbone_variant: a create_resnet variant ("baseline", "conv_stem_attention",
    "full_attention"); depth and the backbone keywords as create_resnet's.
  heads: "conv" (3x3 convolutions in the FPN and heads) or "attention" (each a SASA layer of
    head_kernel_size and head_num_heads; a strided one attention + 2x2 average pool; each
    subnet's predictor a SASA layer + a pointwise convolution).
  min_level..max_level: pyramid levels (3..7: strides 8-128); 5 < max_level adds P6/P7.
  num_scales x aspect_ratios anchors per position, of side anchor_scale x stride x
    2^(i / num_scales) (sasa_jax.detection.anchors).
  fpn_width, head_layers: channels of the FPN and heads, layers per subnet.
  p6_input: what P6 is computed from: "p5" or "c5" (the RetinaNet paper's choice); None:
    "p5" with conv heads, "c5" with attention heads, the only choice that puts every row
    of Table 2 within 5% of its parameters (docs/detection.md).
  Raises ValueError naming the keyword, its value and what is allowed.
  """
  from sasa_jax.models.retinanet import RetinaNet  # noqa: PLC0415 - avoids an import cycle
  check_choice("heads", heads, HEADS)
  if p6_input is None:
    p6_input = "p5" if heads == "conv" else "c5"
  check_choice("p6_input", p6_input, P6_INPUTS)
  check_choice("min_level", min_level, (3, 4, 5))
  if not min_level <= max_level <= 7:
    raise ValueError(f"max_level={max_level!r} is not allowed; choose {min_level}..7")
  for name, value in (("num_classes", num_classes), ("num_scales", num_scales),
                      ("fpn_width", fpn_width), ("head_layers", head_layers)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} is not allowed; it must be a positive int")
  if not aspect_ratios or any(r <= 0 for r in aspect_ratios):
    raise ValueError(f"aspect_ratios={aspect_ratios!r} must be positive numbers")
  if not anchor_scale > 0:
    raise ValueError(f"anchor_scale={anchor_scale!r} must be > 0")
  backbone = create_resnet(
      depth, backbone_variant, width_multiplier=width_multiplier, kernel_size=kernel_size,
      num_heads=num_heads, attention_groups=attention_groups,
      positional_encoding=positional_encoding, attention_type=attention_type,
      scale_query=scale_query, stem_type=stem_type, stem_mixtures=stem_mixtures,
      bn_momentum=bn_momentum, dtype=dtype, impl=impl)
  head_attention = None
  if heads == "attention":
    head_attention = AttentionSettings(
        kernel_size=head_kernel_size, num_heads=head_num_heads,
        positional_encoding=positional_encoding, attention_type=attention_type,
        scale_query=scale_query, impl=impl)
    head_attention.check(fpn_width, where="FPN and heads")
  return RetinaNet(backbone.clone(features_only=True), num_classes=num_classes,
                   num_anchors=num_scales * len(aspect_ratios), min_level=min_level,
                   max_level=max_level, width=fpn_width, head_layers=head_layers,
                   head_attention=head_attention, p6_input=p6_input, bn_momentum=bn_momentum,
                   dtype=DTYPES[dtype])


# Every keyword create_retinanet accepts besides backbone_variant and heads, with its default.
RETINANET_OVERRIDES = {
    name: p.default for name, p in inspect.signature(create_retinanet).parameters.items()
    if p.kind == p.KEYWORD_ONLY}
