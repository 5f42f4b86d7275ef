"""One config shape: config strings and flags build the same model, optimizers and schedules
come from the config, validation names the field before anything is loaded or compiled."""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from sasa_jax import base_config, optim
from sasa_jax.models import create_resnet
from tests import helpers

CONFIGS = {name: os.path.join(helpers.ROOT, "configs", f"{name}.py")
           for name in ("fashion_mnist", "imagenet")}
DETECTION_CONFIGS = {name: os.path.join(helpers.ROOT, "configs", f"{name}.py")
                     for name in ("coco_retinanet", "fashion_mnist_detection")}
# Every model field: (config-string value, flag value), non-default for both configs.
MODEL_VALUES = {
    "depth": ("38", "38"),
    "variant": ("full_attention", "full_attention"),
    "num_classes": ("7", "7"),
    "width_multiplier": ("0.25", "0.25"),
    "kernel_size": ("5", "5"),
    "num_heads": ("4", "4"),
    "attention_groups": ("3-4", "3,4"),
    "positional_encoding": ("absolute", "absolute"),
    "attention_type": ("qr", "qr"),
    "scale_query": ("true", "true"),
    "stem_type": ("conv_values", "conv_values"),
    "stem_mixtures": ("2", "2"),
    "small_images": ("true", "true"),
    "impl": ("reference", "reference"),
}
ALTERNATES = {"variant": ("conv_stem_attention",) * 2, "small_images": ("false",) * 2,
              "attention_groups": ("2-3-4", "2,3,4")}
EXTRA_CASES = [("kernel_size", "3-5-7", "3,5,7", "attention_groups", "2-3-4", "2,3,4"),
               ("attention_groups", "none", "()", None, None, None),
               ("variant", "baseline", "baseline", None, None, None)]


def _load(name):
  spec = importlib.util.spec_from_file_location(name, {**CONFIGS, **DETECTION_CONFIGS}[name])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def via_flags(name, *flag_args):
  """The config as `python -m sasa_jax.main --config=configs/NAME.py FLAGS` would see it."""
  argv = ["main", f"--config={ {**CONFIGS, **DETECTION_CONFIGS}[name]}", *flag_args]
  values = flags.FlagValues()
  saved, sys.argv = sys.argv, argv  # config_flags finds the override flags in sys.argv
  try:
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
    values(argv)
  finally:
    sys.argv = saved
  return values.config


def _same(a, b):
  """Whether two config.model blocks hold the same values of the same types (8 and 8.0, or a
  tuple and a list, compare equal as values): then they are one factory call, so one model
  built from them proves both build."""
  return repr(sorted(dict(a).items())) == repr(sorted(dict(b).items()))


