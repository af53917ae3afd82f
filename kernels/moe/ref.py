"""Pure-jnp references for the fused MoE expert op (``ops.moe_ffn``).

The op computes, for tokens ``x [N, H]`` routed to ``k`` experts each (``expert_ids [N, k]``, ``-1`` = not routed,
e.g. dropped by capacity) with combine weights ``weights [N, k]``::

    out[t] = sum_j weights[t, j] * FFN_{expert_ids[t, j]}(x[t])
    FFN_e(x) = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]          (gated MLP / SwiGLU, no biases)

with the gate/up products and the combine in float32 and ``silu(.) * (.)`` cast to the input dtype before the
down projection (the same cast points as ``sqattn.moe.dispatch``).

Two forms:

* ``moe_ffn_ref``: sort the ``N*k`` assignments by expert (stable), one ``jax.lax.ragged_dot`` per GEMM, unsort,
  weighted sum. The single reference.
* ``moe_ffn_tiled``: the Pallas kernel's own data layout (``tile_layout``: every expert's rows padded to a
  multiple of ``block_m`` so a row tile never straddles two experts), computed with ``ragged_dot`` over the
  padded groups and a scatter-add combine. The kernel's backward is ``jax.vjp`` of this function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["TileLayout", "gated_ffn_ragged", "moe_ffn_ref", "moe_ffn_tiled", "num_tiles",
           "padded_group_layout", "tile_layout"]


def _cdiv(a, b):
    return (a + b - 1) // b


def num_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static bound on the row tiles of a padded layout of ``num_rows`` rows over ``num_experts`` groups.

    ``sum_e ceil(c_e / bm) <= ceil(sum_e c_e / bm) + #non-empty groups`` and ``#non-empty <= min(E, rows)``.
    """
    return max(_cdiv(num_rows, block_m) + min(num_experts, num_rows), 1)


def padded_group_layout(group_sizes: jax.Array, num_rows: int, block_m: int):
    """Where each row of an expert-sorted array goes when every group is padded to a multiple of ``block_m``.

    Args:
      group_sizes: ``[E]`` int rows per expert; the sorted array holds group 0's rows first, then group 1's...
        Rows past ``sum(group_sizes)`` belong to no group.
      num_rows: ``M``, the length of the sorted array.
      block_m: tile height.

    Returns:
      ``(dest [M] int32, tile_expert [T] int32, padded_sizes [E] int32)``: the padded row of each sorted row
      (``T * block_m``, out of range, for rows in no group), the expert of each tile (``-1`` for unused tiles,
      which all come after the used ones), and each group's padded size.
    """
    num_experts = group_sizes.shape[0]
    tiles = num_tiles(num_rows, num_experts, block_m)
    sizes = group_sizes.astype(jnp.int32)
    padded = _cdiv(sizes, block_m) * block_m  # [E]
    start = jnp.cumsum(sizes) - sizes  # [E]
    padded_end = jnp.cumsum(padded)  # [E]
    padded_start = padded_end - padded
    row = jnp.arange(num_rows, dtype=jnp.int32)
    expert = jnp.searchsorted(jnp.cumsum(sizes), row, side="right").astype(jnp.int32)  # [M], E = no group
    safe = jnp.minimum(expert, num_experts - 1)
    dest = jnp.where(expert < num_experts, padded_start[safe] + row - start[safe], tiles * block_m)
    tile_start = jnp.arange(tiles, dtype=jnp.int32) * block_m
    tile_expert = jnp.searchsorted(padded_end, tile_start, side="right").astype(jnp.int32)  # [T]
    tile_expert = jnp.where(tile_expert < num_experts, tile_expert, -1)
    return dest.astype(jnp.int32), tile_expert, padded


