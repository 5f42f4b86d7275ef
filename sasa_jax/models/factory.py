"""create_resnet: the model zoo's one entry point; its keyword arguments are config.model."""
import jax.numpy as jnp

from sasa_jax.layers import ATTENTION_STEM_TYPES, ATTENTION_TYPES, POSITIONAL_ENCODINGS
from sasa_jax.layers.attention import check_choice
from sasa_jax.models.resnet import STAGE_BLOCKS, STAGE_WIDTHS, STEM_WIDTH, SASAResNet
from sasa_jax.ops import IMPLS

VARIANTS = {
    # variant: (attention_groups, stem_type)
    "baseline": ((), "conv"),
    "conv_stem_attention": ((1, 2, 3, 4), "conv"),
    "full_attention": ((1, 2, 3, 4), "spatially_aware"),
}
STEM_TYPES = ("conv",) + ATTENTION_STEM_TYPES
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Every keyword create_resnet accepts besides depth and variant, with its default.
# None means "the variant's choice".
OVERRIDES = {
    "num_classes": 1000,
    "width_multiplier": 1.0,
    "kernel_size": 7,
    "num_heads": 8,
    "attention_groups": None,
    "positional_encoding": "relative",
    "attention_type": "qk+qr",
    "scale_query": False,
    "stem_type": None,
    "stem_mixtures": 4,
    "small_images": False,
    "bn_momentum": 0.9,
    "dtype": "float32",
    "impl": "auto",
}


def create_resnet(depth: int = 50, variant: str = "full_attention", **overrides) -> SASAResNet:
  """Builds a ResNet of the SASA paper. See OVERRIDES for the keywords and defaults.

  depth: 26, 38 or 50 (blocks per group [1,2,4,1], [2,3,5,2], [3,4,6,3]).
  variant: "baseline" (all conv), "conv_stem_attention" (attention in every group,
    conv stem) or "full_attention" (attention stem too).
  attention_groups: which groups (1-4) use attention (Table 3); the variant's default
    is all four for attention variants and none for the baseline.
  stem_type: "conv" or an attention stem (Table 7); default from the variant.
  dtype: "float32" or "bfloat16" (activations and matmuls; parameters stay float32).
  """
  check_choice("depth", depth, tuple(STAGE_BLOCKS))
  check_choice("variant", variant, tuple(VARIANTS))
  unknown = sorted(set(overrides) - set(OVERRIDES))
  if unknown:
    raise ValueError(f"unknown create_resnet keyword(s) {unknown}; allowed: "
                     f"{['depth', 'variant'] + sorted(OVERRIDES)}")
  cfg = {**OVERRIDES, **overrides}
  groups, stem = VARIANTS[variant]
  groups = tuple(groups if cfg["attention_groups"] is None else cfg["attention_groups"])
  stem = stem if cfg["stem_type"] is None else cfg["stem_type"]
  for g in groups:
    check_choice("attention_groups entry", g, (1, 2, 3, 4))
  check_choice("stem_type", stem, STEM_TYPES)
  check_choice("positional_encoding", cfg["positional_encoding"], POSITIONAL_ENCODINGS)
  check_choice("attention_type", cfg["attention_type"], ATTENTION_TYPES)
  check_choice("impl", cfg["impl"], IMPLS)
  check_choice("dtype", cfg["dtype"], tuple(DTYPES))
  k = cfg["kernel_size"]
  if not isinstance(k, int) or k < 1 or k % 2 == 0:
    raise ValueError(f"kernel_size={k!r} is not allowed; it must be a positive odd int")
  wm = cfg["width_multiplier"]
  if not wm > 0:
    raise ValueError(f"width_multiplier={wm!r} is not allowed; it must be > 0")
  if groups:
    heads = cfg["num_heads"]
    for g in groups:
      width = int(round(STAGE_WIDTHS[g - 1] * wm))
      per_head = 2 * heads if cfg["positional_encoding"] != "none" else heads
      if width % per_head:
        raise ValueError(f"num_heads={heads} with width_multiplier={wm}: group {g} has width "
                         f"{width}, which must be a multiple of {per_head} (heads x even head dim)")
  if stem != "conv" and int(round(STEM_WIDTH * wm)) % 4:
    raise ValueError(f"width_multiplier={wm}: the attention stem's width "
                     f"{int(round(STEM_WIDTH * wm))} must be a multiple of its 4 heads")
  return SASAResNet(
      stage_blocks=STAGE_BLOCKS[depth],
      num_classes=cfg["num_classes"],
      width_multiplier=wm,
      attention_groups=groups,
      stem_type=stem,
      small_images=cfg["small_images"],
      stem_mixtures=cfg["stem_mixtures"],
      attention_kwargs=dict(kernel_size=k, num_heads=cfg["num_heads"],
                            positional_encoding=cfg["positional_encoding"],
                            attention_type=cfg["attention_type"],
                            scale_query=cfg["scale_query"], impl=cfg["impl"]),
      bn_momentum=cfg["bn_momentum"],
      dtype=DTYPES[cfg["dtype"]],
  )
