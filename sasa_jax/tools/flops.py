"""Counting FLOPS and parameters from a model itself.

FLOPS = 2 x multiply-adds of every dot_general and convolution in the traced
program (jaxpr), the paper's convention; a Pallas kernel contributes the FLOPS of its
`pl.CostEstimate` (the work it actually does, padding included). Elementwise work (normalisation, softmax,
pooling) is not counted, as in the paper's convolution-only counts. The model is
traced, never compiled, so counting ResNet-50 at 224 px takes seconds.
"""
import math

import jax
import numpy as np

try:
  from jax.extend import core as jcore
except ImportError:  # pragma: no cover
  from jax import core as jcore


def _dot_general_macs(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
  batch = math.prod(lhs[i] for i in lb)
  contract = math.prod(lhs[i] for i in lc)
  lhs_free = math.prod(s for i, s in enumerate(lhs) if i not in lc and i not in lb)
  rhs_free = math.prod(s for i, s in enumerate(rhs) if i not in rc and i not in eqn.params["dimension_numbers"][1][1])
  return batch * contract * lhs_free * rhs_free


def _conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  kernel_out_dim = dn.rhs_spec[0]
  per_output = math.prod(rhs) // rhs[kernel_out_dim]  # kernel taps x input features / group
  return math.prod(out) * per_output


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def jaxpr_macs(jaxpr) -> int:
  """Multiply-adds of all dot_general/conv equations, recursing into sub-programs."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_macs(eqn)
    elif name == "conv_general_dilated":
      total += _conv_macs(eqn)
    elif name == "pallas_call":  # the kernel body runs once per grid step: trust its estimate
      cost = eqn.params.get("cost_estimate")
      total += cost.flops // 2 if cost is not None else 0
    elif name == "cond":  # one branch runs: count the most expensive
      total += max(jaxpr_macs(b.jaxpr) for b in eqn.params["branches"])
    else:
      repeat = eqn.params.get("length", 1) if name == "scan" else 1
      total += repeat * sum(jaxpr_macs(sub) for sub in _sub_jaxprs(eqn))
  return total


def count_flops(fn, *args, **kwargs) -> int:
  """FLOPS (2 x multiply-adds) of one call of fn on arrays or ShapeDtypeStructs."""
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  return 2 * jaxpr_macs(closed.jaxpr)


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def model_cost(model, image_size: int = 224, channels: int = 3):
  """(FLOPS per image, parameter count) of a Flax classifier at batch 1, inference mode."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), np.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(x.shape, x.dtype)))
  flops = count_flops(lambda v, img: model.apply(v, img, train=False), variables, x)
  return flops, count_params(variables["params"])
