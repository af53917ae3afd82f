"""Models. ``build(config.model_name, config.model, rngs)`` constructs one from its config section."""

from __future__ import annotations

import importlib

# model_name -> "module:Class"; the class is built as Class(**config.model, rngs=rngs).
MODELS = {
    "lm": "sqattn.models.lm:LM",
    "hamburger": "sqattn.models.hamburger_task:build_hamburger",
    "ctr_lr": "sqattn.models.ctr:LR",
    "ctr_dnn": "sqattn.models.ctr:DNN",
    "dcn": "sqattn.models.ctr:DCN",
    "fcn": "sqattn.models.ctr:FCN",
    "bearing_mlp": "sqattn.science.bearing.model:BearingMLP",
    "vit": "sqattn.models.vit:ViT",
    "vit_sema": "sqattn.models.sema:SEMAViT",
    "fade_lm": "sqattn.growth.fade:FadeLM",
    "ligo_lm": "sqattn.growth.learn:LiGOLM",
    "template_mlp": "sqattn.growth.mixture:TemplateMLP",
    "mlp": "sqattn.models.mlp:MLP",
    "rank_mlp": "sqattn.peft.rank_task:RankMLP",
    "dit": "sqattn.models.dit:DiT",
    "judge_cnn": "sqattn.models.judge:ShapeJudge",
}


def model_class(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model_name {name!r}; known: {sorted(MODELS)}")
    mod, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def build(name: str, model_cfg, rngs):
    """Builds model ``name`` from its config section; unknown keys fail with the model's TypeError."""
    cls = model_class(name)
    kwargs = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    try:
        return cls(**kwargs, rngs=rngs)
    except TypeError as e:
        raise TypeError(f"config.model does not fit {cls.__name__}: {e}") from e
