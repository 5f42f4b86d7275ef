"""Per-example image preprocessing (tf.data). Randomness is stateless: the same
(seed, example) pair always gives the same crop and flip, so resumed runs see
exactly the data an uninterrupted run would.

Images leave the host as uint8 pixels (a quarter of float32's bytes on the host-to-device
link); `normalize` turns them into float inputs on the device, inside the jitted step."""
import tensorflow as tf

CROP_PADDING = 32  # eval: resize to size * 224 / (224 + 32), then centre crop (standard)


def _to_uint8(image):
  """Resized (float) pixels back to uint8, rounded and clipped to [0, 255]."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def normalize(images, mean, std):
  """uint8 pixels [..., C] -> float32 (x - mean) / std, on the device (jax.numpy)."""
  import jax.numpy as jnp  # noqa: PLC0415 - this module is otherwise tf.data only
  return (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32)


def inception_train(encoded, seed, *, image_size, channels=3, pad=0):
  """Inception-style crop (area 8-100%, aspect 3/4-4/3) of the JPEG, resize, flip: uint8."""
  del pad  # the Inception crop has its own scale range
  shape = tf.io.extract_jpeg_shape(encoded)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  image = tf.io.decode_and_crop_jpeg(encoded, window, channels=channels)
  image = tf.image.resize(image, [image_size, image_size], method="bicubic")
  image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
  return _to_uint8(image)


def inception_eval(encoded, *, image_size, channels=3):
  """Centre crop of size/(size+32) of the shorter side, resized to image_size."""
  shape = tf.io.extract_jpeg_shape(encoded)
  h, w = shape[0], shape[1]
  crop = tf.cast(image_size / (image_size + CROP_PADDING) *
                 tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  window = tf.stack([(h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop])
  image = tf.io.decode_and_crop_jpeg(encoded, window, channels=channels)
  image = tf.image.resize(image, [image_size, image_size], method="bicubic")
  return _to_uint8(image)


def small_train(encoded, seed, *, image_size, channels, pad=2):
  """Small images (28-32 px): pad-and-random-crop by `pad` pixels (0: none), random flip."""
  image = tf.io.decode_png(encoded, channels=channels)
  image = tf.image.resize_with_crop_or_pad(image, image_size + 2 * pad, image_size + 2 * pad)
  if pad:  # (a crop of the whole image would only cost the host time)
    image = tf.image.stateless_random_crop(image, [image_size, image_size, channels], seed=seed)
  return tf.image.stateless_random_flip_left_right(image, seed=seed + 1)


def small_eval(encoded, *, image_size, channels):
  image = tf.io.decode_png(encoded, channels=channels)
  return tf.image.resize_with_crop_or_pad(image, image_size, image_size)


PREPROCESS = {
    "inception": (inception_train, inception_eval),
    "small": (small_train, small_eval),
}
