"""sasa_jax: stand-alone self-attention vision models in JAX/Flax."""
from sasa_jax import xla_gpu as _xla_gpu

__version__ = "0.1.0"
_xla_gpu.avoid_known_crashes()
