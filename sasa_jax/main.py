"""python -m sasa_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE]"""
from absl import app, flags, logging
from ml_collections import config_flags

from sasa_jax import distributed
from sasa_jax.logs import quiet_orbax

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_orbax()
  distributed.initialize_from_env()
  from sasa_jax import train  # after distributed start-up, before any other device use
  logging.info("config:\n%s", FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
