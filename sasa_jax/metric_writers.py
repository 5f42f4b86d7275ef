"""metrics.jsonl next to clu's TensorBoard writer, in a local or gs:// workdir."""
import contextlib
import json
import os

import numpy as np
from clu import metric_writers
from etils import epath


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write_scalars call: {"step": s, "name": value, ...}."""

  def __init__(self, path: epath.PathLike):
    # epath's gs:// open is a context manager around a GFile: keep it entered until close().
    self._files = contextlib.ExitStack()
    self._file = self._files.enter_context(epath.Path(path).open("a"))

  def write_scalars(self, step, scalars):
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")

  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_summaries(self, step, values, metadata=None): pass
  def write_hparams(self, hparams): pass

  def flush(self):
    self._file.flush()  # on object storage: uploads the file so far
    if hasattr(self._file, "fileno"):
      os.fsync(self._file.fileno())

  def close(self):
    self.flush()
    self._files.close()


def create_writer(workdir: epath.PathLike, is_main: bool) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl on the main process; logging only elsewhere."""
  default = metric_writers.create_default_writer(str(workdir), just_logging=not is_main)
  if not is_main:
    return default
  return metric_writers.MultiWriter([default, JsonlWriter(epath.Path(workdir) / "metrics.jsonl")])
