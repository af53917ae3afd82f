"""MQAR (multi-query associative recall) runs of papers/sse.md §7: small 2-layer LMs, one mixer type each.

Command (one run; the grid over models and P, with the curriculum, is experiments/mqar.py):
  python -m experiments.train --config=mqar:mixer=attention,pairs=4,steps=1000 --workdir=/tmp/mqar_att_p4
  python -m experiments.train --config=mqar:mixer=attention,pairs=16,steps=2000,init=/tmp/mqar_att_p4 \
      --workdir=/tmp/mqar_att_p16                                       # curriculum stage: starts from P=4
  python -m experiments.mqar --workdir=/work/runs/mqar                 # the whole grid, results.json + PNG
Args: ``mixer=attention|gla_softmax|gla_silu|sse_n4k1|sse_n8k2`` (``sse_*`` need sqattn.mixers.sse),
``pairs=P`` (key-value pairs; the sequence is ``4P`` tokens: P "k v" pairs then P "k v" queries),
``steps``, ``seed`` (parameter init and data stream), ``init=DIR`` (start from the finished run in DIR, the
curriculum's previous stage: same parameter tree, any P), ``batch``/``lr``/``warmup`` (0/0/-1 = the recipe
below), ``runlocal`` (a few steps at P <= 8, for smoke tests).

Every model: 2 layers, d_model 64, 2 heads with key dim c = 32 and value dim d = 32, SwiGLU hidden 128 (x2),
RMSNorm, tied embeddings, float32 compute; vocabulary 256 (keys 1..127, values 128..255, 0 = pad/noise).
Parameters (not equalised; the mixers differ): attention 98,624, gla_softmax / gla_silu 111,104, sse_n4k1
132,224, sse_n8k2 132,736. Evaluation: >= 1000 held-out sequences; ``eval_accuracy`` is next-token accuracy at
the query keys only (the LM task weights by the data's loss mask, which is 1 exactly at the query keys).

Recipe (2026-12-03). The note's recipe (AdamW 3e-3, batch 32, 1500-2000 fresh steps at the target P) does not
train even softmax attention on this CPU budget: attention at P=16 stayed on the plateau (0.055 held-out query
accuracy after 2000 steps at lr 1e-2, 0.212 after 3000 at 3e-3; at the end of the former no head put more than
6% of its attention on the matching value, after the P = 4 stage below a layer-1 head puts 78% there).
What worked (at P = 16) is a curriculum over P, as in Zoology, which trains on a mixture of P = 4..64: a fresh run at
P = 4 (lr 1e-2, 100 warmup steps, batch 128, 1000 steps) forms the induction circuit (0.98), then each larger P
starts from the finished run at the previous P (``init=``; lr 5e-3, 50 warmup steps). Every step has
TOKENS_PER_STEP = 2048 tokens when P <= 16 (batch = max(32, 2048 // 4P)): on this CPU a step's time is per
token (~8-12k tokens/s at every batch 32-256 and P 16-64, table below), so a larger batch buys nothing
here. Cosine to 0.1 x lr, weight decay 0.1 on matrices only, grad clip 1, SSE partition-balance aux 0.01.

Measured 2026-12-03 (a 2-core CPU shared with other jobs, every run at nice 10).
Time per train step, attention, this family's model (experiments.train, 20-60 steps, best logged window of
metrics.jsonl tokens_per_s; load average 3.6-5.4):
    P=16: batch 32 0.20 s (10.5k tok/s), batch 128 0.68 s (12.0k), batch 256 1.73 s (9.5k)
    P=32: batch 32 0.37 s (11.1k),       batch 128 1.67 s (9.8k)
    P=64: batch 32 0.76 s (10.7k),       batch 128 4.27 s (7.7k)
i.e. ~6 ms per sequence of 64 tokens at any batch: a larger batch costs proportionally more on this CPU.
Under the load of the later runs (load average 6-9, other jobs at nice 0) a step took ~6x longer.
Attention with the curriculum (experiments.mqar --models=attention, seed 0; held-out query accuracy on 1024
sequences): P=4 (1000 steps, fresh) 0.985, then P=16 (2000 steps, from P=4) 0.996; P=32 from P=16: 0.845
after 400 steps (0.741 at 250; not solved); the default 1000-step run (resumed 2026-12-03 from step 294)
ends at 0.924, and 1000 more steps from it at lr 1e-3 (``mqar:mixer=attention,pairs=32,steps=1000,lr=0.001,
init=<the P=32 run>``, grad norm ~5 at the end) reach 0.956 (train loss 0.23), and 1500 more at lr 1e-3
from that 0.971 (7 min at load ~2), and 2500 more at lr 1e-3 from that 0.977 (9 min): still short of 0.99,
and the climb is slowing (~0.015, then ~0.002 per 1000 steps).
Without it (fresh runs at P=16, batch 32): 0.055 after 2000 steps at lr 1e-2 (0.212 after 3000 at 3e-3,
2026-11-29); d_model 128 with 4 heads of 32 (2x the step time) was no better after 500 steps (0.058 vs 0.055).
Longer or larger-batch P=32 stages from the same P=16 run (2026-12-03, machine otherwise idle, each run pinned
to one of the 2 cores with ``taskset``, ~20k tokens/s each): 3000 steps at the stage recipe (lr 5e-3, cosine)
reach 0.955 (0.886 at step 2000); batch 64 for 1500 steps (the same tokens) 0.954. So neither more steps nor a
larger batch reaches 0.99 at P = 32 within ~12M tokens (3x the steps buy 0.924 -> 0.955); the grid uses the
1000-step stage (0.924), the same budget for every model.
So attention solves MQAR at P = 16 (>= 0.99) but not at P = 32 (best 0.977, after 6000 steps at P = 32)
within this CPU's budget, and P = 64 was not run.
Unloaded throughput (2026-12-03, P = 32, batch 32, both cores): attention 25k tokens/s, gla_softmax 17k,
sse_n4k1 11k, sse_n8k2 10k; one process per core (``taskset -c``) gets ~16-20k (attention) each, so two pinned
processes do ~1.5x the work of one unpinned one. A chain 4 -> 16 -> 32 (10.2M tokens) then costs ~9 min of
one core for attention, ~15 for GLA and ~25 for SSE. The measured grid is in experiments/mqar.py.
"""

