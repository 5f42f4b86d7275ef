"""train_and_evaluate(config, workdir): the one training loop for every model.

Data parallel over all devices of all processes with a Mesh/NamedSharding (parameters
replicated, the batch split on the "data" axis; BatchNorm statistics are therefore over
the global batch, over each microbatch of it with config.num_microbatches > 1, or over
groups of config.batch_norm_group_size images within it). Orbax
checkpoints with automatic resume, clu metric writers (TensorBoard + metrics.jsonl) and
progress reports. The workdir may be a local path or a URL (gs://...): every file goes
through etils.epath, orbax or TensorFlow's file system.

Preemption: one process alone saves and exits on SIGTERM. With several processes, jax's
preemption service (started by jax.distributed) turns a SIGTERM to any process into one
agreed step at which every process saves, so no process waits in a barrier that another
never reaches. A non-finite loss or gradient stops the run at the next log or checkpoint
step, before anything non-finite is saved.
"""
import contextlib
import dataclasses
import functools
import hashlib
import shlex
import signal
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import periodic_actions
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sasa_jax import checkpoint_match
from sasa_jax import data as data_lib
from sasa_jax import optim
from sasa_jax import run_info
from sasa_jax import shared_workdir
from sasa_jax import tasks
from sasa_jax import workdir_lease
from sasa_jax.base_config import LOOP_SET_MODEL_FIELDS
from sasa_jax.device_memory import peak_memory
from sasa_jax.data.detection import DetectionOptions
from sasa_jax.metric_writers import create_writer, hparams
from sasa_jax.watchdog import Watchdog
from sasa_jax.models.resnet import batch_norm_across
from sasa_jax.run_once import run_once

# Fields the loop reads (base_config.get_config declares them all).
REQUIRED_FIELDS = (
    "model", "dataset", "batch_size", "num_epochs", "num_train_steps", "optimizer", "schedule",
    "label_smoothing", "ema_decay", "bn_momentum", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "seed", "dtype", "profile",
    "compilation_cache_dir", "num_microbatches", "batch_norm_group_size",
    "keep_checkpoint_every_steps", "workdir_lease_s", "hang_timeout_s")
DATASET_FIELDS = ("name", "data_dir", "image_size", "train_split", "eval_split", "shuffle_buffer",
                  "shuffle_window_mib")
# jax's own switch for its compilation cache as this process started
# (JAX_ENABLE_COMPILATION_CACHE): a run with config.compilation_cache_dir="" turns the cache
# off for itself, and a later run in the same process turns it back on.
_CACHE_ENABLED_AT_START = jax.config.jax_enable_compilation_cache


