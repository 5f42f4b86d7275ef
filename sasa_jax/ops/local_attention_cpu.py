"""Local attention as a compiled CPU kernel (`local_attention_cpu.cc`, an XLA FFI custom call).

The kernel is compiled from source with the host's C++ compiler the first time it is
needed (a few seconds; `-O3 -march=native`), into a cache directory keyed by the source, the
compiler flags, jaxlib's version and the CPU's instruction-set flags, and loaded from there
afterwards. Where no compiler is found, `available()` is False and `impl="auto"` uses the
blocked XLA form on the CPU instead.

Float32 inside; other dtypes are cast around the call. Forward and backward are one custom
call each (the backward recomputes the logits from the saved log-sum-exp).
"""
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("local_attention_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")
_TARGETS = {"fwd": "SasaLocalAttentionFwd", "bwd": "SasaLocalAttentionBwd"}


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor()


def cache_dir() -> pathlib.Path:
  """Where the compiled kernel is kept: $SASA_KERNEL_CACHE, else ~/.cache/sasa_jax."""
  default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "sasa_jax")
  return pathlib.Path(os.environ.get("SASA_KERNEL_CACHE", default))


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def library_path() -> pathlib.Path:
  """The compiled library for this source, compiler flags, jaxlib and CPU."""
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), jax.__version__.encode(),
               platform.machine().encode(), _cpu_flags().encode()):
    key.update(part)
  return cache_dir() / f"local_attention_cpu-{key.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
  """Compiles the kernel unless the cache has it; returns the library's path.

  Raises RuntimeError (with the compiler's output) if it cannot be built."""
  path = library_path()
  if path.exists():
    return path
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
  path.parent.mkdir(parents=True, exist_ok=True)
  # Compiled to a temporary name and renamed, so that concurrent builds never load half a file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", os.fspath(_SOURCE), "-o", tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    os.unlink(tmp)
    raise RuntimeError(f"compiling the CPU attention kernel failed: {' '.join(cmd)}\n"
                       f"{proc.stderr[-4000:]}")
  os.replace(tmp, path)
  return path


@functools.cache
def _register() -> bool:
  lib = ctypes.cdll.LoadLibrary(os.fspath(build()))
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f"sasa_local_attention_{name}",
                                jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return True


@functools.cache
def available() -> bool:
  """Whether the kernel is built (or can be) and registered with XLA; says why not, once."""
  try:
    return _register()
  except (RuntimeError, OSError) as e:
    logging.warning("The compiled CPU attention kernel is not available, so impl='auto' "
                    "uses the blocked XLA form on the CPU (2-3x slower at 56 px maps): %s", e)
    return False


def _attrs(kernel_size, num_heads, rel):
  return dict(num_heads=np.int64(num_heads), kernel_size=np.int64(kernel_size),
              rel=bool(rel))


def _images_batched(call):
  """call(q, k, v, rel_h, rel_w, *per_image) -> a tuple of outputs, every one [images, ...]
  or [images * heads, ...] (call sizes them by its inputs), as one kernel call under
  jax.vmap: the mapped axis merges into the images, since each image attends only within
  itself (BatchNorm groups map the model over groups of images: sasa_jax.train). Only where
  the relative embeddings are mapped too does it make one call per mapped element."""
  batched_call = jax.custom_batching.custom_vmap(call)

  @batched_call.def_vmap
  def rule(axis_size, in_batched, *args):
    if in_batched[3] or in_batched[4]:  # per-element embeddings: one call each
      outs = jax.lax.map(lambda xs: call(*xs), tuple(
          x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
          for x, batched in zip(args, in_batched)))
      return outs, jax.tree.map(lambda _: True, outs)
    merged = [x if i in (3, 4) else
              (x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))).reshape(
                  axis_size * x.shape[1 if batched else 0], *x.shape[2 if batched else 1:])
              for i, (x, batched) in enumerate(zip(args, in_batched))]
    outs = call(*merged)
    return (jax.tree.map(lambda o: o.reshape(axis_size, o.shape[0] // axis_size, *o.shape[1:]),
                         outs), jax.tree.map(lambda _: True, outs))
  return batched_call


def _forward_call(q, k, v, rel_h, rel_w, *, kernel_size, num_heads, rel):
  b, h, w, c = q.shape
  shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct((b, num_heads, h, w), jnp.float32))
  return tuple(jax.ffi.ffi_call("sasa_local_attention_fwd", shapes)(
      q, k, v, rel_h, rel_w, **_attrs(kernel_size, num_heads, rel)))


def _backward_call(q, k, v, rel_h, rel_w, out, lse, g, *, kernel_size, num_heads, rel):
  parts = (q.shape[0] * num_heads,) + rel_h.shape  # per image and head, summed by the caller
  shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),) * 3 + (
      jax.ShapeDtypeStruct(parts, jnp.float32),) * 2
  return tuple(jax.ffi.ffi_call("sasa_local_attention_bwd", shapes)(
      q, k, v, rel_h, rel_w, out, lse, g, **_attrs(kernel_size, num_heads, rel)))


def _forward(q, k, v, rel_h, rel_w, kernel_size, num_heads, rel):
  call = functools.partial(_forward_call, kernel_size=kernel_size, num_heads=num_heads, rel=rel)
  return _images_batched(call)(q, k, v, rel_h, rel_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, rel_h, rel_w, kernel_size, num_heads, rel):
  return _forward(q, k, v, rel_h, rel_w, kernel_size, num_heads, rel)[0]


def _attention_fwd(q, k, v, rel_h, rel_w, kernel_size, num_heads, rel):
  out, lse = _forward(q, k, v, rel_h, rel_w, kernel_size, num_heads, rel)
  return out, (q, k, v, rel_h, rel_w, out, lse)


def _attention_bwd(kernel_size, num_heads, rel, residuals, g):
  q, k, v, rel_h, rel_w, out, lse = residuals
  call = functools.partial(_backward_call, kernel_size=kernel_size, num_heads=num_heads,
                           rel=rel)
  dq, dk, dv, drel_h, drel_w = _images_batched(call)(q, k, v, rel_h, rel_w, out, lse, g)
  return dq, dk, dv, drel_h.sum(0), drel_w.sum(0)


_attention.defvjp(_attention_fwd, _attention_bwd)


def local_attention_cpu(q, k, v, rel_h, rel_w, *, kernel_size, num_heads):
  """See `sasa_jax.ops.local_attention`. Inputs already validated; CPU only."""
  if not _register():
    raise RuntimeError("the CPU attention kernel is not available")
  d = q.shape[-1] // num_heads
  f32 = lambda x: x.astype(jnp.float32)
  rel = rel_h is not None
  if not rel:
    rel_h = rel_w = jnp.zeros((kernel_size, d // 2), jnp.float32)
  out = _attention(f32(q), jnp.zeros(q.shape, jnp.float32) if k is None else f32(k), f32(v),
                   f32(rel_h), f32(rel_w), kernel_size, num_heads, rel)
  return out.astype(q.dtype)

