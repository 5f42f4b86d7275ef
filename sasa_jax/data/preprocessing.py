"""Per-example image preprocessing (tf.data). Randomness is stateless: the same
(seed, example) pair always gives the same crop and flip, so resumed runs see
exactly the data an uninterrupted run would."""
import tensorflow as tf

CROP_PADDING = 32  # eval: resize to size * 224 / (224 + 32), then centre crop (standard)


def _normalize(image, mean, std):
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def inception_train(encoded, seed, *, image_size, mean, std, pad=0):
  del pad  # the Inception crop has its own scale range
  """Inception-style crop (area 8-100%, aspect 3/4-4/3) of the JPEG, resize, flip."""
  shape = tf.io.extract_jpeg_shape(encoded)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, [image_size, image_size], method="bicubic")
  image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
  return _normalize(tf.clip_by_value(image, 0, 255), mean, std)


def inception_eval(encoded, *, image_size, mean, std):
  """Centre crop of size/(size+32) of the shorter side, resized to image_size."""
  shape = tf.io.extract_jpeg_shape(encoded)
  h, w = shape[0], shape[1]
  crop = tf.cast(image_size / (image_size + CROP_PADDING) *
                 tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  window = tf.stack([(h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop])
  image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, [image_size, image_size], method="bicubic")
  return _normalize(tf.clip_by_value(image, 0, 255), mean, std)


def small_train(encoded, seed, *, image_size, mean, std, pad=2):
  """Small images (28-32 px): pad-and-random-crop by `pad` pixels (0: none), random flip."""
  image = tf.io.decode_png(encoded, channels=len(mean))
  image = tf.image.resize_with_crop_or_pad(image, image_size + 2 * pad, image_size + 2 * pad)
  image = tf.image.stateless_random_crop(image, [image_size, image_size, len(mean)], seed=seed)
  image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
  return _normalize(image, mean, std)


def small_eval(encoded, *, image_size, mean, std):
  image = tf.io.decode_png(encoded, channels=len(mean))
  image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
  return _normalize(image, mean, std)


PREPROCESS = {
    "inception": (inception_train, inception_eval),
    "small": (small_train, small_eval),
}
