"""The one config shape that every config in configs/ overrides.

`get_config()` declares every field the loop reads, and config.model declares every
keyword of `create_resnet` (None: the variant's choice), so that a config-string argument
(`configs/X.py:kernel_size=5`) and the matching flag (`--config.model.kernel_size=5`) always
build the same model. Config strings: `apply_arg(config, "a=1,b=x", **extras)` sets model
fields and top-level fields by name and returns the config's own extra arguments.

Command-line forms of sequences: config strings use dashes (`attention_groups=2-3-4`,
`kernel_size=7-7-5`, `attention_groups=none`); flags use commas
(`--config.model.attention_groups=2,3,4`, `--config.model.kernel_size=7,7,5`,
`--config.model.attention_groups=()`).
"""
import ml_collections
from ml_collections import config_dict

from sasa_jax.models.factory import OVERRIDES, PER_GROUP, RETINANET_OVERRIDES

# Set at the top level of the config (the loop passes them to create_resnet).
LOOP_SET_MODEL_FIELDS = ("dtype", "bn_momentum")
# create_resnet keywords whose default is None, with the type a config field holds.
NONE_DEFAULT_TYPES = {"attention_groups": tuple, "stem_type": str, "p6_input": str}
TOP_LEVEL_ARGS = ("seed", "batch_size", "num_epochs", "dtype", "num_microbatches",
                  "batch_norm_group_size")


def _model_fields(base: dict, overrides: dict, factory: str, values: dict):
  """config.model: `base` then every keyword of `factory` (bar the loop's) with its
  default, `values` overriding."""
  fields = dict(base)
  for name, default in overrides.items():
    if name in LOOP_SET_MODEL_FIELDS:
      continue
    if name in NONE_DEFAULT_TYPES:
      default = config_dict.placeholder(NONE_DEFAULT_TYPES[name])
    elif name in PER_GROUP:
      default = (default,)
    fields[name] = default
  model = ml_collections.ConfigDict(fields)
  for name, value in values.items():
    if name not in model:
      raise ValueError(f"model field {name!r} is not a {factory} keyword; choose among "
                       f"{sorted(model)}")
    if name in PER_GROUP and not isinstance(value, (tuple, list)):
      value = (value,)
    model[name] = tuple(value) if isinstance(value, list) else value
  return model


def model_config(**values) -> ml_collections.ConfigDict:
  """config.model: every create_resnet keyword (bar the loop's), `values` overriding."""
  return _model_fields({"depth": 50, "variant": "full_attention"}, OVERRIDES, "create_resnet",
                       values)


def retinanet_config(**values) -> ml_collections.ConfigDict:
  """config.model of a detection config: every create_retinanet keyword (bar the loop's),
  `values` overriding."""
  return _model_fields({"backbone_variant": "full_attention", "heads": "attention"},
                       RETINANET_OVERRIDES, "create_retinanet", values)


