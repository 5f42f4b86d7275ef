"""Compiles for Cloud TPUs on any machine: libtpu's own XLA:TPU compiler, no TPU needed.

  make tpu-compiler                                     # libtpu, once (jax's own pin)
  python -m sasa_jax.tools.tpu_compile                  # the op, every generation
  python -m sasa_jax.tools.tpu_compile --tpu=v5e --impls=pallas --dtypes=bfloat16
  python -m sasa_jax.tools.tpu_compile --tpu=v5e --dtypes=bfloat16 --kv_costs=6.4,25.6

libtpu describes a TPU slice without one (`jax.experimental.topologies`) and compiles for
its devices: what a TPU VM's first step compiles, Mosaic's Pallas kernels included, checked
against the chip's on-chip memory (VMEM) and HBM. For each TPU generation (--tpu), the
attention op's forward and backward (every `impl` of --impls, k = --kernel_size (7),
8 heads, --batch images; and a 3x3 convolution of the same width, "conv3x3") at the four
ResNet-50 stage shapes (--stages), for one device: compiled or not (the compiler's first
line where not: a kernel that overflows VMEM is named there), XLA's planned HBM
temporaries, and the program's device time as libtpu's cost model estimates it
(`aot.estimated_cycles`: millions of TensorCore cycles, and as a multiple of the
convolution's; Pallas kernels carry no estimate). The blocked XLA form's rows name its
block plan; --kv_costs=6.4,25.6 adds rows planned with other values of
`blocked.ACCELERATOR_KV_COST["tpu"]`. `python -m sasa_jax.tools.step_memory --tpu=GEN`
plans a config's whole training step the same way.

libtpu comes from `pip install 'jax[tpu]'` (a TPU VM's set-up) or, without touching the
environment's jax, `make tpu-compiler` (into .venv/tpu_compiler, which this module finds;
SASA_LIBTPU_DIR names another directory).
"""
import importlib.util
import os
import sys

import jax

from sasa_jax.tools import aot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBTPU_DIR = os.environ.get("SASA_LIBTPU_DIR", os.path.join(ROOT, ".venv", "tpu_compiler"))
NOT_INSTALLED = (f"libtpu is not installed: `make tpu-compiler` puts it in {LIBTPU_DIR}, or "
                 "pip install 'jax[tpu]'")

# A small slice of each generation (libtpu's topology names) and the HBM of one of its JAX
# devices: a chip (v4 and v5p: its two TensorCores as one megacore device).
TARGETS = {
    "v4": ("v4:2x2x1", {"chip_config_name": "megacore"}, 32 << 30),
    "v5e": ("v5e:2x2", {}, 16 << 30),
    "v5p": ("v5p:2x2x1", {}, 95 << 30),
    "v6e": ("v6e:2x2", {}, 32 << 30),
}


def available() -> bool:
  """Whether libtpu can be loaded (installed, or in LIBTPU_DIR, which this puts on the path)."""
  if importlib.util.find_spec("libtpu") is None and os.path.isdir(LIBTPU_DIR):
    jax.devices()  # this process's own backends first: libtpu found later only compiles
    sys.path.insert(0, LIBTPU_DIR)
  return importlib.util.find_spec("libtpu") is not None


def device(generation: str):
  """One JAX device of a `generation` TPU slice (TARGETS), for compiling only."""
  return slice_devices(generation)[0]


def slice_devices(generation: str, shape: str | None = None) -> list:
  """The JAX devices of a `generation` TPU slice of `shape` chips ("2x4"; TARGETS' small slice
  if None), for compiling only, in jax's global order."""
  if generation not in TARGETS:
    raise ValueError(f"TPU generation {generation!r} is not one of {sorted(TARGETS)}")
  if not available():
    raise RuntimeError(NOT_INSTALLED)
  from jax.experimental import topologies  # noqa: PLC0415
  if jax.default_backend() != "tpu":  # no TPU here to guard or to ask about
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # the VM's metadata server
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu lets one process at a time load it (/tmp/libtpu_lockfile, left behind by a
    # killed process): compiling processes side by side is safe without a TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  name, options, _ = TARGETS[generation]
  if shape is not None:
    name = f"{generation}:{shape}"
  return list(topologies.get_topology_desc(name, "tpu", **options).devices)


def memory_bytes(generation: str) -> int:
  """The HBM of one JAX device of a `generation` TPU."""
  return TARGETS[generation][2]


if __name__ == "__main__":
  aot.table_program(TARGETS, "tpu", "TPU generations", device)