class TrainState(flax.struct.PyTreeNode):
  """Everything a checkpoint holds. ema_params is None when EMA is off."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any


def batch_norm_groups_fit(group: int, per_device: int, devices: int) -> bool:
  """Whether BatchNorm groups of `group` > 0 images split each of `devices` devices'
  `per_device` images, or are the images of whole devices (consecutive ones, as many as
  divide `devices`): what apply_in_groups runs."""
  return per_device % group == 0 or (group % per_device == 0
                                     and per_device * devices % group == 0)


class DeviceOutOfMemoryError(RuntimeError):
  """A step needed more memory than a device has (XLA's RESOURCE_EXHAUSTED); the message says
  what in the config to change."""


def larger_microbatch_counts(config, devices: int) -> list[int]:
  """The config.num_microbatches values above config's that its batch size, device count and
  BatchNorm groups allow (validate_config's rules), smallest first."""
  per_device, group = config.batch_size // devices, config.batch_norm_group_size
  return [m for m in range(config.num_microbatches + 1, per_device + 1)
          if per_device % m == 0
          and (not group or batch_norm_groups_fit(group, per_device // m, devices))]


def config_flags_of(argv) -> list[str]:
  """The --config and --config.FIELD arguments of a command line (`--flag value` pairs kept
  together; a bare boolean `--config.FIELD` alone), shell-quoted."""
  kept, i = [], 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--config" or arg.startswith(("--config=", "--config.")):
      kept.append(arg)
      if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        i += 1
        kept.append(argv[i])
    i += 1
  return [shlex.quote(a) for a in kept]


def out_of_memory_advice(config, devices: int, argv) -> str:
  """What to change when config's training step does not fit in a device's memory, and the
  command that plans each option (tools/step_memory.py)."""
  per_device, num = config.batch_size // devices, config.num_microbatches
  larger = larger_microbatch_counts(config, devices)
  lines = [f"{per_device} images per device (config.batch_size={config.batch_size} on "
           f"{devices} device(s)" + (f", in {num} microbatches of {per_device // num}"
                                     if num > 1 else "") + ") do not fit; instead:"]
  if larger:
    lines.append(f"--config.num_microbatches={larger[0]}: the same step, the activations of "
                 f"{per_device // larger[0]} images at a time")
  else:
    lines.append(f"config.num_microbatches={num} is the most that splits them"
                 + (f" into BatchNorm groups of config.batch_norm_group_size="
                    f"{config.batch_norm_group_size}" if config.batch_norm_group_size else ""))
  if config.dtype == "float32":
    lines.append("--config.dtype=bfloat16: activations in half the bytes")
  lines.append("a smaller config.batch_size, or more devices")
  flags_ = config_flags_of(argv) or ["--config=CONFIG"]
  counts = ",".join(str(m) for m in [num, *larger[:3]])
  return "\n  ".join(lines) + (
      "\nPlan each before running, on a device of this kind: python -m "
      f"sasa_jax.tools.step_memory {' '.join(flags_)} --devices={devices} "
      f"--microbatches={counts}")


@contextlib.contextmanager
def advise_when_out_of_memory(config, devices: int):
  """Turns XLA's RESOURCE_EXHAUSTED inside the block into a DeviceOutOfMemoryError that says
  what to change (out_of_memory_advice)."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DeviceOutOfMemoryError(
        f"{str(e).splitlines()[0]}\n{memory_advice(config, devices, str(e))}") from e


def memory_advice(config, devices: int, error: str) -> str:
  """What to change for XLA's RESOURCE_EXHAUSTED `error`: a TPU's on-chip memory (VMEM) is
  per kernel, not per batch (vmem_advice); anything else is the batch's
  (out_of_memory_advice)."""
  if "memory space vmem" in error:
    return vmem_advice(config)
  return out_of_memory_advice(config, devices, sys.argv)


def vmem_advice(config) -> str:
  """What to change when a kernel of the step does not fit in a TPU core's VMEM."""
  advice = ("a kernel of the step needs more of the TPU's on-chip memory (VMEM) than it has; "
            "the batch size and microbatches do not change that")
  if config.model.get("impl") == "pallas":
    advice += ("; with the Pallas attention kernels, --config.model.impl=auto runs the "
               "blocked XLA form instead (docs/models.md)")
  return advice


def validate_config(config: ml_collections.ConfigDict, devices: int | None = None) -> int:
  """Raises ValueError naming the bad field, its value and what is allowed, before any data
  is read or anything compiled: the model is built abstractly (jax.eval_shape), so that a
  layer or implementation that cannot take the config fails here. devices: the run's device
  count (None: jax.device_count()). Returns the model's parameter count."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(f"config is missing field(s) {missing} (configs start from "
                     "sasa_jax.base_config.get_config())")
  missing = [f for f in DATASET_FIELDS if f not in config.dataset]
  if missing:
    raise ValueError(f"config.dataset is missing field(s) {missing}")
  if config.dataset.name not in data_lib.DATASETS:
    raise ValueError(f"config.dataset.name={config.dataset.name!r} is not allowed; choose one "
                     f"of {tuple(data_lib.DATASETS)}")
  task = tasks.get(config)  # raises ValueError naming config.task
  spec = data_lib.DATASETS[config.dataset.name]
  if spec.task != task.name:
    raise ValueError(f"config.dataset.name={config.dataset.name!r} is a {spec.task} dataset "
                     f"but config.task={task.name!r}")
  for f in LOOP_SET_MODEL_FIELDS:
    if f in config.model:
      raise ValueError(f"config.model.{f} is set by the top-level config.{f}; remove it")
  allowed = set(task.model_fields)
  unknown = sorted(set(config.model) - allowed)
  if unknown:
    raise ValueError(f"config.model has unknown field(s) {unknown}; allowed (the keyword "
                     f"arguments of {task.factory.__name__}): "
                     f"{sorted(allowed - set(LOOP_SET_MODEL_FIELDS))}")
  if spec.num_classes is not None and config.model.get("num_classes") != spec.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.get('num_classes')!r}: "
                     f"{config.dataset.name} has {spec.num_classes} classes")
  if task.name == "detection" and "detection" not in config:
    raise ValueError("config is missing field 'detection' (base_config.get_config() has it)")
  if config.get("init_backbone_from") and task.name != "detection":
    raise ValueError(f"config.init_backbone_from={config.init_backbone_from!r} initialises a "
                     "detection model's backbone; config.task is "
                     f"{task.name!r}")
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={config.dtype!r} is not allowed; choose one of "
                     "('float32', 'bfloat16')")
  n, num = devices or jax.device_count(), config.num_microbatches
  if not isinstance(num, int) or num <= 0:
    raise ValueError(f"config.num_microbatches={num!r} must be a positive integer")
  if config.batch_size <= 0 or config.batch_size % (num * n):
    raise ValueError(f"config.batch_size={config.batch_size} must be a positive multiple of the "
                     f"device count {n}" + (f" times config.num_microbatches={num} "
                                            f"({num * n})" if num > 1 else ""))
  group, local = config.batch_norm_group_size, config.batch_size // num // n
  if not isinstance(group, int) or group < 0 or (group and not batch_norm_groups_fit(
      group, local, n)):
    raise ValueError(
        f"config.batch_norm_group_size={group!r} must be 0 (statistics over the whole "
        f"{'microbatch' if num > 1 else 'batch'}){', ' if n > 1 else ' or '}a divisor of the "
        f"{local} images each of the {n} device(s) holds (config.batch_size={config.batch_size}"
        + (f" / num_microbatches={num}" if num > 1 else "") + f" / {n})"
        + (f", or a multiple of {local} that divides {local * n} (groups of whole devices)"
           if n > 1 else ""))
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_train_steps > 0 or config.num_epochs > 0, got "
                     f"{config.num_train_steps} and {config.num_epochs}")
  for f, off in (("workdir_lease_s", "no lease, nothing stops a second run on the workdir"),
                 ("hang_timeout_s", "a hung run waits for its time limit")):
    if not isinstance(config[f], (int, float)) or config[f] < 0:
      raise ValueError(f"config.{f}={config[f]!r} must be a number of seconds >= 0 (0: {off})")
  buffer, window_mib = config.dataset.shuffle_buffer, config.dataset.shuffle_window_mib
  if not isinstance(buffer, int) or buffer <= 0:
    raise ValueError(f"config.dataset.shuffle_buffer={buffer!r} must be a positive number of "
                     "records")
  if not isinstance(window_mib, (int, float)) or window_mib <= 0:
    raise ValueError(f"config.dataset.shuffle_window_mib={window_mib!r} must be a number of "
                     "MiB > 0 (a shuffle window: that much of the records, or "
                     "config.dataset.shuffle_buffer of them where that is more)")
  for f in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[f] <= 0:
      raise ValueError(f"config.{f}={config[f]} must be > 0")
  every = config.keep_checkpoint_every_steps
  if not isinstance(every, int) or every < 0 or every % config.checkpoint_every_steps:
    raise ValueError(f"config.keep_checkpoint_every_steps={every!r} must be 0 (keep the last "
                     "config.keep_checkpoints only) or a multiple of "
                     f"config.checkpoint_every_steps={config.checkpoint_every_steps}")
  optim.validate(config.optimizer, config.schedule)
  model = create_model(config)  # model fields: raises ValueError naming the field
  size = config.dataset.image_size
  image_shape = (size, size, len(spec.mean))
  try:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((1, *image_shape)), train=False))
    task.check(model, variables, image_shape)
  except (ValueError, TypeError, NotImplementedError) as e:
    raise ValueError(f"config.model {dict(config.model)} cannot be built for "
                     f"{size}x{size} images: {e}") from e
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def create_model(config):
  try:
    return tasks.get(config).create_model()
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from e


def split_microbatches(batch, num: int):
  """Every [B, ...] leaf as [num, B / num, ...], microbatch i holding rows i, num + i,
  2 num + i, ...: a batch laid out in contiguous blocks over the devices gives every
  microbatch an equal share of each device's block, so no row leaves its device."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), batch)


def apply_in_groups(model, params, batch_stats, images, rng, group_size: int):
  """The model in training mode on images [N, S, S, C] -> (outputs with N first, new
  BatchNorm running averages).

  group_size = 0: BatchNorm statistics over all N images (across devices when the batch is
  sharded). group_size = g > 0: over every g contiguous images. Under a mesh the model runs
  per device (shard_map), so statistics cross devices only where a group spans them: g
  dividing each device's share L of the N, each device's images as groups of g (jax.vmap,
  one set of parameters); g a multiple of L, the statistics averaged over each g / L
  consecutive devices (a grouped all-reduce, models.resnet.batch_norm_across). The groups'
  running averages are averaged."""
  def apply(variables, images, rng, model=model):
    outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
    return outputs, updates["batch_stats"]

  def apply_groups(variables, images, rng):
    n = images.shape[0]
    if n == group_size:
      return apply(variables, images, rng)
    groups = n // group_size
    outputs, stats = jax.vmap(apply, in_axes=(None, 0, 0))(
        variables, images.reshape(groups, group_size, *images.shape[1:]),
        jax.random.split(rng, groups))
    return (jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), outputs),
            jax.tree.map(lambda x: x.mean(0), stats))

  variables = {"params": params, "batch_stats": batch_stats}
  if not group_size:
    return apply(variables, images, rng)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes or mesh.size == 1:
    return apply_groups(variables, images, rng)
  axes = tuple(mesh.axis_names)

  def per_device(variables, images, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
    local = images.shape[0]
    if group_size <= local:
      outputs, stats = apply_groups(variables, images, rng)
    else:  # each group of `span` consecutive devices (in the batch's order) normalises as one
      span = group_size // local
      device_groups = tuple(tuple(range(i, i + span)) for i in range(0, mesh.size, span))
      outputs, stats = apply(variables, images, rng,
                             model=batch_norm_across(model, axes, device_groups))
    return outputs, jax.lax.pmean(stats, axes)
  # The variables enter as arguments, not closures: a closed-over array keeps its sharding on
  # the automatic mesh, which indexing it inside the manual one refuses (the attention stem's
  # relative embeddings). check_vma=False as in the attention op (sasa_jax.ops.local_attention):
  # its kernel calls carry no varying-axes types; the transpose sums the parameters'
  # cotangents over devices.
  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axes), P()),
                       out_specs=(P(axes), P()), check_vma=False)(variables, images, rng)


def train_step(state, batch, *, model, tx, schedule, config, task):
  """One step on the global batch {"image": [B, S, S, C], + the task's targets}.

  With config.num_microbatches = M > 1 the batch runs as M microbatches of B / M images one
  after another (lax.scan), each normalised by its own BatchNorm statistics; their losses,
  gradients, metrics and BatchNorm running averages are averaged into one optimizer step
  (activation memory of B / M images). config.batch_norm_group_size = g > 0 normalises
  every g contiguous images of a (micro)batch by their own statistics (apply_in_groups)."""
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

  def loss_fn(params, micro, rng):
    images = data_lib.normalize(micro["image"], config.dataset.name)
    outputs, batch_stats = apply_in_groups(model, params, state.batch_stats, images, rng,
                                           config.batch_norm_group_size)
    loss, task_metrics = task.loss(outputs, micro)
    return loss, (task_metrics, batch_stats)

  def micro_step(micro, rng):
    (loss, (task_metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, micro, rng)
    return grads, batch_stats, loss, task_metrics

  num = config.num_microbatches
  if num == 1:
    grads, batch_stats, loss, task_metrics = micro_step(batch, rng)
  else:
    micro = split_microbatches(batch, num)

    def add(total, xs):
      i, one = xs
      out = micro_step(one, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, total, out), None
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(micro_step, first, rng))
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(num), micro))
    grads, batch_stats, loss, task_metrics = jax.tree.map(lambda t: t / num, total)
  deltas, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, deltas)
  ema = state.ema_params
  if ema is not None:  # decay warms up as min(d, (1 + t) / (10 + t)), as tf.train.EMA does
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(config.ema_decay, (1 + t) / (10 + t))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
  grad_norm = optax.tree.norm(grads)
  metrics = {"train/loss": loss, **task_metrics,
             "train/grad_norm": grad_norm,
             "learning_rate": schedule(state.step),
             # 1.0 while loss, gradients and new parameters are all finite
             "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                        & jnp.isfinite(optax.tree.norm(params))).astype(jnp.float32)}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema)
  return new_state, metrics


def jit_train_step(config, task, model, tx, schedule, state_sharding, batch_sharding):
  """train_step jitted for these shardings, the state donated; traced and run under the
  batch sharding's mesh (`jax.set_mesh`)."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                        task=task),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, NamedSharding(batch_sharding.mesh, P())),
      donate_argnums=(0,))


def eval_step(state, batch, *, model, dataset_name, task):
  """The task's evaluation outputs of one global batch (with its "mask": 1 real, 0 pad)."""
  params = state.params if state.ema_params is None else state.ema_params
  outputs = model.apply({"params": params, "batch_stats": state.batch_stats},
                        data_lib.normalize(batch["image"], dataset_name), train=False)
  return task.eval_outputs(outputs, batch)


def jit_eval_step(config, task, model, state_sharding, batch_sharding):
  """eval_step jitted for these shardings (state_sharding may be one sharding for the whole
  state), its outputs replicated; traced and run under the batch sharding's mesh."""
  return jax.jit(
      functools.partial(eval_step, model=model, dataset_name=config.dataset.name, task=task),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=NamedSharding(batch_sharding.mesh, P()))


def eval_batch_size(config) -> int:
  """The global eval batch: one microbatch's size (evaluation holds no gradients). A config
  without num_microbatches (an older run's config.json) has one microbatch."""
  return config.batch_size // config.get("num_microbatches", 1)


def evaluate_split(p_eval, state, builder, task, *, split: str, batch_size: int,
                   image_size: int, batch_sharding, on_batch=lambda i: None) -> dict:
  """The task's metrics of `state` over every example of `split` exactly once (the last
  batches padded and masked), in global batches of `batch_size`; on_batch(i) after batch i."""
  n = data_lib.eval_steps(builder, split, batch_size)
  ds = data_lib.eval_dataset(builder, split=split,
                             per_host_batch=batch_size // jax.process_count(),
                             image_size=image_size, num_steps=n)
  evaluator = task.evaluator(builder)
  for i, batch in enumerate(ds.as_numpy_iterator()):
    evaluator.update(p_eval(state, data_lib.to_global(batch, batch_sharding)))
    on_batch(i)
  return evaluator.result()


class DivergenceError(FloatingPointError):
  """The loss, gradients or parameters stopped being finite."""


class _Preemption:
  """When to save and exit on a preemption notice (SIGTERM) or, with one process, Ctrl-C.

  One process: Python handlers of SIGTERM and SIGINT set a flag, checked after every step
  (a second Ctrl-C interrupts at once, as Python's own handler does). Several processes:
  jax.distributed's preemption service owns SIGTERM (a Python handler would replace its
  handler and leave processes stopping at different steps); orbax's
  `reached_preemption(step)`, called at every step by every process, turns true at the same
  step everywhere."""

  def __init__(self, ckpt: ocp.CheckpointManager):
    self._ckpt = ckpt
    self.requested = False
    self._own_handler = jax.process_count() == 1
    if self._own_handler:  # (a process started with SIGINT ignored keeps ignoring it)
      self._previous = {sig: signal.signal(sig, self._handle)
                        for sig in (signal.SIGTERM, signal.SIGINT)
                        if sig == signal.SIGTERM or signal.getsignal(sig) != signal.SIG_IGN}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: saving a checkpoint at the next step, then exiting (Ctrl-C "
                      "again stops at once)")
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
    else:
      logging.warning("SIGTERM: saving a checkpoint at the next step, then exiting")
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._own_handler:
      return self.requested
    return self._ckpt.reached_preemption(step)

  def restore(self):
    if self._own_handler:
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)


