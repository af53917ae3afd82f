"""Causal softmax attention (full, sliding window, packed segments, GQA): ``causal_attention``."""

from kernels.causal_attention.ops import causal_attention

__all__ = ["causal_attention"]
