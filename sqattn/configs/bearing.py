"""Bearing-fault classifier of the digital twin (papers/digital_twin_bearing.md; ``sqattn/science/bearing``).

Task ``bearing``: 4 classes (normal, inner race, outer race, ball) from the 15 window features (18 with
``envelope``) of synthesised CWRU-like records (4 classes x 4 rpm x 8 records x 29 windows of 2048 samples at
12 kHz = 3712 windows); model ``bearing_mlp``: 2 x 64 GELU MLP on standardised features. AdamW 3e-3, batch 64,
``steps`` steps, eval on every test window (record-level split by default: no window of a test record is seen).

Commands (2 shared CPU cores):
  python -m experiments.train --config=bearing_mlp --workdir=/tmp/bearing_mlp
  python -m experiments.train --config=bearing_mlp:envelope,noise=0.3,split=window --workdir=/tmp/b2
  python -m experiments.bearing --workdir=/work/runs/bearing        # every table (RF and MLP), JSON + PNG
Registered names: bearing_mlp (15 features), bearing_mlp_env (18). Args: ``envelope``, ``noise`` (sigma_n),
``split=record|window``, ``records`` (per class and rpm), ``seconds``, ``hidden``, ``layers``, ``steps``,
``seed``, ``runlocal``. Runtime 14-42 s per 1000-step run on 2 loaded cores (data synthesis included; ~3 min
with a cold compilation cache). Record split, sigma_n 0.05: 66 % (15 features) and 100 % (18) test accuracy; every
setting is in experiments/bearing.py's docstring.
"""

from __future__ import annotations

import math

import ml_collections

from sqattn.configs import base, parse_arg
from sqattn.science.bearing import dataset, features, task


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, envelope=False, noise=0.05, split="record", records=8, seconds=5.0, hidden=64, layers=2,
                  steps=1000, seed=0, runlocal=False)
    if a.split not in dataset.SPLITS:
        raise ValueError(f"bearing: split must be one of {dataset.SPLITS}, got {a.split!r}")
    c = base.base_config()
    c.task = "bearing"
    c.model_name = "bearing_mlp"
    c.seed = a.seed
    c.data = dataset.default_config()
    c.data.update(dict(seed=a.seed, noise=a.noise, split=a.split, envelope=a.envelope,
                       records_per_cell=a.records, seconds=a.seconds))
    c.batch_size = 64
    c.num_steps = a.steps
    c.log_every = 50
    c.eval_every = 0                      # evaluate once, at the end, on every test window
    c.checkpoint_every = max(a.steps // 2, 1)
    c.keep_checkpoints = 1
    c.optim.update(lr=3e-3, warmup_steps=50, min_lr_ratio=0.05, weight_decay=1e-4, grad_clip=1.0)
    c.mesh.update(data=1, fsdp=1)         # a 6k-parameter model: one device
    c.model = ml_collections.ConfigDict(dict(
        in_features=len(features.names(a.envelope)), hidden=a.hidden, num_layers=a.layers,
        num_classes=task.NUM_CLASSES))
    if a.runlocal:
        base.runlocal(c)
        c.data.records_per_cell = 2
        c.data.seconds = 0.35             # 2 windows per record: 32 records, 64 windows
    c.eval_batches = math.ceil(dataset.num_windows(c.data, "test") / c.batch_size)
    return c
