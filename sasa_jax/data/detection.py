"""Per-example detection preprocessing (tf.data), for coco/2017 and datasets in its layout.

Training: scale jitter (the image's longer side resized to image_size x s, s uniform in
[scale_min, scale_max]), a random image_size x image_size crop where larger, zero padding
where smaller (bottom and right), a horizontal flip with probability 0.5; boxes follow and
are clipped, those left without area or marked crowd dropped, the rest padded to
max_boxes with a mask. Evaluation: the longer side resized to image_size, padded; the
scale is kept to map detections back to the original pixels. Randomness is stateless
(seeded per example) as in classification; images leave the host as uint8.
"""
import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DetectionOptions:
  """config.detection's pipeline fields."""
  max_boxes: int = 100
  scale_min: float = 0.8
  scale_max: float = 1.2


def _decode(encoded, channels):
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def _resize(image, scale):
  """image [h, w, C] uint8 resized by `scale` (bilinear) -> float32 [H', W', C], (H', W')."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
  return tf.image.resize(image, new, method="bilinear"), new


def _to_uint8(image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _pad_boxes(boxes, labels, keep, max_boxes):
  """Kept boxes first, truncated or zero-padded to max_boxes, with a float mask."""
  boxes = tf.boolean_mask(boxes, keep)[:max_boxes]
  labels = tf.boolean_mask(labels, keep)[:max_boxes]
  n = tf.shape(labels)[0]
  pad = max_boxes - n
  return (tf.pad(boxes, [[0, pad], [0, 0]]), tf.pad(labels, [[0, pad]]),
          tf.pad(tf.ones([n], tf.float32), [[0, pad]]))


def train_example(example, seed, *, image_size: int, channels: int,
                  options: DetectionOptions) -> dict:
  """{"image": [S, S, C] uint8, "boxes": [max_boxes, 4] float32 (ymin, xmin, ymax, xmax)
  px of the output image, "labels": [max_boxes] int32, "box_mask": [max_boxes] float32}."""
  image = _decode(example["image"], channels)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  jitter = tf.random.stateless_uniform([], seed, options.scale_min, options.scale_max)
  scale = image_size / tf.reduce_max(hw) * jitter
  image, new = _resize(image, scale)
  room = tf.maximum(new - image_size, 0)
  offset = tf.cast(tf.floor(tf.random.stateless_uniform([2], seed + 1) *
                            tf.cast(room + 1, tf.float32)), tf.int32)
  offset = tf.minimum(offset, room)
  image = image[offset[0]:offset[0] + image_size, offset[1]:offset[1] + image_size]
  image = tf.image.pad_to_bounding_box(image, 0, 0, image_size, image_size)
  objects = example["objects"]
  boxes = objects["bbox"] * tf.tile(hw, [2]) * scale - tf.cast(tf.tile(offset, [2]), tf.float32)
  boxes = tf.clip_by_value(boxes, 0.0, float(image_size))
  flip = tf.random.stateless_uniform([], seed + 2) < 0.5
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  boxes = tf.cond(flip, lambda: tf.stack([boxes[:, 0], image_size - boxes[:, 3], boxes[:, 2],
                                          image_size - boxes[:, 1]], axis=1), lambda: boxes)
  keep = ((boxes[:, 2] - boxes[:, 0] >= 1.0) & (boxes[:, 3] - boxes[:, 1] >= 1.0)
          & ~tf.cast(objects["is_crowd"], tf.bool))
  boxes, labels, mask = _pad_boxes(boxes, tf.cast(objects["label"], tf.int32), keep,
                                   options.max_boxes)
  return {"image": _to_uint8(image), "boxes": boxes, "labels": labels, "box_mask": mask}


def eval_example(example, *, image_size: int, channels: int) -> dict:
  """{"image": [S, S, C] uint8, "image_id": int32, "scale": float32 (model px per original
  px), "mask": 1.0}."""
  image = _decode(example["image"], channels)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = image_size / tf.reduce_max(hw)
  image, _ = _resize(image, scale)
  image = tf.image.pad_to_bounding_box(image[:image_size, :image_size], 0, 0, image_size,
                                       image_size)
  return {"image": _to_uint8(image), "image_id": tf.cast(example["image/id"], tf.int32),
          "scale": tf.cast(scale, tf.float32), "mask": tf.constant(1.0)}


def ground_truth_example(example, *, channels: int) -> dict:
  """What the COCO evaluator needs of one eval image (sasa_jax.detection.coco_eval)."""
  hw = tf.shape(_decode(example["image"], channels))[:2]
  objects = example["objects"]
  return {"id": example["image/id"], "height": hw[0], "width": hw[1],
          "boxes": objects["bbox"] * tf.cast(tf.tile(hw, [2]), tf.float32),
          "labels": objects["label"], "is_crowd": objects["is_crowd"],
          "area": objects["area"]}
