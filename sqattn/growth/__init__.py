"""Model growth: pure functions from a trained LM (NNX state + config) to a bigger one (papers/gstack.md,
papers/mixturegrowth.md).

* ``depth``: G_direct (``order="stack"`` = G_stack, ``"interleave"``, ``"by_kind"``), G_zero, G_random.
* ``width``: Net2Net split (G_direct) and zero padding (G_zero) of ``d_model`` / ``mlp_dim``.
* ``fade``: the G_random mask ramp (``FadeLM``, ``FadeLMTask`` and its host hook).
* ``learn``: G_learn (LiGO depth maps): ``LiGOLM`` (frozen base + trainable ``[L_t, L_s]`` maps per kind and
  parameter path, started as G_stack) and its two ``init.transform``s, ``start`` and ``fold``.
* ``paths``: the one convention about the LM's tree (``blocks/i``, residual outputs, stream norms).

Through the trainer, a grown run is an ordinary run whose config has
``init.workdir = <base run>``, ``init.transform = "sqattn.growth:grow"`` and ``init.args.op`` (``direct``,
``zero``, ``random`` for depth; ``net2net``, ``zero`` for width), ``init.args.order``;
``sqattn.configs.growth.grown_config`` builds one. The trainer loads the base run, calls ``grow`` and starts a
fresh optimizer; ``data_offset`` continues the base's data stream. G_learn is two such runs (``init.args.op``
``learn``: the map-learning phase, ``fold``: the folded LM trained on); see ``sqattn.configs.growth``.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from sqattn.growth import depth, paths, width

TRANSFORM = "sqattn.growth:grow"


def model_fields(model_cfg, drop=()) -> dict:
    """``config.model`` as a plain dict, without the fields in ``drop``."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return {k: v for k, v in d.items() if k not in drop}


def field_diff(a: dict, b: dict) -> list[str]:
    """The fields whose values differ between two ``model_fields`` dicts (or that only one has)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def grow_model(src_model: nnx.Module, tgt_model: nnx.Module, *, op: str, order: str = "stack",
               seed: int = 0) -> nnx.Module:
    """Fills ``tgt_model`` (freshly initialised from the grown config) with ``src_model`` grown into it.

    Depth growth when the layer counts differ (``op`` in ``depth.OPS``), width growth when they are equal
    (``op`` in ``width.OPS``; ``"zero"`` means G_zero in both). A ``FadeLM`` target (G_random) gets masks 0 on
    the fresh layers and 1 elsewhere.
    """
    src = paths.pure_params(src_model)
    tgt = paths.pure_params(tgt_model)
    has_fade = "fade" in tgt
    fade = tgt.pop("fade", None)
    src.pop("fade", None)
    axes = paths.param_axes(tgt_model)
    if paths.num_layers(src) != paths.num_layers(tgt):
        if op not in depth.OPS:
            raise ValueError(f"growth: the layer count changes ({paths.num_layers(src)} -> "
                             f"{paths.num_layers(tgt)}): op must be one of {depth.OPS}, got {op!r}")
        if (op == "random") != has_fade:
            raise ValueError("growth: op='random' needs model_name='fade_lm' (its fade-in mask), and "
                             "fade_lm is only for op='random' (configs.growth.grown_config sets both)")
        grown, _, rep = depth.grow_params(src, tgt, axes, op=op, order=order)
        if has_fade:
            grown["fade"] = (1.0 - np.asarray(rep, np.float32)).astype(fade.dtype)
    else:
        if op not in width.OPS:
            raise ValueError(f"growth: the layer count is unchanged, so this is width growth: op must be one "
                             f"of {width.OPS}, got {op!r}")
        grown = width.grow_params(src, tgt, axes, op=op, seed=seed)
        if has_fade:
            grown["fade"] = fade
    return paths.load(tgt_model, grown)


def grow(src_model: nnx.Module, src_config, config) -> nnx.Module:
    """The trainer's ``init.transform``: grows the base run's model into ``config.model``.

    Reads ``config.init.args``: ``op``, ``order`` (depth), ``g`` (optional check: target layers = g x source),
    ``seed`` (Net2Net's unit draw).
    """
    from sqattn.train import state as state_lib
    args = config.init.get("args") or {}
    op = str(args.get("op", "direct"))
    g = int(args.get("g", 0) or 0)
    ls, lt = int(src_config.model.num_layers), int(config.model.num_layers)
    if g and lt != g * ls:
        raise ValueError(f"growth: init.args.g={g} but the base run has {ls} layers and this config "
                         f"{lt} (expected {g * ls})")
    order = str(args.get("order", "stack"))
    # order="by_kind" maps every target layer to a base layer of its own kind (checked layer by layer), so the
    # block pattern may differ: a base "SA" grows into "SSSA".
    free = ("num_layers", "block_pattern") if order == "by_kind" else ("num_layers",)
    diff = field_diff(model_fields(src_config.model, free), model_fields(config.model, free))
    if lt != ls and diff:
        raise ValueError(f"growth: depth growth changes only model.num_layers, but these differ too: {diff} "
                         f"(grow width and depth in two runs)")
    tgt_model = state_lib.build_base_model(config)
    return grow_model(src_model, tgt_model, op=op, order=order,
                      seed=int(args.get("seed", config.seed)))