def set_compilation_cache(config, workdir: epath.Path) -> str | None:
  """Persistent XLA compilation cache, so that a restarted run skips compiling.

  config.compilation_cache_dir: None = JAX_COMPILATION_CACHE_DIR if set, else
  WORKDIR/compilation_cache; "" = off (JAX_COMPILATION_CACHE_DIR or not); else that
  directory (local or gs://). Always off where JAX_ENABLE_COMPILATION_CACHE=false."""
  from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415
  path = config.compilation_cache_dir
  if path is None:
    path = jax.config.jax_compilation_cache_dir or str(workdir / "compilation_cache")
  enabled = bool(path) and _CACHE_ENABLED_AT_START  # "": off, JAX_COMPILATION_CACHE_DIR or not
  if enabled != jax.config.jax_enable_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
  if not enabled:
    return None
  if path != jax.config.jax_compilation_cache_dir:
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


# Orbax saves a replicated array "replica-parallel": each replica writes a slice of it, cut on
# the device by a program compiled for that array's shape and that device, at the first save of
# every process (52 programs, about 1 CPU second, for the tests' ResNet-14 on 2 CPU devices).
# Splitting pays only for large arrays; smaller ones are written whole by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _write_small_arrays_whole() -> None:
  """Registers orbax's jax.Array handler (with its default metadata store) so that an array is
  split among its replicas only where each slice holds MIN_REPLICA_SLICE_BYTES or more."""
  from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: PLC0415 (no public path)
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


