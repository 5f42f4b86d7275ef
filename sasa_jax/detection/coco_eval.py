"""COCO box mAP with pycocotools, the reference evaluator.

Ground truth comes from the dataset itself (every image of the eval split, read once on the
host, boxes in original pixels); detections from the model, mapped back to original pixels.
Category ids are the dataset's label indices + 1 (TFDS's coco labels are contiguous 0..79).
"""
import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The 12 numbers COCOeval.summarize() prints, in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def ground_truth(images, num_classes: int) -> COCO:
  """A pycocotools COCO from an iterable of dicts {"id", "height", "width", "boxes" [M, 4]
  (ymin, xmin, ymax, xmax) in pixels, "labels" [M], "is_crowd" [M], "area" [M] (None: the
  box's)}."""
  coco_images, annotations = [], []
  for image in images:
    coco_images.append({"id": int(image["id"]), "height": int(image["height"]),
                        "width": int(image["width"])})
    boxes = np.asarray(image["boxes"], np.float64).reshape(-1, 4)
    areas = image.get("area")
    for j, (y0, x0, y1, x1) in enumerate(boxes):
      w, h = x1 - x0, y1 - y0
      annotations.append({
          "id": len(annotations) + 1, "image_id": int(image["id"]),
          "category_id": int(image["labels"][j]) + 1, "bbox": [x0, y0, w, h],
          "area": float(areas[j]) if areas is not None else float(w * h),
          "iscrowd": int(image["is_crowd"][j])})
  coco = COCO()
  coco.dataset = {"images": coco_images, "annotations": annotations,
                  "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def detections_to_coco(image_ids, boxes, scores, classes, valid) -> list[dict]:
  """Arrays [I], [I, D, 4] (ymin, xmin, ymax, xmax, original pixels), [I, D], [I, D], [I, D]
  -> pycocotools result dicts."""
  out = []
  for i, image_id in enumerate(np.asarray(image_ids)):
    for (y0, x0, y1, x1), score, cls in zip(boxes[i][valid[i]], scores[i][valid[i]],
                                            classes[i][valid[i]]):
      out.append({"image_id": int(image_id), "category_id": int(cls) + 1,
                  "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                  "score": float(score)})
  return out


def evaluate(gt: COCO, detections: list[dict]) -> dict:
  """{name: value} of METRIC_NAMES (pycocotools' -1 where a metric has no ground truth);
  the summary pycocotools prints is returned as "summary"."""
  if not detections:
    return {name: 0.0 for name in METRIC_NAMES} | {"summary": "no detections"}
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    result = gt.loadRes(detections)
    evaluator = COCOeval(gt, result, iouType="bbox")
    evaluator.params.imgIds = sorted(gt.getImgIds())
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  summary = "\n".join(l for l in buffer.getvalue().splitlines() if "Average" in l)
  return {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)} | {
      "summary": summary}
