"""Where the growth operators find things in an LM's parameter tree (``sqattn.models.lm.LM``).

The whole convention, in one place (the operators never name a mixer's parameters):

* ``params["blocks"][i]`` is layer ``i`` (``nnx.List`` of ``Block``), in depth order; everything outside
  ``blocks`` (``embed``, ``final_norm``, ``head``) is per-model and is taken once from the source.
* A block's residual branches are its ``mixer`` and ``mlp`` subtrees; their *output* parameters are the ones
  whose last logical axis is ``"embed"`` (the projections that write into the residual stream, e.g.
  attention/SSE ``o``, Mamba ``out_proj``, SwiGLU ``down``, MoE ``w_down``, and their biases).
* The norms over the residual stream are ``blocks/i/norm1``, ``blocks/i/norm2`` and ``final_norm`` (logical
  axis ``"norm"``, as are the head-dim norms inside mixers, which is why they are found by path).
* Weights act as ``x @ W`` over the last axis: in a parameter of rank >= 2 the last axis is the output and the
  one before it the input (Dense ``[in, out]``, MoE ``[E, in, out]``, the untied head ``[d, V]``); the
  embedding ``[V, d]`` is a lookup whose last axis is the output.

Paths are tuples of pure-dict keys, e.g. ``("blocks", 0, "mixer", "o", "kernel")``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCKS = "blocks"
RESIDUAL_BRANCHES = ("mixer", "mlp")
STREAM_NORMS = ("norm1", "norm2", "final_norm")

Path = tuple


def pure_params(model: nnx.Module) -> dict:
    """The model's ``nnx.Param`` leaves as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def param_axes(model: nnx.Module) -> dict[Path, tuple]:
    """Logical axis names of every Param leaf, keyed by path."""
    out = {}
    st = nnx.state(model, nnx.Param)
    for path, var in jax.tree_util.tree_leaves_with_path(st, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
        out[keys] = tuple(axes) if axes is not None else (None,) * np.ndim(var.value)
    return out


def flatten(tree: dict) -> dict[Path, Any]:
    """``{path: leaf}`` of a pure dict."""
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p): v
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict[Path, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def num_layers(params: dict) -> int:
    if BLOCKS not in params:
        raise ValueError(f"growth: the model has no {BLOCKS!r} subtree (top-level keys: {sorted(params)}); the "
                         f"growth operators work on sqattn.models.lm.LM-style models")
    return len(params[BLOCKS])


def layer(params: dict, i: int) -> dict:
    return params[BLOCKS][i]


def signature(block: dict) -> tuple:
    """What must match for a layer to be copied into another position: its relative paths and shapes."""
    return tuple(sorted((p, tuple(np.shape(v))) for p, v in flatten(block).items()))


def is_residual_output(rel: Path, axes: tuple) -> bool:
    """``rel`` (a path inside one block) writes into the residual stream."""
    return bool(rel) and rel[0] in RESIDUAL_BRANCHES and bool(axes) and axes[-1] == "embed"


def is_stream_norm(path: Path) -> bool:
    """``path`` is the scale of a norm over the residual stream (``blocks/i/norm1|norm2``, ``final_norm``)."""
    if path[0] == "final_norm":
        return True
    return path[0] == BLOCKS and len(path) >= 3 and path[2] in ("norm1", "norm2")


def load(model: nnx.Module, params: dict) -> nnx.Module:
    """Puts ``params`` (same tree as ``pure_params(model)``, shapes checked) into ``model``, returns it."""
    want = {p: np.shape(v) for p, v in flatten(pure_params(model)).items()}
    got = {p: np.shape(v) for p, v in flatten(params).items()}
    if want != got:
        missing = sorted(set(want) - set(got), key=str)[:4]
        extra = sorted(set(got) - set(want), key=str)[:4]
        shapes = [(p, got[p], want[p]) for p in sorted(set(want) & set(got), key=str) if got[p] != want[p]][:4]
        raise ValueError(f"growth: the grown parameters do not fit the target model: missing {missing}, "
                         f"unexpected {extra}, shape (got, want) {shapes}")
    st = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(st, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    nnx.update(model, st)
    return model
