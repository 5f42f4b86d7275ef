"""metrics.jsonl next to clu's TensorBoard writer, in a local or gs:// workdir."""
import contextlib
import json
import os
import time

import numpy as np
from clu import metric_writers
from etils import epath

from sasa_jax.checkpoint_match import flat_config


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write_scalars call: {"step": s, "name": value, ...}.

  In a local file each row reaches the operating system as it is written: a reader (a
  plot, a test, `tail -f`) sees every logged step, and a killed process loses none. On
  object storage a flush uploads the whole object, so rows are uploaded at most every
  `upload_every_secs` seconds, and at flush() and close()."""

  def __init__(self, path: epath.PathLike, upload_every_secs: float = 30.0):
    # epath's gs:// open is a context manager around a GFile: keep it entered until close().
    self._files = contextlib.ExitStack()
    self._file = self._files.enter_context(epath.Path(path).open("a"))
    self._local = hasattr(self._file, "fileno")
    self._upload_every_secs = upload_every_secs
    self._uploaded_at = time.monotonic()

  def write_scalars(self, step, scalars):
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    if self._local:
      self._file.flush()
    elif time.monotonic() - self._uploaded_at >= self._upload_every_secs:
      self.flush()

  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_summaries(self, step, values, metadata=None): pass
  def write_hparams(self, hparams): pass

  def flush(self):
    self._file.flush()  # on object storage: uploads the file so far
    self._uploaded_at = time.monotonic()
    if self._local:
      os.fsync(self._file.fileno())

  def close(self):
    self.flush()
    self._files.close()


def hparams(config) -> dict:
  """Every config field, dotted (model.kernel_size, schedule.peak_value, ...), as
  TensorBoard's HParams dashboard takes them (bool, int, float or str): a sequence in its
  flag form ("2,3,4", "()"), None as "none". The dashboard then tells ablations apart by the
  fields they change."""
  def value(v):
    if isinstance(v, (list, tuple)):
      return ",".join(str(x) for x in v) or "()"
    return "none" if v is None else v
  return {k: value(v) for k, v in flat_config(config).items()}


def create_writer(workdir: epath.PathLike, is_main: bool) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl on the main process; logging only elsewhere."""
  default = metric_writers.create_default_writer(str(workdir), just_logging=not is_main)
  if not is_main:
    return default
  return metric_writers.MultiWriter([default, JsonlWriter(epath.Path(workdir) / "metrics.jsonl")])
