"""Anchor targets (RetinaNet's matching), on the device inside the jitted step.

An anchor is foreground if its best IoU with a ground-truth box is >= 0.5, background if
< 0.4, ignored in between; every box also claims its best anchor (so that no box goes
unmatched), as RetinaNet's reference implementation does.
"""
import jax
import jax.numpy as jnp

from sasa_jax.detection import anchors as anchors_lib

FOREGROUND_IOU = 0.5
BACKGROUND_IOU = 0.4


def assign(anchors, boxes, labels, box_mask):
  """One image's targets.

  anchors [N, 4]; boxes [M, 4], labels [M] int, box_mask [M] (1: a real box to learn).
  Returns (class_targets [N] int32: the label, -1 background, -2 ignored;
  box_targets [N, 4]: the encoded matched box, zeros elsewhere).
  """
  valid = box_mask > 0
  overlaps = jnp.where(valid[None, :], anchors_lib.iou(anchors, boxes), -1.0)  # [N, M]
  best = jnp.max(overlaps, axis=1)
  match = jnp.argmax(overlaps, axis=1)
  # every real box claims its best anchor (later boxes win ties, as a scatter does)
  best_anchor = jnp.argmax(overlaps, axis=0)  # [M]
  claims = valid & (jnp.max(overlaps, axis=0) > 0)
  forced = jnp.zeros(anchors.shape[0], bool).at[best_anchor].max(claims)
  match = match.at[jnp.where(claims, best_anchor, anchors.shape[0])].set(
      jnp.arange(boxes.shape[0]), mode="drop")
  foreground = (best >= FOREGROUND_IOU) | forced
  background = (best < BACKGROUND_IOU) & ~forced
  class_targets = jnp.where(foreground, labels[match],
                            jnp.where(background, -1, -2)).astype(jnp.int32)
  box_targets = anchors_lib.encode(boxes[match], anchors)
  box_targets = jnp.where(foreground[:, None], box_targets, 0.0)
  return class_targets, box_targets


def assign_batch(anchors, boxes, labels, box_mask):
  """`assign` over a batch: boxes [B, M, 4], labels [B, M], box_mask [B, M]."""
  return jax.vmap(assign, in_axes=(None, 0, 0, 0))(anchors, boxes, labels, box_mask)
