"""ResNet-26/38/50 with SASA attention in place of the 3x3 convolutions (§3.1, §4.1)."""
import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sasa_jax.layers import AttentionSettings, AttentionStem, SelfAttention2D
from sasa_jax.layers.pointwise import pointwise_conv

# 26/38/50: the paper's (Table 1); 14: one block per group, for quick experiments and tests.
STAGE_BLOCKS = {14: (1, 1, 1, 1), 26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
QUICK_DEPTH = 14  # the tools' --quick modes (smoke tests, not measurements)
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths; block outputs are 4x these
STEM_WIDTH = 64


class BottleneckBlock(nn.Module):
  """1x1 conv -> 3x3 conv or SASA -> 1x1 conv (x4 features), with a residual.

  [B, H, W, C] -> [B, H / strides, W / strides, 4 * filters]. In attention blocks the
  stride is a 2x2 average pool after the attention, as the paper prescribes.
  """
  filters: int
  strides: int
  attention: AttentionSettings | None  # None: a 3x3 convolution
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    conv1x1 = functools.partial(conv, kernel_size=(1, 1), conv_general_dilated=pointwise_conv)
    y = nn.relu(self.norm()(conv1x1(self.filters, name="conv1")(x)))
    if self.attention is not None:
      y = SelfAttention2D.from_settings(self.attention, self.filters, stride=self.strides,
                                        dtype=self.dtype, name="attention")(y)
    else:
      y = conv(self.filters, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
               name="conv2")(y)
    y = nn.relu(self.norm()(y))
    y = self.norm(scale_init=nn.initializers.zeros)(conv1x1(4 * self.filters, name="conv3")(y))
    if x.shape != y.shape:
      x = self.norm(name="proj_bn")(conv1x1(4 * self.filters, strides=self.strides,
                                            name="proj")(x))
    return nn.relu(x + y)


class SASAResNet(nn.Module):
  """A bottleneck ResNet whose chosen groups use SASA attention. [B, H, W, 3] -> [B, classes].

  Attributes:
    stage_blocks: bottleneck blocks per group 1-4.
    group_attention: per group 1-4, the AttentionSettings of its SASA layers, or None for
      3x3 convolutions.
    features_only: return the outputs of groups 2-4 (strides 8, 16, 32: the C3-C5 of a
      feature pyramid) as {3: C3, 4: C4, 5: C5} instead of logits; no classifier head.
    stem_type: "conv" (7x7/2 conv + 3x3/2 max pool) or an AttentionStem type.
    bn_axis_name, bn_axis_index_groups: every BatchNorm's statistics averaged over the
      devices of each group along this mapped axis (nn.BatchNorm's axis_name and
      axis_index_groups; see batch_norm_across); None: over the images it is given.
    stem_impl: the attention stem's op implementation.
    small_images: for 28-32 px inputs: a 3x3/1 conv + 2x2/2 max pool stem, or an
      attention stem over 2x2 blocks (+ 2x2 max pool): both halve the resolution.
  """
  stage_blocks: Sequence[int]
  num_classes: int = 1000
  width_multiplier: float = 1.0
  group_attention: Sequence[AttentionSettings | None] = (None, None, None, None)
  stem_type: str = "conv"
  small_images: bool = False
  stem_mixtures: int = 4
  stem_impl: str = "auto"
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  features_only: bool = False
  bn_axis_name: Any = None
  bn_axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             axis_name=self.bn_axis_name,
                             axis_index_groups=self.bn_axis_index_groups)
    width = lambda c: int(round(c * self.width_multiplier))
    x = x.astype(self.dtype)
    if self.stem_type == "conv":
      if self.small_images:
        x = nn.Conv(width(STEM_WIDTH), (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    dtype=self.dtype, name="stem_conv")(x)
        x = nn.max_pool(nn.relu(norm(name="stem_bn")(x)), (2, 2), strides=(2, 2))
      else:
        x = nn.Conv(width(STEM_WIDTH), (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                    use_bias=False, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = AttentionStem(width(STEM_WIDTH), stem_type=self.stem_type,
                        block_size=2 if self.small_images else 4,
                        num_mixtures=self.stem_mixtures, bn_momentum=self.bn_momentum,
                        dtype=self.dtype, impl=self.stem_impl,
                        bn_axis_name=self.bn_axis_name,
                        bn_axis_index_groups=self.bn_axis_index_groups,
                        name="stem")(x, train=train)
    features = {}
    for group, (blocks, filters) in enumerate(zip(self.stage_blocks, STAGE_WIDTHS), start=1):
      for i in range(blocks):
        x = BottleneckBlock(width(filters), strides=2 if (i == 0 and group > 1) else 1,
                            attention=self.group_attention[group - 1], norm=norm,
                            dtype=self.dtype, name=f"group{group}_block{i + 1}")(x)
      features[group + 1] = x
    if self.features_only:
      return {level: features[level] for level in (3, 4, 5)}
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                 name="head")(x)
    return x.astype(jnp.float32)


def batch_norm_across(model: nn.Module, axis_name: Any, groups: Any) -> nn.Module:
  """`model` (a SASAResNet, or a module with bn_axis_name, bn_axis_index_groups and such
  submodules, as RetinaNet) with every BatchNorm's statistics averaged over the devices of
  each of `groups` (tuples of indices along axis_name; None: all of them), for a model run
  per device under jax.shard_map with mapped axis `axis_name`."""
  fields = {f.name for f in dataclasses.fields(model)}
  if not {"bn_axis_name", "bn_axis_index_groups"} <= fields:
    raise ValueError(f"{type(model).__name__} has no fields bn_axis_name and "
                     "bn_axis_index_groups for its BatchNorm layers, which BatchNorm groups "
                     "across devices (config.batch_norm_group_size a multiple of the images "
                     "per device) need: see docs/forking.md, 'new model'")
  submodules = {f.name: batch_norm_across(getattr(model, f.name), axis_name, groups)
                for f in dataclasses.fields(model) if f.name not in ("parent", "name")
                and isinstance(getattr(model, f.name), nn.Module)}
  return model.clone(bn_axis_name=axis_name, bn_axis_index_groups=groups, **submodules)
