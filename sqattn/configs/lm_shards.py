"""Byte-level attention LM trained on a nested shard of the stdlib corpus (``sqattn/analysis/text_shards.py``),
for the data-scaling sweep of ``experiments/scaling.py`` (papers/scaling_laws.md).

The ``lm_tiny`` structure (attention + SwiGLU blocks, heads of 16, tied bytes embedding) at width ``d_model`` and
depth ``layers``, rows of ``seq_len`` bytes, batch 16, AdamW 3e-3 with cosine decay; the train rows come from the
first ``train_bytes`` bytes of one fixed chunk order of the corpus (every shard contains the smaller ones); eval
is the ``text`` source's held-out tail, the same for every shard, evaluated every ``eval_every`` steps so the best
validation value can be read from metrics.jsonl (early stopping after the fact).

  python -m experiments.train --config=lm_shards:train_bytes=262144,d_model=64 --workdir=/tmp/lm_shard
Args: ``train_bytes`` (0 = everything), ``d_model``, ``layers``, ``seq_len``, ``steps``, ``seed``, ``runlocal``.
"""

from __future__ import annotations

import ml_collections

from sqattn.configs import base, lm, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, train_bytes=0, d_model=64, layers=2, seq_len=64, steps=300, seed=0, runlocal=False)
    if a.d_model < 16 or a.d_model % 16:
        raise ValueError(f"lm_shards: d_model must be a positive multiple of 16 (heads of 16), got {a.d_model}")
    c = lm.get_config("mixer=attention")
    c.task = "lm_shards"
    c.seed = a.seed
    c.data.seq_len = a.seq_len
    c.data.train_bytes = a.train_bytes
    c.data.shard_seed = 0
    c.num_steps = a.steps
    c.batch_size = 16
    c.model.update(d_model=a.d_model, num_layers=a.layers, mlp_dim=3 * a.d_model)
    c.model.mixers.attention.update(num_heads=a.d_model // 16, num_kv_heads=max(1, a.d_model // 32))
    c.optim.warmup_steps = min(30, max(a.steps // 10, 1))
    c.eval_every = max(a.steps // 4, 1)
    c.eval_batches = 4
    c.log_every = 25
    c.checkpoint_every = a.steps
    c.keep_checkpoints = 1
    c.mesh.fsdp = 1
    if a.runlocal:
        base.runlocal(c)
        c.data.train_bytes = a.train_bytes or 8 * 4096
        c.model.update(d_model=32, num_layers=1, mlp_dim=64)
        c.model.mixers.attention.update(num_heads=2, num_kv_heads=1)
    return c
