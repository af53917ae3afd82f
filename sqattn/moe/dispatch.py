"""Dispatch strategies: how routed tokens reach their experts and come back (single device / GSPMD).

Every strategy has the signature ``f(x, routing, params, *, capacity, ...) -> (out, keep)`` with

* ``x [G, S, H]``: tokens in capacity groups (``sqattn.moe.router``: per group and expert at most ``capacity``
  assignments are served, in token order),
* ``expert_ids, weights [G, S, k]``: the routing (``router.route``),
* ``params``: ``ExpertParams(w_gate [E, H, I], w_up [E, H, I], w_down [E, I, H])``,
* ``out [G, S, H]`` float32 and ``keep [G, S, k]`` bool (which assignments were served).

Strategies (all tested equal, forward, gradients and ``keep``):

* ``dense_dispatch`` -- **the reference**: one-hot dispatch/combine tensors ``[G, S, E, C]`` built from a cumsum
  over token order (GShard), expert inputs by einsum, a batched gated MLP over ``[E, G*C, H]``.
* ``sorted_dispatch`` -- sort assignments by (expert, group), drop by rank within each (group, expert) queue,
  grouped matmul over the kept rows, unsort, weighted sum. No ``C``-padding of the compute: dropless costs
  what it routes. The grouped matmul is ``jax.lax.ragged_dot`` (``gmm="ragged"``, a real grouped GEMM on
  GPU/TPU) or ``gmm="tiled"``: rows padded per expert to tiles of ``block_m`` and a scan over tiles with its own
  VJP (``sqattn.moe.gmm``), because
  XLA:CPU expands ``ragged_dot`` into a dense masked matmul over all E experts (E times the FLOPs). ``"auto"``
  takes ragged on GPU/TPU and tiled on CPU (``resolve_gmm``).
* ``fused_dispatch`` -- the same drop rule, then the Pallas kernel ``kernels.moe.moe_ffn`` (gather, both GEMMs
  with the activation, weighted combine in one kernel).

The drop rule is implemented twice on purpose -- by cumsum (``dense_dispatch``) and by sort rank
(``sorted_layout``) -- and the tests check both against a numpy loop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import dispatch as kernel_dispatch
from kernels.moe import moe_ffn
from kernels.moe import ref as moe_ref
from sqattn.moe import gmm as gmm_lib

GMM_IMPLS = ("auto", "ragged", "tiled")


class ExpertParams(NamedTuple):
    """Stacked gated-MLP expert weights: ``w_gate``/``w_up [E, H, I]``, ``w_down [E, I, H]``."""
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array


def expert_ffn(x: jax.Array, params: ExpertParams) -> jax.Array:
    """Batched gated MLP per expert: ``x [E, M, H]`` (compute dtype) -> float32 ``[E, M, H]``.

    Gate/up products accumulate in float32; ``silu(g) * u`` is cast to ``x.dtype`` before the down GEMM.
    """
    dt = x.dtype
    g = jnp.einsum("emh,ehi->emi", x, params.w_gate.astype(dt), preferred_element_type=jnp.float32)
    u = jnp.einsum("emh,ehi->emi", x, params.w_up.astype(dt), preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(dt)  # [E, M, I]
    return jnp.einsum("emi,eih->emh", h, params.w_down.astype(dt), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------- (a) dense
def dense_dispatch(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, params: ExpertParams, *,
                   capacity: int) -> tuple[jax.Array, jax.Array]:
    """Reference: one-hot dispatch and combine tensors with capacity (GShard/MaxText ``dense_matmul``)."""
    g, s, k = expert_ids.shape
    e = params.w_gate.shape[0]
    one_hot = jax.nn.one_hot(expert_ids.reshape(g, s * k), e, dtype=jnp.int32)  # [G, S*k, E], token-major
    position = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)  # [G, S*k] queue position
    keep = position < capacity  # [G, S*k]
    slot = jax.nn.one_hot(jnp.where(keep, position, capacity), capacity, dtype=jnp.float32)  # [G, S*k, C]
    route = one_hot.astype(jnp.float32) * keep[..., None]  # [G, S*k, E]
    dispatch = jnp.einsum("gae,gac->gaec", route, slot).reshape(g, s, k, e, capacity)
    combine = jnp.einsum("gsjec,gsj->gsec", dispatch, weights.astype(jnp.float32))  # [G, S, E, C]
    dispatch = jnp.sum(dispatch, axis=2).astype(x.dtype)  # [G, S, E, C], entries 0/1
    x_e = jnp.einsum("gsec,gsh->egch", dispatch, x)  # [E, G, C, H] (one token per slot: exact)
    y_e = expert_ffn(x_e.reshape(e, g * capacity, -1), params).reshape(e, g, capacity, -1)  # [E, G, C, H]
    out = jnp.einsum("gsec,egch->gsh", combine, y_e)  # [G, S, H] float32
    return out, keep.reshape(g, s, k)


# ----------------------------------------------------------------------------------------------- (b) sorted
class SortedLayout(NamedTuple):
    """Assignments (flat index ``a = (g*S + s)*k + j``) sorted for a grouped matmul.

    Attributes:
      perm: ``[A]`` int32, compute-layout row -> assignment. Kept rows come first, grouped by expert (experts in
        order; within an expert by group, then token); dropped rows follow.
      inverse: ``[A]`` int32, assignment -> compute-layout row.
      keep: ``[A]`` bool per assignment.
      rank: ``[A]`` int32 position of the assignment in its (group, expert) queue.
      group_sizes: ``[E]`` int32 kept rows per expert.
    """
    perm: jax.Array
    inverse: jax.Array
    keep: jax.Array
    rank: jax.Array
    group_sizes: jax.Array


def sorted_layout(expert_ids: jax.Array, num_experts: int, capacity: int) -> SortedLayout:
    """The drop rule by sort rank: a stable sort by (expert, group) keeps token order inside each queue."""
    g, s, k = expert_ids.shape
    a = g * s * k
    ids = expert_ids.reshape(a).astype(jnp.int32)
    group = jnp.arange(a, dtype=jnp.int32) // (s * k)
    key = ids * g + group  # [A], expert-major
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # [A]
    seg_count = jnp.zeros((num_experts * g,), jnp.int32).at[key].add(1)  # [E*G]
    seg_start = jnp.cumsum(seg_count) - seg_count
    rank_sorted = jnp.arange(a, dtype=jnp.int32) - seg_start[key[order]]
    keep_sorted = rank_sorted < capacity
    kept_before = jnp.cumsum(keep_sorted.astype(jnp.int32)) - keep_sorted
    num_kept = jnp.sum(keep_sorted.astype(jnp.int32))
    row = jnp.where(keep_sorted, kept_before, num_kept + jnp.arange(a, dtype=jnp.int32) - kept_before)
    perm = jnp.zeros((a,), jnp.int32).at[row].set(order)
    inverse = jnp.zeros((a,), jnp.int32).at[order].set(row)
    keep = jnp.zeros((a,), bool).at[order].set(keep_sorted)
    rank = jnp.zeros((a,), jnp.int32).at[order].set(rank_sorted)
    group_sizes = jnp.sum(jnp.minimum(seg_count, capacity).reshape(num_experts, g), axis=1)  # [E]
    return SortedLayout(perm, inverse, keep, rank, group_sizes)


def resolve_gmm(gmm: str, target: str | None = None) -> str:
    """``"auto"`` -> ``"ragged"`` on GPU/TPU (grouped GEMM), ``"tiled"`` on CPU (see the module docstring)."""
    if gmm not in GMM_IMPLS:
        raise ValueError(f"grouped matmul: unknown gmm {gmm!r}; expected one of {GMM_IMPLS}")
    if gmm == "auto":
        return "ragged" if kernel_dispatch.target_platform(target) in ("gpu", "tpu") else "tiled"
    return gmm


def _tile_ffn(x_tiles: jax.Array, tile_expert: jax.Array, params: ExpertParams) -> jax.Array:
    """Gated MLP on expert tiles ``x_tiles [T, bm, H]`` (``sqattn.moe.gmm``); float32 ``[T * bm, H]``."""
    t, bm, h = x_tiles.shape
    g = gmm_lib.tile_matmul(x_tiles, params.w_gate, tile_expert)  # [T, bm, I] float32
    u = gmm_lib.tile_matmul(x_tiles, params.w_up, tile_expert)
    hid = (jax.nn.silu(g) * u).astype(x_tiles.dtype)
    return gmm_lib.tile_matmul(hid, params.w_down, tile_expert).reshape(t * bm, h)  # [T*bm, H]


def grouped_ffn(xs: jax.Array, group_sizes: jax.Array, params: ExpertParams, *, gmm: str = "auto",
                block_m: int = 128, target: str | None = None) -> jax.Array:
    """Gated MLP over expert-sorted rows ``xs [M, H]`` (``group_sizes [E]``); float32 ``[M, H]``, zero past
    ``sum(group_sizes)``. ``"tiled"`` pads each expert's rows to whole ``block_m``-row tiles."""
    if resolve_gmm(gmm, target) == "ragged":
        return moe_ref.gated_ffn_ragged(xs, group_sizes, *params)
    m, h = xs.shape
    dest, tile_expert, _ = moe_ref.padded_group_layout(group_sizes, m, block_m)
    tiles = tile_expert.shape[0]
    x_tiles = jnp.zeros((tiles * block_m, h), xs.dtype).at[dest].set(xs, mode="drop")  # [T*bm, H]
    y = _tile_ffn(x_tiles.reshape(tiles, block_m, h), tile_expert, params)
    return jnp.take(y, dest, axis=0, mode="fill", fill_value=0.0)


