"""TFDS input pipelines: per-host shards, deterministic order, resumable position.

Every process reads its own even slice of each split (as `tfds.split_for_jax_process`).
Training order is a pure function of (seed, epoch): each epoch takes the host's files in its
own seeded order. A slice of at most one shuffle window (`window_records`: `shuffle_buffer`
records, or `dataset.shuffle_window_mib` MiB of them where that is more) streams through a
buffer seeded with (seed, epoch); a larger one is cut into windows, each read whole and
shuffled by (seed, epoch, window). Each example's augmentation is seeded by (seed, process,
its position in the run), so that hosts draw different crops and flips. Resuming at step s
therefore jumps to the right epoch and window, reads the encoded records of that window
before the position without decoding them, and yields exactly the batches an uninterrupted
run would.
"""
import dataclasses
import functools
import math
import os
from typing import Callable

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from sasa_jax.data import detection
from sasa_jax.data import fashion_mnist
from sasa_jax.data import fashion_mnist_detection
from sasa_jax.data import preprocessing
from sasa_jax.data.preprocessing import PREPROCESS

# tf.data runs on the host. A TensorFlow built with CUDA (one a GPU cluster's environment may
# hold instead of tensorflow-cpu) would otherwise reserve most of every GPU's memory at its
# first operation, memory JAX then cannot have.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already started its devices (the importer ran an op)
  logging.warning("TensorFlow's devices were started before sasa_jax.data was imported: "
                  "a CUDA build of TensorFlow may hold GPU memory that JAX needs")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a TFDS dataset."""
  preprocess: str               # key of PREPROCESS ("detection": sasa_jax.data.detection)
  mean: tuple                   # per-channel, in [0, 255] pixel units
  std: tuple
  prepare: Callable | None      # prepares the dataset in data_dir, or None if manual
  how_to_prepare: str
  task: str = "classification"  # or "detection" (coco/2017's features)
  num_classes: int | None = None


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
    "coco/2017": DatasetSpec(
        "detection", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), None,
        "Run `tfds build coco/2017 --data_dir=DATA_DIR` on a machine with network access "
        "(about 25 GB), or point dataset.data_dir at an existing prepared copy (local or "
        "gs://).", task="detection", num_classes=80),
    "fashion_mnist_detection": DatasetSpec(
        "detection", (72.94,), (90.02,), fashion_mnist_detection.prepare,
        "`make data` (Debian's dataset-fashion-mnist); it is then generated automatically.",
        task="detection", num_classes=10),
}


def spec_of(builder) -> DatasetSpec:
  """The DatasetSpec of a TFDS builder ("coco/2017" is registered with its config)."""
  if builder.name in DATASETS:
    return DATASETS[builder.name]
  return DATASETS[f"{builder.name}/{builder.builder_config.name}"]


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
  versions = epath.Path(builder.data_dir).parent  # DATA_DIR/NAME, one folder per version
  found = sorted(p.parent.name for p in versions.glob("*/dataset_info.json"))
  raise FileNotFoundError(
      f"dataset {name!r} is not prepared in config.dataset.data_dir={data_dir!r}: TFDS reads "
      f"version {builder.version} from {builder.data_dir}, which has no dataset_info.json"
      + (f" (it holds version(s) {', '.join(found)} only, which this tensorflow-datasets "
         f"release does not read: prepare {builder.version} there)" if found else "")
      + f". {spec.how_to_prepare}")


# The pipeline's functions have no tensor-dependent Python control flow: traced as they are,
# without AutoGraph's source conversion (0.7 s of CPU in each process's start-up). A `for` or
# `if` on a tensor added to them fails at trace time ("using a tf.Tensor as a Python bool").
_graph = tf.autograph.experimental.do_not_convert


def _host_split(split: str, process_index: int, process_count: int, drop_remainder: bool):
  """This process's even slice of `split` (tfds.split_for_jax_process, process given)."""
  return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]


