"""Compiles for Cloud TPUs on any machine: libtpu's own XLA:TPU compiler, no TPU needed.

  make tpu-compiler                                     # libtpu, once (jax's own pin)
  python -m sasa_jax.tools.tpu_compile                  # the op, every generation
  python -m sasa_jax.tools.tpu_compile --tpu=v5e --impls=pallas --dtypes=bfloat16

libtpu describes a TPU slice without one (`jax.experimental.topologies`) and compiles for
its devices: what a TPU VM's first step compiles, Mosaic's Pallas kernels included, checked
against the chip's on-chip memory (VMEM) and HBM. For each TPU generation (--tpu), the
attention op's forward and backward (every `impl` of --impls, k = 7, 8 heads, --batch
images) at the four ResNet-50 stage shapes, for one device: compiled or not (the
compiler's first line where not: a kernel that overflows VMEM is named there), and XLA's
planned HBM temporaries. `python -m sasa_jax.tools.step_memory --tpu=GEN` plans a config's
whole training step the same way.

libtpu comes from `pip install 'jax[tpu]'` (a TPU VM's set-up) or, without touching the
environment's jax, `make tpu-compiler` (into .venv/tpu_compiler, which this module finds;
SASA_LIBTPU_DIR names another directory).
"""
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBTPU_DIR = os.environ.get("SASA_LIBTPU_DIR", os.path.join(ROOT, ".venv", "tpu_compiler"))
NOT_INSTALLED = (f"libtpu is not installed: `make tpu-compiler` puts it in {LIBTPU_DIR}, or "
                 "pip install 'jax[tpu]'")

# A small slice of each generation (libtpu's topology names) and the HBM of one of its JAX
# devices: a chip (v4 and v5p: its two TensorCores as one megacore device).
GENERATIONS = {
    "v4": ("v4:2x2x1", {"chip_config_name": "megacore"}, 32 << 30),
    "v5e": ("v5e:2x2", {}, 16 << 30),
    "v5p": ("v5p:2x2x1", {}, 95 << 30),
    "v6e": ("v6e:2x2", {}, 32 << 30),
}
STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))  # ResNet-50 at 224 px: size, channels
MIB = 2**20


def libtpu_available() -> bool:
  """Whether libtpu can be loaded (installed, or in LIBTPU_DIR, which this puts on the path)."""
  if importlib.util.find_spec("libtpu") is None and os.path.isdir(LIBTPU_DIR):
    jax.devices()  # this process's own backends first: libtpu found later only compiles
    sys.path.insert(0, LIBTPU_DIR)
  return importlib.util.find_spec("libtpu") is not None


def tpu_device(generation: str):
  """One JAX device of a `generation` TPU slice (GENERATIONS), for compiling only."""
  if generation not in GENERATIONS:
    raise ValueError(f"TPU generation {generation!r} is not one of {sorted(GENERATIONS)}")
  if not libtpu_available():
    raise RuntimeError(NOT_INSTALLED)
  from jax.experimental import topologies  # noqa: PLC0415
  if jax.default_backend() != "tpu":  # no TPU here to guard or to ask about
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # the VM's metadata server
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu lets one process at a time load it (/tmp/libtpu_lockfile, left behind by a
    # killed process): compiling processes side by side is safe without a TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  name, options, _ = GENERATIONS[generation]
  return topologies.get_topology_desc(name, "tpu", **options).devices[0]


def placed(device, *shapes):
  """jax.ShapeDtypeStructs `shapes` placed on `device` (what jit lowers for it)."""
  sharding = NamedSharding(Mesh(np.asarray([device]), ("data",)), P())
  return [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]


def compile_for(device, fn, *shapes):
  """(compiled, None) or (None, the compiler's error): `fn` jitted and compiled for `device`
  at jax.ShapeDtypeStruct `shapes`."""
  try:
    return jax.jit(fn).lower(*placed(device, *shapes)).compile(), None
  except Exception as e:  # pylint: disable=broad-except  # XLA:TPU's errors, reported
    return None, f"{type(e).__name__}: {e}"


def first_line(error: str) -> str:
  """The compiler's error up to its details ("Ran out of memory in memory space vmem ...")."""
  lines = [line for line in error.splitlines() if line.strip()]
  return " ".join(lines[:2])[:400]


def op_rows(generation: str, impls, dtypes, batch: int = 32, stages=STAGES,
            kernel_size: int = 7, num_heads: int = 8) -> list[dict]:
  """One row per (stage, dtype, impl): the op's fwd+bwd compiled for one `generation` device
  (see the module's docstring)."""
  from sasa_jax.ops import local_attention  # noqa: PLC0415
  device = tpu_device(generation)
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
        row = {"tpu": generation, "device": device.device_kind,
               "shape": f"{batch}x{size}x{size}x{channels}", "dtype": jnp.dtype(dtype).name,
               "impl": impl, "compiled": exe is not None,
               "compile_s": round(time.perf_counter() - start, 2)}
        if exe is not None:
          row["hbm_temp_mib"] = exe.memory_analysis().temp_size_in_bytes / MIB
          row["tpu_custom_calls"] = exe.as_text().count('custom_call_target="tpu_custom_call"')
        else:
          row["error"] = first_line(error)
        rows.append(row)
  return rows


def format_rows(rows) -> str:
  lines = ["tpu  shape            dtype     impl    compiled  HBM temp MiB  kernels"]
  for r in rows:
    if r["compiled"]:
      tail = f"{'yes':>8}  {r['hbm_temp_mib']:>12.1f}  {r['tpu_custom_calls']:>7}"
    else:
      tail = f"{'no':>8}  {r['error']}"
    lines.append(f"{r['tpu']:<4} {r['shape']:<16} {r['dtype']:<9} {r['impl']:<7} {tail}")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags():  # as a program only: step_memory imports this module beside its own flags
  flags.DEFINE_list("tpu", list(GENERATIONS), f"TPU generations, of {list(GENERATIONS)}.")
  flags.DEFINE_list("impls", ["auto", "pallas"],
                    "The op's implementations to compile (\"auto\": what a TPU runs; \"xla\" "
                    "sizes its chunks for the host that traces it).")
  flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Dtypes of the op's inputs.")
  flags.DEFINE_integer("batch", 32, "Images per device.")
  flags.DEFINE_list("stages", [f"{s}x{c}" for s, c in STAGES],
                    "Shapes SIZExCHANNELS of the op's square maps (8 heads, k = 7).")
  flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  for name in FLAGS.tpu:
    if name not in GENERATIONS:
      raise app.UsageError(f"--tpu={name}: not one of {sorted(GENERATIONS)}", exitcode=2)
  if not libtpu_available():
    raise app.UsageError(NOT_INSTALLED, exitcode=2)
  try:
    stages = [tuple(int(n) for n in s.split("x")) for s in FLAGS.stages]
  except ValueError:
    stages = []
  if not stages or any(len(s) != 2 for s in stages):
    raise app.UsageError(f"--stages={','.join(FLAGS.stages)}: SIZExCHANNELS, comma-separated",
                         exitcode=2)
  rows = [row for generation in FLAGS.tpu
          for row in op_rows(generation, FLAGS.impls, [jnp.dtype(d) for d in FLAGS.dtypes],
                             FLAGS.batch, stages)]
  print(json.dumps(rows, indent=1) if FLAGS.format == "json" else format_rows(rows))


if __name__ == "__main__":
  jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
  define_flags()
  app.run(main)