def _param_count(model_config):
  model = create_resnet(**model_config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_every_model_field_is_covered():
  for name in CONFIGS:
    assert set(_load(name).get_config().model) == set(MODEL_VALUES)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("field", list(MODEL_VALUES))
def test_config_string_and_flag_build_the_same_model(name, field):
  text, flag = MODEL_VALUES[field]
  default = dict(_load(name).get_config().model)
  if dict(_load(name).get_config(f"{field}={text}").model) == default:
    text, flag = ALTERNATES[field]  # the value was this config's default
  from_string = _load(name).get_config(f"{field}={text}").model
  from_flag = via_flags(name, f"--config.model.{field}={flag}").model
  assert _same(from_string, from_flag) and dict(from_flag) != default
  assert _param_count(from_flag) > 0


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("case", EXTRA_CASES, ids=[c[0] + "=" + c[1] for c in EXTRA_CASES])
def test_sequences_and_variants_by_both_routes(name, case):
  field, text, flag, field2, text2, flag2 = case
  arg = f"{field}={text}" + (f",{field2}={text2}" if field2 else "")
  flag_args = [f"--config.model.{field}={flag}"] + (
      [f"--config.model.{field2}={flag2}"] if field2 else [])
  a, b = _load(name).get_config(arg).model, via_flags(name, *flag_args).model
  assert _same(a, b) and _param_count(b) > 0


def test_baseline_variant_is_the_conv_model_by_either_route():
  a = _load("fashion_mnist").get_config("variant=baseline").model
  b = via_flags("fashion_mnist", "--config.model.variant=baseline").model
  conv = create_resnet(26, "baseline", num_classes=10, width_multiplier=0.125,
                       small_images=True)
  assert _same(a, b) and _param_count(b) == _param_count(
      {"depth": 26, "variant": "baseline", "num_classes": 10, "width_multiplier": 0.125,
       "small_images": True})
  assert all(g is None for g in conv.group_attention)


def test_per_group_kernel_sizes_reach_the_layers():
  model = create_resnet(26, "conv_stem_attention", attention_groups=(2, 3, 4),
                        kernel_size=(7, 7, 5), num_heads=(8, 8, 4))
  assert model.group_attention[0] is None
  assert [s.kernel_size for s in model.group_attention[1:]] == [7, 7, 5]
  assert [s.num_heads for s in model.group_attention[1:]] == [8, 8, 4]
  with pytest.raises(ValueError, match=r"kernel_size=\(7, 5\) gives 2 values for 3 attention"):
    create_resnet(26, "conv_stem_attention", attention_groups=(2, 3, 4), kernel_size=(7, 5))


@pytest.mark.parametrize("name", list({**CONFIGS, **DETECTION_CONFIGS}))
def test_top_level_arguments_by_both_routes(name):
  """Every config-string argument outside config.model equals its --config flag."""
  values = {"seed": ("3", 3), "batch_size": ("64", 64), "num_epochs": ("2.5", 2.5),
            "dtype": ("bfloat16", "bfloat16"), "num_microbatches": ("4", 4),
            "batch_norm_group_size": ("8", 8)}
  assert set(values) == set(base_config.TOP_LEVEL_ARGS)
  a = _load(name).get_config(",".join(f"{k}={t}" for k, (t, _) in values.items()))
  b = via_flags(name, *(f"--config.{k}={t}" for k, (t, _) in values.items()))
  for key, (_, value) in values.items():
    assert a[key] == b[key] == value and type(a[key]) is type(value), key


def test_linear_scaling_follows_the_batch_size_by_either_route():
  assert _load("imagenet").get_config().schedule.peak_value == pytest.approx(1.6)
  assert _load("imagenet").get_config("batch_size=1024").schedule.peak_value == pytest.approx(0.4)
  assert via_flags("imagenet", "--config.batch_size=1024").schedule.peak_value == pytest.approx(0.4)
  fixed = via_flags("imagenet", "--config.schedule.peak_value=3.0", "--config.batch_size=1024")
  assert fixed.schedule.peak_value == 3.0


def test_optimizer_and_schedule_flags():
  config = via_flags("fashion_mnist", "--config.optimizer.name=lamb",
                     "--config.optimizer.weight_decay=0.02", "--config.schedule.name=step")
  assert config.optimizer.name == "lamb" and config.optimizer.weight_decay == 0.02
  assert config.schedule.name == "step"


def _schedule(**fields):
  c = base_config.get_config().schedule
  c.update({"peak_value": 1.0, "warmup_epochs": 1.0, "end_value": 0.0, **fields})
  return optim.create_schedule(c, steps_per_epoch=10, num_steps=100)


def test_schedules():
  cosine = _schedule(name="cosine")
  assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
  assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(55)) == pytest.approx(0.5)
  assert float(cosine(100)) == pytest.approx(0.0, abs=1e-6)
  linear = _schedule(name="linear", end_value=0.1)
  assert float(linear(10)) == pytest.approx(1.0) and float(linear(55)) == pytest.approx(0.55)
  assert float(linear(100)) == pytest.approx(0.1)
  step = _schedule(name="step", boundaries_epochs=(3.0, 6.0), decay_factor=0.1)
  assert [round(float(step(s)), 6) for s in (10, 29, 30, 59, 60, 99)] == [
      1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
  constant = _schedule(name="constant", warmup_epochs=0.0)
  assert float(constant(0)) == float(constant(99)) == 1.0


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_optimizers_decay_kernels_only(name):
  c = base_config.get_config().optimizer
  c.update(name=name, weight_decay=0.5)
  tx = optim.create_optimizer(c, optax.constant_schedule(0.1))
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["bias"]).max()) == 0.0  # no gradient, no decay
  assert float(jnp.abs(updates["kernel"]).max()) > 0.0  # decayed


@pytest.mark.parametrize("momentum,nesterov,steps", [
    (0.9, True, (1.9, 2.71)),   # g + mu m_t, with m_t = g + mu m_(t-1)
    (0.9, False, (1.0, 1.9)),   # m_t
    (0.0, True, (1.0, 1.0)),    # plain SGD
])
def test_sgd_momentum_and_nesterov_follow_the_config(momentum, nesterov, steps):
  c = base_config.get_config().optimizer
  c.update(name="sgd", momentum=momentum, nesterov=nesterov, weight_decay=0.0)
  tx = optim.create_optimizer(c, optax.constant_schedule(0.1))
  params = {"kernel": jnp.zeros((2, 2))}
  grads = {"kernel": jnp.ones((2, 2))}
  state = tx.init(params)
  for want in steps:  # the same gradient each step: updates of -0.1 x want
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * want, rtol=1e-6)


