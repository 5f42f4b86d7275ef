"""Detection: anchors, box coding, targets, losses, NMS, COCO evaluation, RetinaNet, the
pipeline and the training loop end to end."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sasa_jax.detection import anchors as anchors_lib
from sasa_jax.detection import coco_eval, losses, postprocess, targets
from sasa_jax.models.factory import create_retinanet
from sasa_jax.run_once import run_once
from tests import helpers

SPEC = anchors_lib.AnchorSpec(min_level=3, max_level=5, num_scales=3,
                              aspect_ratios=(0.5, 1.0, 2.0), anchor_scale=3.0)


def _random_boxes(rng, n, size=96.0):
  y0, x0 = rng.uniform(0, size - 10, (2, n))
  h, w = rng.uniform(4, 40, (2, n))
  return np.stack([y0, x0, y0 + h, x0 + w], axis=1).astype(np.float32)


def test_anchors_per_level_and_their_shapes():
  anchors = anchors_lib.generate_anchors(SPEC, 96)
  assert anchors.shape == ((12 * 12 + 6 * 6 + 3 * 3) * 9, 4)
  first = anchors[:9]  # level 3, position (0, 0): centre (4, 4), side 24 * 2**(i/3)
  np.testing.assert_allclose((first[:, 0] + first[:, 2]) / 2, 4.0, rtol=1e-6)
  h, w = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
  np.testing.assert_allclose(w / h, [0.5, 1, 2] * 3, rtol=1e-5)
  np.testing.assert_allclose(np.sqrt(h * w), np.repeat(24 * 2 ** (np.arange(3) / 3), 3),
                             rtol=1e-5)
  last = anchors[-1]  # level 5, position (2, 2): centre 2.5 * 32 = 80
  assert (last[0] + last[2]) / 2 == pytest.approx(80.0)


def test_box_coding_round_trip_jitted():
  rng = np.random.default_rng(0)
  boxes, anchors = _random_boxes(rng, 200), _random_boxes(rng, 200)
  codes = jax.jit(anchors_lib.encode)(boxes, anchors)
  np.testing.assert_allclose(jax.jit(anchors_lib.decode)(codes, anchors), boxes, atol=1e-3)
  np.testing.assert_allclose(anchors_lib.encode(anchors, anchors), 0.0, atol=1e-6)


def test_targets_foreground_background_ignored_and_forced():
  anchors = jnp.asarray(anchors_lib.generate_anchors(SPEC, 96))
  boxes = jnp.asarray([anchors[100], [0, 0, 3, 3], [0, 0, 0, 0]], jnp.float32)
  cls, codes = jax.jit(targets.assign)(anchors, boxes, jnp.array([4, 7, 1]),
                                       jnp.array([1.0, 1.0, 0.0]))
  assert int(cls[100]) == 4
  np.testing.assert_allclose(codes[100], 0.0, atol=1e-6)
  iou = np.asarray(anchors_lib.iou(anchors, boxes[:2]))
  # the tiny box claims its best anchor although its IoU is far below 0.5
  best = int(np.argmax(iou[:, 1]))
  assert iou[best, 1] < targets.FOREGROUND_IOU and int(cls[best]) == 7
  fg_other = (iou[:, 0] >= 0.5) | (np.arange(len(iou)) == best)
  expected = np.where(fg_other, 0, np.where(iou.max(1) < 0.4, -1, -2))
  got = np.asarray(cls)
  assert np.all((got >= 0) == (expected >= 0))
  assert np.all(got[expected < 0] == expected[expected < 0])
  assert 1 not in set(got.tolist())  # the masked box's label never appears


def test_detection_loss_against_the_direct_formula():
  rng = np.random.default_rng(1)
  b, n, k = 2, 30, 5
  logits = rng.normal(size=(b, n, k)).astype(np.float32)
  codes = rng.normal(size=(b, n, 4)).astype(np.float32) * 0.2
  cls = rng.choice([-2, -1, 0, 1, 2, 3, 4], size=(b, n))
  box_t = rng.normal(size=(b, n, 4)).astype(np.float32) * 0.2 * (cls >= 0)[..., None]
  total, parts = jax.jit(losses.detection_loss)(logits, codes, cls, box_t)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  y = (cls[..., None] == np.arange(k)).astype(np.float64)
  p_t = np.where(y == 1, p, 1 - p)
  alpha_t = np.where(y == 1, 0.25, 0.75)
  focal = -alpha_t * (1 - p_t) ** 2 * np.log(p_t)
  num_fg = max((cls >= 0).sum(), 1)
  focal = (focal * (cls != -2)[..., None]).sum() / num_fg
  d = np.abs(codes - box_t).astype(np.float64)
  huber = np.where(d <= 0.1, 0.5 * d ** 2, 0.1 * (d - 0.05))
  box = (huber * (cls >= 0)[..., None]).sum() / (4 * num_fg)
  assert float(parts["focal"]) == pytest.approx(focal, rel=1e-4)
  assert float(parts["box"]) == pytest.approx(box, rel=1e-4)
  assert float(total) == pytest.approx(focal + 50 * box, rel=1e-4)


def _numpy_nms(boxes, scores, threshold):
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  keep = []
  for i in order:
    if not np.isfinite(scores[i]):
      continue
    if all(float(anchors_lib.iou(boxes[i][None], boxes[j][None])[0, 0]) <= threshold
           for j in keep):
      keep.append(i)
  return sorted(keep)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_against_a_numpy_reference(threshold):
  rng = np.random.default_rng(int(threshold * 10))
  centres = _random_boxes(rng, 6)
  boxes = np.concatenate([c + rng.normal(0, 3, (8, 4)) for c in centres]).astype(np.float32)
  boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                          np.maximum(boxes[:, :2], boxes[:, 2:]) + 1], axis=1)
  scores = rng.uniform(size=len(boxes)).astype(np.float32)
  scores[::7] = -np.inf  # not candidates
  keep = jax.jit(postprocess.nms, static_argnums=2)(boxes, scores, threshold)
  assert sorted(np.nonzero(np.asarray(keep))[0].tolist()) == _numpy_nms(boxes, scores,
                                                                        threshold)


def test_detect_runs_nms_per_class_and_pads():
  anchors = jnp.asarray([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60]], jnp.float32)
  logits = jnp.full((3, 2), -20.0)
  logits = logits.at[0, 0].set(3.0).at[1, 0].set(2.0).at[1, 1].set(1.0).at[2, 1].set(-1.0)
  boxes, scores, classes, valid = jax.jit(
      lambda l: postprocess.detect(l, jnp.zeros((3, 4)), anchors, max_detections=10))(logits)
  assert boxes.shape == (10, 4) and int(valid.sum()) == 3
  # anchor 1's class-0 score is suppressed by anchor 0's; its class-1 score is not
  got = {(int(c), round(float(s), 4)) for c, s, v in zip(classes, scores, valid) if v}
  sig = lambda x: round(1 / (1 + math.exp(-x)), 4)
  assert got == {(0, sig(3.0)), (1, sig(1.0)), (1, sig(-1.0))}
  assert list(np.asarray(scores[valid])) == sorted(np.asarray(scores[valid]), reverse=True)


def _image(image_id, boxes, labels):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return {"id": image_id, "height": 100, "width": 100, "boxes": boxes, "labels": labels,
          "is_crowd": [False] * len(labels), "area": None}


def test_coco_eval_path_on_hand_made_predictions():
  gt = coco_eval.ground_truth([_image(1, [[10, 10, 50, 50]], [0]),
                               _image(2, [[20, 30, 60, 90]], [0])], num_classes=3)
  ids = np.array([1, 2])
  boxes = np.zeros((2, 2, 4), np.float32)
  boxes[0, 0] = [10, 10, 50, 50]    # exact: a hit
  boxes[1, 0] = [70, 70, 95, 95]    # misses the only box of image 2
  scores = np.array([[0.9, 0], [0.8, 0]], np.float32)
  classes = np.zeros((2, 2), np.int32)
  valid = np.array([[True, False], [True, False]])
  half = coco_eval.evaluate(gt, coco_eval.detections_to_coco(ids, boxes, scores, classes,
                                                             valid))
  # recall 1/2 at precision 1 (the hit outranks the miss): 51 of COCO's 101 recall points
  assert half["AP"] == pytest.approx(51 / 101, abs=1e-6)
  assert half["AP50"] == pytest.approx(51 / 101, abs=1e-6)
  assert half["AR100"] == pytest.approx(0.5)
  boxes[1, 0] = [20, 30, 60, 90]
  both = coco_eval.evaluate(gt, coco_eval.detections_to_coco(ids, boxes, scores, classes, valid))
  assert both["AP"] == pytest.approx(1.0) and both["AR1"] == pytest.approx(1.0)
  assert set(coco_eval.METRIC_NAMES) <= set(both)


def test_retinanet_outputs_match_the_anchors():
  for heads in ("conv", "attention"):
    model = create_retinanet("conv_stem_attention", heads, depth=14, num_classes=10,
                             width_multiplier=0.125, num_heads=2, kernel_size=3,
                             attention_groups=(3, 4), min_level=3, max_level=5,
                             anchor_scale=3.0, fpn_width=32, head_layers=1,
                             head_kernel_size=3, head_num_heads=2, impl="reference")
    x = jnp.zeros((2, 96, 96, 1))
    variables = run_once(jax.jit(model.init), jax.random.key(0), x)
    out = jax.jit(lambda v, i: model.apply(v, i))(variables, x)
    n = anchors_lib.generate_anchors(SPEC, 96).shape[0]
    assert out["logits"].shape == (2, n, 10) and out["boxes"].shape == (2, n, 4)
    # the class prior: every anchor starts at foreground probability 0.01
    np.testing.assert_allclose(jax.nn.sigmoid(out["logits"]), 0.01, atol=5e-3)
    if heads == "attention":  # W_V of the heads' layers drawn as RetinaNet's N(0, 0.01),
      for net in ("class_net", "box_net"):  # the predictor's attention at lecun_normal's
        params = variables["params"][net]
        assert 0.008 < float(jnp.std(params["layer0"]["value"]["kernel"])) < 0.012
        assert float(jnp.std(params["predict_attention"]["value"]["kernel"])) > 0.1


RETINANET_GROUPS_ON_FOUR_DEVICES = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sasa_jax import train
from sasa_jax.models.factory import create_retinanet
# The attention stem, backbone, FPN and heads: every kind of BatchNorm the detector has.
model = create_retinanet("full_attention", "attention", depth=14, num_classes=10,
                         width_multiplier=0.125, num_heads=2, kernel_size=3, min_level=3,
                         max_level=5, fpn_width=32, head_layers=1, head_kernel_size=3,
                         head_num_heads=2)
images = jax.random.normal(jax.random.key(1), (16, 64, 64, 1))
variables = jax.jit(model.init)(jax.random.key(0), images[:1])
mesh = Mesh(np.asarray(jax.devices()), ("data",))
out = {}
for group in (4, 8):  # each device's 4 images; devices {0, 1} and {2, 3} together
  apply = jax.jit(lambda images: train.apply_in_groups(
      model, variables["params"], variables["batch_stats"], images, jax.random.key(2), group))
  single = apply(images)  # one device: the groups by vmap alone
  with jax.set_mesh(mesh):
    sharded = apply(jax.device_put(images, NamedSharding(mesh, P("data"))))
  out[group] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree.leaves(sharded), jax.tree.leaves(single)))
print(json.dumps(out))
"""