def preservation_policy(config):
  """Which checkpoints orbax keeps: the last config.keep_checkpoints, and with
  config.keep_checkpoint_every_steps > 0 every one at a multiple of it as well."""
  latest = ocp.checkpoint_managers.LatestN(config.keep_checkpoints)
  if not config.keep_checkpoint_every_steps:
    return latest
  return ocp.checkpoint_managers.AnyPreservationPolicy(
      [latest, ocp.checkpoint_managers.EveryNSteps(config.keep_checkpoint_every_steps)])


def initial_state(config, model, tx, mesh, image_shape):
  """(init, abstract, shardings): init() makes the TrainState (jit it with
  out_shardings=shardings to build it straight into them), abstract is its
  jax.ShapeDtypeStructs, shardings replicate every leaf over `mesh`."""
  def init():
    variables = model.init(jax.random.key(config.seed), jnp.zeros((1,) + image_shape),
                           train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      ema_params=params if config.ema_decay > 0 else None)

  abstract = jax.eval_shape(init)
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, abstract)
  return init, abstract, shardings


def params_fingerprint(params) -> str:
  """sha256 of this process's own replica of the parameters (to compare processes)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(leaf.addressable_data(0)).tobytes())
  return digest.hexdigest()


def _check_finite(pending, ckpt, step):
  """Raises DivergenceError if any step in `pending` (metrics since the last check) had a
  non-finite loss, gradient or parameter, naming the first such step and the newest
  checkpoint (every checkpoint is finite: this check runs before each save)."""
  finite = np.asarray(jax.device_get([m["finite"] for _, m in pending]))
  if finite.all():
    return
  bad_step = pending[int(np.argmin(finite))][0]
  last = ckpt.latest_step()
  where = (f"the last finite checkpoint is step {last} in {ckpt.directory}" if last is not None
           else "no checkpoint was written before it")
  raise DivergenceError(f"training diverged: non-finite loss, gradient or parameters at step "
                        f"{bad_step}; {where}. Lower the learning rate "
                        f"or check the data, then resume from that checkpoint.")


def init_backbone(state: TrainState, source: str, tx, shardings) -> TrainState:
  """`state` with its backbone's parameters and BatchNorm statistics taken from the latest
  checkpoint of the classification run in `source` (its EMA weights if it kept them; its
  classifier head left out), the optimizer state (and EMA) started afresh. Raises
  ValueError naming the first entry whose presence or shape differs."""
  from sasa_jax.tools.runs import restore_variables  # noqa: PLC0415
  step, _, variables = restore_variables(source)
  replaced = {}
  for collection in ("params", "batch_stats"):
    target = getattr(state, collection)["backbone"]
    loaded = {k: v for k, v in variables[collection].items() if k != "head"}
    want, have = ({jax.tree_util.keystr(k): v
                   for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
                  for tree in (target, loaded))
    for key in sorted(set(want) | set(have)):
      if key not in have or key not in want or want[key].shape != have[key].shape:
        raise ValueError(
            f"config.init_backbone_from={source!r}: {collection}{key} is "
            f"{'missing' if key not in have else have[key].shape} in its checkpoint (step "
            f"{step}) but {'absent' if key not in want else want[key].shape} in this "
            "backbone; the classification run must use the same depth, variant and "
            "backbone settings")
    sharding = jax.tree.leaves(shardings)[0]
    placed = jax.tree.map(lambda t, x: jax.make_array_from_callback(
        t.shape, sharding, lambda index: np.asarray(x, t.dtype)[index]), target, loaded)
    replaced[collection] = {**getattr(state, collection), "backbone": placed}
  params = replaced["params"]
  opt_state = run_once(jax.jit(tx.init, out_shardings=shardings.opt_state), params)
  logging.info("initialised the backbone from %s (step %d)", source, step)
  return state.replace(params=params, batch_stats=replaced["batch_stats"], opt_state=opt_state,
                       ema_params=params if state.ema_params is not None else None)


def _detection_options(task, config) -> DetectionOptions | None:
  if task.name != "detection":
    return None
  c = config.detection
  return DetectionOptions(max_boxes=c.max_boxes, scale_min=c.scale_min, scale_max=c.scale_max)


class Throughput:
  """Training images per second between log steps, over all devices and per device, and the
  share of that time the loop waited for its next batch (near 1: the input pipeline, not
  the devices, sets the pace). The clock restarts after the first (compiling) step and after
  each evaluation; `clock` returns seconds."""

  def __init__(self, batch_size: int, devices: int, step: int, clock=time.perf_counter):
    self.batch_size, self.devices, self.clock = batch_size, devices, clock
    self.restart(step)

  def restart(self, step: int) -> None:
    self.step, self.time, self.input_wait = step, self.clock(), 0.0

  def next_batch(self, iterator):
    """next(iterator), its wait counted."""
    start = self.clock()
    batch = next(iterator)
    self.input_wait += self.clock() - start
    return batch

  def since_last(self, step: int) -> dict:
    """Called once the steps up to `step` are done (their metrics fetched)."""
    now = self.clock()
    if step <= self.step:
      return {}
    seconds = now - self.time
    images_per_sec = (step - self.step) * self.batch_size / seconds
    result = {"images_per_sec": images_per_sec,
              "images_per_sec_per_device": images_per_sec / self.devices,
              "input_wait_fraction": self.input_wait / seconds}
    self.restart(step)
    return result


def _check_checkpoint_matches(ckpt, step, abstract, config, workdir) -> None:
  """Raises ValueError, naming the arrays and config fields that differ, where the
  checkpoint at `step` does not hold the state `config` builds (a changed model, optimizer
  or EMA in a workdir that holds another run)."""
  differences = checkpoint_match.state_differences(ckpt.item_metadata(step), abstract)
  if not differences:
    return
  ckpt.close()
  saved = workdir / "config.json"
  changed = checkpoint_match.config_differences(saved, config)
  raise ValueError(
      f"{ckpt.directory}/{step} holds another state than this config builds:\n  "
      + "\n  ".join(differences)
      + (f"\nthe config that wrote it ({saved}) differs in:\n  " + "\n  ".join(changed)
         if changed else "")
      + "\nResume with the run's own config, or train this one in a new --workdir.")


def under_mesh(mesh, fn):
  """fn, traced and run with `mesh` as jax's context mesh: the attention op maps its kernel
  calls over the batch shards it finds there (`ops.local_attention`), which XLA's
  partitioner cannot split."""
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return call


def split_size(builder, config, field: str) -> int:
  """The examples in config.dataset.<field> (a TFDS split spec); ValueError naming the
  field, its value and the dataset's splits where TFDS cannot read it or it is empty."""
  split = config.dataset[field]
  try:
    size = data_lib.num_examples(builder, split)
  except (ValueError, KeyError) as e:
    raise ValueError(f"config.dataset.{field}={split!r}: {e}") from e
  if not size:
    raise ValueError(f"config.dataset.{field}={split!r} holds no examples; "
                     f"{config.dataset.name} has " + ", ".join(
                         f"{name}: {info.num_examples}"
                         for name, info in builder.info.splits.items()))
  return size


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What a run's config and workdir make, checked before anything is created or compiled."""
  workdir: epath.Path   # absolute, or a URL
  num_params: int       # the model's
  builder: Any          # the prepared TFDS builder
  num_train: int        # examples of config.dataset.train_split
  num_eval: int         # examples of config.dataset.eval_split
  steps_per_epoch: int
  num_steps: int        # the steps the run trains to


