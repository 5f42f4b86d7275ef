"""What differs between tasks in the one training loop (sasa_jax.train): the model
factory, the loss and the evaluation. config.task picks one (`get`); its dataset must be of
that task (sasa_jax.data.DATASETS[name].task).

A task holds the config and gives: create_model(); check(model, variables, image_shape)
(raises ValueError); train_batch_spec(batch, image_shape) (a training batch's
jax.ShapeDtypeStructs); loss(outputs, batch) -> (loss, metrics), inside the jitted step;
eval_outputs(outputs, batch), inside the jitted eval step; evaluator(builder), whose
update(eval outputs) runs per eval batch and result() returns the eval metrics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sasa_jax import data as data_lib
from sasa_jax.detection import anchors as anchors_lib
from sasa_jax.detection import coco_eval, losses, postprocess, targets
from sasa_jax.models import OVERRIDES, create_resnet
from sasa_jax.models.factory import RETINANET_OVERRIDES, create_retinanet
from sasa_jax.ops import default_impl


def _create_model(factory, config, platform: str | None = None):
  """config.model's network, with impl="auto" resolved for this process's backend: the
  loop compiles for that backend alone, and an unresolved "auto" would trace every
  platform's kernels (jax.lax.platform_dependent traces each branch) at each start.
  platform: another one that the model is compiled for (a TPU's, from a CPU host): there
  "auto" stays, resolved as it is lowered (the blocked op's chunks sized for it too)."""
  model = dict(config.model)
  if model.get("impl", "auto") == "auto" and platform in (None, jax.default_backend()):
    model["impl"] = default_impl()
  return factory(**model, dtype=config.dtype, bn_momentum=config.bn_momentum)


class Classification:
  """Softmax cross-entropy (label smoothing), top-1/top-5 evaluation summed on device."""
  name = "classification"
  model_fields = ("depth", "variant", *OVERRIDES)
  factory = staticmethod(create_resnet)

  def __init__(self, config):
    self.config = config

  def create_model(self, platform: str | None = None):
    return _create_model(self.factory, self.config, platform)

  def check(self, model, variables, image_shape):
    del model, variables, image_shape

  def train_batch_spec(self, batch, image_shape):
    """Shapes and dtypes of a training batch of `batch` images, as the pipeline makes it."""
    return {"image": jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}

  def loss(self, outputs, batch):
    """outputs: logits [B, K]; batch {"label": [B]}. -> (loss, metrics)."""
    num_classes = outputs.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes),
                                 self.config.label_smoothing)
    loss = optax.softmax_cross_entropy(outputs, labels).mean()
    return loss, {"train/accuracy": jnp.mean(jnp.argmax(outputs, -1) == batch["label"])}

  def eval_outputs(self, outputs, batch):
    """Sums over the real (mask 1) examples: loss, top-1 and top-5 hits, count."""
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"])
    top5 = jax.lax.top_k(outputs, min(5, outputs.shape[-1]))[1]
    return {"loss": jnp.sum(loss * mask),
            "top1": jnp.sum((top5[:, 0] == batch["label"]) * mask),
            "top5": jnp.sum(jnp.any(top5 == batch["label"][:, None], -1) * mask),
            "count": jnp.sum(mask)}

  def evaluator(self, builder):
    return _SumEvaluator()


class _SumEvaluator:
  def __init__(self):
    self.totals = None

  def update(self, sums):
    self.totals = sums if self.totals is None else jax.tree.map(jnp.add, self.totals, sums)

  def result(self):
    totals = jax.device_get(self.totals)
    count = float(totals["count"])
    return {"eval/loss": totals["loss"] / count, "eval/accuracy": totals["top1"] / count,
            "eval/top5_accuracy": totals["top5"] / count, "eval/num_examples": count}


