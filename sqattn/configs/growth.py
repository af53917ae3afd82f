"""Grown runs (papers/gstack.md): a config that starts from a trained base run and grows it (``sqattn.growth``).

A grown run is an ordinary trainer run: ``init.workdir`` = the base run, ``init.transform = "sqattn.growth:grow"``
with ``init.args`` (``op``, ``order``, ``g``, ``fade_steps``), a fresh AdamW with its own warmup, and
``data_offset`` = the base run's steps, so it continues the base's data stream. ``metrics.jsonl`` counts
``train_flops`` from the base run's, so arms compare at equal FLOPs. Commands (2 CPU cores):

  python -m experiments.train --config=lm_tiny --config.model.num_layers=2 --config.num_steps=200 \\
      --workdir=/tmp/base2
  python -m experiments.train --config=grow:base=lm_tiny,src=/tmp/base2,op=direct,g=2 --workdir=/tmp/g2

G_learn (``sqattn.growth.learn``) is two runs: a short phase that trains only the depth maps, then the fold into a
plain LM that trains on (``learn`` = the phase's steps; ``steps`` of the second run):

  python -m experiments.train --config=grow:base=lm_tiny,src=/tmp/base2,op=learn,learn=15 --workdir=/tmp/l2
  python -m experiments.train --config=grow:base=lm_tiny,src=/tmp/l2,op=fold --workdir=/tmp/l2_fold

Args: ``base`` (a registered config: the target, e.g. ``lm_tiny``, ``sse_h_tiny``), ``src`` (the base run's
workdir; empty = no growth, the target trained from scratch), ``op`` (``direct`` | ``zero`` | ``random`` |
``learn`` | ``fold`` for depth, ``net2net`` | ``zero`` for width), ``order`` (``stack`` | ``interleave`` |
``by_kind``), ``g`` (depth factor check; 0 = none), ``layers`` (target depth; 0 = the base config's),
``d_model`` / ``mlp_dim`` (target width; 0 = the base config's), ``fade`` (G_random ramp steps), ``learn``
(G_learn's map-learning steps), ``offset`` (data offset; -1 = the base run's latest checkpoint step), ``steps``,
``warmup`` (-1 = the base config's), ``runlocal``.
``experiments/gstack.py`` builds its arms with ``grown_config`` directly.
"""

from __future__ import annotations

import os

import ml_collections

from sqattn.configs import parse_arg

TRANSFORM = "sqattn.growth:grow"


def latest_step(workdir: str) -> int:
    """The newest checkpoint step in ``workdir`` (-1 when there is none)."""
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps) if steps else -1


def depth_config(config: ml_collections.ConfigDict, num_layers: int) -> ml_collections.ConfigDict:
    """``config`` with ``model.num_layers`` changed (a base of a depth growth, or its target)."""
    c = config.copy_and_resolve_references()
    c.model.num_layers = int(num_layers)
    return c


