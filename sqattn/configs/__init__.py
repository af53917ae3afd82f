"""Named configs. ``get("NAME[:arg]")`` -> a validated-later ``ConfigDict``.

Each module ``sqattn/configs/<family>.py`` exposes ``get_config(arg: str | None)``; ``arg`` is a
big_vision-style string ``"size=tiny,runlocal"`` parsed by ``parse_arg``. ``REGISTRY`` maps public names to
(module, default arg); ``NAME:extra`` appends ``extra`` to the default arg (``lm_tiny:runlocal``).
"""

from __future__ import annotations

import importlib

import ml_collections

# name -> (module under sqattn.configs, default arg)
REGISTRY: dict[str, tuple[str, str]] = {
    "lm_tiny": ("lm", "mixer=attention"),
    "hamburger": ("hamburger", ""),
    "liger": ("liger", ""),
    "swa_tiny": ("lm", "mixer=swa"),
    "gla_tiny": ("lm", "mixer=gla"),
    "sse_h_tiny": ("sse_h", "size=tiny"),
    "sse_h_2b": ("sse_h", "size=2b"),
    "mamba_tiny": ("lm", "mixer=mamba"),
    "mamba2_tiny": ("lm", "mixer=mamba2"),
    "copy_mamba2": ("copy_task", "mixer=mamba2"),
    "copy_mamba": ("copy_task", "mixer=mamba"),
    "copy_transformer": ("copy_task", "mixer=transformer"),
    "mqar": ("mqar", "mixer=gla_softmax"),
    "mqar_attention": ("mqar", "mixer=attention"),
    "moe_tiny": ("moe", "size=tiny"),
    "moe_large": ("moe", "size=large"),
    "scout_swa_tiny": ("scout", "mixer=swa,size=tiny"),
    "scout_mamba_tiny": ("scout", "mixer=mamba,size=tiny"),
    "scout_swa_400m": ("scout", "mixer=swa,size=400m"),
    "scout_mamba_400m": ("scout", "mixer=mamba,size=400m"),
    "scout_recall": ("scout_recall", "model=scout_L16"),
    "fcn_synth": ("ctr", "arch=fcn"),
    "ecn_synth": ("ctr", "arch=ecn"),
    "dcnv1_synth": ("ctr", "arch=dcnv1"),
    "dcnv2_synth": ("ctr", "arch=dcnv2"),
    "dcnmix_synth": ("ctr", "arch=dcnmix"),
    "dnn_synth": ("ctr", "arch=dnn"),
    "fcn_criteo": ("ctr", "arch=fcn,source=criteo"),
    "fcn_avazu": ("ctr", "arch=fcn,source=avazu"),
    "bearing_mlp": ("bearing", ""),
    "bearing_mlp_env": ("bearing", "envelope"),
    "grow": ("growth", ""),
    "vit_digits": ("vit", "source=digits"),
    "vit_glyphs": ("vit", "source=glyphs"),
    "sema_digits": ("vit", "model=sema,stream=digits5"),
    "teacher_lmc": ("teacher", "problem=lmc"),
    "teacher_reg": ("teacher", "problem=reg"),
    "teacher_cls": ("teacher", "problem=cls"),
    "lm_shards": ("lm_shards", ""),
    "rank_synth": ("adaptive_rank", "method=triadapt"),
    "dit_shapes": ("diffusion", "kind=dit"),
    "judge_shapes": ("diffusion", "kind=judge"),
    "spm_shapes": ("diffusion", "kind=spm"),
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name_and_arg: str) -> ml_collections.ConfigDict:
    """Returns the config registered as ``name`` (optionally ``name:arg``)."""
    name, _, extra = name_and_arg.partition(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown config {name!r}; known configs: {', '.join(names())}")
    module, arg = REGISTRY[name]
    arg = ",".join(a for a in (arg, extra) if a)
    cfg = importlib.import_module(f"sqattn.configs.{module}").get_config(arg or None)
    with cfg.unlocked():
        cfg.name = name_and_arg
    return cfg


def parse_arg(arg: str | None, **spec):
    """Parses ``"a=1,b,c=x"`` against defaults in ``spec`` (big_vision's ``parse_arg``).

    A bare key sets a bool to True. Values take the type of their default. Unknown keys raise.
    """
    out = dict(spec)
    for item in filter(None, (arg or "").split(",")):
        key, eq, val = item.partition("=")
        if key not in spec:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(spec)}")
        default = spec[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = val.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(val)
    return ml_collections.ConfigDict(out)