class Detection:
  """RetinaNet: anchor targets, focal + Huber loss (config.detection), COCO mAP through
  pycocotools on process 0 (every process runs the eval steps; detections of the global
  batch come back to every process)."""
  name = "detection"
  model_fields = ("backbone_variant", "heads", *RETINANET_OVERRIDES)
  factory = staticmethod(create_retinanet)

  def __init__(self, config):
    self.config = config
    model = {**RETINANET_OVERRIDES, **config.model}
    self.anchor_spec = anchors_lib.AnchorSpec(
        model["min_level"], model["max_level"], model["num_scales"],
        tuple(model["aspect_ratios"]), model["anchor_scale"])
    self._ground_truth = None

  @functools.cached_property
  def anchors(self):
    """[N, 4] anchors of config.dataset.image_size images (numpy)."""
    return anchors_lib.generate_anchors(self.anchor_spec, self.config.dataset.image_size)

  def create_model(self, platform: str | None = None):
    return _create_model(self.factory, self.config, platform)

  def check(self, model, variables, image_shape):
    """The model's anchors per image must be the anchor generator's."""
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *image_shape))), variables)
    if out["boxes"].shape[1] != self.anchors.shape[0]:
      raise ValueError(f"config.model: the network predicts for {out['boxes'].shape[1]} "
                       f"anchors per {image_shape[0]} px image, the anchor generator makes "
                       f"{self.anchors.shape[0]} (levels {self.anchor_spec.min_level}-"
                       f"{self.anchor_spec.max_level})")

  def train_batch_spec(self, batch, image_shape):
    """Shapes and dtypes of a training batch of `batch` images, as the pipeline makes it."""
    boxes = self.config.detection.max_boxes
    return {"image": jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8),
            "boxes": jax.ShapeDtypeStruct((batch, boxes, 4), jnp.float32),
            "labels": jax.ShapeDtypeStruct((batch, boxes), jnp.int32),
            "box_mask": jax.ShapeDtypeStruct((batch, boxes), jnp.float32)}

  def loss(self, outputs, batch):
    c = self.config.detection
    class_targets, box_targets = targets.assign_batch(
        jnp.asarray(self.anchors), batch["boxes"], batch["labels"], batch["box_mask"])
    total, parts = losses.detection_loss(
        outputs["logits"], outputs["boxes"], class_targets, box_targets, alpha=c.focal_alpha,
        gamma=c.focal_gamma, delta=c.huber_delta, box_weight=c.box_loss_weight)
    return total, {"train/focal_loss": parts["focal"], "train/box_loss": parts["box"],
                   "train/foreground_anchors": parts["num_foreground"] / batch["boxes"].shape[0]}

  def eval_outputs(self, outputs, batch):
    """Per image: the detections in original pixels, its id and mask."""
    c = self.config.detection
    boxes, scores, classes, valid = postprocess.detect_batch(
        outputs["logits"], outputs["boxes"], jnp.asarray(self.anchors), pre_nms=c.pre_nms,
        max_detections=c.max_detections, score_threshold=c.score_threshold,
        iou_threshold=c.nms_iou)
    return {"boxes": boxes / batch["scale"][:, None, None], "scores": scores,
            "classes": classes, "valid": valid, "image_id": batch["image_id"],
            "mask": batch["mask"]}

  def evaluator(self, builder):
    return _CocoEvaluator(functools.partial(self.ground_truth, builder),
                          self.config.dataset.eval_split)

  def ground_truth(self, builder):
    """The eval split's pycocotools ground truth, read on first use and kept for the run's
    later evaluations (it decodes every eval image once for its size)."""
    if self._ground_truth is None:
      self._ground_truth = coco_eval.ground_truth(
          data_lib.ground_truth(builder, self.config.dataset.eval_split),
          data_lib.DATASETS[self.config.dataset.name].num_classes)
    return self._ground_truth


class _CocoEvaluator:
  """Collects the detections of real images; `result` runs pycocotools on process 0."""

  def __init__(self, ground_truth, split):
    self.ground_truth, self.split = ground_truth, split  # ground_truth(): a pycocotools COCO
    self.batches = []

  def update(self, outputs):
    if jax.process_index() == 0:
      out = jax.device_get(outputs)
      real = out["mask"] > 0
      self.batches.append({k: v[real] for k, v in out.items()})

  def result(self):
    if jax.process_index() != 0:
      return {}
    out = {k: np.concatenate([b[k] for b in self.batches]) for k in self.batches[0]}
    ids = out["image_id"]
    if len(np.unique(ids)) != len(ids):
      raise RuntimeError(f"evaluation saw {len(ids) - len(np.unique(ids))} image(s) twice")
    gt = self.ground_truth()
    missing = set(gt.getImgIds()) - set(ids.tolist())
    if missing:
      raise RuntimeError(f"evaluation missed {len(missing)} image(s) of {self.split}")
    metrics = coco_eval.evaluate(gt, coco_eval.detections_to_coco(
        ids, out["boxes"], out["scores"], out["classes"], out["valid"]))
    metrics.pop("summary")
    return {f"eval/{k}": v for k, v in metrics.items()} | {"eval/num_images": float(len(ids))}


TASKS = {"classification": Classification, "detection": Detection}


def get(config):
  """The task of config.task (a config without the field, e.g. an older run's config.json:
  classification)."""
  name = config.get("task", "classification")
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not allowed; choose one of {tuple(TASKS)}")
  return TASKS[name](config)
