"""Shared building blocks: parameters with logical axes, Dense, Embed, RMSNorm, RoPE, SwiGLU, short conv."""

from sqattn.layers.core import (Dense, Embed, RMSNorm, ShortConv, SwiGLU, apply_rope, param,
                                positions_from_segments, rope_frequencies)

__all__ = ["Dense", "Embed", "RMSNorm", "ShortConv", "SwiGLU", "apply_rope", "param",
           "positions_from_segments", "rope_frequencies"]
