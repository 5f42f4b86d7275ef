"""Compiling for a device this machine does not have: what tools/tpu_compile and
tools/gpu_compile share.

A compiler that describes a device without one (libtpu for TPUs, jax's CUDA plugin for
NVIDIA GPUs: `jax.experimental.topologies`) gives JAX devices that compile but never run.
Here: placing abstract arguments on such a device, compiling for it, and the attention op's
table (its forward and backward at the four ResNet-50 stage shapes: compiled or the
compiler's first error line, the planned temporaries, the Pallas kernels in the program).
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))  # ResNet-50 at 224 px: size, channels
MIB = 2**20
# How a compiled program calls a Pallas kernel: Mosaic on TPU, Triton on GPU.
KERNEL_CALLS = ('custom_call_target="tpu_custom_call"',
                'custom_call_target="__gpu$xla.gpu.triton"')


def placed(device, *shapes):
  """jax.ShapeDtypeStructs `shapes` placed on `device` (what jit lowers for it)."""
  sharding = NamedSharding(Mesh(np.asarray([device]), ("data",)), P())
  return [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]


def compile_for(device, fn, *shapes):
  """(compiled, None) or (None, the compiler's error): `fn` jitted and compiled for `device`
  at jax.ShapeDtypeStruct `shapes`."""
  try:
    return jax.jit(fn).lower(*placed(device, *shapes)).compile(), None
  except Exception as e:  # pylint: disable=broad-except  # the compiler's errors, reported
    return None, f"{type(e).__name__}: {e}"


def first_line(error: str) -> str:
  """The compiler's error up to its details ("Ran out of memory in memory space vmem ...")."""
  lines = [line for line in error.splitlines() if line.strip()]
  return " ".join(lines[:2])[:400]


def kernel_calls(compiled) -> int:
  """Pallas kernel launches (Mosaic or Triton) in a compiled program."""
  text = compiled.as_text()
  return sum(text.count(call) for call in KERNEL_CALLS)


def op_rows(device, target: str, impls, dtypes, batch: int = 32, stages=STAGES,
            kernel_size: int = 7, num_heads: int = 8) -> list[dict]:
  """One row per (stage, dtype, impl): the op's fwd+bwd compiled for `device` (named
  `target` in the rows): compiled or the compiler's first error line, XLA's planned
  temporaries (MiB) and the Pallas kernels the program launches."""
  from sasa_jax.ops import local_attention  # noqa: PLC0415
  rows = []
  for size, channels in stages:
    d = channels // num_heads
    for dtype in dtypes:
      for impl in impls:
        def loss(q, k, v, rh, rw, impl=impl):
          y = local_attention(q, k, v, rh, rw, kernel_size=kernel_size, num_heads=num_heads,
                              impl=impl)
          return jnp.sum(jnp.square(y.astype(jnp.float32)))
        maps = jax.ShapeDtypeStruct((batch, size, size, channels), dtype)
        rel = jax.ShapeDtypeStruct((kernel_size, d // 2), dtype)
        start = time.perf_counter()
        exe, error = compile_for(device, jax.grad(loss, argnums=range(5)),
                                 maps, maps, maps, rel, rel)
        row = {"target": target, "device": device.device_kind,
               "shape": f"{batch}x{size}x{size}x{channels}", "dtype": jnp.dtype(dtype).name,
               "impl": impl, "compiled": exe is not None,
               "compile_s": round(time.perf_counter() - start, 2)}
        if exe is not None:
          row["temp_mib"] = exe.memory_analysis().temp_size_in_bytes / MIB
          row["kernels"] = kernel_calls(exe)
        else:
          row["error"] = first_line(error)
        rows.append(row)
  return rows


def format_rows(rows) -> str:
  lines = ["target shape            dtype     impl    compiled  temp MiB  kernels"]
  for r in rows:
    if r["compiled"]:
      tail = f"{'yes':>8}  {r['temp_mib']:>8.1f}  {r['kernels']:>7}"
    else:
      tail = f"{'no':>8}  {r['error']}"
    lines.append(f"{r['target']:<6} {r['shape']:<16} {r['dtype']:<9} {r['impl']:<7} {tail}")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def table_program(targets, target_flag: str, target_help: str, device_for):
  """tools/tpu_compile's and tools/gpu_compile's program: the op table (`table_main`) on this
  machine's CPU, with its flags (defined here, as a program only: step_memory imports those
  modules beside its own flags): --TARGET_FLAG (a list of `targets`, `target_help` says
  what), --impls, --dtypes, --batch, --stages, --format."""
  jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
  flags.DEFINE_list(target_flag, list(targets), f"{target_help}, of {list(targets)}.")
  flags.DEFINE_list("impls", ["auto", "pallas"],
                    "The op's implementations to compile (\"auto\": what that device runs; "
                    "\"xla\" sizes its chunks for the host that traces it).")
  flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Dtypes of the op's inputs.")
  flags.DEFINE_integer("batch", 32, "Images per device.")
  flags.DEFINE_list("stages", [f"{s}x{c}" for s, c in STAGES],
                    "Shapes SIZExCHANNELS of the op's square maps (8 heads, k = 7).")
  flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
  app.run(lambda argv: table_main(argv, targets, target_flag, device_for))


def table_main(argv, targets, target_flag: str, device_for):
  """The op table over the --TARGET_FLAG devices, each from `device_for(name)` (which raises
  RuntimeError when its compiler is not installed), printed as --format says."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  names = getattr(FLAGS, target_flag)
  for name in names:
    if name not in targets:
      raise app.UsageError(f"--{target_flag}={name}: not one of {sorted(targets)}",
                           exitcode=2)
  try:
    stages = [tuple(int(n) for n in s.split("x")) for s in FLAGS.stages]
  except ValueError:
    stages = []
  if not stages or any(len(s) != 2 for s in stages):
    raise app.UsageError(f"--stages={','.join(FLAGS.stages)}: SIZExCHANNELS, comma-separated",
                         exitcode=2)
  rows = []
  for name in names:
    try:
      device = device_for(name)
    except RuntimeError as e:  # the compiler is not installed
      raise app.UsageError(str(e), exitcode=2) from e
    rows += op_rows(device, name, FLAGS.impls, [jnp.dtype(d) for d in FLAGS.dtypes],
                    FLAGS.batch, stages)
  print(json.dumps(rows, indent=1) if FLAGS.format == "json" else format_rows(rows))
