"""Gated linear attention (GLA): ``gla`` (sequence op) and ``gla_step`` (one decoding step)."""

from kernels.gla.ops import gla, gla_step

__all__ = ["gla", "gla_step"]
