"""ImageNet's preprocessing (data/preprocessing.py) on JPEGs whose pixels say where they are."""
import numpy as np
import tensorflow as tf

from sasa_jax.data import preprocessing

H, W = 200, 256


def _position_jpeg():
  """A [H, W, 3] JPEG with red = the row (0-255 over the height) and green = the column."""
  rows = np.broadcast_to(np.linspace(0, 255, H)[:, None], (H, W))
  cols = np.broadcast_to(np.arange(W, dtype=np.float64)[None, :], (H, W))
  pixels = np.stack([rows, cols, np.full((H, W), 128.0)], axis=-1).round().astype(np.uint8)
  return tf.io.encode_jpeg(pixels, quality=100)


def _window(image):
  """(top, left, height, width, flipped) of the source window an output shows, read off the
  red and green of its edge rows and columns (in source pixels)."""
  image = image.astype(np.float64)
  top, bottom = (image[i, :, 0].mean() * (H - 1) / 255 for i in (0, -1))
  first, last = image[:, 0, 1].mean(), image[:, -1, 1].mean()
  left, right = min(first, last), max(first, last)
  return top, left, bottom - top, right - left, first > last


def test_eval_is_the_centre_crop_of_224_256_of_the_shorter_side():
  out = preprocessing.inception_eval(_position_jpeg(), image_size=64).numpy()
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  # crop = int(200 * 64 / 96) = 133 pixels, at ((200 - 133 + 1) // 2, (256 - 133 + 1) // 2)
  top, left, height, width, flipped = _window(out)
  assert not flipped
  np.testing.assert_allclose([top, left, height, width], [34, 62, 132, 132], atol=2.5)


def test_train_crops_are_inception_crops_flipped_half_the_time_by_the_seed():
  encoded = _position_jpeg()
  windows = []
  for s in range(48):
    out = preprocessing.inception_train(encoded, tf.constant([7, s]), image_size=32).numpy()
    again = preprocessing.inception_train(encoded, tf.constant([7, s]), image_size=32).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, again)  # a function of the seed
    windows.append(_window(out))
  top, left, height, width, flipped = (np.array(v) for v in zip(*windows))
  area = (height + 1) * (width + 1) / (H * W)
  aspect = (width + 1) / (height + 1)
  # area 8-100% of the image, aspect 3/4-4/3 (a pixel's slack for reading the edges)
  assert area.min() > 0.07 and area.max() < 1.02, area
  assert aspect.min() > 0.7 and aspect.max() < 1.42, aspect
  assert area.min() < 0.2 and area.max() > 0.6  # the range is used, not one scale
  assert len({round(t) for t in top}) > 10 and len({round(v) for v in left}) > 10
  assert 12 <= flipped.sum() <= 36
