"""Byte-level decoder LMs whose MLP is a mixture of experts in every other block (papers/flashmoe.md).

``moe_tiny`` (CPU): ``lm_tiny`` (4 x d128 attention blocks, SwiGLU 384) with blocks 1 and 3 made MoE layers of
8 gated-MLP experts of width 192, top-2, capacity factor 1.25 per sequence: the same active MLP FLOPs as the
dense block, 8/2 = 4x the MLP parameters there. Command (2 CPU cores; measured, 200 steps: train loss 4.03 at
step 10 -> 1.91 at step 200, eval 1.70 nats = 2.45 bits/byte; expert load max/mean 1.13 in both MoE blocks over 8
eval batches, from ``sqattn.moe.expert_load``):
  python -m experiments.train --config=moe_tiny --config.num_steps=200 --workdir=/tmp/moe_tiny
Expert parallelism on the 8 simulated CPU devices (the ``expert`` axis splits the experts and the batch):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.train --config=moe_tiny \
      --config.mesh.fsdp=2 --config.mesh.expert=4 --workdir=/tmp/moe_tiny_ep

``moe_large`` (dry run on a laptop; train on accelerators): 24 x d2048 blocks (16 heads, 8 kv-heads), dense
SwiGLU 8192 in even blocks, 64 experts of width 2048 top-2 in odd blocks (FlashMoE's default expert shape),
10.57B parameters of which 1.21B are active per token (dry run):
  python -m experiments.train --config=moe_large --dry_run
  python -m experiments.train --config=moe_large --config.mesh.fsdp=-1 --config.mesh.expert=8 ...

Args: ``size=tiny|large``, ``data=text|tfds``, ``dispatch=auto|dense|sorted|fused|expert_parallel``,
``runlocal`` (a few small steps, for smoke tests).
"""

from __future__ import annotations

import ml_collections

from sqattn.configs import base, lm, parse_arg


def moe_config(**overrides) -> ml_collections.ConfigDict:
    """The ``model.moe`` section (``sqattn.moe.MoE`` kwargs plus the layer selection)."""
    c = ml_collections.ConfigDict(dict(
        every=2,                # MoE replaces the MLP of blocks every-1, 2*every-1, ... (moe_layer_indices)
        layers=(),              # or explicit block indices (overrides every)
        num_experts=8,          # E
        top_k=2,                # experts per token
        mlp_dim=192,            # expert hidden width
        capacity_factor=1.25,   # C = ceil(cf * group_size * top_k / E); <= 0: dropless
        group_size=0,           # tokens per capacity group (consecutive tokens of a row); 0 = the whole row
        dispatch="auto",        # auto | dense | sorted | fused | expert_parallel (auto: EP when mesh.expert > 1)
        gmm="auto",             # grouped matmul of the sorted path: auto | ragged | tiled
        kernel_impl="auto",     # kernels.moe impl for dispatch=fused: auto | ref | chunked | pallas | interpret
        block_m=128,            # tile rows of the tiled grouped matmul
        exchange="auto",        # EP all-to-all: auto | padded | ragged | ragged_emulated
        aux_loss_coef=1e-2,     # load-balance loss weight
        z_loss_coef=1e-3,       # router z-loss weight
    ))
    c.update(overrides)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, size="tiny", data="text", dispatch="auto", runlocal=False)
    if a.size not in ("tiny", "large"):
        raise ValueError(f"moe configs: unknown size {a.size!r}; known: ['large', 'tiny']")
    c = lm.get_config(f"mixer=attention,size=tiny,data={a.data}")
    c.model.moe = moe_config(dispatch=a.dispatch)
    if a.size == "large":
        c.model.update(d_model=2048, num_layers=24, mlp_dim=8192, remat=True)
        c.model.mixers.attention.update(num_heads=16, num_kv_heads=8)
        c.model.moe.update(num_experts=64, top_k=2, mlp_dim=2048)
        c.data.seq_len = 2048
        c.batch_size = 256
        c.num_steps = 20000
        c.optim.lr = 3e-4
        c.optim.warmup_steps = 1000
        c.eval_every = 1000
        c.checkpoint_every = 1000
    if a.runlocal:
        base.runlocal(c)
        c.model.update(d_model=64, num_layers=2, mlp_dim=128, remat=False)
        c.model.mixers.attention.update(num_heads=4, num_kv_heads=2)
        c.model.moe.update(num_experts=4, mlp_dim=64)
    return c
