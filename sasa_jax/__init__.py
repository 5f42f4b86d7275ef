"""sasa_jax: stand-alone self-attention vision models in JAX/Flax."""
__version__ = "0.1.0"
