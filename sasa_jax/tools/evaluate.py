"""Evaluates a run's checkpoint on any split of its dataset, as the training loop evaluates.

  python -m sasa_jax.tools.evaluate --workdir=runs/demo
  python -m sasa_jax.tools.evaluate --workdir=gs://B/r50 --split=validation --step=100000 \
      --data_dir=gs://B/tfds [--weights=raw] [--batch_size=1024]

Rebuilds the model from the run's config.json, restores checkpoint --step (default: the
latest) and runs the task's evaluation (top-1, top-5 and loss; COCO mAP for detection) over
every example of --split (default: the run's eval split) once, on all devices of this
machine. --weights=ema (the default where the run kept an EMA, as the loop evaluates) or
raw. Prints the metrics as one JSON object. For runs held out of the validation set
(`holdout=true`), this is how the validation number is had at the end.
"""
import json

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sasa_jax import data as data_lib
from sasa_jax import tasks, train
from sasa_jax.logs import quiet_orbax
from sasa_jax.tools.runs import load_trained, read_config

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run directory (config.json, checkpoints/).")
flags.DEFINE_string("split", None, "TFDS split to evaluate (default: the run's eval split).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("weights", None, ["ema", "raw"],
                  "ema: the EMA weights (the run's must have kept them); raw: the trained "
                  "parameters (default: ema where the run kept them, as the loop evaluates).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the run's).")
flags.DEFINE_integer("batch_size", None,
                     "Global eval batch (default: the run's, per microbatch).")
flags.mark_flags_as_required(["workdir"])


def evaluate(workdir: str, *, split=None, step=None, weights=None, data_dir=None,
             batch_size=None) -> dict:
  """{"step", "split", "weights", **the task's eval metrics} of checkpoint `step`."""
  config = read_config(workdir)
  if split:
    config.dataset.eval_split = split
  if data_dir:
    config.dataset.data_dir = data_dir
  batch = batch_size or train.eval_batch_size(config)
  if batch <= 0 or batch % jax.device_count():
    raise ValueError(f"--batch_size={batch} must be a positive multiple of the device count "
                     f"{jax.device_count()}")
  trained = load_trained(workdir, step, weights, config)
  task = tasks.get(config)
  model = trained.model
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  restored = jax.device_put(train.TrainState(
      step=np.asarray(trained.step), params=trained.variables["params"],
      batch_stats=trained.variables["batch_stats"], opt_state=None, ema_params=None),
      replicated)
  p_eval = train.under_mesh(mesh, train.jit_eval_step(config, task, model, replicated,
                                                       batch_sharding))
  builder = data_lib.get_builder(config.dataset.name, config.dataset.data_dir)
  metrics = train.evaluate_split(p_eval, restored, builder, task,
                                 split=config.dataset.eval_split, batch_size=batch,
                                 image_size=config.dataset.image_size,
                                 batch_sharding=batch_sharding)
  return {"step": trained.step, "split": config.dataset.eval_split,
          "weights": trained.weights,
          **{k: float(v) for k, v in metrics.items()}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_orbax()
  try:
    result = evaluate(FLAGS.workdir, split=FLAGS.split, step=FLAGS.step,
                      weights=FLAGS.weights, data_dir=FLAGS.data_dir,
                      batch_size=FLAGS.batch_size)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