def test_grad_clip_norm_scales_down_only_gradients_above_it():
  c = base_config.get_config().optimizer
  c.update(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0)
  tx = optim.create_optimizer(c, optax.constant_schedule(1.0))
  params = {"kernel": jnp.zeros((2, 2))}
  for scale, want in ((10.0, 1.0), (0.25, 0.5)):  # gradient norms 20 and 0.5
    grads = {"kernel": jnp.full((2, 2), scale)}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(want, rel=1e-6)


def _train_config(name="fashion_mnist", arg=helpers.TINY_MODEL, **changes):
  """Config `name` with `changes` ({"dotted.field": value})."""
  config = _load(name).get_config(arg)
  for key, value in changes.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.mark.parametrize("changes,match", [
    ({"optimizer.name": "adam"}, r"config.optimizer.name='adam' is not allowed"),
    ({"schedule.name": "poly"}, r"config.schedule.name='poly' is not allowed"),
    ({"schedule.peak_value": 0.0}, r"config.schedule.peak_value=0.0 must be > 0"),
    ({"optimizer.grad_clip_norm": -1.0}, r"config.optimizer.grad_clip_norm=-1.0 must be >= 0"),
    ({"workdir_lease_s": -5.0}, r"config.workdir_lease_s=-5.0 must be a number of seconds >= 0"),
    ({"model.kernel_size": (4,)}, r"config.model: kernel_size=4 \(group 3\) is not allowed"),
    ({"model.num_heads": (3,)}, r"config.model: num_heads=3 \(group 3\): the layer's width 32"),
    ({"model.attention_groups": (2, 5)}, r"config.model: attention_groups entry=5 is not allowed"),
    ({"model.variant": "full_attention", "dataset.image_size": 29},
     r"config.model .* cannot be built for 29x29 images: AttentionStem needs H and W divisible"),
    ({"schedule.warmup_epochs": -1.0}, r"config.schedule.warmup_epochs=-1.0 must be >= 0"),
    ({"model.attention_groups": (3, 3)}, r"attention_groups=\(3, 3\) names a group twice"),
    ({"num_train_steps": -1, "num_epochs": 0.0},
     r"set config.num_train_steps > 0 or config.num_epochs > 0, got -1 and 0.0"),
    ({"log_every_steps": 0}, r"config.log_every_steps=0 must be > 0"),
    ({"init_backbone_from": "runs/demo"},
     r"config.init_backbone_from='runs/demo' initialises a detection model's backbone"),
    ({"optimizer.lr": 0.1}, r"config.optimizer is missing \[\] / has unknown \['lr'\]; its "
     r"fields are \['name', 'momentum'"),
])
def test_validate_config_names_the_field(changes, match):
  from sasa_jax.train import validate_config
  with pytest.raises(ValueError, match=match):
    validate_config(_train_config(**changes))


@pytest.mark.parametrize("config,section,field,match", [
    ((), None, "dataset", r"config is missing field\(s\) \['dataset'\] \(configs start from "
     r"sasa_jax.base_config.get_config\(\)\)"),
    ((), "dataset", "image_size", r"config.dataset is missing field\(s\) \['image_size'\]"),
    ((), "schedule", "decay_factor",
     r"config.schedule is missing \['decay_factor'\] / has unknown"),
    (("fashion_mnist_detection", None), None, "detection", r"config is missing field 'detection'"),
])
def test_validate_config_names_a_missing_field(config, section, field, match):
  """config: _train_config's arguments (default: the Fashion-MNIST config of the tests'
  model)."""
  from sasa_jax.train import validate_config
  config = _train_config(*config)
  del (config[section] if section else config)[field]
  with pytest.raises(ValueError, match=match):
    validate_config(config)


@pytest.mark.parametrize("arg,match", [
    ("holdout=maybe", r"config argument holdout='maybe': expected true or false"),
    ("batch_size=many", r"config argument batch_size='many': expected int"),
    ("num_epochs=long", r"config argument num_epochs='long': expected float"),
    ("depth", r"config argument 'depth': expected key=value"),
])
def test_config_string_values_of_the_wrong_kind_are_named(arg, match):
  with pytest.raises(ValueError, match=match):
    _load("imagenet").get_config(arg)


# Detection configs: (config-string value, flag value) of create_retinanet fields.
DETECTION_VALUES = {
    "backbone_variant": ("baseline", "baseline"),
    "heads": ("conv", "conv"),
    "head_kernel_size": ("3", "3"),
    "aspect_ratios": ("0.5-2.0", "0.5,2.0"),
    "p6_input": ("p5", "p5"),
    "kernel_size": ("3-5-7", "3,5,7"),
    "attention_groups": ("2-3-4", "2,3,4"),
    "max_level": ("6", "6"),
}


