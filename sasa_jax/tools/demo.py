"""The Fashion-MNIST demo: a SASA ResNet learns real images on the CPU.

  python -m sasa_jax.tools.demo [--workdir runs/demo] [--fresh] [--config.FIELD=VALUE ...]

Trains configs/fashion_mnist.py (attention in residual groups 3-4, one of Table 3's two best
rows; a 3x3 conv stem for 28 px images) on the 60,000 training images, evaluates on all
10,000 test images, and prints the test accuracy, the parameter count, the training images/s
and the wall time.
Running it again resumes the run in --workdir (or finishes at once if it is done);
--fresh deletes the workdir first.
"""
import gc

if __name__ == "__main__":
  gc.disable()  # until the imports are done, as in sasa_jax/main.py (runs.train_or_resume)

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sasa_jax import cli  # noqa: E402
from sasa_jax.tools.runs import read_metrics, train_or_resume  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Where the run lives.")
flags.DEFINE_bool("fresh", False, "Delete --workdir first instead of resuming it.")
cli.define_config(os.path.join(ROOT, "configs", "fashion_mnist.py"), "Training config.")


def summary(workdir: str) -> dict:
  """The last eval row of metrics.jsonl, with the median training images/s and input wait
  of its log steps (where it has any)."""
  rows = read_metrics(workdir)
  final = dict([r for r in rows if "eval/accuracy" in r][-1])
  timed = [r for r in rows if "images_per_sec" in r]
  if timed:
    final["images_per_sec"] = float(np.median([r["images_per_sec"] for r in timed]))
    final["input_wait_fraction"] = float(np.median([r["input_wait_fraction"] for r in timed]))
  return final


def main(argv):
  del argv
  start = time.time()
  params = train_or_resume(FLAGS.config, FLAGS.workdir, FLAGS.fresh)
  final = summary(FLAGS.workdir)
  model = dict(FLAGS.config.model)
  print(f"\nsasa_jax demo: ResNet-{model['depth']} {model['variant']} (attention groups "
        f"{tuple(model.get('attention_groups', ()))}, k={model['kernel_size']}) on Fashion-MNIST")
  print(f"  test accuracy  {final['eval/accuracy']:.4f} on {int(final['eval/num_examples'])} "
        f"test images (top-5 {final['eval/top5_accuracy']:.4f}) at step {final['step']}")
  print(f"  parameters     {params:,}")
  if "images_per_sec" in final:
    print(f"  training       {final['images_per_sec']:,.0f} images/s, "
          f"{final['input_wait_fraction']:.0%} of the time waiting for input (medians over "
          "log steps)")
  print(f"  wall time      {time.time() - start:.0f} s (this invocation)")
  print(f"  run directory  {FLAGS.workdir} (metrics.jsonl, TensorBoard events, checkpoints)")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
