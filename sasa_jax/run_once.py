"""Programs that run once per process (parameter initialisation): compiled for compile time.

On the CPU, XLA spends most of such a program's compile time in LLVM's optimisation passes,
which buy nothing for a single call. Measured on a 2-core AMD EPYC, 2026-12-04
(`jit(model.init)` at XLA's default level vs `xla_backend_optimization_level=0`, in one
process):

  model                         compile           run
  ResNet-14 at 1/8 width, 28 px   4.1 s -> 1.6 s   4 ms -> 13 ms
  ResNet-26 conv-stem, 224 px     5.8 s -> 4.3 s   0.06 s -> 0.40 s
  ResNet-50 full attention        10.0 s -> 7.8 s  0.13 s -> 0.79 s

The values may differ in the last bit from a default compile (floating-point contraction);
every process of a run compiles them the same way, so they agree across processes.
Accelerators compile with their defaults.
"""
import jax

# XLA DebugOptions for a CPU program that runs once.
CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def run_once(jitted, *args):
  """jitted(*args) (a `jax.jit` function), compiled with CPU_OPTIONS when JAX's default
  backend is the CPU."""
  lowered = jitted.lower(*args)
  options = CPU_OPTIONS if jax.default_backend() == "cpu" else None
  return lowered.compile(options)(*args)
