"""MQAR (multi-query associative recall) runs of papers/sse.md §7: small 2-layer LMs, one mixer type each.

Command (one run; the grid over models and P is experiments/mqar.py):
  python -m experiments.train --config=mqar:mixer=gla_softmax,pairs=32 --workdir=/tmp/mqar_gla_p32
  python -m experiments.mqar --workdir=/work/runs/mqar                 # the whole grid, results.json + PNG
Args: ``mixer=attention|gla_softmax|gla_silu|sse_n4k1|sse_n8k2`` (``sse_*`` need sqattn.mixers.sse),
``pairs=P`` (key-value pairs; the sequence is ``4P`` tokens: P "k v" pairs then P "k v" queries),
``steps``, ``seed`` (parameter init and data stream), ``runlocal`` (a few steps at P <= 8, for smoke tests).

Every model: 2 layers, d_model 64, 2 heads with key dim c = 32 and value dim d = 32, SwiGLU hidden 128 (x2),
RMSNorm, tied embeddings, float32 compute; vocabulary 256 (keys 1..127, values 128..255, 0 = pad/noise).
Training (the note's recipe): AdamW lr 3e-3, weight decay 0.1, 100 warmup steps then cosine to 0.1 x lr,
batch 32, fresh random sequences every step, SSE partition-balance aux loss 0.01. Evaluation: 1024 held-out
sequences (32 batches of the eval stream); ``eval_accuracy`` is next-token accuracy at the query keys only
(the LM task weights by the data's loss mask, which is 1 exactly at the query keys).

Hardware / runtime / result (measured 2026-11-29, one seed, a 2-core CPU shared with other jobs at load
average 5-25): a train step takes 0.4-1.7 s (attention) to 1.5-3.5 s (GLA, SSE) at P=16 and ~2x/4x that at
P=32/64, so 1000 steps cost 12-30 min per run at P=16 and the 15-run grid at 1000 steps many hours. At 1000
steps every model is still near the start of learning: held-out query accuracy at P=16 attention 0.063,
gla_softmax 0.065, gla_silu 0.170, sse_n4k1 0.145, sse_n8k2 0.188 (chance 1/128; guessing a stated value
1/16); attention reaches 0.212 at 3000 steps. The note's expected direction (attention ~1.0, GLA dropping past
P=32, SSE above GLA) needs much longer training than its 1500-2000-step estimate; not yet observed here.
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
    """The MQAR run ``arg`` = ``"mixer=...,pairs=...,steps=...,seed=...[,runlocal]"``."""
    a = parse_arg(arg, mixer="gla_softmax", pairs=32, steps=1500, seed=0, runlocal=False)
    if a.mixer not in MIXERS:
        raise ValueError(f"mqar configs: unknown mixer {a.mixer!r}; expected one of {sorted(MIXERS)}")
    if a.pairs < 1:
        raise ValueError(f"mqar configs: pairs must be >= 1, got {a.pairs}")
    letter, name, mixer_cfg = MIXERS[a.mixer]
    c = base.base_config()
    c.seed = a.seed
    c.batch_size = 32
    c.num_steps = a.steps
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = math.ceil(EVAL_SEQUENCES / c.batch_size)   # 32 x 32 = 1024 held-out sequences
    c.checkpoint_every = 500
    c.keep_checkpoints = 1
    c.optim.lr = 3e-3
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 100
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
