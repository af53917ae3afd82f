"""Sparse State Expansion (SSE): ``sse`` (sparse partitions over a sequence), ``sse_step`` (one
decoding step) and the top-K routing helpers with deterministic ties."""

from kernels.sse.ops import sse, sse_step
from kernels.sse.ref import topk_indices, topk_mask, topk_rank

__all__ = ["sse", "sse_step", "topk_indices", "topk_mask", "topk_rank"]
