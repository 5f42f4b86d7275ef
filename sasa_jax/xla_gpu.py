"""XLA:GPU flags that keep known compiler crashes out of this project's programs.

jaxlib 0.10's XLA:GPU aborts the process (no Python exception) while compiling the backward
pass of the ResNets: `triton_tiling_propagation.cc:627] Check failed:
subdim_size_accumulator == dim_size (784 vs. 56)`, in the pass that fuses matmuls into Triton
GEMM kernels (openxla/xla#47381). `python -m sasa_jax.tools.gpu_compile`'s compiler (jax's
CUDA plugin 0.10.2, for an H100 or A100) shows it for a plain ResNet-50's gradient at batch
128, bfloat16 or float32, and for the Fashion-MNIST config's training step; with Triton GEMM
fusions off (cuBLAS takes those matmuls) both compile. jaxlib 0.11.2 compiled and ran the
same ResNet-50 steps on an H200 (docs/gpu.md), so the flag is set for jaxlib 0.10 only.
"""
import os

FLAG = "--xla_gpu_enable_triton_gemm"


def avoid_known_crashes(environ=os.environ) -> bool:
  """Turns Triton GEMM fusions off in XLA_FLAGS under jaxlib 0.10, unless XLA_FLAGS already
  sets them either way. Takes effect only before jax starts its backends (sasa_jax's import
  calls it). Returns whether it changed XLA_FLAGS."""
  from jaxlib import version  # noqa: PLC0415  # jaxlib alone: jax's backends stay unstarted
  flags = environ.get("XLA_FLAGS", "")
  if version.__version_info__[:2] != (0, 10) or FLAG in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}=false".strip()
  return True