def test_batch_norm_groups_of_devices_reach_every_batch_norm_of_a_retinanet():
  """A RetinaNet run per device with BatchNorm over groups of 1 or 2 devices' images gives
  the outputs and running statistics of the same groups on one device: the grouped
  all-reduce reaches the backbone's (stem included) and the FPN's and heads' BatchNorms."""
  import json
  proc = helpers.run_python(RETINANET_GROUPS_ON_FOUR_DEVICES, devices=4)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["4"] < 1e-4 and out["8"] < 1e-4, out


def test_create_retinanet_names_bad_keywords():
  with pytest.raises(ValueError, match="heads='dense'"):
    create_retinanet("baseline", "dense")
  with pytest.raises(ValueError, match="p6_input='c4'"):
    create_retinanet("baseline", "conv", p6_input="c4")
  with pytest.raises(ValueError, match="head_num_heads|num_heads=3"):
    create_retinanet("baseline", "attention", head_num_heads=3)


def test_model_table_detection_matches_table_2():
  import json
  out = helpers.run_module("sasa_jax.tools.model_table", ["--detection", "--format", "json"])
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [(r["heads"], r["backbone"]) for r in rows] == [
      ("conv", "baseline"), ("conv", "conv_stem_attention"), ("conv", "full_attention"),
      ("attention", "conv_stem_attention"), ("attention", "full_attention")]
  for r in rows:
    assert abs(r["params_m"] / r["paper_params_m"] - 1) <= 0.05, r
    assert abs(r["gflops"] / r["paper_gflops"] - 1) <= 0.10, r


