"""Cost model of core attention (CA): causal pair counts per document shard, and bytes moved per row.

A document of length ``s`` packed into a micro-batch has a block-diagonal causal mask: the query at position
``p`` (0-based, within its document) sees keys ``0..p`` of the same document, i.e. ``p + 1`` keys. The CA
compute of a set of query rows is therefore the number of (query, key) pairs ``sum_p (p + 1)``; multiply by
``4 * h_q * d_h`` for forward FLOPs. This is DistCA's planner proxy (papers/cad.md, "Cost model").

Closed forms (all exact integers):
  * ``causal_pairs(q, kv) = q*kv - q*(q-1)/2``: ``q`` query rows that end at key index ``kv`` (exclusive),
    e.g. the last ``q`` rows of a document prefix of length ``kv``.
  * ``rows_pairs(a, b)``: query rows ``a..b-1`` of one document = ``causal_pairs(b - a, b)``.
    A whole document: ``rows_pairs(0, s) = s(s+1)/2``.
  * ``head_tail_pairs(a, b, m)``: the ``m`` rows ``a+x..a+x+m-1`` together with their mirror rows
    ``b-x-m..b-x-1`` about the centre of ``[a, b)`` cost ``m * (a + b + 1)`` for every offset ``x`` — linear in
    ``m``, so "move exactly F pairs" is ``m = F // (a + b + 1)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def causal_pairs(q, kv):
    """Pairs of ``q`` query rows that end at key index ``kv`` (exclusive): ``q*kv - q*(q-1)/2``."""
    q = np.asarray(q, np.int64)
    kv = np.asarray(kv, np.int64)
    return q * kv - q * (q - 1) // 2


def rows_pairs(a, b):
    """Pairs of the query rows ``[a, b)`` of one document (each row ``p`` sees ``p + 1`` keys)."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    return causal_pairs(b - a, b)


def doc_pairs(s):
    """Pairs of a whole causal document of length ``s``: ``s(s+1)/2``."""
    s = np.asarray(s, np.int64)
    return s * (s + 1) // 2


def head_tail_pairs(a, b, m):
    """Pairs of ``m`` head rows plus their ``m`` mirror tail rows about the centre of ``[a, b)``."""
    return np.asarray(m, np.int64) * (np.asarray(a, np.int64) + np.asarray(b, np.int64) + 1)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Bytes that moving one row of a CA-task costs, and forward FLOPs of one (query, key) pair.

    Attributes:
      q_bytes: per query row placed on another server: Q sent there plus O sent back (LSE stays on the
        server, which keeps its residuals for the backward pass).
      kv_bytes: per key row sent to another server: K plus V.
      flops_per_pair: forward FLOPs of one unmasked (query, key) pair, ``4 * h_q * d_h`` (QK^T and PV).
    """
    q_bytes: float = 1.0
    kv_bytes: float = 1.0
    flops_per_pair: float = 1.0

    @classmethod
    def from_dims(cls, num_heads: int, num_kv_heads: int, head_dim: int, bytes_per_elem: int = 2) -> "CostModel":
        """Cost model of one attention layer with ``num_heads`` query and ``num_kv_heads`` KV heads."""
        return cls(q_bytes=2.0 * num_heads * head_dim * bytes_per_elem,
                   kv_bytes=2.0 * num_kv_heads * head_dim * bytes_per_elem,
                   flops_per_pair=4.0 * num_heads * head_dim)


# Llama-3-8B attention shape (32 query heads, 8 KV heads, d_h = 128) in bf16: the paper's smaller model.
LLAMA3_8B = CostModel.from_dims(32, 8, 128, 2)
