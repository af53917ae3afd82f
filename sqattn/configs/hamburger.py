"""HAMburger fine-tuning (papers/hamburger.md) as a run of the trainer, started from a trained byte-LM run.

  python -m experiments.train --config=hamburger:base=/tmp/base_run --workdir=/tmp/ham_run

Args: ``base`` (the LM run to graft onto; its model and data config are read from its ``config.json``; empty =
a random ``lm_tiny``-shaped base, for smoke tests only), ``steps`` (300), ``batch`` (16), ``s_max`` (4),
``micro_layers`` (1), ``prompt_len`` (16: tokens of each row kept as a prompt, unsegmented), ``seed`` (0),
``runlocal``. Optimiser: AdamW at 1e-3 for the grafted modules and 5e-4 for the base (``optim.lr_scale``),
warmup min(50, steps/10), cosine to 10%, clip 1. The training rows are the base run's text read from data step
1,000,003 * (seed + 1) on (``data_offset``), so they are not the windows the base was trained on.
"""

from __future__ import annotations

import json
import os

import ml_collections

from sqattn.configs import base as base_lib, parse_arg


def config_for(base_workdir: str, *, steps: int = 300, batch_size: int = 16, s_max: int = 4,
               micro_layers: int = 1, prompt_len: int = 16, seed: int = 0) -> ml_collections.ConfigDict:
    """The fine-tuning config of a HAMburger grafted onto the LM run in ``base_workdir`` ("" = a random base)."""
    c = base_lib.base_config()
    c.model_name = "hamburger"
    c.task = "hamburger"
    c.seed = seed
    if base_workdir:
        path = os.path.join(base_workdir, "config.json")
        if not os.path.exists(path):
            raise ValueError(f"hamburger: base run {base_workdir!r} has no config.json (not a trainer run)")
        with open(path) as f:
            src = json.load(f)
        if src.get("model_name", "lm") != "lm":
            raise ValueError(f"hamburger: base run {base_workdir!r} is a {src.get('model_name')!r} model, not an LM")
        lm_model, data_cfg = src["model"], ml_collections.ConfigDict(src["data"])
        c.init.workdir = base_workdir
        c.init.transform = "sqattn.models.hamburger_task:graft"
    else:
        from sqattn import configs
        tiny = configs.get("lm_tiny")
        lm_model, data_cfg = tiny.model.to_dict(), tiny.data
    c.data = data_cfg
    c.model = ml_collections.ConfigDict(dict(base=lm_model, s_max=s_max, micro_layers=micro_layers,
                                             prompt_len=prompt_len))
    c.batch_size = batch_size
    c.num_steps = steps
    c.data_offset = 1_000_003 * (seed + 1)
    c.optim.lr = 1e-3
    c.optim.lr_scale = "^base/=0.5"
    c.optim.warmup_steps = min(50, max(steps // 10, 1))
    c.eval_every = 0
    c.eval_batches = 8
    c.log_every = max(1, min(25, steps))
    c.checkpoint_every = max(1, min(100, steps))
    c.keep_checkpoints = 1
    c.mesh.fsdp = 1
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, base="", steps=300, batch=16, s_max=4, micro_layers=1, prompt_len=16, seed=0,
                  runlocal=False)
    c = config_for(a.base, steps=a.steps, batch_size=a.batch, s_max=a.s_max, micro_layers=a.micro_layers,
                   prompt_len=a.prompt_len, seed=a.seed)
    if a.runlocal:
        base_lib.runlocal(c)
        c.data.seq_len = min(c.data.seq_len, 32)
        if not a.base:
            c.model.base.num_layers = 1
        c.model.prompt_len = min(c.model.prompt_len, 8)
    return c
