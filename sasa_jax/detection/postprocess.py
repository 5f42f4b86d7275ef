"""Detections from RetinaNet outputs: top-k candidates, decoding, per-class NMS; jit-able
(fixed shapes throughout), batched with vmap."""
import functools

import jax
import jax.numpy as jnp

from sasa_jax.detection import anchors as anchors_lib


def nms(boxes, scores, iou_threshold: float):
  """Greedy non-maximum suppression of one set of candidates.

  boxes [K, 4], scores [K] (-inf: not a candidate). Returns keep [K] bool: a candidate is
  kept if no higher-scoring kept candidate overlaps it by more than iou_threshold. Ties
  in score go to the lower index."""
  order = jnp.argsort(-scores, stable=True)
  sorted_boxes, sorted_valid = boxes[order], jnp.isfinite(scores[order])
  overlaps = anchors_lib.iou(sorted_boxes, sorted_boxes) > iou_threshold
  index = jnp.arange(scores.shape[0])

  def body(i, keep):
    suppressed = jnp.any(keep & overlaps[i] & (index < i))
    return keep.at[i].set(keep[i] & ~suppressed)

  keep_sorted = jax.lax.fori_loop(0, scores.shape[0], body, sorted_valid)
  return jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)


def detect(logits, box_codes, anchors, *, pre_nms: int = 1000, max_detections: int = 100,
           score_threshold: float = 0.05, iou_threshold: float = 0.5):
  """One image: logits [N, K], box_codes [N, 4], anchors [N, 4] ->
  (boxes [D, 4], scores [D], classes [D] int32, valid [D] bool), D = max_detections,
  best first.

  The pre_nms highest (anchor, class) scores above score_threshold are decoded, then NMS
  runs per class (boxes of different classes never suppress each other)."""
  num_classes = logits.shape[-1]
  scores = jax.nn.sigmoid(logits).reshape(-1)
  k = min(pre_nms, scores.shape[0])
  top_scores, flat = jax.lax.top_k(scores, k)
  anchor_index, classes = flat // num_classes, flat % num_classes
  boxes = anchors_lib.decode(box_codes[anchor_index], anchors[anchor_index])
  top_scores = jnp.where(top_scores >= score_threshold, top_scores, -jnp.inf)
  # per class at once: shift each class's boxes to its own region of the plane
  span = jnp.max(jnp.abs(boxes)) * 2 + 1
  keep = nms(boxes + (classes * span)[:, None], top_scores, iou_threshold)
  kept = jnp.where(keep, top_scores, -jnp.inf)
  d = min(max_detections, k)
  final, index = jax.lax.top_k(kept, d)
  valid = jnp.isfinite(final)
  out = (boxes[index], jnp.where(valid, final, 0.0), classes[index].astype(jnp.int32), valid)
  if d < max_detections:
    pad = max_detections - d
    out = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in out)
  return out


def detect_batch(logits, box_codes, anchors, **kwargs):
  """`detect` over a batch: logits [B, N, K], box_codes [B, N, 4]."""
  return jax.vmap(functools.partial(detect, anchors=anchors, **kwargs))(logits, box_codes)
