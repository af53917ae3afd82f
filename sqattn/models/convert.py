"""Model conversion: turn a trained model's config and weights into another architecture's (linearisation).

Liger (papers/liger.md) linearises a softmax-attention LM without new parameters::

    student_cfg = linearize_config(teacher_cfg.model, mixer_cfg=dict(window=64, gate="gla"))
    student = sqattn.models.build("lm", student_cfg, nnx.Rngs(0))
    report = transplant(teacher, student)      # every teacher weight lands at the same path

``linearize_config`` swaps each attention letter "A" of the block pattern for the Liger letter and gives the
Liger mixer the attention mixer's projection geometry; ``transplant`` copies every parameter whose path and
shape exist in both models.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from sqattn import mixers as mixer_registry
from sqattn.models.lm import expand_pattern

__all__ = ["ATTENTION_GEOMETRY", "linearize_config", "transplant"]

# Attention kwargs that fix the projection shapes and RoPE; the Liger mixer inherits these (window, cad and
# other attention-only options are dropped).
ATTENTION_GEOMETRY = ("num_heads", "num_kv_heads", "head_dim", "rope_theta", "qk_norm")


def linearize_config(model_config: ml_collections.ConfigDict | dict, *, to_letter: str = "L",
                     mixer_cfg: dict[str, Any] | None = None) -> ml_collections.ConfigDict | dict:
    """Returns a copy of an LM model config whose attention layers ("A") become ``to_letter`` layers.

    The block pattern is first expanded to ``num_layers`` letters, so ``"SSA"`` with 6 layers becomes
    ``"SSLSSL"``. ``mixers.<to_letter's mixer name>`` is set to the attention mixer's geometry
    (``ATTENTION_GEOMETRY`` keys present in ``mixers.attention``) updated with ``mixer_cfg``.

    Args:
      model_config: the ``config.model`` section of an LM config (``sqattn/configs/lm.py``); not modified.
      to_letter: block-pattern letter of the replacement mixer (default "L", Liger).
      mixer_cfg: the replacement mixer's own options, e.g. ``dict(window=16, gate="gla")``.

    Returns:
      The converted copy (a ``ConfigDict`` for a ``ConfigDict`` input, else a dict).

    Raises:
      ValueError: the pattern holds no "A", or ``mixers.attention`` is missing, or ``to_letter`` is unknown.
    """
    as_dict = not isinstance(model_config, ml_collections.ConfigDict)
    cfg = ml_collections.ConfigDict(model_config) if as_dict else model_config
    cfg = ml_collections.ConfigDict(cfg.to_dict())                      # deep, unlocked copy
    name = mixer_registry.get(to_letter).name
    pattern = expand_pattern(cfg.block_pattern, cfg.num_layers)
    if "A" not in pattern:
        raise ValueError(f"linearize_config: block_pattern {cfg.block_pattern!r} has no attention layer 'A'")
    attention = cfg.get("mixers", {}).get("attention")
    if attention is None:
        raise ValueError("linearize_config: model config has no mixers.attention to take the geometry from")
    new_mixer = {k: attention[k] for k in ATTENTION_GEOMETRY if k in attention}
    new_mixer.update(dict(mixer_cfg or {}))
    cfg.block_pattern = pattern.replace("A", to_letter)
    cfg.mixers[name] = ml_collections.ConfigDict(new_mixer)
    return cfg.to_dict() if as_dict else cfg


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def transplant(src_model: nnx.Module, dst_model: nnx.Module) -> dict[str, list[str]]:
    """Copies every parameter of ``src_model`` whose path and shape exist in ``dst_model``, in place.

    Only ``nnx.Param`` variables (and subtypes) take part; values keep their bits (cast to the destination
    dtype, a no-op when both are float32).

    Returns:
      ``{"copied": [...], "missing_in_src": [...], "unused_in_src": [...]}`` of "/"-joined paths:
      copied, present only in ``dst_model`` (left as initialised), present only in ``src_model``.

    Raises:
      ValueError: a path present in both has different shapes (lists every such path).
    """
    src = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(src_model, nnx.Param))}
    dst = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(dst_model, nnx.Param))}
    shared = [p for p in src if p in dst]
    mismatched = [f"{_path_str(p)}: {tuple(src[p].shape)} vs {tuple(dst[p].shape)}" for p in shared
                  if tuple(src[p].shape) != tuple(dst[p].shape)]
    if mismatched:
        raise ValueError("transplant: shape mismatch at shared paths (src vs dst): " + "; ".join(mismatched))
    updates = []
    for p in shared:
        var = dst[p]
        value = jnp.asarray(src[p][...]).astype(var[...].dtype)
        updates.append((p, var.replace(value)))
    nnx.update(dst_model, nnx.from_flat_state(updates))
    return {
        "copied": sorted(_path_str(p) for p in shared),
        "missing_in_src": sorted(_path_str(p) for p in dst if p not in src),
        "unused_in_src": sorted(_path_str(p) for p in src if p not in dst),
    }
