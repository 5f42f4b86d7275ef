"""Optimizers and learning-rate schedules from the config (config.optimizer, config.schedule).

    config.optimizer = dict(name="sgd", momentum=0.9, nesterov=True, b1=0.9, b2=0.999,
                            eps=1e-8, weight_decay=1e-4, grad_clip_norm=0.0)
    config.schedule = dict(name="cosine", peak_value=..., warmup_epochs=5.0, end_value=0.0,
                           boundaries_epochs=(30, 60, 90), decay_factor=0.1)

Each optimizer reads the fields it needs (sgd: momentum, nesterov; adamw and lamb: b1, b2,
eps) and weight_decay, which applies to kernels and embeddings only (parameters with more
than one dimension; never biases or batch-norm scales). grad_clip_norm > 0 first scales the
gradients down to that global L2 norm where they exceed it (optax.clip_by_global_norm; 0:
off; the logged train/grad_norm is the norm before clipping). Every schedule warms up linearly
from 0 to peak_value over warmup_epochs, then: "cosine" decays to end_value, "linear" goes
straight to end_value, "step" multiplies by decay_factor at each of boundaries_epochs,
"constant" stays. The learning rate is what the config says: linear scaling with the batch
size, where wanted, is written in the config (`base_config.linear_scaling`).

A new optimizer or schedule is one function in OPTIMIZERS or SCHEDULES.
"""
from typing import Callable

import jax
import optax


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _sgd(c, lr):
  return optax.chain(optax.add_decayed_weights(c.weight_decay, mask=_decay_mask),
                     optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))


def _adamw(c, lr):
  return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                     mask=_decay_mask)


def _lamb(c, lr):
  return optax.lamb(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                    mask=_decay_mask)


# name -> (optimizer config, schedule) -> optax.GradientTransformation
OPTIMIZERS: dict[str, Callable] = {"sgd": _sgd, "adamw": _adamw, "lamb": _lamb}


def _after_warmup(name: str, c, steps_per_epoch: int, warmup: int, num_steps: int):
  decay_steps = max(num_steps - warmup, 1)
  if name == "cosine":
    return optax.cosine_decay_schedule(c.peak_value, decay_steps,
                                       alpha=c.end_value / c.peak_value if c.peak_value else 0.0)
  if name == "linear":
    return optax.linear_schedule(c.peak_value, c.end_value, decay_steps)
  if name == "step":
    boundaries = {int(e * steps_per_epoch) - warmup: c.decay_factor
                  for e in c.boundaries_epochs if int(e * steps_per_epoch) > warmup}
    return optax.piecewise_constant_schedule(c.peak_value, boundaries)
  if name == "constant":
    return optax.constant_schedule(c.peak_value)
  raise KeyError(name)


SCHEDULES = ("cosine", "linear", "step", "constant")
OPTIMIZER_FIELDS = ("name", "momentum", "nesterov", "b1", "b2", "eps", "weight_decay",
                    "grad_clip_norm")
SCHEDULE_FIELDS = ("name", "peak_value", "warmup_epochs", "end_value", "boundaries_epochs",
                   "decay_factor")


def create_schedule(c, steps_per_epoch: int, num_steps: int) -> optax.Schedule:
  """config.schedule -> step -> learning rate, over a run of num_steps steps."""
  warmup = min(int(c.warmup_epochs * steps_per_epoch), num_steps - 1)
  after = _after_warmup(c.name, c, steps_per_epoch, warmup, num_steps)
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, c.peak_value, warmup), after],
                              [warmup])


def create_optimizer(c, schedule: optax.Schedule) -> optax.GradientTransformation:
  """config.optimizer -> the optax transformation, driven by `schedule`."""
  tx = OPTIMIZERS[c.name](c, schedule)
  if c.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  return tx


def validate(optimizer, schedule) -> None:
  """Raises ValueError naming the config field, its value and what is allowed."""
  for prefix, c, fields in (("optimizer", optimizer, OPTIMIZER_FIELDS),
                            ("schedule", schedule, SCHEDULE_FIELDS)):
    missing = [f for f in fields if f not in c]
    unknown = sorted(set(c) - set(fields))
    if missing or unknown:
      raise ValueError(f"config.{prefix} is missing {missing} / has unknown {unknown}; "
                       f"its fields are {list(fields)}")
  if optimizer.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={optimizer.name!r} is not allowed; choose one "
                     f"of {tuple(OPTIMIZERS)}")
  if schedule.name not in SCHEDULES:
    raise ValueError(f"config.schedule.name={schedule.name!r} is not allowed; choose one of "
                     f"{SCHEDULES}")
  if not schedule.peak_value > 0:
    raise ValueError(f"config.schedule.peak_value={schedule.peak_value!r} must be > 0")
  if schedule.warmup_epochs < 0:
    raise ValueError(f"config.schedule.warmup_epochs={schedule.warmup_epochs!r} must be >= 0")
  for field in ("weight_decay", "grad_clip_norm"):
    if not optimizer[field] >= 0:
      raise ValueError(f"config.optimizer.{field}={optimizer[field]!r} must be >= 0")