@pytest.mark.parametrize("window", [None, 16])  # streamed; in 4 shuffle windows
def test_detection_pipeline_boxes_follow_the_image(detection_dir, window):
  from sasa_jax import data as data_lib
  builder = data_lib.get_builder("fashion_mnist_detection", detection_dir)
  ds = data_lib.train_dataset(builder, split="train[:64]", per_host_batch=16, image_size=96,
                              seed=0, shuffle_buffer=64, window=window)
  batch = next(ds.as_numpy_iterator())
  assert batch["image"].shape == (16, 96, 96, 1) and batch["boxes"].shape[1] == 100
  for image, boxes, mask in zip(batch["image"], batch["boxes"], batch["box_mask"]):
    assert mask.sum() >= 1
    for y0, x0, y1, x1 in boxes[mask > 0]:
      assert 0 <= y0 < y1 <= 96 and 0 <= x0 < x1 <= 96
      inside = image[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1)), 0]
      assert inside.max() > 0  # an item's pixels lie inside its box
    outside = image[..., 0].copy()
    for y0, x0, y1, x1 in boxes[mask > 0]:
      outside[max(int(y0) - 1, 0):int(math.ceil(y1)) + 1,
              max(int(x0) - 1, 0):int(math.ceil(x1)) + 1] = 0
    assert outside.max() < 40  # and nothing but resampling fringes outside the boxes


