"""Compiles for NVIDIA GPUs on any machine: XLA:GPU and Triton from jax's CUDA plugin, no GPU.

  make gpu-compiler                                     # jax's CUDA plugin, once
  python -m sasa_jax.tools.gpu_compile                  # the op, every GPU
  python -m sasa_jax.tools.gpu_compile --gpu=h100 --impls=pallas --dtypes=bfloat16

jax's CUDA plugin describes a GPU from its properties alone (`jax.experimental.topologies`
with a target config: no driver, no device) and compiles for it what a GPU machine's first
step compiles: XLA:GPU's fusions and the Pallas kernels through Triton down to PTX for the
GPU's architecture (sm_90a for an H100). For each GPU (--gpu), the attention op's forward
and backward (every `impl` of --impls, k = --kernel_size (7), 8 heads, --batch images) at
the four ResNet-50 stage shapes (--stages): compiled or not (the compiler's first line
where not: a Triton kernel that fails to lower or outgrows shared memory is named there),
and XLA's planned temporaries.
`python -m sasa_jax.tools.step_memory --gpu=h100` plans a config's whole training step the
same way, against the memory jax lets a process use on that GPU (`memory_bytes`).

The plugin comes with `pip install 'jax[cuda12]'` (a GPU machine's set-up) or, without
touching the environment's jax, `make gpu-compiler` (the plugin alone, no CUDA libraries,
into .venv/gpu_compiler, which this module finds; SASA_CUDA_PLUGIN_DIR names another).
"""
import dataclasses
import importlib.util
import os
import sys

import jax

from sasa_jax.tools import aot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN_DIR = os.environ.get("SASA_CUDA_PLUGIN_DIR",
                            os.path.join(ROOT, ".venv", "gpu_compiler"))
PLUGIN = "jax_plugins.xla_cuda12"
NOT_INSTALLED = (f"jax's CUDA plugin is not installed: `make gpu-compiler` puts it in "
                 f"{PLUGIN_DIR}, or pip install 'jax[cuda12]'")


@dataclasses.dataclass(frozen=True)
class Gpu:
  """What XLA:GPU reads of a GPU (its `GpuDeviceInfoProto`) and the memory CUDA reports."""
  name: str                 # CUDA's device name
  compute_capability: tuple[int, int]
  sms: int
  fp32_per_sm: int                 # FP32 cores per SM
  shared_memory_per_sm: int        # bytes
  shared_memory_per_block: int     # bytes, the opt-in maximum of one block
  l2_bytes: int
  bandwidth: float                 # HBM, bytes/s
  clock_ghz: float
  memory_bytes: int                # total device memory, as cudaMemGetInfo reports it

  def target_config(self) -> str:
    """The GpuTargetConfigProto text the CUDA plugin compiles for."""
    major, minor = self.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm} threads_per_core_limit: 2048
  core_count: {self.sms} fpus_per_core: {self.fp32_per_sm} block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {self.bandwidth:.0f}
  l2_cache_size: {self.l2_bytes} clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{self.name}"
"""


# NVIDIA's published properties of the SXM parts; memory_bytes as CUDA reports it: the H100
# and A100 from deviceQuery, the H200 from the 104.85 GiB that jax's allocator took (75%)
# on the H200 that docs/gpu.md measured.
TARGETS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), sms=132, fp32_per_sm=128,
                shared_memory_per_sm=233472, shared_memory_per_block=232448, l2_bytes=50 << 20,
                bandwidth=3.35e12, clock_ghz=1.98, memory_bytes=84_929_347_584),
    "h200": Gpu("NVIDIA H200", (9, 0), sms=132, fp32_per_sm=128,
                shared_memory_per_sm=233472, shared_memory_per_block=232448, l2_bytes=50 << 20,
                bandwidth=4.8e12, clock_ghz=1.98, memory_bytes=150_111_485_952),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), sms=108, fp32_per_sm=64,
                shared_memory_per_sm=167936, shared_memory_per_block=166912, l2_bytes=40 << 20,
                bandwidth=2.039e12, clock_ghz=1.41, memory_bytes=84_987_740_160),
}


def memory_bytes(gpu: str) -> int:
  """What one process's jax may use of a `gpu`: its allocator's pool, by default 75% of the
  device (XLA_PYTHON_CLIENT_MEM_FRACTION, read from this environment, changes it)."""
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or 0.75)
  return int(TARGETS[gpu].memory_bytes * fraction)


def available() -> bool:
  """Whether jax's CUDA plugin can be loaded (installed, or in PLUGIN_DIR)."""
  if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec(PLUGIN) is None:
    if os.path.isdir(os.path.join(PLUGIN_DIR, "jax_plugins")) and PLUGIN_DIR not in sys.path:
      sys.path.insert(0, PLUGIN_DIR)
  return (importlib.util.find_spec("jax_plugins") is not None
          and importlib.util.find_spec(PLUGIN) is not None)


def _register_plugin():
  """The CUDA plugin registered with jax: found at jax's start where it is installed beside
  it; from PLUGIN_DIR, registered here after this process's own backends (so that jax does
  not look for a GPU)."""
  from jax._src.lib import xla_client  # noqa: PLC0415
  jax.devices()  # this process's own backends first
  if not xla_client.pjrt_plugin_loaded("cuda"):
    # No CUDA here whose versions the plugin could check: it only compiles.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    importlib.import_module(PLUGIN).initialize()


def device(gpu: str):
  """A JAX device of a `gpu` (TARGETS), for compiling only."""
  return cluster(gpu)[0]


def cluster(gpu: str, hosts: int = 1, per_host: int = 1) -> list:
  """The JAX devices of `hosts` machines with `per_host` `gpu`s each (TARGETS), for compiling
  only, in jax's global order: by host (`process_index`), then by GPU."""
  if gpu not in TARGETS:
    raise ValueError(f"GPU {gpu!r} is not one of {sorted(TARGETS)}")
  if not available():
    raise RuntimeError(NOT_INSTALLED)
  _register_plugin()
  from jax.experimental import topologies  # noqa: PLC0415
  return list(topologies.get_topology_desc(platform="cuda",
                                           target_config=TARGETS[gpu].target_config(),
                                           topology=f"{hosts}x1x{per_host}").devices)


if __name__ == "__main__":
  aot.table_program(TARGETS, "gpu", "GPUs", device)
