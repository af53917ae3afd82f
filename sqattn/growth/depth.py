"""Depth growth (papers/gstack.md): an L_s-layer LM -> an L_t-layer LM of the same width.

Every operator places the source layers in the target by a *layer map* (target layer i <- source layer
``m[i]``) and differs only in what the repeated positions hold:

* ``direct`` (G_direct, "G_stack" with ``order="stack"``): every target layer is a copy of its source layer.
  Not function-preserving (M o M != M); the paper's point is that it trains fastest afterwards.
* ``zero`` (G_zero): the first occurrence of each source layer is a copy; the repeats are copies whose
  residual-branch output projections are zero, so each repeat is the identity and the grown model computes
  exactly the source model's function.
* ``random`` (G_random): first occurrences are copies, the repeats are the target model's fresh random layers;
  they are faded in by a mask ``x + m (block(x) - x)`` that a ``FadeLM`` ramps from 0 to 1
  (``sqattn.growth.fade``), so at the growth step the function is the source's.

Orders (``layer_map``): ``stack`` = whole-model repeat 1..L,1..L (G_stack); ``interleave`` = 1,1,2,2 (each layer
repeated in place); ``by_kind`` = like ``stack`` but among layers of the same kind only (mixer letter and
parameter tree), e.g. a 2-layer "SA" hybrid into the 4-layer "SSSA" one: S,S,S <- the S layer, A <- the A layer.
A target layer must have the same parameter tree as its source layer; when the orders put e.g. an attention
layer where an SSE layer belongs, the error names both.

Depth-dependent init scaling (``out_scale = 1/sqrt(2 L)``) is not re-applied: copied layers keep their trained
weights, which is what the paper does.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sqattn.growth import paths

ORDERS = ("stack", "interleave", "by_kind")
OPS = ("direct", "zero", "random")


def layer_map(src_sigs: list, tgt_sigs: list, order: str = "stack") -> list[int]:
    """Source layer of every target layer.

    Args:
      src_sigs, tgt_sigs: one ``paths.signature`` (or any comparable "kind") per layer of each model.
      order: one of ``ORDERS``.

    Raises:
      ValueError: unknown order, fewer target than source layers, or a target layer whose kind differs from
        the source layer the order puts there.
    """
    ls, lt = len(src_sigs), len(tgt_sigs)
    if order not in ORDERS:
        raise ValueError(f"growth: unknown depth order {order!r}; expected one of {ORDERS}")
    if ls == 0 or lt < ls:
        raise ValueError(f"growth: depth growth needs target num_layers >= source num_layers >= 1, got "
                         f"{ls} -> {lt}")
    if order == "stack":
        m = [i % ls for i in range(lt)]
    elif order == "interleave":
        m = [i * ls // lt for i in range(lt)]
    else:
        kinds: dict = {}
        for j, s in enumerate(src_sigs):
            kinds.setdefault(s, []).append(j)
        seen: dict = {}
        m = []
        for i, s in enumerate(tgt_sigs):
            if s not in kinds:
                raise ValueError(f"growth: target layer {i} is of a kind no source layer has "
                                 f"(order='by_kind'); its parameters: {[p for p, _ in s][:4]}")
            k = seen.get(s, 0)
            seen[s] = k + 1
            m.append(kinds[s][k % len(kinds[s])])
    for i, j in enumerate(m):
        if src_sigs[j] != tgt_sigs[i]:
            raise ValueError(
                f"growth: order={order!r} puts source layer {j} at target layer {i}, but their parameter trees "
                f"differ (different mixer letter or MoE/dense MLP): only in the source "
                f"{_diff(src_sigs[j], tgt_sigs[i])}, only in the target {_diff(tgt_sigs[i], src_sigs[j])}. "
                f"Pick a block pattern whose period divides the source depth, or order='by_kind'.")
    return m


def _diff(a, b):
    return sorted(set(a) - set(b), key=str)[:3]


def repeats(mapping: list[int]) -> list[bool]:
    """``True`` for target layers that are not the first occurrence of their source layer."""
    seen, out = set(), []
    for j in mapping:
        out.append(j in seen)
        seen.add(j)
    return out


def zero_residual_outputs(block: dict, axes_of) -> dict:
    """``block`` with every residual-branch output parameter set to zero (the block becomes the identity).

    ``axes_of(rel_path) -> logical axes`` of a parameter of this block.
    """
    flat = paths.flatten(block)
    hit = [p for p in flat if paths.is_residual_output(p, axes_of(p))]
    if not hit:
        raise ValueError("growth: found no residual-branch output parameter (last logical axis 'embed' under "
                         f"{paths.RESIDUAL_BRANCHES}) in a block with parameters {sorted(flat, key=str)[:6]}")
    for p in hit:
        flat[p] = jnp.zeros_like(flat[p])
    return paths.unflatten(flat)


def grow_params(src: dict, tgt_init: dict, tgt_axes: dict, *, op: str = "direct",
                order: str = "stack") -> tuple[dict, list[int], list[bool]]:
    """Grown parameters on pure dicts.

    Args:
      src: the source model's params (``paths.pure_params``).
      tgt_init: the target model's freshly initialised params (fixes the tree; ``random`` takes its layers).
      tgt_axes: ``paths.param_axes`` of the target model.
      op: one of ``OPS``.  order: one of ``ORDERS``.

    Returns:
      (params of the target tree, layer map, repeat flags).
    """
    if op not in OPS:
        raise ValueError(f"growth: unknown depth op {op!r}; expected one of {OPS}")
    ls, lt = paths.num_layers(src), paths.num_layers(tgt_init)
    src_sigs = [paths.signature(paths.layer(src, j)) for j in range(ls)]
    tgt_sigs = [paths.signature(paths.layer(tgt_init, i)) for i in range(lt)]
    mapping = layer_map(src_sigs, tgt_sigs, order)
    rep = repeats(mapping)
    out = {}
    for k, v in tgt_init.items():
        if k == paths.BLOCKS:
            continue
        if k not in src:
            raise ValueError(f"growth: the source model has no {k!r} (source keys {sorted(src)})")
        s_shapes = {p: np.shape(x) for p, x in paths.flatten({k: src[k]}).items()}
        t_shapes = {p: np.shape(x) for p, x in paths.flatten({k: v}).items()}
        if s_shapes != t_shapes:
            raise ValueError(f"growth: depth growth keeps the width, but {k!r} differs: source {s_shapes}, "
                             f"target {t_shapes}")
        out[k] = src[k]
    blocks = {}
    for i, j in enumerate(mapping):
        if not rep[i] or op == "direct":
            blocks[i] = src[paths.BLOCKS][j]
        elif op == "zero":
            blocks[i] = zero_residual_outputs(src[paths.BLOCKS][j],
                                              lambda rel, i=i: tgt_axes[(paths.BLOCKS, i) + rel])
        else:
            blocks[i] = tgt_init[paths.BLOCKS][i]
    out[paths.BLOCKS] = blocks
    return out, mapping, rep
