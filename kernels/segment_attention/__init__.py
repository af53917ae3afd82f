"""SCOUT segment attention: ``segment_attention`` (sequence op), ``segment_attention_step`` (one decoding
step from a checkpoint-only cache) and ``score_entries`` (admissible pairs, for cost tables)."""

from kernels.segment_attention.ops import score_entries, segment_attention, segment_attention_step

__all__ = ["score_entries", "segment_attention", "segment_attention_step"]
