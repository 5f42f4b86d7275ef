"""RetinaNet's losses: sigmoid focal loss and Huber box regression, both normalised by
the number of foreground anchors in the global batch."""
import jax
import jax.numpy as jnp
import optax

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
HUBER_DELTA = 0.1
BOX_LOSS_WEIGHT = 50.0


def detection_loss(logits, box_codes, class_targets, box_targets, *, alpha=FOCAL_ALPHA,
                   gamma=FOCAL_GAMMA, delta=HUBER_DELTA, box_weight=BOX_LOSS_WEIGHT):
  """logits [B, N, K], box_codes [B, N, 4]; targets from targets.assign_batch.

  Returns (total, {"focal": ..., "box": ..., "num_foreground": ...}): the focal loss summed
  over non-ignored anchors and classes, the Huber loss summed over foreground anchors'
  coordinates (divided by 4 more), each divided by max(1, foreground anchors)."""
  num_classes = logits.shape[-1]
  foreground = class_targets >= 0
  num_fg = jnp.maximum(jnp.sum(foreground).astype(jnp.float32), 1.0)
  one_hot = jax.nn.one_hot(class_targets, num_classes)  # background/ignored rows all zero
  focal = optax.sigmoid_focal_loss(logits, one_hot, alpha=alpha, gamma=gamma)
  focal = jnp.sum(focal * (class_targets != -2)[..., None]) / num_fg
  huber = optax.huber_loss(box_codes, box_targets, delta=delta)
  box = jnp.sum(huber * foreground[..., None]) / (4 * num_fg)
  return focal + box_weight * box, {"focal": focal, "box": box, "num_foreground": num_fg}
