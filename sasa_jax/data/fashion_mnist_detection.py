"""`fashion_mnist_detection`: a small real-image detection set in COCO's TFDS layout.

Each example is a CANVAS x CANVAS grey canvas with 1-MAX_ITEMS real Fashion-MNIST items
pasted at random positions and sizes (MIN_SIDE-MAX_SIDE px, overlapping by at most
MAX_OVERLAP IoU); each item's box is the tight box of its non-zero pixels and its label the
item's class. Train canvases draw items from Fashion-MNIST's train split, test canvases
from its test split. The features are coco/2017's (image, image/id, objects with area,
bbox, id, is_crowd, label), so the detection pipeline reads both alike. Generation is
deterministic (seeded per split); `prepare` writes it into a TFDS data_dir in ~30 s.
"""
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sasa_jax.data import fashion_mnist

CANVAS = 96
MAX_ITEMS = 4
MIN_SIDE, MAX_SIDE = 20, 48
MAX_OVERLAP = 0.3
NUM_EXAMPLES = {"train": 12_000, "test": 2_000}
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle_boot")


def _box_iou(a, b):
  ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  iw = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ih * iw
  area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
  return inter / (area(a) + area(b) - inter)


def compose(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
  """One canvas from a pool of items [P, 28, 28] uint8 with labels [P].
  Returns (canvas [CANVAS, CANVAS, 1] uint8, boxes [M, 4] (ymin, xmin, ymax, xmax) px,
  labels [M])."""
  canvas = np.zeros((CANVAS, CANVAS), np.uint8)
  boxes, classes = [], []
  for _ in range(int(rng.integers(1, MAX_ITEMS + 1))):
    for _attempt in range(10):
      side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
      y, x = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
      i = int(rng.integers(len(items)))
      item = np.asarray(Image.fromarray(items[i]).resize((side, side), Image.BILINEAR))
      rows, cols = np.nonzero(item > 0)
      if rows.size == 0:
        continue
      box = (y + rows.min(), x + cols.min(), y + rows.max() + 1, x + cols.max() + 1)
      if all(_box_iou(box, b) <= MAX_OVERLAP for b in boxes):
        canvas[y:y + side, x:x + side] = np.maximum(canvas[y:y + side, x:x + side], item)
        boxes.append(box)
        classes.append(int(labels[i]))
        break
  return canvas[..., None], np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes)


class FashionMnistDetection(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST items on canvases, with boxes: see the module docstring."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "96 px canvases, 1-4 items of 20-48 px."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(CANVAS, CANVAS, 1)),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "id": np.int64,
                "is_crowd": np.bool_,
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
        }),
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    source = fashion_mnist.prepare(str(self.data_dir_root))
    return {split: self._generate_examples(source, split, seed)
            for seed, split in enumerate(("train", "test"))}

  def _generate_examples(self, source, split, seed):  # pylint: disable=arguments-differ
    data = tfds.as_numpy(source.as_dataset(split=split, batch_size=-1))
    items, labels = data["image"][..., 0], data["label"]
    rng = np.random.default_rng(seed)
    next_id = 1
    for index in range(NUM_EXAMPLES[split]):
      canvas, boxes, classes = compose(items, labels, rng)
      objects = []
      for box, label in zip(boxes, classes):
        objects.append({"area": int((box[2] - box[0]) * (box[3] - box[1])),
                        "bbox": tfds.features.BBox(*(box / CANVAS)), "id": next_id,
                        "is_crowd": False, "label": int(label)})
        next_id += 1
      image_id = seed * 1_000_000 + index + 1
      yield image_id, {"image": canvas, "image/id": image_id, "objects": objects}


def prepare(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Writes fashion_mnist_detection (and fashion_mnist, its source) into data_dir."""
  builder = FashionMnistDetection(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