from __future__ import annotations

import math

import ml_collections

from sqattn import data
from sqattn.configs import base, parse_arg

D_MODEL = 64
NUM_LAYERS = 2
NUM_HEADS = 2
HEAD_DIM = 32             # c = d = 32
MLP_DIM = 2 * D_MODEL     # SwiGLU x2
EVAL_SEQUENCES = 1000     # rounded up to whole eval batches
CHUNK_SIZE = 32
# The recipe (module docstring): a fresh run (the curriculum's first stage, P = 4) at lr 1e-2 with 100 warmup
# steps; a run started from a smaller-P run (``init=``) at lr 5e-3 with 50 warmup steps; both cosine to 0.1 x lr.
LR_FRESH, WARMUP_FRESH = 1e-2, 100
LR_STAGE, WARMUP_STAGE = 5e-3, 50
TOKENS_PER_STEP = 2048    # batch = max(MIN_BATCH, TOKENS_PER_STEP // 4P): 128 at P=4, 32 at P >= 16
MIN_BATCH = 32

# mixer arg -> (block-pattern letter, sub-config name, sub-config). SSE: N sparse partitions, top-K routing
# (+ the always-selected shared partition). Its "sorted" form equals the note's "mask" form up to float rounding
# (tests/sqattn/mixers/test_sse.py) and is ~2x faster here (P=32, batch 32, 2 loaded CPUs: n4k1 1.5 vs 3.3 s per
# step, n8k2 2.7 vs 6.2 s); ``--config.model.mixers.sse.form=mask`` selects the note's form.
MIXERS = {
    "attention": ("A", "attention", dict(
        num_heads=NUM_HEADS, num_kv_heads=NUM_HEADS, head_dim=HEAD_DIM, window=0, rope_theta=10000.0,
        qk_norm=False)),
    "gla_softmax": ("G", "gla", dict(
        num_heads=NUM_HEADS, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM, key_map="softmax", query_map="silu",
        gate_rank=16, gate_norm=16.0, short_conv=False, chunk_size=CHUNK_SIZE, impl="auto")),
    "gla_silu": ("G", "gla", dict(
        num_heads=NUM_HEADS, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM, key_map="silu", query_map="silu",
        gate_rank=16, gate_norm=16.0, short_conv=False, chunk_size=CHUNK_SIZE, impl="auto")),
    "sse_n4k1": ("S", "sse", dict(
        num_heads=NUM_HEADS, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM, num_partitions=4, top_k=1,
        form="sorted", chunk_size=CHUNK_SIZE, impl="auto", aux_loss_coef=0.01)),
    "sse_n8k2": ("S", "sse", dict(
        num_heads=NUM_HEADS, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM, num_partitions=8, top_k=2,
        form="sorted", chunk_size=CHUNK_SIZE, impl="auto", aux_loss_coef=0.01)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The MQAR run ``arg`` = ``"mixer=...,pairs=...,steps=...,seed=...[,batch=B][,lr=X][,warmup=W][,init=DIR]
    [,runlocal]"``; ``batch``/``lr``/``warmup`` left at 0/0/-1 take the recipe's defaults (module docstring)."""
    a = parse_arg(arg, mixer="gla_softmax", pairs=32, steps=1500, seed=0, batch=0, lr=0.0, warmup=-1, init="",
                  runlocal=False)
    if a.mixer not in MIXERS:
        raise ValueError(f"mqar configs: unknown mixer {a.mixer!r}; expected one of {sorted(MIXERS)}")
    if a.pairs < 1:
        raise ValueError(f"mqar configs: pairs must be >= 1, got {a.pairs}")
    if a.batch < 0 or a.lr < 0:
        raise ValueError(f"mqar configs: batch and lr must be >= 0 (0 = the recipe's default), got "
                         f"batch={a.batch}, lr={a.lr}")
    letter, name, mixer_cfg = MIXERS[a.mixer]
    c = base.base_config()
    c.seed = a.seed
    c.batch_size = a.batch or default_batch(a.pairs)
    c.num_steps = a.steps
    c.log_every = 50
    c.eval_every = 250
    c.eval_batches = math.ceil(EVAL_SEQUENCES / c.batch_size)   # >= 1000 held-out sequences
    c.checkpoint_every = 500
    c.keep_checkpoints = 1
    c.optim.lr = a.lr or (LR_STAGE if a.init else LR_FRESH)
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = a.warmup if a.warmup >= 0 else (WARMUP_STAGE if a.init else WARMUP_FRESH)
    c.init.workdir = a.init    # curriculum: start from the finished run at a smaller P (same parameter tree)
    c.data = data.default_config("mqar")
    c.data.seed = a.seed
    c.data.num_kv_pairs = a.pairs
    c.data.seq_len = 4 * a.pairs   # P "k v" pairs + P "k v" queries: exactly the 2P + 2Q the source needs
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=256,            # 1 pad + 127 keys + 128 values (data.key/value_vocab_size)
        d_model=D_MODEL,
        num_layers=NUM_LAYERS,
        block_pattern=letter,
        mlp_dim=MLP_DIM,
        tie_embeddings=True,
        dtype="float32",           # the note asks for fp32; these matmuls are too small to gain from bf16
        norm_eps=1e-6,
        remat=False,
        mixers=ml_collections.ConfigDict({name: ml_collections.ConfigDict(dict(mixer_cfg))}),
    ))
    if a.runlocal:
        base.runlocal(c)
        pairs = min(a.pairs, 8)
        c.data.num_kv_pairs = pairs
        c.data.seq_len = 4 * pairs
    return c


def default_batch(pairs: int) -> int:
    """Sequences per step: TOKENS_PER_STEP tokens (a step's CPU time is per token here), at least MIN_BATCH."""
    return max(MIN_BATCH, TOKENS_PER_STEP // (4 * pairs))