def grown_config(target: ml_collections.ConfigDict, source_workdir: str, *, op: str = "direct",
                 order: str = "stack", g: int = 0, source_step: int = -1, data_offset: int = -1,
                 fade_steps: int = 0, num_steps: int | None = None,
                 warmup_steps: int | None = None, learn_steps: int = 0) -> ml_collections.ConfigDict:
    """``target`` (the grown model's config) set to start from ``source_workdir`` grown by ``op``.

    Args:
      target: the config of the grown model (e.g. ``lm_tiny``, or ``width.width_config(...)`` of the base).
      source_workdir: the base run.  source_step: its checkpoint (-1 = latest).
      op, order, g: ``sqattn.growth.grow``'s ``init.args``.
      data_offset: train batch of step s = data batch s + data_offset; -1 = the source step (the base run's
        batches, so the batch sizes must match).
      fade_steps: G_random ramp length (``op="random"`` only; the model becomes ``fade_lm``).
      num_steps, warmup_steps: the grown run's schedule (None = the target's).
      learn_steps: ``op="learn"`` (G_learn's phase): the number of steps that train only the depth maps
        (``num_steps`` of this run; warmup = ``warmup_steps`` or a tenth of it, no weight decay on the maps).

    G_learn is two runs: ``op="learn"`` from the base run (model ``ligo_lm``: the base frozen, the maps trained),
    then ``op="fold"`` from that run (a plain ``lm`` of ``target`` with the folded weights, a fresh optimizer,
    ``data_offset`` = the learn run's offset + its steps, its FLOPs counted via its ``train_flops``).
    """
    c = target.copy_and_resolve_references()
    with c.unlocked():
        c.init.workdir = source_workdir
        c.init.step = int(source_step)
        c.init.transform = TRANSFORM
        c.init.args = ml_collections.ConfigDict(dict(op=op, order=order, g=int(g), fade_steps=int(fade_steps)))
        if data_offset < 0:
            data_offset = source_step if source_step >= 0 else latest_step(source_workdir)
            if data_offset < 0:
                raise ValueError(f"growth: {source_workdir!r} holds no checkpoint to grow (train the base run "
                                 f"first, or pass data_offset)")
            if op == "fold":      # the learn run's batches continued the base's: continue after both
                data_offset += int(_source_config(source_workdir).get("data_offset", 0))
        c.data_offset = int(data_offset)
        if op in ("learn", "fold"):
            _learn_config(c, source_workdir, learn_steps, g)
            if op == "learn":
                num_steps = int(learn_steps)
                warmup_steps = max(1, num_steps // 10) if warmup_steps is None else warmup_steps
        if num_steps is not None:
            c.num_steps = int(num_steps)
        if warmup_steps is not None:
            c.optim.warmup_steps = int(warmup_steps)
        if op == "random":
            from sqattn.growth import fade
            c.model_name, c.task = "fade_lm", "lm_fade"
            c.optim.trainable = fade.NOT_FADE
    return c


def _source_config(workdir: str) -> dict:
    from sqattn.sample import _read_config_json
    return _read_config_json(workdir)


def _learn_config(c: ml_collections.ConfigDict, source_workdir: str, learn_steps: int, g: int) -> None:
    """Sets G_learn's learn run (``init.args.op == "learn"``) or fold run (``"fold"``) on ``c`` in place."""
    from sqattn.growth import learn
    op = c.init.args.op
    src = _source_config(source_workdir)
    if op == "fold":
        if src.get("model_name") != learn.MODEL:
            raise ValueError(f"growth: op='fold' continues a G_learn phase run (model_name {learn.MODEL!r}), but "
                             f"{source_workdir!r} trained {src.get('model_name')!r}; grow with op='learn' first")
        c.init.transform = learn.FOLD
        return
    if int(learn_steps) < 1:
        raise ValueError(f"growth: op='learn' needs learn_steps >= 1 (the map-learning phase), got {learn_steps}")
    ls = int(src["model"]["num_layers"])
    if g and int(c.model.num_layers) != g * ls:
        raise ValueError(f"growth: g={g} but the base run has {ls} layers and the target "
                         f"{c.model.num_layers} (expected {g * ls})")
    pattern = src["model"].get("block_pattern", "A")
    c.model_name = learn.MODEL
    c.model.ligo = ml_collections.ConfigDict(dict(
        source_layers=ls, source_pattern="" if pattern == c.model.get("block_pattern", "A") else pattern))
    c.init.transform = learn.START
    c.optim.trainable = learn.TRAINABLE
    c.optim.weight_decay = 0.0       # decay would pull the identity maps (the base's weights) towards zero


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    from sqattn import configs
    from sqattn.growth import width
    a = parse_arg(arg, base="lm_tiny", src="", op="direct", order="stack", g=0, layers=0, d_model=0, mlp_dim=0,
                  fade=0, learn=0, offset=-1, steps=-1, warmup=-1, runlocal=False)
    target = configs.get(a.base + (":runlocal" if a.runlocal else ""))
    if a.layers:
        target = depth_config(target, a.layers)
    if a.d_model or a.mlp_dim:
        target = width.width_config(target, d_model=a.d_model or None, mlp_dim=a.mlp_dim or None)
    steps = None if a.steps < 0 else a.steps
    warmup = None if a.warmup < 0 else a.warmup
    if not a.src:        # nothing to grow from: the target from scratch (also what the config tests train)
        if steps is not None:
            target.num_steps = steps
        if warmup is not None:
            target.optim.warmup_steps = warmup
        return target
    return grown_config(target, a.src, op=a.op, order=a.order, g=a.g, data_offset=a.offset, fade_steps=a.fade,
                        num_steps=steps, warmup_steps=warmup, learn_steps=a.learn)
