"""Liger linearisation (papers/liger.md) as a run of the trainer: a trained attention LM's weights
transplanted into the same model with every attention layer replaced by Liger's key-gated recurrence + sliding
window, fine-tuned through LoRA adapters on q, k, v only.

  python -m experiments.train --config=liger:base=/tmp/teacher_run --workdir=/tmp/liger_run

Args: ``base`` (the attention-LM run; "" = a random ``lm_tiny``, for smoke tests only), ``steps`` (300),
``seq_len`` (128), ``batch`` (8), ``lr`` (1e-3, constant, AdamW b2 0.999, no decay, clip 1), ``window`` (16),
``chunk_size`` (32), ``seed`` (0), ``runlocal``. The training text is the teacher's source drawn with data seed
``teacher's + 1000 + seed`` (other windows than the teacher saw). ``experiments/linearize.py`` runs the paper's
variants (other gates, no window, no recurrence) through ``config_for(mixer=...)``.
"""

from __future__ import annotations

import ml_collections

from sqattn.configs import base as base_lib, parse_arg

LORA_TARGETS = ("q", "k", "v")


def config_for(teacher_workdir: str, *, teacher_config=None, mixer: dict | None = None, steps: int = 300,
               seq_len: int = 128, batch_size: int = 8, lr: float = 1e-3, window: int = 16, chunk_size: int = 32,
               seed: int = 0) -> ml_collections.ConfigDict:
    """The LoRA fine-tune of the teacher run in ``teacher_workdir`` turned into a Liger model.

    ``init`` transplants every teacher weight into the linearised model (``init.transfer="transplant"``),
    ``peft`` wraps q, k, v in LoRA rank 8 / alpha 8 and ``optim.trainable`` trains only the adapters (plus the
    gate projection when ``mixer["gate"] == "fresh"``). ``mixer``: the Liger mixer's options (default: window
    ``window``, GLA-style key gate at temperature 16, recurrence + window mixed 0.5, ``chunk_size``).
    """
    from sqattn.models.convert import linearize_config
    if teacher_config is None:
        if teacher_workdir:
            from sqattn import sample
            teacher_config = sample.load_config(teacher_workdir)
        else:
            from sqattn import configs
            teacher_config = configs.get("lm_tiny")
    mixer = dict(dict(window=window, gate="gla", gate_temperature=16.0, recurrent=True, mix=0.5,
                      chunk_size=chunk_size, impl="auto"), **(mixer or {}))
    cfg = ml_collections.ConfigDict(teacher_config.to_dict())
    defaults = base_lib.base_config()
    for key in ("init", "peft", "data_offset"):
        if key not in cfg:                      # a teacher saved before these settings existed
            cfg[key] = defaults[key]
    for key in ("trainable", "lr_scale"):
        if key not in cfg.optim:
            cfg.optim[key] = defaults.optim[key]
    cfg.model = linearize_config(teacher_config.model, mixer_cfg=mixer)
    cfg.name = "liger"
    cfg.seed = seed
    cfg.num_steps = steps
    cfg.batch_size = batch_size
    cfg.data.seq_len = seq_len
    cfg.data.seed = int(teacher_config.data.get("seed", 0)) + 1000 + seed
    cfg.data_offset = 0
    cfg.init.workdir, cfg.init.step, cfg.init.transfer = teacher_workdir, -1, "transplant"
    cfg.peft.method, cfg.peft.targets, cfg.peft.rank, cfg.peft.alpha = "lora", ",".join(LORA_TARGETS), 8, 8.0
    cfg.optim.update(dict(lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, b1=0.9, b2=0.999,
                          eps=1e-8, grad_clip=1.0, grad_accum=1, lr_scale="",
                          trainable="lora_" + ("|mixer/gate/" if mixer["gate"] == "fresh" else "")))
    cfg.eval_every, cfg.eval_batches = 0, 1
    cfg.log_every = 1
    cfg.checkpoint_every = max(1, min(100, steps))
    cfg.keep_checkpoints = 1
    cfg.mesh.fsdp = 1
    return cfg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, base="", steps=300, seq_len=128, batch=8, lr=1e-3, window=16, chunk_size=32, seed=0,
                  runlocal=False)
    c = config_for(a.base, steps=a.steps, seq_len=a.seq_len, batch_size=a.batch, lr=a.lr, window=a.window,
                   chunk_size=a.chunk_size, seed=a.seed)
    if a.runlocal:
        base_lib.runlocal(c)
        c.model.num_layers = min(c.model.num_layers, 2)
        c.model.block_pattern = c.model.block_pattern[:c.model.num_layers] or c.model.block_pattern
    return c
