"""TFDS input pipelines: per-host shards, deterministic order, resumable position.

Every process reads its own slice of each split (`tfds.split_for_jax_process`).
Training order is a pure function of (seed, epoch): files are read in one seeded
order and examples reshuffled per epoch with seed + epoch, and each example's
augmentation is seeded by (seed, its position in the run). Resuming at step s
therefore jumps to the right epoch and skips the encoded records before the
position (no decoding), and yields exactly the batches an uninterrupted run would.
"""
import dataclasses
import math
from typing import Callable

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sasa_jax.data import fashion_mnist
from sasa_jax.data.preprocessing import PREPROCESS


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a TFDS dataset."""
  preprocess: str               # key of PREPROCESS
  mean: tuple                   # per-channel, in [0, 255] pixel units
  std: tuple
  prepare: Callable | None      # prepares the dataset in data_dir, or None if manual
  how_to_prepare: str


DATASETS = {
    "imagenet2012": DatasetSpec(
        "inception", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), None,
        "Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into "
        "DATA_DIR/downloads/manual and run `tfds build imagenet2012 --data_dir=DATA_DIR`, "
        "or point dataset.data_dir at an existing prepared copy (local or gs://)."),
    "fashion_mnist": DatasetSpec(
        "small", (72.94,), (90.02,), fashion_mnist.prepare,
        "`make data` (Debian's dataset-fashion-mnist), or network access for TFDS's download; "
        "it is then prepared automatically."),
}


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `name`, preparing it first where we know how."""
  if name not in DATASETS:
    raise ValueError(f"dataset.name={name!r} is not allowed; choose one of {tuple(DATASETS)}")
  spec = DATASETS[name]
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if spec.prepare is not None:
    try:
      return spec.prepare(data_dir)
    except Exception as e:  # noqa: BLE001 - re-raised with the instructions
      raise FileNotFoundError(f"dataset {name!r} is not prepared in data_dir={data_dir!r} and "
                              f"preparing it failed ({e}). {spec.how_to_prepare}") from e
  raise FileNotFoundError(f"dataset {name!r} is not prepared in data_dir={builder.data_dir!r}. "
                          f"{spec.how_to_prepare}")


def _records(builder, split, seed):
  return builder.as_dataset(
      split, shuffle_files=True, decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False))


def train_dataset(builder, *, split: str, per_host_batch: int, image_size: int, seed: int,
                  start_step: int = 0, shuffle_buffer: int = 16_384,
                  crop_padding: int = 2) -> tf.data.Dataset:
  """Endless batches {"image": [b, S, S, C] float32, "label": [b] int32} for this host,
  starting at global step `start_step`. crop_padding: random-crop margin of small images."""
  spec = DATASETS[builder.name]
  train_fn = PREPROCESS[spec.preprocess][0]
  host_split = tfds.split_for_jax_process(split, drop_remainder=True)
  n_host = builder.info.splits[host_split].num_examples
  records = _records(builder, host_split, seed)
  epoch0, offset = divmod(start_step * per_host_batch, n_host)

  def epoch(e):
    shuffled = records.shuffle(min(shuffle_buffer, n_host), seed=seed + e,
                               reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, ex: (e * n_host + i, ex))

  def preprocess(index, ex):
    example_seed = tf.stack([tf.constant(seed, tf.int64), index])
    image = train_fn(ex["image"], example_seed, image_size=image_size, mean=spec.mean,
                     std=spec.std, pad=crop_padding)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  ds = tf.data.Dataset.range(epoch0, 2**40).flat_map(epoch).skip(offset)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(per_host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_steps(builder, split: str, global_batch: int) -> int:
  """Eval batches every host runs so that all examples of `split` are covered once."""
  per_host = math.ceil(builder.info.splits[split].num_examples / jax.process_count())
  return math.ceil(per_host / (global_batch // jax.process_count()))


def eval_dataset(builder, *, split: str, per_host_batch: int, image_size: int,
                 num_steps: int) -> tf.data.Dataset:
  """`num_steps` batches with a "mask" (1 real, 0 padding) covering this host's slice."""
  spec = DATASETS[builder.name]
  eval_fn = PREPROCESS[spec.preprocess][1]
  host_split = tfds.split_for_jax_process(split, drop_remainder=False)
  n_host = builder.info.splits[host_split].num_examples
  ds = builder.as_dataset(host_split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {
      "image": eval_fn(ex["image"], image_size=image_size, mean=spec.mean, std=spec.std),
      "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(1.0)},
              num_parallel_calls=tf.data.AUTOTUNE)
  pad = num_steps * per_host_batch - n_host
  padding = {"image": tf.zeros([image_size, image_size, len(spec.mean)]),
             "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad))
  return ds.batch(per_host_batch).prefetch(tf.data.AUTOTUNE)


def num_examples(builder, split: str) -> int:
  return builder.info.splits[split].num_examples


def to_global(batch, sharding):
  """This host's numpy batch -> one global jax.Array per leaf, sharded by `sharding`.

  The one place where host data becomes device data (training, eval and tests)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)
