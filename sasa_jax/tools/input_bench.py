"""Images per second the ImageNet training preprocessing sustains on this host's CPU cores.

  python -m sasa_jax.tools.input_bench [--images 512] [--threads 1,2] [--format json]

Encodes --images synthetic JPEGs of ImageNet's typical size (500 x 375, quality 90: smooth
colour fields with noise) once, then runs the training input's per-example work on them
through tf.data, as `data/input_pipeline.py` does: `preprocessing.inception_train` (the
JPEG's shape, an Inception crop, decoding the crop only, bicubic resize to 224, flip, uint8)
with --threads parallel calls in a private thread pool of that size, batched. Reports
images/s per setting and per thread, after one untimed pass. Reading and shuffling records
are not timed (they cost little next to decoding). A data-parallel run needs the
accelerator's images/s (docs/gpu.md) from each host's cores, per accelerator.
"""
import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf

from sasa_jax.data import preprocessing

IMAGE_SIZE = 224
JPEG_SHAPE = (375, 500)  # ImageNet's most common size (height, width)


def synthetic_jpegs(count: int, shape=JPEG_SHAPE, seed: int = 0) -> list[bytes]:
  """count JPEGs (quality 90) of smooth random colour fields with noise: photo-like
  entropy, so that decoding costs what a photo's does, unlike flat or pure-noise pixels."""
  rng = np.random.default_rng(seed)
  h, w = shape
  out = []
  for _ in range(count):
    coarse = rng.uniform(0, 255, size=(h // 25 + 1, w // 25 + 1, 3)).astype(np.float32)
    field = tf.image.resize(coarse[None], (h, w), method="bicubic")[0].numpy()
    pixels = np.clip(field + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
    out.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
  return out


def images_per_s(jpegs: list[bytes], threads: int, batch: int = 64, passes: int = 2) -> float:
  """Sustained images/s of `inception_train` over jpegs with `threads` parallel calls."""
  seeds = np.arange(2 * len(jpegs), dtype=np.int64).reshape(len(jpegs), 2)
  ds = tf.data.Dataset.from_tensor_slices((jpegs, seeds)).repeat(passes)
  ds = ds.map(lambda x, s: preprocessing.inception_train(x, s, image_size=IMAGE_SIZE),
              num_parallel_calls=threads, deterministic=False).batch(batch)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  for _ in ds.take(len(jpegs) // batch):  # untimed: thread pools and kernels warm up
    pass
  start, count = time.perf_counter(), 0
  for images in ds:
    count += int(images.shape[0])
  return count / (time.perf_counter() - start)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=512)
  p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                 help="comma-separated parallel calls (default: 1 and every core)")
  p.add_argument("--format", choices=("text", "json"), default="text")
  args = p.parse_args(argv)
  jpegs = synthetic_jpegs(args.images)
  kb = float(np.mean([len(j) for j in jpegs])) / 1024
  for threads in dict.fromkeys(int(t) for t in args.threads.split(",")):
    rate = images_per_s(jpegs, threads)
    row = {"kind": "input_pipeline", "preprocessing": "inception_train",
           "jpeg": f"{JPEG_SHAPE[1]}x{JPEG_SHAPE[0]}", "jpeg_kb": round(kb, 1),
           "image_size": IMAGE_SIZE, "threads": threads, "cores": os.cpu_count(),
           "images_per_s": round(rate, 1), "images_per_s_per_thread": round(rate / threads, 1)}
    print(json.dumps(row) if args.format == "json" else
          f"inception_train, {row['jpeg']} JPEGs ({kb:.0f} KB), {threads} thread(s): "
          f"{rate:.0f} images/s ({rate / threads:.0f} per thread)", flush=True)


if __name__ == "__main__":
  main()
