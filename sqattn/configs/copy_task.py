"""COPY task of "Can Mamba always enjoy the free lunch?" (papers/mamba_free_lunch.md §5).

A sample is ``x_1..x_L SEP x_1..x_L`` with x_i uniform over 16 symbols (fixed L); next-token loss only
on the L copied tokens; fresh data every step; the metric is per-token copy accuracy on 512 fresh eval
sequences (``eval_accuracy``; chance 1/16). Models: 2 layers, d_model 32, pre-RMSNorm, residual,
untied embedding and head.

* ``mixer=mamba2``: Mamba-2 (SSD), expand 2 (D_in 64), head_dim 16 (4 heads), conv 4, ``d_state`` N,
  gated RMSNorm, no MLP. chunk_size = min(2L, 64): the quadratic (dual) form in one chunk up to
  L = 32; at L = 64 two chunks of 64 measured ~2x faster than one of 128 (fwd+bwd of the op on this
  CPU). State per layer: 64 * N floats.
* ``mixer=mamba``: Mamba-1 (S6), same width, N = ``d_state``, no MLP (optional row of §5).
* ``mixer=transformer``: 2 heads of 16, causal softmax attention, SwiGLU MLP of hidden 85 (parameter-
  matched to the note's GELU x4 MLP). Positions: **RoPE** (the sqattn attention mixer), not the
  note's learned absolute positions; a relative-offset head (offset L + 1) solves fixed-L copy.

Training: Adam (no weight decay), b 0.9/0.98, lr 3e-3, 100 warmup steps, cosine to 0, clip 1.0,
batch 32, ``steps`` steps (note: 1500), seed 0, float32.

Commands (2 shared CPU cores):
  python -m experiments.train --config=copy_mamba2:d_state=16,copy_len=32 --workdir=/tmp/copy
  python -m experiments.copy_task --workdir=/work/runs/copy_task        # the whole grid, JSON + PNG
Registered names: copy_mamba2, copy_mamba, copy_transformer. Args: ``mixer=mamba2|mamba|transformer``,
``d_state``, ``copy_len`` (L), ``num_symbols``, ``steps``, ``seed``, ``runlocal``. The measured grid is in
experiments/copy_task.py's docstring (1000 steps: Mamba-2 N=16 copies 93% at L=8 but 50% at L=32; N=64
83% at L=32; the Transformer 100% up to L=64).
"""

from __future__ import annotations

import ml_collections

from sqattn import data
from sqattn.configs import base, parse_arg

MIXERS = ("mamba2", "mamba", "transformer")
D_MODEL = 32
NUM_LAYERS = 2
EVAL_SEQUENCES = 512


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, mixer="mamba2", d_state=16, copy_len=16, num_symbols=16, steps=1500, seed=0,
                  runlocal=False)
    if a.mixer not in MIXERS:
        raise ValueError(f"copy_task: unknown mixer {a.mixer!r}; expected one of {'|'.join(MIXERS)}")
    if a.copy_len < 1 or a.d_state < 1 or a.steps < 1:
        raise ValueError(f"copy_task: copy_len, d_state and steps must be >= 1, got {a.copy_len}, "
                         f"{a.d_state}, {a.steps}")
    c = base.base_config()
    c.seed = a.seed
    c.data = data.default_config("copy")
    c.data.copy_len = a.copy_len          # L, fixed (min_copy_len unset)
    c.data.seq_len = 2 * a.copy_len       # x_1..x_L SEP x_1..x_{L-1} -> targets up to x_L
    c.data.num_symbols = a.num_symbols
    c.data.seed = a.seed
    c.batch_size = 32
    c.num_steps = a.steps
    c.log_every = 50
    c.eval_every = 0                      # evaluate once, at the end
    c.eval_batches = EVAL_SEQUENCES // c.batch_size
    c.checkpoint_every = 500
    c.keep_checkpoints = 1
    c.optim.update(lr=3e-3, warmup_steps=100, min_lr_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.98,
                   grad_clip=1.0)
    c.mesh.update(data=1, fsdp=1)         # a 30k-parameter model: one device, no sharding overhead
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=a.num_symbols + 2,     # pad, symbols, SEP
        d_model=D_MODEL,
        num_layers=NUM_LAYERS,
        block_pattern="2",
        mlp_dim=0,
        tie_embeddings=False,
        dtype="float32",
        norm_eps=1e-6,
        remat=False,
        mixers=ml_collections.ConfigDict(),
    ))
    if a.mixer == "mamba2":
        c.model.mixers.mamba2 = ml_collections.ConfigDict(dict(
            d_state=a.d_state, expand=2, head_dim=16, ngroups=1, d_conv=4,
            chunk_size=min(2 * a.copy_len, 64), impl="auto"))
    elif a.mixer == "mamba":
        c.model.block_pattern = "M"
        c.model.mixers.mamba = ml_collections.ConfigDict(dict(
            d_state=a.d_state, expand=2, d_conv=4, dt_rank="auto", chunk_size=8, impl="auto"))
    else:
        c.model.block_pattern = "A"
        c.model.mlp_dim = 85
        c.model.mixers.attention = ml_collections.ConfigDict(dict(
            num_heads=2, num_kv_heads=2, window=0, rope_theta=10000.0, qk_norm=False))
    if a.runlocal:
        base.runlocal(c)
        c.data.seq_len = 2 * a.copy_len   # runlocal caps seq_len; a copy row needs 2L
        c.eval_batches = 2
    return c
