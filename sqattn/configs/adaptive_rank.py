"""Adaptive-rank adapters on the synthetic heterogeneous-rank task (``shared/papers/triadaptlora.md``).

Task ``rank_synth`` (``sqattn.peft.rank_task``): MLP 64 -> 256 -> 256 -> 256 -> 10 whose base is teacher A;
teacher B adds planted perturbations of rank ``ranks`` (default 1,4,8,0 on fc1, fc2, fc3, head); 5000 train /
2000 test inputs; MSE. Adapters on all four linears with ``peft.method`` = ``method`` at an equal final total
rank ``budget`` (default 4 x 4 = 16): ``lora`` (rank 4 everywhere), ``triadapt`` (1 -> grows by 2, linear or exp
threshold), ``adalora`` (6 -> cubic pruning), ``increlora`` (1 -> grows by 1). Adam(W) lr 1e-3, no weight
decay, batch 128, ``steps`` steps (2000), allocation warmup 200 and final 400 steps.

Commands (2 shared CPU cores):
  python -m experiments.train --config=rank_synth:method=triadapt --workdir=/tmp/rs_tri
  python -m experiments.adaptive_rank --workdir=/work/runs/adaptive_rank     # every arm, 3 seeds, tables
Registered name: ``rank_synth`` (args ``method``, ``schedule``, ``seed``, ``steps``, ``lr``, ``budget``,
``ranks``, ``gamma``, ``interval``, ``sens_every``, ``rescale``, ``runlocal``). Runtime and results: the table
in experiments/adaptive_rank.py's docstring.

``peft_config(method, ...)`` is the ``config.peft`` section every adaptive run uses (the LM fine-tunes of
``experiments/adaptive_rank.py`` too): the base keys plus the allocator's, and ``optim.trainable`` is set to
the adapters' regex by ``set_peft``.
"""

from __future__ import annotations

import math

import ml_collections

from sqattn.configs import base, parse_arg
from sqattn.peft import adaptive, allocator, rank_task

METHODS = ("lora",) + adaptive.ADAPTIVE_METHODS

ARMS = {   # experiment arm -> (peft.method, extra rank_synth args)
    "lora": ("lora", ""),
    "triadapt": ("triadapt", "schedule=linear"),
    "triadapt_exp": ("triadapt", "schedule=exp"),
    "triadapt_rescale": ("triadapt", "schedule=linear,rescale=True"),
    "adalora": ("adalora", ""),
    "increlora": ("increlora", ""),
}


def peft_config(method: str, targets: str, *, rank: int = 4, alpha: float = 8.0, budget: int = 0,
                init_rank: int = -1, max_rank: int = -1, grow_rank: int = -1, orth_reg: float = -1.0,
                **alloc) -> ml_collections.ConfigDict:
    """A ``config.peft`` with every adapter and allocator key (``allocator.DEFAULTS`` overridden by
    ``alloc``)."""
    unknown = set(alloc) - set(allocator.DEFAULTS)
    if unknown:
        raise ValueError(f"unknown allocator settings {sorted(unknown)}; known: {sorted(allocator.DEFAULTS)}")
    p = base.peft_config()
    p.update(dict(method=method, targets=targets, rank=rank, alpha=alpha))
    for k, v in dict(budget=budget, init_rank=init_rank, max_rank=max_rank, grow_rank=grow_rank,
                     orth_reg=orth_reg, **{**allocator.DEFAULTS, **alloc}).items():
        p[k] = v
    return p


def set_peft(c: ml_collections.ConfigDict, peft: ml_collections.ConfigDict) -> None:
    """``c.peft = peft`` and adapter-only training (``optim.trainable``, no weight decay on the adapters)."""
    with c.unlocked():
        c.peft = peft
    c.optim.trainable = adaptive.TRAINABLE
    c.optim.weight_decay = 0.0