DETECT = ("configs/fashion_mnist_detection.py:depth=14,width_multiplier=0.125,num_heads=2,"
          "kernel_size=3,head_kernel_size=3,head_num_heads=2,fpn_width=32,head_layers=1")


def test_detection_end_to_end_two_processes_then_one_resumes(detection_dir, tmp_path):
  """4 simulated devices as 2 processes x 2 (launch/local.sh) with BatchNorm over each
  process's two devices, then the detection demo on 1 process x 4 resumes as microbatches
  with BatchNorm over groups of 2 images on each device: training, per-host shards, COCO
  evaluation counting every held-out image once, the demo's report and image."""
  import json
  import os
  import socket
  import subprocess
  workdir = tmp_path / "run"
  common = dict(ckpt_every=2, log_every=1, eval_every=2, train_split="train[:128]",
                eval_split="test[:37]")
  cmd = helpers.main_cmd(DETECT, workdir, helpers.tiny_flags(detection_dir, 2, **common) + [
      "--config.batch_norm_group_size=8"])  # 2 devices' images: a grouped all-reduce
  proc = subprocess.run([os.path.join(helpers.ROOT, "launch", "local.sh"), "2", *cmd[3:]],
                        cwd=helpers.ROOT, env=helpers.env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
  assert ("4 per device on 4 device(s) in 2 process(es); BatchNorm statistics over groups of "
          "8 images, each across 2 devices") in (workdir / "logs" / "process_0.log").read_text()
  # the detection demo's command resumes it: 1 process x 4 devices, each step as 2
  # microbatches with BatchNorm over each device's 2 images (neither is in the checkpoint)
  cmd = helpers.main_cmd(DETECT, workdir, helpers.tiny_flags(detection_dir, 4, **common) + [
      "--config.num_microbatches=2", "--config.batch_norm_group_size=2"])
  proc = helpers.run_module("sasa_jax.tools.detect_demo", cmd[3:] + ["--images=3"],
                            environ=helpers.env(4))
  assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
  assert ("4 per device on 4 device(s) in 1 process(es), as 2 microbatches of 2; BatchNorm "
          "statistics over groups of 2 images") in proc.stderr
  assert "COCO mAP" in proc.stdout and "on 37 held-out images at step 4" in proc.stdout
  assert (workdir / "detections.png").stat().st_size > 10_000
  rows = helpers.read_metrics(workdir)
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  starts = [json.loads(line) for line in (workdir / "starts.jsonl").read_text().splitlines()]
  assert [(r["start_step"], r["processes"], r["devices"]) for r in starts] == [(0, 2, 4),
                                                                               (2, 1, 4)]
  assert [r["hosts"] for r in starts] == [[socket.gethostname()] * 2, [socket.gethostname()]]
  assert starts[1]["argv"][0].endswith("detect_demo.py")
  assert all(np.isfinite(r["train/focal_loss"]) and r["train/foreground_anchors"] > 0
             for r in train)
  evals = [r for r in rows if "eval/AP" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert r["eval/num_images"] == 37  # every image once, padded batches, any process count
    assert {f"eval/{m}" for m in coco_eval.METRIC_NAMES} <= set(r)
  # tools/evaluate on the last checkpoint: the loop's last COCO evaluation, on 1 device.
  out = helpers.run_module("sasa_jax.tools.evaluate", [f"--workdir={workdir}"]).stdout
  assert json.loads(out) == {**evals[-1], "split": "test[:37]", "weights": "raw"}


def _state(config, image_shape):
  import optax
  from jax.sharding import Mesh
  from sasa_jax import train
  model = train.create_model(config)
  tx = optax.sgd(0.1, momentum=0.9)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  init, _, shardings = train.initial_state(config, model, tx, mesh, image_shape)
  return run_once(jax.jit(init, out_shardings=shardings)), tx, shardings


def test_init_backbone_from_a_classification_checkpoint(tmp_path):
  import orbax.checkpoint as ocp
  from tests.test_config import _load
  from sasa_jax import train
  classify = _load("fashion_mnist").get_config(
      "depth=14,width_multiplier=0.125,num_heads=2,kernel_size=3,small_images=false")
  source, _, _ = _state(classify, (28, 28, 1))
  source = source.replace(params=jax.tree.map(lambda x: x + 1.0, source.params))
  with ocp.CheckpointManager(tmp_path / "cls" / "checkpoints") as mngr:
    mngr.save(7, args=ocp.args.StandardSave(source))
  detect = _load("fashion_mnist_detection").get_config(
      "depth=14,width_multiplier=0.125,num_heads=2,kernel_size=3,fpn_width=32,head_layers=1,"
      "head_num_heads=2")
  state, tx, shardings = _state(detect, (96, 96, 1))
  loaded = train.init_backbone(state, str(tmp_path / "cls"), tx, shardings)
  for collection in ("params", "batch_stats"):
    want = {k: v for k, v in getattr(source, collection).items() if k != "head"}
    jax.tree.map(np.testing.assert_array_equal, getattr(loaded, collection)["backbone"], want)
    jax.tree.map(np.testing.assert_array_equal, getattr(loaded, collection)["fpn"],
                 getattr(state, collection)["fpn"])
  momentum = jax.tree.leaves(loaded.opt_state)
  assert all(float(jnp.abs(m).max()) == 0 for m in momentum if m.ndim)  # started afresh
  other = _load("fashion_mnist").get_config(
      "depth=14,width_multiplier=0.125,num_heads=2,kernel_size=3,small_images=true")
  wrong, _, _ = _state(other, (28, 28, 1))
  with ocp.CheckpointManager(tmp_path / "small" / "checkpoints") as mngr:
    mngr.save(1, args=ocp.args.StandardSave(wrong))
  with pytest.raises(ValueError, match=r"init_backbone_from=.*\['stem_conv'\]\['kernel'\] is "
                     r"\(3, 3, 1, 8\) in its checkpoint \(step 1\) but \(7, 7, 1, 8\)"):
    train.init_backbone(state, str(tmp_path / "small"), tx, shardings)


def test_coco_2017_through_the_same_path(tmp_path):
  """TFDS's coco/2017 builder (fake JPEGs of random sizes, crowd boxes) through the COCO
  config: RGB decode, jitter/crop/pad of non-square images, eval mapped back to original
  pixels, twice in one run."""
  data_dir = str(tmp_path / "tfds")
  helpers.prepare_fake_coco(data_dir)
  workdir = tmp_path / "run"
  flags = helpers.tiny_flags(data_dir, 2, batch=4, eval_every=1, train_split="train",
                             eval_split="validation")
  flags += ["--config.dataset.image_size=64", "--config.dtype=float32"]
  helpers.run_main("configs/coco_retinanet.py:depth=14,width_multiplier=0.125,num_heads=2,"
                   "kernel_size=3,head_kernel_size=3,head_num_heads=2,fpn_width=32,"
                   "head_layers=1", workdir, flags, devices=2)
  rows = helpers.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  evals = [r for r in rows if "eval/AP" in r]  # the second reuses the first's ground truth
  assert [(r["step"], r["eval/num_images"]) for r in evals] == [(1, 7), (2, 7)]