def _retinanet_params(model_config):
  """Parameters of the model built from model_config, at the zoo's smallest depth."""
  from sasa_jax.models import QUICK_DEPTH
  from sasa_jax.models.factory import create_retinanet
  model = create_retinanet(**{**model_config, "depth": QUICK_DEPTH})
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_detection_configs_cover_every_create_retinanet_keyword():
  from sasa_jax.models.factory import RETINANET_OVERRIDES
  fields = {"backbone_variant", "heads", *RETINANET_OVERRIDES} - {"dtype", "bn_momentum"}
  for name in DETECTION_CONFIGS:
    assert set(_load(name).get_config().model) == fields


@pytest.mark.parametrize("field", list(DETECTION_VALUES))
def test_detection_config_string_and_flag_build_the_same_model(field):
  text, flag = DETECTION_VALUES[field]
  default = dict(_load("coco_retinanet").get_config().model)
  extra = ",attention_groups=2-3-4" if field == "kernel_size" else ""
  flags = ["--config.model.attention_groups=2,3,4"] if extra else []
  from_string = _load("coco_retinanet").get_config(f"{field}={text}{extra}").model
  from_flag = via_flags("coco_retinanet", f"--config.model.{field}={flag}", *flags).model
  assert _same(from_string, from_flag) and dict(from_flag) != default
  if field in ("heads", "p6_input", "aspect_ratios"):
    assert _retinanet_params(from_flag) > 0


def test_coco_config_rows_and_recipe():
  config = _load("coco_retinanet").get_config("backbone_variant=baseline,heads=conv")
  assert (config.task, config.dataset.name, config.dataset.image_size) == (
      "detection", "coco/2017", 640)
  assert config.batch_size == 64 and config.num_epochs == 150
  assert config.schedule.peak_value == pytest.approx(0.12)
  assert config.schedule.warmup_epochs == 1.0 and config.schedule.name == "cosine"


@pytest.mark.parametrize("changes,match", [
    ({"task": "classification"},
     r"config.dataset.name='fashion_mnist_detection' is a detection dataset but "
     r"config.task='classification'"),
    ({"task": "segmentation"}, r"config.task='segmentation' is not allowed"),
    ({"model.num_classes": 80}, r"config.model.num_classes=80: fashion_mnist_detection has 10"),
    ({"model.heads": "dense"}, r"config.model: heads='dense' is not allowed"),
    ({"model.max_level": 8}, r"config.model: max_level=8 is not allowed; choose 3..7"),
    ({"model.fpn_width": 0}, r"config.model: fpn_width=0 is not allowed; it must be a positive"),
    ({"model.aspect_ratios": (0.5, -1.0)},
     r"config.model: aspect_ratios=\(0.5, -1.0\) must be positive numbers"),
    ({"model.anchor_scale": 0.0}, r"config.model: anchor_scale=0.0 must be > 0"),
])
def test_validate_detection_config_names_the_field(changes, match):
  from sasa_jax.train import validate_config
  with pytest.raises(ValueError, match=match):
    validate_config(_train_config("fashion_mnist_detection", None, **changes))


@pytest.mark.parametrize("module", ["sasa_jax.main", "sasa_jax.tools.step_memory",
                                    "sasa_jax.tools.demo"])
@pytest.mark.parametrize("args, line", [
    (["--config=configs/imagenet.py", "--config.model.kernal_size=5"],
     ": --config.model.kernal_size: the config has no field 'kernal_size'; did you mean "
     "'kernel_size'?\n"),
    (["--config=configs/imagenet.py:kernal_size=5"],
     ": flag --config=configs/imagenet.py:kernal_size=5: config argument 'kernal_size' is not "
     "allowed; choose among ['attention_groups', "),
    (["--config=configs/imagenet.py:kernel_size=x"],
     ": flag --config=configs/imagenet.py:kernel_size=x: config argument kernel_size='x': "
     "expected ints joined by '-' (e.g. 2-3-4) or none\n"),
    (["--config=configs/imagenett.py"],
     ":\n  --config: Failed loading config file config_config\n"),
], ids=["flag", "argument", "value", "file"])
def test_a_config_error_is_a_flags_error_without_a_traceback(module, args, line, tmp_path):
  """Before start-up and the heavy imports, in absl's form for flag errors."""
  workdir = [f"--workdir={tmp_path}"] if module == "sasa_jax.main" else []
  proc = helpers.run_module(module, args + workdir, check=False, timeout=120)
  assert proc.returncode == 1
  assert "FATAL Flags parsing error" + line in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr and "start-up" not in proc.stderr
