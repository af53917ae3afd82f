"""The SPM reproduction's runs (papers/spm.md): a text-conditioned DiT on the shapes world, its judge CNN, and
SPM erasing of a concept from the trained DiT.

``kind=dit`` (registered ``dit_shapes``): task ``diffusion``, model ``dit`` (16x16x3 images, patch 2 -> 64
tokens with fixed 2-D sincos positions, width 64, 4 blocks, 4 heads, text encoder of 2 layers over 6 word tokens;
~0.5M parameters), cosine schedule of 1000 steps, caption dropout 10 % "" / 10 % shape only / 10 % colour only,
AdamW 1e-3 (wd 0), batch 128, 6000 steps, min-SNR-5 weighting of the eps loss (min(SNR, 5) / SNR, Hang et al.
2023: the loss's weight moves off the nearly clean timesteps; ``minsnr=0`` for the plain eps MSE). This is the
recipe of experiments/spm.py's fourth attempt (72 min on one CPU core, judge shape accuracy 0.72); before
2026-12-03 23:00 the defaults were patch 4, learned positions, batch 32, 3000 steps, no min-SNR, whose samples
drew no recognisable shapes. On this CPU a step is overhead-bound: a batch of 128 costs ~1.3x a batch of 32.
``kind=judge`` (``judge_shapes``): task ``shapes_judge``, model ``judge_cnn`` (4 convs, width 32), AdamW 3e-3, 1000 steps.
``kind=spm`` (``spm_shapes``): task ``spm``, the DiT config with ``peft.method="spm"`` (rank-1 adapters on
every Dense of the DiT blocks), only the adapters trained (``optim.trainable``), Adam 1e-3, batch 4,
``spm.*`` as the official configs (eta 1, lambda 1000, 4 anchors, c_sur = "", rollouts of up to 20 DDIM steps
at CFG 3). Pass the trained DiT run: ``--config.init.workdir=<dit run>`` (``init=...`` in the arg).

Commands (2 shared CPU cores; every run is resumable like any other):
  python -m experiments.train --config=dit_shapes --workdir=/tmp/dit
  python -m experiments.train --config=judge_shapes --workdir=/tmp/judge
  python -m experiments.train --config=spm_shapes:init=/tmp/dit,concept=star --workdir=/tmp/spm_star
  python -m experiments.spm --workdir=/tmp/spm_exp      # all of it, with the evaluation tables
Args: ``kind``, ``steps``, ``batch``, ``width``, ``depth``, ``patch``, ``lr``, ``seed``, ``init`` (SPM source
run), ``concept``, ``la`` (lambda), ``anchors``, ``rollout`` (S), ``minsnr`` (min-SNR gamma of the DiT's
loss, 0 = off), ``pos`` (the DiT's patch positions: ``sincos``, fixed 2-D, the default since 2026-12-03, or
``learned``, the earlier runs'), ``runlocal``. Runtimes and results: experiments/spm.py.
"""

from __future__ import annotations

import ml_collections

from sqattn.configs import base, parse_arg
from sqattn.data import shapes

KINDS = ("dit", "judge", "spm")


def dit_model(width: int, depth: int, patch: int, pos: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        image_size=16, channels=3, patch=patch, d_model=width, depth=depth, num_heads=4, mlp_ratio=4,
        vocab_size=len(shapes.VOCAB), text_len=shapes.TEXT_LEN, text_layers=2, pos_embed=pos))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, kind="dit", steps=0, batch=0, width=64, depth=4, patch=2, lr=0.0, seed=0, init="",
                  concept="star", la=1000.0, anchors=4, rollout=20, minsnr=-1.0, pos="sincos", runlocal=False)
    if a.kind not in KINDS:
        raise ValueError(f"diffusion config: kind must be one of {KINDS}, got {a.kind!r}")
    c = base.base_config()
    c.seed = a.seed
    c.data = ml_collections.ConfigDict(dict(name="shapes", seed=a.seed, size=16, p_empty=0.1, p_shape_only=0.1,
                                            p_colour_only=0.1))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine",    # or "linear"
        train_steps=1000,     # T of the forward process
        sample_steps=20,      # DDIM steps when sampling
        guidance=3.0,         # CFG scale when sampling
        # > 0: min-SNR-gamma weighted eps loss (0: the plain mean eps MSE); default 5 for the DiT, 0 otherwise
        min_snr_gamma=a.minsnr if a.minsnr >= 0 else (5.0 if a.kind == "dit" else 0.0),
    ))
    c.mesh.update(data=1, fsdp=1)          # < 1M parameters: one device
    c.log_every = 50
    c.eval_batches = 4
    c.keep_checkpoints = 1
    c.optim.update(weight_decay=0.0, warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0)
    if a.kind == "dit":
        c.task, c.model_name = "diffusion", "dit"
        c.model = dit_model(a.width, a.depth, a.patch, a.pos)
        c.batch_size = a.batch or 128
        c.num_steps = a.steps or 6000
        c.optim.lr = a.lr or 1e-3
    elif a.kind == "judge":
        c.task, c.model_name = "shapes_judge", "judge_cnn"
        c.model = ml_collections.ConfigDict(dict(channels=3, width=32, num_shapes=len(shapes.SHAPES),
                                                 num_colours=len(shapes.COLOURS)))
        c.batch_size = a.batch or 64
        c.num_steps = a.steps or 1000
        c.optim.update(lr=a.lr or 3e-3, warmup_steps=20)
    else:
        c.task, c.model_name = "spm", "dit"
        c.model = dit_model(a.width, a.depth, a.patch, a.pos)
        c.batch_size = a.batch or 4
        c.num_steps = a.steps or 400
        c.optim.update(lr=a.lr or 1e-3, warmup_steps=20, min_lr_ratio=1.0, trainable=r"spm_(down|up)")
        c.init.workdir = a.init
        c.peft.update(method="spm", targets="q,k,v,o,fc1,fc2", rank=1, alpha=1.0)
        c.spm = ml_collections.ConfigDict(dict(
            concept=a.concept,    # a shape or a colour of the shapes world
            surrogate="",         # c_sur (the "neutral" prompt)
            eta=1.0,              # erasing guidance scale
            la_strength=a.la,     # lambda of latent anchoring (0: off)
            num_anchors=a.anchors,
            rollout_steps=a.rollout,   # x_t: n ~ U{1..S-1} DDIM steps of S, from noise
            rollout_guidance=3.0,
        ))
        c.eval_batches = 1
    c.checkpoint_every = max(c.num_steps // 4, 1)
    c.eval_every = 0
    if a.runlocal:
        base.runlocal(c)
        if a.kind != "judge":
            c.model.update(d_model=16, depth=1, text_layers=1, num_heads=2, patch=4)
        else:
            c.model.width = 8
        if a.kind == "spm":
            c.batch_size = 2
            c.spm.update(rollout_steps=3, num_anchors=2)
    return c