def sorted_dispatch(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, params: ExpertParams, *,
                    capacity: int, gmm: str = "auto", block_m: int = 128,
                    target: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Sort by expert, grouped matmul on the kept rows, unsort, weighted sum (dropless when ``capacity = S``).

    The tiled grouped matmul gathers the tokens straight into their padded tiles and reads each assignment's
    result straight out of them (one gather each way, no intermediate sorted copy).
    """
    g, s, k = expert_ids.shape
    h = x.shape[-1]
    n, a = g * s, g * s * k
    lay = sorted_layout(expert_ids, params.w_gate.shape[0], capacity)
    x_flat = x.reshape(n, h)
    if resolve_gmm(gmm, target) == "ragged":
        ys = moe_ref.gated_ffn_ragged(x_flat[lay.perm // k], lay.group_sizes, *params)  # [A, H] sorted rows
        y = ys[lay.inverse]  # [A, H] assignment order
    else:
        dest, tile_expert, _ = moe_ref.padded_group_layout(lay.group_sizes, a, block_m)  # sorted row -> tile row
        rows = tile_expert.shape[0] * block_m
        src = jnp.full((rows,), a, jnp.int32).at[dest].set(jnp.arange(a, dtype=jnp.int32), mode="drop")
        token = lay.perm.at[src].get(mode="fill", fill_value=a) // k  # [T*bm], n = padding row
        x_tiles = x_flat.at[token].get(mode="fill", fill_value=0).reshape(-1, block_m, h)  # [T, bm, H]
        y_rows = _tile_ffn(x_tiles, tile_expert, params)  # [T*bm, H]
        y = y_rows.at[dest[lay.inverse]].get(mode="fill", fill_value=0.0)  # [A, H]; dropped rows -> 0
    w = jnp.where(lay.keep, weights.reshape(-1).astype(jnp.float32), 0.0).reshape(n, k)
    out = jnp.einsum("nk,nkh->nh", w, y.reshape(n, k, h))  # [N, H]
    return out.reshape(g, s, h), lay.keep.reshape(g, s, k)


# ----------------------------------------------------------------------------------------------- (c) fused
def fused_dispatch(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, params: ExpertParams, *,
                   capacity: int, impl: str = "auto", block_sizes=None,
                   target: str | None = None) -> tuple[jax.Array, jax.Array]:
    """The drop rule of ``sorted_layout``, then the fused Pallas kernel ``kernels.moe.moe_ffn``."""
    g, s, k = expert_ids.shape
    h = x.shape[-1]
    keep = sorted_layout(expert_ids, params.w_gate.shape[0], capacity).keep.reshape(g * s, k)
    ids = jnp.where(keep, expert_ids.reshape(g * s, k), -1)
    out = moe_ffn(x.reshape(g * s, h), ids, weights.reshape(g * s, k).astype(jnp.float32), *params,
                  impl=impl, block_sizes=block_sizes, target=target)
    return out.astype(jnp.float32).reshape(g, s, h), keep.reshape(g, s, k)