def get_config() -> ml_collections.ConfigDict:
  """Every field the loop reads, with defaults that configs override."""
  config = ml_collections.ConfigDict()
  config.task = "classification"  # or "detection" (sasa_jax.tasks)
  config.model = model_config()
  # shuffle_buffer: the records examples are shuffled among, or shuffle_window_mib MiB of
  # them where that is more: a shuffle window, about what a resume reads again and what each
  # host holds about four of (sasa_jax.data.input_pipeline); crop_padding: random-crop margin
  # of small images
  config.dataset = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=config_dict.placeholder(str), image_size=224,
      train_split="train", eval_split="validation", shuffle_buffer=16_384,
      shuffle_window_mib=256.0, crop_padding=2))
  config.batch_size = 256
  # > 1: each step runs the batch as this many microbatches one after another and averages
  # their gradients (memory of batch_size / num_microbatches images; sasa_jax.train.train_step)
  config.num_microbatches = 1
  # > 0: BatchNorm normalises every this many contiguous images of a (micro)batch by their
  # own statistics (e.g. the images of one device, as per-core BatchNorm on TPU pods, or of
  # a node's 8 GPUs); 0: by the whole (micro)batch's. sasa_jax.train.apply_in_groups
  config.batch_norm_group_size = 0
  config.num_epochs = 90.0
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", momentum=0.9, nesterov=True, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
      grad_clip_norm=0.0))  # > 0: gradients scaled down to this global L2 norm
  config.schedule = ml_collections.ConfigDict(dict(
      name="cosine", peak_value=0.1, warmup_epochs=5.0, end_value=0.0,
      boundaries_epochs=(30.0, 60.0, 80.0), decay_factor=0.1))
  config.label_smoothing = 0.0
  config.ema_decay = 0.0  # 0: off
  config.bn_momentum = 0.9
  config.dtype = "float32"
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  config.keep_checkpoint_every_steps = 0  # > 0: every checkpoint at a multiple is kept too
  config.seed = 0
  config.profile = False
  config.compilation_cache_dir = config_dict.placeholder(str)  # None: WORKDIR/compilation_cache
  # A run holds WORKDIR/lease.json while it trains, renewed every 1/6 of this; a second run
  # on the workdir stops, unless the lease goes this long unrenewed (its run was killed).
  config.workdir_lease_s = 60.0  # 0: no lease
  # A run with no step, evaluation batch or checkpoint save for this long (a hung device,
  # collective or filesystem) dumps every thread's stack and exits 75, every process with it.
  config.hang_timeout_s = 1800.0  # 0: waits for ever; the step's compilation is not timed
  # Detection only (config.task = "detection"): pipeline, loss and post-processing.
  config.detection = ml_collections.ConfigDict(dict(
      max_boxes=100,                  # boxes per training image (more are dropped)
      scale_min=0.8, scale_max=1.2,   # scale jitter of the longer side
      focal_alpha=0.25, focal_gamma=2.0, huber_delta=0.1, box_loss_weight=50.0,
      pre_nms=1000, max_detections=100, score_threshold=0.05, nms_iou=0.5))
  # A classification run directory whose latest checkpoint initialises a detection model's
  # backbone at step 0 (same depth, variant and settings); None: from scratch.
  config.init_backbone_from = config_dict.placeholder(str)
  return config


def linear_scaling(config, per_256: float):
  """peak learning rate = per_256 x batch_size / 256, kept in step with config.batch_size
  (a FieldReference: --config.batch_size rescales it)."""
  return config.get_ref("batch_size").to_float() * per_256 / 256


def _parse(key, text, current):
  kind = type(current) if current is not None else None
  if key in PER_GROUP or NONE_DEFAULT_TYPES.get(key) is tuple or isinstance(current, tuple):
    if text.lower() in ("", "none"):
      return ()
    item = float if current and all(isinstance(v, float) for v in current) else int
    try:
      return tuple(item(t) for t in text.split("-"))
    except ValueError:
      raise ValueError(f"config argument {key}={text!r}: expected {item.__name__}s joined by "
                       "'-' (e.g. 2-3-4) or none") from None
  if kind is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config argument {key}={text!r}: expected true or false")
    return text.lower() in ("true", "1")
  if kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      raise ValueError(f"config argument {key}={text!r}: expected {kind.__name__}") from None
  return text


def apply_arg(config: ml_collections.ConfigDict, arg: str | None, **extras) -> dict:
  """Applies a config string "a=1,b=x" to `config`: model fields by their name, and
  TOP_LEVEL_ARGS. `extras` are the config's own arguments with their defaults; their parsed
  values are returned."""
  values = dict(extras)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r}: expected key=value")
    if key in extras:
      values[key] = _parse(key, text, extras[key])
    elif key in config.model:
      config.model[key] = _parse(key, text, config.model[key])
    elif key in TOP_LEVEL_ARGS:
      config[key] = _parse(key, text, config[key])
    else:
      allowed = sorted(set(config.model) | set(TOP_LEVEL_ARGS) | set(extras))
      raise ValueError(f"config argument {key!r} is not allowed; choose among {allowed}")
  return values