def augmentation_seed(seed, process_index, index):
  """The [2] stateless seed of the example at run position `index` on `process_index`:
  each process draws its own crops and flips."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(process_index, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def _file_pieces(builder, host_split, max_records: int):
  """The host's records as pieces of files, {"path", "skip", "take"} arrays, none of more
  than `max_records` records (TFDS's file instructions, the larger ones cut)."""
  pieces = []
  for f in builder.info.splits[host_split].file_instructions:
    for start in range(0, f.take, max_records):
      pieces.append((str(f.filename), f.skip + start, min(max_records, f.take - start)))
  path, skip, take = zip(*pieces)
  return {"path": np.array(path), "skip": np.array(skip, np.int64),
          "take": np.array(take, np.int64)}


def _read_pieces(pieces: tf.data.Dataset, count) -> tf.data.Dataset:
  """The serialized records of `pieces` ({"path", "skip", "take"} elements), `count` of
  them read in parallel, in a deterministic order."""
  return pieces.interleave(
      _graph(lambda f: tf.data.TFRecordDataset(f["path"]).skip(f["skip"]).take(f["take"])),
      cycle_length=count, block_length=1, deterministic=True,
      num_parallel_calls=tf.data.AUTOTUNE)


def _deserialize(builder):
  return _graph(functools.partial(builder.info.features.deserialize_example,
                                  decoders={"image": tfds.decode.SkipDecoding()}))


def _epoch_records(builder, host_split, *, seed, epoch, shuffle_buffer, skip=0):
  """The host's serialized examples of epoch `epoch` (a tensor), in an order that is a
  function of (seed, epoch) alone: files shuffled per epoch, then examples through a seeded
  buffer. The first `skip` of them (a tensor) are dropped: a resumed run parses only what it
  trains on."""
  n_host = builder.info.splits[host_split].num_examples
  files = _file_pieces(builder, host_split, n_host)  # TFDS's file instructions, uncut
  order = tf.data.Dataset.from_tensor_slices(files).shuffle(
      len(files["take"]), seed=2 * (seed + epoch) + 1, reshuffle_each_iteration=False)
  serialized = _read_pieces(order, min(16, len(files["take"])))
  return serialized.shuffle(min(shuffle_buffer, n_host), seed=2 * (seed + epoch),
                            reshuffle_each_iteration=False).skip(skip)


# A resumed run must read again the records its shuffle drew from before its position. A host
# slice of more than one window is therefore shuffled window by window, and a resume reads at
# most its own window again (ImageNet on one host: about 16,000 of 1.28 M records).
WINDOW_MIB = 256  # base_config's dataset.shuffle_window_mib
_WINDOW_STREAM = 0x5A5A  # keeps the windows' random stream apart from augmentation's


def window_records(builder, shuffle_buffer: int, window_mib: float = WINDOW_MIB) -> int:
  """The records a shuffle window holds: `shuffle_buffer`, or `window_mib` MiB of the
  dataset's mean record where that is more (a small-record dataset is shuffled as a whole)."""
  splits = builder.info.splits.values()
  record_bytes = sum(s.num_bytes for s in splits) / max(1, sum(s.num_examples for s in splits))
  return max(shuffle_buffer, int(window_mib * 2**20 // record_bytes) if record_bytes else 0)


def _window_plan(pieces, *, seed, epoch, window: int):
  """Epoch `epoch`'s (a tensor) windows: "order", the pieces in the epoch's order, drawn from
  (seed, epoch); "window", each of those pieces' window: the pieces that start within one span
  of `window` records of that order; "start" and "size", each window's first position in the
  epoch and its records (at most 2 * window); "seed", the epoch's [2] random seed."""
  epoch_seed = tf.random.experimental.stateless_fold_in(
      tf.stack([tf.cast(seed, tf.int64), tf.constant(_WINDOW_STREAM, tf.int64)]), epoch)
  order = tf.random.experimental.stateless_shuffle(tf.range(len(pieces["take"])), epoch_seed)
  take = tf.gather(pieces["take"], order)
  start = tf.cumsum(take, exclusive=True)  # of each piece in the epoch
  piece_window = start // window
  return {"order": order, "window": piece_window, "seed": epoch_seed,
          "start": tf.math.segment_min(start, piece_window),
          "size": tf.math.segment_sum(take, piece_window)}


def _epoch_windows(pieces, *, seed, epoch, window: int, offset):
  """Epoch `epoch` (a tensor) of the host's serialized records with their positions in the
  epoch, (int64, string) pairs, from position `offset` (a tensor) on, window by window
  (`_window_plan`), each read whole into a shuffle buffer seeded by (seed, epoch, window).
  The windows before `offset`'s are not read."""
  plan = _window_plan(pieces, seed=seed, epoch=epoch, window=window)
  first = tf.searchsorted(plan["start"], tf.reshape(offset, [1]), side="right",
                          out_type=tf.int64)[0] - 1

  def records(w):  # window w's records, shuffled, from `offset` on
    mine = tf.gather(plan["order"], tf.where(plan["window"] == w)[:, 0])
    files = tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(
        lambda a: tf.gather(a, mine), pieces))
    drop = tf.maximum(offset - plan["start"][w], 0)
    shuffled = _read_pieces(files, 16).shuffle(
        plan["size"][w], seed=tf.random.experimental.stateless_fold_in(plan["seed"], w)[0],
        reshuffle_each_iteration=False).skip(drop)
    return shuffled.enumerate(start=plan["start"][w] + drop)

  return tf.data.Dataset.range(first, plan["window"][-1] + 1).flat_map(_graph(records))


def train_dataset(builder, *, split: str, per_host_batch: int, image_size: int, seed: int,
                  start_step: int = 0, shuffle_buffer: int = 16_384, crop_padding: int = 2,
                  detection_options: detection.DetectionOptions | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  window_mib: float = WINDOW_MIB, window: int | None = None
                  ) -> tf.data.Dataset:
  """Endless batches for this host, starting at global step `start_step`:
  classification {"image": [b, S, S, C] uint8, "label": [b] int32}; detection as
  sasa_jax.data.detection.train_example's. crop_padding: random-crop margin of small
  images. process_index/count default to jax's (given explicitly only to inspect another
  host). window: records per shuffle window, default `window_records(builder,
  shuffle_buffer, window_mib)`; a host slice of at most one window streams through a
  `shuffle_buffer` buffer instead."""
  spec = spec_of(builder)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  host_split = _host_split(split, process_index, process_count, drop_remainder=True)
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise ValueError(f"dataset {builder.name!r} is stored as {builder.info.file_format.value}; "
                     "the training pipeline reads tfrecord datasets (`tfds build "
                     "--file_format=tfrecord`)")
  n_host = builder.info.splits[host_split].num_examples
  window = window or window_records(builder, shuffle_buffer, window_mib)
  epoch0, offset = divmod(start_step * per_host_batch, n_host)

  def from_offset(e):  # where epoch e starts: at `offset` in the first, at 0 after
    return tf.where(e == epoch0, tf.constant(offset, tf.int64), tf.constant(0, tf.int64))

  def preprocess(index, ex):
    example_seed = augmentation_seed(seed, process_index, index)
    if spec.task == "detection":
      return detection.train_example(ex, example_seed, image_size=image_size,
                                     channels=len(spec.mean),
                                     options=detection_options or detection.DetectionOptions())
    image = PREPROCESS[spec.preprocess][0](ex["image"], example_seed, image_size=image_size,
                                           channels=len(spec.mean), pad=crop_padding)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  epochs = tf.data.Dataset.range(epoch0, 2**40)
  n_windows = -(-n_host // window)
  span = -(-n_host // n_windows)  # the windows' equal spans, of at most `window` records
  how = (f"streamed through a shuffle buffer of {min(shuffle_buffer, n_host):,}"
         if n_windows == 1 else f"in {n_windows} shuffle windows of about {span:,} records "
         "(a resume reads its window again)")
  logging.info("training data: %s records of %r on this host, %s; from epoch %d, record %d",
               f"{n_host:,}", split, how, epoch0, offset)
  pieces = _file_pieces(builder, host_split, span) if n_windows > 1 else None

  def epoch(e):  # (position in the run, serialized record) pairs of epoch e
    if n_windows == 1:  # streamed through the shuffle buffer
      skip = from_offset(e)
      records = _epoch_records(builder, host_split, seed=seed, epoch=e,
                               shuffle_buffer=shuffle_buffer, skip=skip).enumerate(start=skip)
    else:  # window by window
      records = _epoch_windows(pieces, seed=seed, epoch=e, window=span, offset=from_offset(e))
    return records.map(_graph(lambda i, s: (e * n_host + i, s)))

  ds = epochs.flat_map(_graph(epoch))
  if n_windows > 1:
    # a window's records are all read before its first comes out: the prefetch reads the
    # next window while this one trains
    ds = ds.prefetch(span)
  ds = ds.map(_graph(lambda i, s: (i, _deserialize(builder)(s))))
  ds = ds.map(_graph(preprocess), num_parallel_calls=host_cpus())
  ds = ds.batch(per_host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_WITHOUT_AUTOTUNE_MODEL)


def host_cpus() -> int:
  """The CPUs this process may run on (a SLURM task's or a container's share of the host),
  as TensorFlow counts its own threads."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


# tf.data's autotuning runs a model thread that an endless iterator's deletion waits for,
# holding the GIL, until that thread's next optimisation round: up to a minute, at the end of
# every run and preemption (TensorFlow 2.21: deletions of 0.5-9 s after 3-15 s of
# iteration, measured on a 2-core AMD EPYC; none without the model). The training stream
# runs without it: the map takes every CPU of the process (what autotuning tends to), the
# prefetch buffer still sizes itself (its own autotuner needs no model thread).
_WITHOUT_AUTOTUNE_MODEL = tf.data.Options()
_WITHOUT_AUTOTUNE_MODEL.autotune.enabled = False


def eval_steps(builder, split: str, global_batch: int) -> int:
  """Eval batches every host runs so that all examples of `split` are covered once."""
  per_host = math.ceil(builder.info.splits[split].num_examples / jax.process_count())
  return math.ceil(per_host / (global_batch // jax.process_count()))


def eval_dataset(builder, *, split: str, per_host_batch: int, image_size: int,
                 num_steps: int) -> tf.data.Dataset:
  """`num_steps` batches with a "mask" (1 real, 0 padding) covering this host's slice:
  classification {"image", "label", "mask"}; detection as
  sasa_jax.data.detection.eval_example's."""
  spec = spec_of(builder)
  channels = len(spec.mean)

  def preprocess(ex):
    if spec.task == "detection":
      return detection.eval_example(ex, image_size=image_size, channels=channels)
    return {"image": PREPROCESS[spec.preprocess][1](ex["image"], image_size=image_size,
                                                    channels=channels),
            "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(1.0)}

  host_split = _host_split(split, jax.process_index(), jax.process_count(), drop_remainder=False)
  n_host = builder.info.splits[host_split].num_examples
  ds = builder.as_dataset(host_split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(_graph(preprocess), num_parallel_calls=tf.data.AUTOTUNE)
  pad = num_steps * per_host_batch - n_host
  padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad))
  return ds.batch(per_host_batch).prefetch(tf.data.AUTOTUNE)


def ground_truth(builder, split: str):
  """Every image of `split` once, as numpy dicts for sasa_jax.detection.coco_eval (read on
  one host; the images are decoded only for their size)."""
  spec = spec_of(builder)
  ds = builder.as_dataset(split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(_graph(lambda ex: detection.ground_truth_example(ex, channels=len(spec.mean))),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def normalize(images, dataset_name: str):
  """uint8 images from these pipelines -> the model's float32 inputs (on the device)."""
  spec = DATASETS[dataset_name]
  return preprocessing.normalize(images, spec.mean, spec.std)


def num_examples(builder, split: str) -> int:
  return builder.info.splits[split].num_examples


def to_global(batch, sharding):
  """This host's numpy batch -> one global jax.Array per leaf, sharded by `sharding`.

  The one place where host data becomes device data (training, eval and tests)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)
