"""RetinaNet (Lin et al. 2017) on a SASA ResNet, with conv or SASA attention FPN and heads
(SASA §4.2, App. A.3; Table 2).

Outputs are flat over the anchors of every level, in the order of
`sasa_jax.detection.anchors.generate_anchors`: level, then row, then column, then anchor.
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sasa_jax.layers import AttentionSettings, SelfAttention2D
from sasa_jax.layers.pointwise import pointwise_conv
from sasa_jax.models.resnet import SASAResNet

HEAD_INIT = nn.initializers.normal(stddev=0.01)  # RetinaNet's head init (W_V in attention)
PRIOR_PROBABILITY = 0.01  # the class predictor's initial foreground probability


def _spatial(width: int, attention: AttentionSettings | None, *, stride: int, dtype,
             kernel_init: Callable, name: str):
  """A 3x3 convolution (with bias), or the SASA layer that replaces it (a strided one:
  attention + 2x2 average pool)."""
  if attention is None:
    return nn.Conv(width, (3, 3), strides=stride, padding=((1, 1), (1, 1)), dtype=dtype,
                   kernel_init=kernel_init, name=name)
  return SelfAttention2D.from_settings(attention, width, stride=stride, dtype=dtype,
                                       value_init=kernel_init, name=name)


def _upsample_to(x, shape):
  """Nearest-neighbour 2x upsampling of [B, h, w, C], cropped to `shape`'s [H, W]."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, :shape[1], :shape[2]]


class FPN(nn.Module):
  """Feature pyramid P3-P7 over {3: C3, 4: C4, 5: C5} (SASA §4.2).

  1x1 laterals (bias) + nearest top-down sums; a 3x3 conv or SASA layer on each of P3-P5;
  P6 a strided 3x3 conv or SASA layer (+ 2x2 average pool) on P5 (p6_input="p5", as
  Table 2's parameter counts imply) or on C5 ("c5", the RetinaNet paper); P7 the same on
  ReLU(P6). BatchNorm on every output level. Returns {level: [B, H_l, W_l, width]}.
  """
  width: int = 256
  min_level: int = 3
  max_level: int = 7
  attention: AttentionSettings | None = None
  p6_input: str = "p5"
  norm: Any = nn.BatchNorm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats):
    lateral = {l: nn.Conv(self.width, (1, 1), dtype=self.dtype,
                          conv_general_dilated=pointwise_conv, name=f"lateral{l}")(feats[l])
               for l in range(self.min_level, 6)}
    merged = {5: lateral[5]}
    for l in range(4, self.min_level - 1, -1):
      merged[l] = lateral[l] + _upsample_to(merged[l + 1], lateral[l].shape)
    spatial = functools.partial(_spatial, self.width, self.attention, dtype=self.dtype,
                                kernel_init=nn.initializers.lecun_normal())
    out = {l: spatial(stride=1, name=f"post{l}")(merged[l])
           for l in range(self.min_level, 6)}
    for l in range(6, self.max_level + 1):
      x = (feats[5] if self.p6_input == "c5" else out[5]) if l == 6 else nn.relu(out[l - 1])
      out[l] = spatial(stride=2, name=f"p{l}")(x)
    return {l: self.norm(name=f"bn{l}")(out[l]) for l in sorted(out)}


class Subnet(nn.Module):
  """A RetinaNet head, shared across levels: `num_layers` 3x3 conv (or SASA) layers of
  `width` channels, each with its own BatchNorm per level, then the predictor of
  `outputs` values per position (a 3x3 conv; in the attention form a SASA layer followed by
  a pointwise convolution that mixes its heads). {level: [B, H, W, C]} -> [B, N_level, outputs]
  concatenated over levels in the anchors' order."""
  outputs: int
  width: int = 256
  num_layers: int = 4
  attention: AttentionSettings | None = None
  bias_init: Callable = nn.initializers.zeros
  norm: Any = nn.BatchNorm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pyramid):
    layers = [_spatial(self.width, self.attention, stride=1, dtype=self.dtype,
                       kernel_init=HEAD_INIT, name=f"layer{i}") for i in range(self.num_layers)]
    if self.attention is None:
      predictor = [nn.Conv(self.outputs, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           kernel_init=HEAD_INIT, bias_init=self.bias_init, name="predict")]
    else:
      # W_V of the predictor's attention keeps the default scale: two N(0, 0.01) layers in a
      # row would leave the logits nearly constant and their gradients tiny
      predictor = [_spatial(self.width, self.attention, stride=1, dtype=self.dtype,
                            kernel_init=nn.initializers.lecun_normal(),
                            name="predict_attention"),
                   nn.Dense(self.outputs, dtype=self.dtype, kernel_init=HEAD_INIT,
                            bias_init=self.bias_init, name="predict")]
    results = []
    for level, x in sorted(pyramid.items()):
      for i, layer in enumerate(layers):
        x = nn.relu(self.norm(name=f"bn{i}_level{level}")(layer(x)))
      for layer in predictor:
        x = layer(x)
      results.append(x.reshape(x.shape[0], -1, self.outputs))
    return jnp.concatenate(results, axis=1)


class RetinaNet(nn.Module):
  """[B, S, S, C] images -> {"logits": [B, N, num_classes], "boxes": [B, N, 4]} over the N
  anchors of levels min_level..max_level (box regression in the anchors' coding).

  Attributes:
    backbone: a SASAResNet with features_only=True.
    head_attention: AttentionSettings of the FPN and heads, or None for convolutions.
  """
  backbone: SASAResNet
  num_classes: int = 80
  num_anchors: int = 9
  min_level: int = 3
  max_level: int = 7
  width: int = 256
  head_layers: int = 4
  head_attention: AttentionSettings | None = None
  p6_input: str = "p5"
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32
  bn_axis_name: Any = None  # as SASAResNet's (the backbone has its own)
  bn_axis_index_groups: Any = None

  @nn.compact
  def __call__(self, images, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-3, dtype=self.dtype,
                             axis_name=self.bn_axis_name,
                             axis_index_groups=self.bn_axis_index_groups)
    feats = self.backbone(images, train=train)
    pyramid = FPN(self.width, self.min_level, self.max_level, self.head_attention,
                  self.p6_input, norm=norm, dtype=self.dtype, name="fpn")(feats)
    subnet = functools.partial(Subnet, width=self.width, num_layers=self.head_layers,
                               attention=self.head_attention, norm=norm, dtype=self.dtype)
    prior = -np.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
    logits = subnet(self.num_anchors * self.num_classes,
                    bias_init=nn.initializers.constant(prior), name="class_net")(pyramid)
    boxes = subnet(self.num_anchors * 4, name="box_net")(pyramid)
    batch = images.shape[0]
    return {"logits": logits.reshape(batch, -1, self.num_classes).astype(jnp.float32),
            "boxes": boxes.reshape(batch, -1, 4).astype(jnp.float32)}
