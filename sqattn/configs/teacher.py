"""MLP students of a synthetic random teacher (``sqattn/analysis/teacher.py``), for the training-dynamics analyses.

Protocols (``problem=``):
* ``lmc`` (papers/lmc.md small-scale reproduction): 10-class labels from a random 32 -> 64 -> 10 ReLU teacher,
  10k train / 5k eval; student MLP 32 -> 128 -> 128 -> 10 (GELU, no normalisation: with ReLU the loss along a
  path has kinks whose curvature forward-mode AD does not see, so the Hessian predictors B_H/B_q miss part of
  the barrier; GELU keeps them exact); batch 32 (noisy on purpose);
  AdamW at a constant learning rate after a short warmup (no decay, so a child spawned at step k sees the same
  learning rate as its parent did), no weight decay, no clipping. ``keep_checkpoints`` is high so a parent keeps
  every spawn point (``sqattn.analysis.lmc.train_parent``).
* ``reg`` (papers/scaling_laws.md task A): 16 -> 64 -> 1 tanh teacher + N(0, 0.1^2) noise, validation MSE on 4096
  examples (floor 0.01); student 2-hidden-layer MLP of width ``width``; Adam, batch 64.
* ``cls`` (task B): the same inputs, 10 classes from the argmax of a 16 -> 64 -> 10 tanh teacher, 10 % label noise;
  validation error on 4096 examples (best guess 0.9, floor set by the noise).

Commands (2 CPU cores; a 3000-step lmc run takes ~15 s alone):
  python -m experiments.train --config=teacher_lmc --workdir=/tmp/teacher_lmc
  python -m experiments.train --config=teacher_reg:width=32,n_train=4096 --workdir=/tmp/teacher_reg
Registered names: teacher_lmc, teacher_reg, teacher_cls. Args: ``problem``, ``width``, ``layers``, ``n_train``,
``steps``, ``lr``, ``batch``, ``seed`` (init), ``data_seed`` (data order), ``teacher_seed``, ``eval_every``,
``runlocal``.
"""

from __future__ import annotations

import ml_collections

from sqattn.analysis import teacher
from sqattn.configs import base, parse_arg

PROBLEMS = ("lmc", "reg", "cls")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, problem="lmc", width=0, layers=2, n_train=0, steps=0, lr=0.0, batch=0, seed=0,
                  data_seed=0, teacher_seed=0, eval_every=-1, runlocal=False)
    if a.problem not in PROBLEMS:
        raise ValueError(f"teacher configs: problem must be one of {PROBLEMS}, got {a.problem!r}")
    c = base.base_config()
    c.task = "teacher"
    c.model_name = "mlp"
    c.seed = a.seed
    c.data = teacher.default_config()
    if a.problem == "lmc":
        c.data.update(dict(kind="classification", in_dim=32, teacher_hidden=64, teacher_activation="relu",
                           num_outputs=10, n_train=10000, n_eval=5000))
        width, batch, steps, lr = 128, 32, 3000, 2e-3
        c.optim.update(warmup_steps=10, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=0.0, b2=0.999)
        c.keep_checkpoints = 32
    else:
        c.data.update(dict(in_dim=16, teacher_hidden=64, teacher_activation="tanh", n_eval=4096))
        if a.problem == "reg":
            c.data.update(dict(kind="regression", num_outputs=1, noise=0.1))
        else:
            c.data.update(dict(kind="classification", num_outputs=10, label_noise=0.1))
        width, batch, steps, lr = 32, 64, 1000, 3e-3
        c.optim.update(warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=0.0, b2=0.999)
        c.keep_checkpoints = 1
    c.data.update(dict(seed=a.data_seed, teacher_seed=a.teacher_seed))
    if a.n_train:
        c.data.n_train = a.n_train
    c.batch_size = a.batch or batch
    c.num_steps = a.steps or steps
    c.optim.lr = a.lr or lr
    c.model = ml_collections.ConfigDict(dict(
        in_features=c.data.in_dim, out_features=c.data.num_outputs, hidden=a.width or width, num_layers=a.layers,
        activation="gelu" if a.problem == "lmc" else "relu", init_scale=1.0))
    c.log_every = 50
    c.eval_every = a.eval_every if a.eval_every >= 0 else 0
    c.checkpoint_every = c.num_steps
    c.mesh.update(data=1, fsdp=1)          # a tiny model: one device
    if a.runlocal:
        base.runlocal(c)
        c.model.hidden = 8
        c.data.update(dict(n_train=64, n_eval=32))
    c.eval_batches = teacher.eval_batches_for(c.data, c.batch_size)
    return c
