"""Functional core: the SASA local-attention op behind one contract."""
from sasa_jax.ops.local_attention import IMPLS, default_impl, local_attention

__all__ = ["IMPLS", "default_impl", "local_attention"]