def synth_peft(method: str, *, rank: int = 4, budget: int = 0, steps: int = 2000, schedule: str = "linear",
               interval: int = 0, sens_every: int = 1, rescale: bool = False,
               targets: str = "fc1,fc2,fc3,head") -> ml_collections.ConfigDict:
    """The synthetic task's peft section for ``method`` (schedules scaled to ``steps``: warmup 10 %, final 20 %;
    growth methods allocate every 5 % of the run, adalora masks every 1 %)."""
    warmup, final = steps // 10, steps // 5
    if method == "lora":
        return peft_config("lora", targets, rank=rank)
    if method == "triadapt":
        return peft_config(method, targets, rank=rank, budget=budget, max_rank=3 * rank, grow_rank=max(rank // 2, 1),
                           init_rank=1, interval=interval or max(steps // 20, 1), warmup=warmup, final=final,
                           schedule=schedule, rescale=rescale)
    if method == "increlora":
        return peft_config(method, targets, rank=rank, budget=budget, max_rank=3 * rank, grow_rank=1, init_rank=1,
                           interval=interval or max(steps // 20 // sens_every, 1) * sens_every, warmup=warmup,
                           final=final, sens_every=sens_every, top_h=1)
    if method == "adalora":
        return peft_config(method, targets, rank=rank, budget=budget, init_rank=int(math.ceil(1.5 * rank)),
                           interval=interval or max(steps // 100 // sens_every, 1) * sens_every, warmup=warmup,
                           final=final, sens_every=sens_every)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, method="triadapt", schedule="linear", seed=0, steps=2000, lr=1e-3, rank=4, budget=0,
                  ranks="1,4,8,0", gamma=1.0, interval=0, sens_every=1, rescale=False, runlocal=False)
    if a.method not in METHODS:
        raise ValueError(f"rank_synth: method must be one of {METHODS}, got {a.method!r}")
    c = base.base_config()
    c.task = "rank_synth"
    c.model_name = "rank_mlp"
    c.seed = a.seed
    c.model = ml_collections.ConfigDict(dict(sizes=(64, 256, 256, 256, 10), teacher_seed=0))
    c.data = ml_collections.ConfigDict(dict(name="rank_synth", seed=a.seed, true_ranks=a.ranks, gamma=a.gamma,
                                            n_train=5000, n_test=2000))
    c.batch_size = 128
    c.num_steps = a.steps
    c.log_every = 10
    c.eval_every = 0
    c.checkpoint_every = a.steps
    c.keep_checkpoints = 1
    c.optim.update(lr=a.lr, warmup_steps=min(50, a.steps // 10), min_lr_ratio=0.1, b2=0.999)
    c.mesh.update(data=1, fsdp=1)          # a 150k-parameter model: one device
    n_layers = len(c.model.sizes) - 1
    if len(a.ranks.split(",")) != n_layers:
        raise ValueError(f"rank_synth: ranks needs {n_layers} comma-separated entries, got {a.ranks!r}")
    set_peft(c, synth_peft(a.method, rank=a.rank, budget=a.budget, steps=a.steps, schedule=a.schedule,
                           interval=a.interval, sens_every=a.sens_every, rescale=a.rescale,
                           targets=",".join(rank_task.layer_names(n_layers))))
    if a.runlocal:
        base.runlocal(c)
        c.model.sizes = (8, 16, 16, 16, 4)
        c.data.update(n_train=64, n_test=16)
        c.batch_size = 8
        steps = c.num_steps
        set_peft(c, synth_peft(a.method, rank=2, steps=steps, sens_every=1, interval=1,
                               targets=",".join(rank_task.layer_names(n_layers))))
        if a.method != "lora":
            c.peft.update(warmup=0, final=0)
    c.eval_batches = math.ceil(c.data.n_test / c.batch_size)
    return c


def synth_run_config(arm: str, seed: int, steps: int, sens_every: int):
    """The ``rank_synth`` config of one arm of experiments/adaptive_rank.py (per-step logging; adaptive arms
    record the same-batch loss jump at each allocation)."""
    from sqattn import configs
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {sorted(ARMS)}")
    method, extra = ARMS[arm]
    args = f"method={method},seed={seed},steps={steps},sens_every={sens_every}" + (f",{extra}" if extra else "")
    c = configs.get(f"rank_synth:{args}")
    c.log_every = 1
    if method != "lora":
        c.peft.measure_jump = True
    return c
