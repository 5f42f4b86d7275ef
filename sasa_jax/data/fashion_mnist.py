"""Fashion-MNIST in TFDS format from Debian's `dataset-fashion-mnist` package.

TFDS's own `fashion_mnist` builder downloads the four IDX files; this subclass takes
them from /usr/share/datasets/fashion-mnist when they are there and otherwise defers
to the download. It writes the same `fashion_mnist/3.0.1` dataset, so the input
pipeline reads it with `tfds.builder("fashion_mnist")` like any other TFDS dataset.
"""
import os

import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_data": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_data": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def local_files(directory: str = DEBIAN_DIR) -> dict | None:
  """The four IDX .gz paths in `directory`, or None if any is missing."""
  paths = {k: os.path.join(directory, v) for k, v in FILES.items()}
  return paths if all(os.path.exists(p) for p in paths.values()) else None


class FashionMnistLocal(mnist.FashionMNIST, skip_registration=True):
  """TFDS's fashion_mnist, reading the IDX files from a local directory."""
  name = "fashion_mnist"
  source_dir = DEBIAN_DIR

  def _split_generators(self, dl_manager):
    paths = local_files(self.source_dir)
    if paths is None:
      return super()._split_generators(dl_manager)
    files = dl_manager.extract(paths)
    return [
        tfds.core.SplitGenerator(name=split, gen_kwargs=dict(
            num_examples=count, data_path=files[f"{prefix}_data"],
            label_path=files[f"{prefix}_labels"]))
        for split, prefix, count in ((tfds.Split.TRAIN, "train", 60_000),
                                     (tfds.Split.TEST, "test", 10_000))
    ]


def prepare(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Writes fashion_mnist into data_dir (TFDS's default if None) unless already there."""
  builder = FashionMnistLocal(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
