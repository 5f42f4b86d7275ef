"""Code that is lowered only for the platforms it is written for.

`jax.lax.platform_dependent` picks a branch per platform, but when one function is lowered
for several platforms at once (`jax.export.export(f, platforms=["tpu", "cuda"])`) jax
lowers every kept branch for every one of them, and a TPU kernel cannot be lowered for CUDA
("Compiler params for platform tpu cannot be used for gpu lowering"). Wrapping a kernel
call in `platform_only(fn, platforms, *args)` makes it one primitive whose lowering is the
call on `platforms` and zeros of the right shapes elsewhere: the zeros are never computed,
because `platform_dependent` runs the kernel's branch on its platform only.

Not differentiable itself (it wraps the Pallas calls inside a custom_vjp's forward and
backward); vmap maps the wrapped function.
"""
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import batching, mlir

_platform_only_p = Primitive("sasa_platform_only")
_platform_only_p.multiple_results = True


def platform_only(fn, platforms: tuple[str, ...], *args):
  """fn(*args) (a pytree of arrays) on `platforms`, lowered nowhere else."""
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  flat = _platform_only_p.bind(*jax.tree.leaves(args), jaxpr=closed,
                               platforms=tuple(platforms))
  return jax.tree.unflatten(jax.tree.structure(out_shape), flat)


@_platform_only_p.def_impl
def _impl(*args, jaxpr, platforms):
  return jax.jit(lambda *a: _platform_only_p.bind(*a, jaxpr=jaxpr, platforms=platforms))(
      *args)


@_platform_only_p.def_abstract_eval
def _abstract_eval(*avals, jaxpr, platforms):
  del avals, platforms
  return jaxpr.out_avals


def _lowering(platform):
  def rule(ctx, *args, jaxpr, platforms):
    if platform in platforms:
      fn = jaxpr_as_fun(jaxpr)
    else:
      def fn(*_):
        return [jnp.zeros(a.shape, a.dtype) for a in jaxpr.out_avals]
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
  return rule


for _platform in ("cpu", "tpu", "cuda", "rocm"):
  mlir.register_lowering(_platform_only_p, _lowering(_platform), platform=_platform)


def _batched(args, dims, *, jaxpr, platforms):
  mapped = jax.vmap(jaxpr_as_fun(jaxpr), in_axes=tuple(dims), out_axes=0)
  outs = platform_only(lambda *a: tuple(mapped(*a)), platforms, *args)
  return outs, [0] * len(outs)


batching.primitive_batchers[_platform_only_p] = _batched
