"""Fused MoE expert compute: ``moe_ffn`` (gather routed rows, gated-MLP experts, weighted combine)."""

from kernels.moe.ops import moe_ffn

__all__ = ["moe_ffn"]