def plan_run(config: ml_collections.ConfigDict, workdir: str,
             devices: int | None = None) -> RunPlan:
  """Checks the config (validate_config, for `devices`: None, jax.device_count()), the
  workdir's path and the dataset (prepared in data_dir, both splits readable and not empty),
  and counts the steps; ValueError or FileNotFoundError naming what to change. Creates
  nothing (but a dataset that prepares itself where it is missing: Fashion-MNIST's):
  train_and_evaluate's start, and tools/preflight's before a job is submitted."""
  num_params = validate_config(config, devices)
  workdir = epath.Path(workdir)
  if not workdir.is_absolute() and "://" not in str(workdir):
    workdir = workdir.absolute()
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"the workdir {workdir} is a file; give a directory (new or a run's)")
  builder = data_lib.get_builder(config.dataset.name, config.dataset.data_dir)
  num_train = split_size(builder, config, "train_split")
  num_eval = split_size(builder, config, "eval_split")  # a typo fails now, not when evaluating
  steps_per_epoch = num_train // config.batch_size
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else int(config.num_epochs * steps_per_epoch))
  if num_steps <= 0:
    raise ValueError(
        f"config.num_epochs={config.num_epochs} of config.dataset.train_split="
        f"{config.dataset.train_split!r} ({num_train} examples, {steps_per_epoch} steps of "
        f"config.batch_size={config.batch_size} per epoch) makes no training step: train on "
        "more examples, more epochs, or set config.num_train_steps")
  if steps_per_epoch == 0:  # config.num_train_steps without one whole batch per epoch
    raise ValueError(
        f"config.batch_size={config.batch_size} is larger than config.dataset.train_split="
        f"{config.dataset.train_split!r} ({num_train} examples): an epoch holds no whole "
        "batch, and the schedule counts its epochs in batches; use a smaller batch or a "
        "larger split")
  return RunPlan(workdir, num_params, builder, num_train, num_eval, steps_per_epoch, num_steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains config's model on config's dataset in workdir, resuming from its checkpoints.

  workdir: a local directory or a URL that etils.epath, orbax and TensorFlow read
  (gs://bucket/run); shared by all processes."""
  started = time.time()
  plan = plan_run(config, workdir)
  plan.workdir.mkdir(parents=True, exist_ok=True)
  shared_workdir.check(plan.workdir)  # every process sees it, or all fail now
  with (workdir_lease.held(plan.workdir, config.workdir_lease_s,  # one run per workdir
                           active=jax.process_index() == 0) as lease,
        Watchdog(config.hang_timeout_s) as watchdog):  # a hung run stops
    return _train(config, plan, lease, watchdog, started)


def _train(config, plan: RunPlan, lease: workdir_lease.WorkdirLease, watchdog: Watchdog,
           started: float) -> TrainState:
  """train_and_evaluate's loop for `plan`, in a workdir this run holds the lease of,
  reporting its progress to `watchdog`."""
  workdir, builder = plan.workdir, plan.builder
  steps_per_epoch, num_steps = plan.steps_per_epoch, plan.num_steps
  set_compilation_cache(config, workdir)
  is_main = jax.process_index() == 0
  writer = create_writer(workdir, is_main)
  per_host_batch = config.batch_size // jax.process_count()
  eval_batch = eval_batch_size(config)
  size = config.dataset.image_size
  channels = len(data_lib.DATASETS[config.dataset.name].mean)

  task = tasks.get(config)
  model = task.create_model()
  schedule = optim.create_schedule(config.schedule, steps_per_epoch, num_steps)
  tx = optim.create_optimizer(config.optimizer, schedule)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  init, abstract, state_sharding = initial_state(config, model, tx, mesh, (size, size, channels))

  _write_small_arrays_whole()
  ckpt = ocp.CheckpointManager(
      workdir / "checkpoints", item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(
          preservation_policy=preservation_policy(config),
          save_interval_steps=config.checkpoint_every_steps,
          enable_async_checkpointing=True, create=True))
  latest = ckpt.latest_step()
  if latest is not None:
    _check_checkpoint_matches(ckpt, latest, abstract, config, workdir)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)
    state = ckpt.restore(latest, args=ocp.args.StandardRestore(target))
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
  else:
    state = run_once(jax.jit(init, out_shardings=state_sharding))
    if config.get("init_backbone_from"):
      state = init_backbone(state, config.init_backbone_from, tx, state_sharding)
  start_step = int(jax.device_get(state.step))

  saved = workdir / "config.json"
  changes = (checkpoint_match.config_differences(saved, config)
             if is_main and latest is not None else [])
  if changes:  # e.g. a longer schedule, on purpose; or another batch size, by mistake
    logging.warning("resuming with a config that differs from the last start's (%s, "
                    "there; this command, here) in:\n  %s", saved, "\n  ".join(changes))
  lease.confirm()  # raises if another run claimed the workdir at the same time
  # process 0 writes; every one gathers
  start = run_info.record_start(workdir, start_step, config_changes=changes,
                                num_train_steps=num_steps, run=lease.run)
  if is_main:  # what tools (attention maps, reports) need to rebuild the model
    saved.write_text(config.to_json_best_effort(indent=2))
    code = start["code"]
    logging.info("start at step %d recorded in starts.jsonl: jax %s, %d %s device(s) in %d "
                 "process(es), code %s", start_step, start["packages"]["jax"],
                 start["devices"], start["device_kind"], start["processes"],
                 (code["commit"][:12] + (" with uncommitted changes"
                                         if code["uncommitted_changes"] else ""))
                 if code else "not from a git checkout")
  if is_main and start_step == 0:
    logging.info("model %s: %.3fM parameters; %d steps, %d per epoch", dict(config.model),
                 plan.num_params / 1e6, num_steps, steps_per_epoch)
    writer.write_hparams(hparams(config))
  if is_main:
    devices, processes, num = jax.device_count(), jax.process_count(), config.num_microbatches
    group, local = config.batch_norm_group_size, config.batch_size // devices // num
    logging.info("batch %d: %d per device on %d device(s) in %d process(es)%s%s%s",
                 config.batch_size, config.batch_size // devices, devices, processes,
                 f", as {num} microbatches of {local}" if num > 1 else "",
                 f"; BatchNorm statistics over groups of {group} images" if group else "",
                 f", each across {group // local} devices" if group > local else "")

  p_train = under_mesh(mesh, jit_train_step(config, task, model, tx, schedule,
                                            state_sharding, batch_sharding))
  p_eval = under_mesh(mesh, jit_eval_step(config, task, model, state_sharding, batch_sharding))

  def evaluate(step):
    result = evaluate_split(
        p_eval, state, builder, task, split=config.dataset.eval_split, batch_size=eval_batch,
        image_size=size, batch_sharding=batch_sharding,
        on_batch=lambda i: watchdog.progress(f"evaluation batch {i + 1} at step {step}"))
    writer.write_scalars(step, result)
    writer.flush()
    return result

  train_iter = data_lib.train_dataset(
      builder, split=config.dataset.train_split, per_host_batch=per_host_batch, image_size=size,
      seed=config.seed, start_step=start_step,
      shuffle_buffer=config.dataset.shuffle_buffer,
      window_mib=config.dataset.shuffle_window_mib,
      crop_padding=config.dataset.get("crop_padding", 2),
      detection_options=_detection_options(task, config)).as_numpy_iterator()
  # Called after a log step's metrics are fetched: steps/s and ETA over finished steps, not
  # over steps the host has dispatched ahead of the devices.
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=config.log_every_steps,
      every_secs=None)
  profile = None
  remaining = num_steps - start_step
  if remaining <= 0:
    logging.info("step %d is at or past the run's %d steps: nothing to train (a longer run: "
                 "--config.num_train_steps or --config.num_epochs)", start_step, num_steps)
  if config.profile and is_main and remaining >= 2:
    # 5 steps from 10 steps after this start (compilation done), fewer and earlier in a
    # shorter run, so that the trace is written before the run ends; then every hour.
    count = min(5, remaining - 1)
    first = start_step + max(1, min(10, remaining - count))
    profile = periodic_actions.Profile(logdir=str(workdir), num_profile_steps=count,
                                       profile_duration_ms=None, first_profile=first)
    logging.info("profiling %d step(s) from step %d, and again every hour, into %s "
                 "(TensorBoard's Profile tab)", count, first + 1, workdir / "plugins" / "profile")

  preemption = _Preemption(ckpt)
  throughput = Throughput(config.batch_size, jax.device_count(), start_step)
  pending = []  # (step, metrics) since the last log step, still on the device
  unchecked = []  # (step, metrics) since the last finiteness check
  step = start_step
  try:
    with advise_when_out_of_memory(config, jax.device_count()):
      while step < num_steps:
        lease.check()  # process 0; the others stop with it (peer_failure)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = data_lib.to_global(throughput.next_batch(train_iter), batch_sharding)
          with (watchdog.paused("the training step's compilation") if step == start_step
                else contextlib.nullcontext()):
            state, metrics = p_train(state, batch)
        step += 1
        watchdog.progress(f"step {step}")
        if step == start_step + 1:
          jax.block_until_ready(metrics)
          logging.info("first step done %.1f s after start (compilation included)",
                       time.time() - started)
          throughput.restart(step)
        pending.append(metrics)
        unchecked.append((step, metrics))
        if profile is not None:
          profile(step)
        stop = preemption.reached(step)  # asked once per step: every process gets one answer
        save = stop or step == num_steps or step % config.checkpoint_every_steps == 0
        if save or step % config.log_every_steps == 0:
          _check_finite(unchecked, ckpt, step)
          unchecked = []
        if step % config.log_every_steps == 0 or step == num_steps:
          summary = jax.tree.map(lambda *x: float(np.mean(x)), *jax.device_get(pending))
          summary.pop("finite")
          summary.update(throughput.since_last(step))
          summary.update(peak_memory(jax.local_devices()))
          writer.write_scalars(step, summary)
          pending = []
        report_progress(step)  # every step; a log step's once its metrics are fetched
        due = step % config.eval_every_steps == 0 or step == num_steps
        if save:  # before evaluating: an evaluation that fails loses no training
          lease.check()
          ckpt.save(step, args=ocp.args.StandardSave(state), force=True)
          watchdog.progress(f"the checkpoint of step {step} began saving")
        if stop:
          logging.warning("preempted: checkpoint at step %d written; exiting%s", step,
                          f" without its evaluation (python -m sasa_jax.tools.evaluate "
                          f"--workdir={workdir} --step={step})" if due else "")
          break
        if due:
          evaluate(step)
          throughput.restart(step)
    logging.info("process %d final parameters at step %d: sha256 %s", jax.process_index(), step,
                 params_fingerprint(state.params))
  finally:
    ckpt.wait_until_finished()
    ckpt.close()
    preemption.restore()
    writer.flush()
    writer.close()
  return state
