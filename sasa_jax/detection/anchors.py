"""RetinaNet anchors and box coding.

Boxes are [..., 4] = (ymin, xmin, ymax, xmax) in pixels of the model's input image.
Anchors are ordered level, row, column, then scale-major (scale, aspect ratio): the order of
RetinaNet's flattened outputs (sasa_jax.models.retinanet).
"""
import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

# exp of a decoded height/width offset is clipped here (log(1000 / 16), as Detectron).
MAX_LOG_SCALE = math.log(1000.0 / 16)


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
  """min_level..max_level pyramid levels; per position num_scales x len(aspect_ratios)
  anchors of side anchor_scale * 2**level * 2**(i / num_scales), aspect ratio w / h."""
  min_level: int = 3
  max_level: int = 7
  num_scales: int = 3
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  anchor_scale: float = 4.0

  @property
  def per_position(self) -> int:
    return self.num_scales * len(self.aspect_ratios)


def level_sides(image_size: int, max_level: int) -> dict:
  """{level: feature map side} for square images: each stride-2 stage rounds up."""
  sides, side = {}, image_size
  for level in range(1, max_level + 1):
    side = -(-side // 2)
    sides[level] = side
  return sides


def generate_anchors(spec: AnchorSpec, image_size: int) -> np.ndarray:
  """[N, 4] float32 anchors of a square image of `image_size` pixels."""
  sides = level_sides(image_size, spec.max_level)
  out = []
  for level in range(spec.min_level, spec.max_level + 1):
    stride, side = 2 ** level, sides[level]
    centres = (np.arange(side) + 0.5) * stride
    cy, cx = np.meshgrid(centres, centres, indexing="ij")  # [side, side]
    shapes = []
    for i in range(spec.num_scales):
      base = spec.anchor_scale * stride * 2 ** (i / spec.num_scales)
      for ratio in spec.aspect_ratios:
        shapes.append((base / math.sqrt(ratio), base * math.sqrt(ratio)))  # (h, w)
    hw = np.asarray(shapes)  # [A, 2]
    boxes = np.stack([cy[..., None] - hw[:, 0] / 2, cx[..., None] - hw[:, 1] / 2,
                      cy[..., None] + hw[:, 0] / 2, cx[..., None] + hw[:, 1] / 2], axis=-1)
    out.append(boxes.reshape(-1, 4))
  return np.concatenate(out).astype(np.float32)


def _centre_size(boxes):
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + h / 2, boxes[..., 1] + w / 2, h, w


def encode(boxes, anchors):
  """Boxes [..., 4] relative to anchors [..., 4] -> (ty, tx, th, tw) [..., 4]
  (Faster R-CNN coding, unit weights)."""
  ya, xa, ha, wa = _centre_size(anchors)
  y, x, h, w = _centre_size(boxes)
  eps = 1e-8
  return jnp.stack([(y - ya) / ha, (x - xa) / wa, jnp.log(jnp.maximum(h, eps) / ha),
                    jnp.log(jnp.maximum(w, eps) / wa)], axis=-1)


def decode(codes, anchors):
  """The inverse of `encode`: codes [..., 4] on anchors [..., 4] -> boxes [..., 4]."""
  ya, xa, ha, wa = _centre_size(anchors)
  y = codes[..., 0] * ha + ya
  x = codes[..., 1] * wa + xa
  h = jnp.exp(jnp.minimum(codes[..., 2], MAX_LOG_SCALE)) * ha
  w = jnp.exp(jnp.minimum(codes[..., 3], MAX_LOG_SCALE)) * wa
  return jnp.stack([y - h / 2, x - w / 2, y + h / 2, x + w / 2], axis=-1)


def iou(a, b):
  """Pairwise intersection over union: a [..., N, 4], b [..., M, 4] -> [..., N, M]."""
  a, b = a[..., :, None, :], b[..., None, :, :]
  ih = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  iw = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
  inter = ih * iw
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / jnp.maximum(area(a) + area(b) - inter, 1e-8)
