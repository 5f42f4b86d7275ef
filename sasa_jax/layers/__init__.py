"""Flax Linen modules around the functional core."""
from sasa_jax.layers.attention import (ATTENTION_TYPES, POSITIONAL_ENCODINGS, AttentionSettings,
                                       SelfAttention2D)
from sasa_jax.layers.stem import ATTENTION_STEM_TYPES, AttentionStem

__all__ = ["ATTENTION_STEM_TYPES", "ATTENTION_TYPES", "AttentionSettings", "AttentionStem",
           "POSITIONAL_ENCODINGS",
           "SelfAttention2D"]
