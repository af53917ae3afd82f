"""Core attention disaggregation (CAD / DistCA, papers/cad.md).

Core attention (softmax(QK^T)V with the per-document causal mask) costs O(sum of squared document lengths)
and unbalances data-parallel devices that hold equal token counts. CAD cuts it into CA-tasks (head/tail
shards of documents that keep their absolute positions), schedules them onto the same devices acting as
attention servers so every server computes the same number of causal pairs (within ``eps``), and executes
the exchange as a ``shard_map`` program with padded all-to-alls.

* ``cost``     pair counts (``causal_pairs``, ``rows_pairs``, ``head_tail_pairs``) and bytes (``CostModel``).
* ``planner``  pieces, CA-tasks (``Items``), the greedy ``schedule`` and exact ``traffic``; host numpy.
* ``plan``     ``plan_tokens(doc, pos, ...) -> ExecPlan``: static-shape send/keep index arrays per nano-batch.
* ``attention`` ``varlen_attention`` (document mask, finite mask value, f32 LSE, custom_vjp).
* ``program``  ``cad_attention`` (host plan) and ``core_attention`` (mixer switch, in-graph plan).
* ``data``     the long-tailed length law, sequential packing, packed LM batches.
"""

from sqattn.parallel.cad.attention import count_pairs, segment_causal_mask, varlen_attention
from sqattn.parallel.cad.cost import (LLAMA3_8B, CostModel, causal_pairs, doc_pairs, head_tail_pairs,
                                      rows_pairs)
from sqattn.parallel.cad.data import pack_pieces, pack_tokens, packed_lm_batch, sample_doc_lengths
from sqattn.parallel.cad.plan import ExecPlan, bucket, nano_bounds, plan_tokens
from sqattn.parallel.cad.planner import (Items, Pieces, Residency, ScheduleResult, Traffic, pieces_pairs,
                                         schedule, server_loads, token_pieces, traffic)
from sqattn.parallel.cad.program import (CADConfig, cad_attention, core_attention, device_program,
                                         doc_pos_from_segments, graph_plan_caps)

__all__ = [
    "CADConfig", "CostModel", "ExecPlan", "Items", "LLAMA3_8B", "Pieces", "Residency", "ScheduleResult",
    "Traffic", "bucket", "cad_attention", "causal_pairs", "core_attention", "count_pairs", "device_program",
    "doc_pairs", "doc_pos_from_segments", "graph_plan_caps", "head_tail_pairs", "nano_bounds", "pack_pieces",
    "pack_tokens", "packed_lm_batch", "pieces_pairs", "plan_tokens", "rows_pairs", "sample_doc_lengths",
    "schedule", "segment_causal_mask", "server_loads", "token_pieces", "traffic", "varlen_attention",
]
