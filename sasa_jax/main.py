"""python -m sasa_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE]"""
import gc

# Python's cyclic garbage collector, left on, walks the heap of every module imported so far
# again and again while jax, TensorFlow and flax import (about half a million objects), and
# once more at interpreter exit. Off until the imports are done, then that heap is frozen out
# of its reach: 3 core-seconds less for a short run of a small model (docs/performance.md).
if __name__ == "__main__":
  gc.disable()

from absl import app, flags, logging  # noqa: E402

from sasa_jax import cli, distributed, peer_failure  # noqa: E402
from sasa_jax.logs import quiet_orbax  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
cli.define_config()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_orbax()
  distributed.initialize_from_env()
  with peer_failure.stop_all_on_error():  # several processes: one fails, all stop now
    from sasa_jax import train  # after distributed start-up, before any other device use
    gc.freeze()
    gc.enable()
    logging.info("config:\n%s", FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  gc.freeze()  # what the run leaves behind is freed by the exit, not walked first


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
