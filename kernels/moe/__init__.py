"""MoE expert compute: ``moe_ffn`` (gather routed rows, gated-MLP experts, weighted combine) and
``kernel_unsupported`` (whether ``impl="auto"`` runs its Pallas kernels on the target, and why not)."""

from kernels.moe.ops import kernel_unsupported, moe_ffn

__all__ = ["kernel_unsupported", "moe_ffn"]
