"""The detection demo: a small attention RetinaNet learns to find Fashion-MNIST items.

  python -m sasa_jax.tools.detect_demo [--workdir runs/detect] [--fresh] [--config.FIELD=VALUE]

Trains configs/fashion_mnist_detection.py (attention backbone groups 3-4, SASA FPN and
heads) on 12,000 canvases of real Fashion-MNIST items, evaluates COCO mAP with pycocotools
on the 2,000 held-out canvases, and writes WORKDIR/detections.png: predicted boxes (solid,
with class and score) next to the truth (dashed) on held-out images. Running it again
resumes the run in --workdir (or finishes at once if it is done); --fresh starts over.
"""
import gc

if __name__ == "__main__":
  gc.disable()  # until the imports are done, as in sasa_jax/main.py (runs.train_or_resume)

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from sasa_jax import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/detect", "Where the run lives.")
flags.DEFINE_bool("fresh", False, "Delete --workdir first instead of resuming it.")
flags.DEFINE_integer("images", 8, "Held-out images drawn in detections.png.")
cli.define_config(os.path.join(ROOT, "configs", "fashion_mnist_detection.py"),
                  "Training config.")


def predict(trained, images):
  """Detections of a trained run (`runs.load_trained`) on uint8 images [B, S, S, C]: (boxes
  in the images' pixels, scores, classes, valid) as numpy, as the evaluation decodes them."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from sasa_jax import tasks  # noqa: PLC0415
  task = tasks.Detection(trained.config)
  outputs = trained(images)
  batch = {"scale": np.ones(len(images), np.float32), "image_id": np.zeros(len(images)),
           "mask": np.ones(len(images))}
  out = jax.device_get(task.eval_outputs(outputs, batch))
  return out["boxes"], out["scores"], out["classes"], out["valid"]


def draw(workdir: str, num_images: int, out: str, min_score: float = 0.3) -> str:
  """Predicted boxes next to the truth on the first `num_images` held-out images."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from sasa_jax import data as data_lib  # noqa: PLC0415
  from sasa_jax.data.fashion_mnist_detection import CLASS_NAMES  # noqa: PLC0415
  from sasa_jax.detection.anchors import iou  # noqa: PLC0415
  from sasa_jax.tools.runs import load_trained  # noqa: PLC0415
  trained = load_trained(workdir)
  config = trained.config
  builder = data_lib.get_builder(config.dataset.name, config.dataset.data_dir)
  split = f"{config.dataset.eval_split.split('[')[0]}[:{num_images}]"
  batch = next(data_lib.eval_dataset(builder, split=split, per_host_batch=num_images,
                                     image_size=config.dataset.image_size,
                                     num_steps=1).as_numpy_iterator())
  truth = list(data_lib.ground_truth(builder, split))
  boxes, scores, classes, valid = predict(trained, batch["image"])
  cols = min(4, num_images)
  rows = -(-num_images // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= num_images:
      continue
    ax.imshow(batch["image"][i, ..., 0], cmap="gray")
    for (y0, x0, y1, x1), label in zip(truth[i]["boxes"], truth[i]["labels"]):
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", ec="lime"))
    drawn = []  # one label per object: skip a box that overlaps a better one (any class)
    for j in np.nonzero(valid[i] & (scores[i] >= min_score))[0]:
      if drawn and float(np.max(iou(boxes[i, j][None], boxes[i, drawn]))) > 0.7:
        continue
      drawn.append(j)
      y0, x0, y1, x1 = boxes[i, j]
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red"))
      ax.text(x0, y0, f"{CLASS_NAMES[classes[i, j]]} {scores[i, j]:.2f}", color="yellow",
              fontsize=6, va="bottom")
  fig.suptitle(f"predictions (red, score >= {min_score}, the best class per object) and "
               "truth (dashed)")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv):
  del argv
  start = time.time()
  from sasa_jax.tools.runs import read_metrics, train_or_resume  # noqa: PLC0415
  params = train_or_resume(FLAGS.config, FLAGS.workdir, FLAGS.fresh)
  final = [r for r in read_metrics(FLAGS.workdir) if "eval/AP" in r][-1]
  image = draw(FLAGS.workdir, FLAGS.images, os.path.join(FLAGS.workdir, "detections.png"))
  model = dict(FLAGS.config.model)
  print(f"\nsasa_jax detection demo: RetinaNet, ResNet-{model['depth']} "
        f"{model['backbone_variant']} backbone, {model['heads']} FPN and heads")
  print(f"  COCO mAP       {final['eval/AP']:.4f} (mAP@0.5 {final['eval/AP50']:.4f}, "
        f"@0.75 {final['eval/AP75']:.4f}) on {int(final['eval/num_images'])} held-out images "
        f"at step {final['step']}")
  print(f"  parameters     {params:,}")
  print(f"  wall time      {time.time() - start:.0f} s (this invocation)")
  print(f"  run directory  {FLAGS.workdir} (metrics.jsonl, TensorBoard events, checkpoints)")
  print(f"  detections     {image}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