class TileLayout(NamedTuple):
    """Assignments sorted by expert, each expert's rows padded to whole tiles of ``block_m`` rows.

    Attributes:
      rows: ``[T * block_m]`` int32 token of each row; padding rows hold ``N`` (a zero row appended to x).
      weights: ``[T * block_m]`` float32 combine weight of each row (0 on padding).
      tile_expert: ``[T]`` int32 expert of each tile, ``-1`` for unused tiles (all at the end).
      group_sizes: ``[E]`` int32 padded rows per expert (multiples of ``block_m``).
    """
    rows: jax.Array
    weights: jax.Array
    tile_expert: jax.Array
    group_sizes: jax.Array


def tile_layout(expert_ids: jax.Array, weights: jax.Array, num_experts: int, block_m: int) -> TileLayout:
    """Builds the kernel layout from ``expert_ids [N, k]`` (``-1`` = not routed) and ``weights [N, k]``."""
    n, k = expert_ids.shape
    a = n * k
    ids = expert_ids.reshape(a)  # [A], assignment a = t * k + j
    key = jnp.where(ids >= 0, ids, num_experts)
    order = jnp.argsort(key, stable=True)  # expert-sorted, token order within an expert
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[key].add(1)[:num_experts]  # [E]
    dest, tile_expert, padded = padded_group_layout(counts, a, block_m)
    m_pad = tile_expert.shape[0] * block_m
    rows = jnp.full((m_pad,), n, jnp.int32).at[dest].set((order // k).astype(jnp.int32), mode="drop")
    w = jnp.zeros((m_pad,), jnp.float32).at[dest].set(
        weights.reshape(a).astype(jnp.float32)[order], mode="drop")
    return TileLayout(rows, w, tile_expert, padded)


def gated_ffn_ragged(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                     w_down: jax.Array) -> jax.Array:
    """Grouped gated MLP over expert-sorted rows ``xs [M, H]`` with ``jax.lax.ragged_dot``; float32 ``[M, H]``.

    Rows past ``sum(group_sizes)`` come out zero.
    """
    dt = xs.dtype
    gs = group_sizes.astype(jnp.int32)
    g = jax.lax.ragged_dot(xs, w_gate.astype(dt), gs, preferred_element_type=jnp.float32)  # [M, I]
    u = jax.lax.ragged_dot(xs, w_up.astype(dt), gs, preferred_element_type=jnp.float32)  # [M, I]
    h = (jax.nn.silu(g) * u).astype(dt)
    return jax.lax.ragged_dot(h, w_down.astype(dt), gs, preferred_element_type=jnp.float32)  # [M, H]


def moe_ffn_ref(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Reference: sort by expert, grouped GEMMs, unsort, weighted sum. Returns float32 ``[N, H]``."""
    n, k = expert_ids.shape
    num_experts = w_gate.shape[0]
    a = n * k
    ids = expert_ids.reshape(a)
    valid = ids >= 0
    key = jnp.where(valid, ids, num_experts)
    order = jnp.argsort(key, stable=True)  # [A]
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[key].add(1)[:num_experts]
    ys = gated_ffn_ragged(x[order // k], counts, w_gate, w_up, w_down)  # [A, H] sorted order
    y = jnp.zeros_like(ys).at[order].set(ys)  # [A, H] assignment order
    w = jnp.where(valid, weights.reshape(a).astype(jnp.float32), 0.0)
    return jnp.einsum("nk,nkh->nh", w.reshape(n, k), y.reshape(n, k, -1))  # [N, H]


def moe_ffn_tiled(x_pad: jax.Array, layout: TileLayout, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    """The kernel's math in jnp: ``x_pad [N+1, H]`` (last row zero) -> float32 ``[N+1, H]``.

    Gathers every padded row, runs the grouped FFN over the padded groups and scatter-adds the weighted rows
    back to their tokens (padding rows read and write the zero row ``N`` with weight 0).
    """
    xs = x_pad[layout.rows]  # [M_pad, H]
    ys = gated_ffn_ragged(xs, layout.group_sizes, w_gate, w_up, w_down)  # [M_pad, H]
    return jnp.zeros(x_pad.shape, jnp.float32).at[layout.rows].add(ys * layout.weights[:, None])
