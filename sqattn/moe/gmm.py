"""Grouped matmul by row tiles, for backends without a real grouped GEMM (XLA:CPU).

XLA:CPU lowers ``jax.lax.ragged_dot`` to a dense masked matmul over every group (E times the FLOPs). Here the
expert-sorted rows are padded per expert to whole tiles of ``block_m`` rows (``kernels.moe.ref.
padded_group_layout``), and a ``lax.scan`` over the tiles multiplies each tile by its expert's matrix, skipping
the unused tiles. Autodiff of that scan would accumulate the weight gradient as a full ``[E, K, N]`` scatter per
tile, so ``tile_matmul`` has its own VJP, megablox-style (gmm + tgmm): ``dx`` is the same scan with the
transposed weights, ``dw`` a scan adding ``x_t^T dy_t`` into its expert's slice of a float32 carry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["tile_matmul"]


def _tile_scan(x_tiles: jax.Array, w: jax.Array, tile_expert: jax.Array, transpose_w: bool) -> jax.Array:
    """``y_t = x_t @ w[e_t]`` (or ``@ w[e_t]^T``) for every used tile; float32 ``[T, bm, N]``."""
    num_experts = w.shape[0]
    n = w.shape[1] if transpose_w else w.shape[2]
    bm = x_tiles.shape[1]
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    w = w.astype(x_tiles.dtype)  # once, not once per tile

    def one(carry, inp):
        xt, e = inp
        we = w[jnp.clip(e, 0, num_experts - 1)]  # [K, N] (or [N, K])
        y = jax.lax.cond(e >= 0,
                         lambda: jax.lax.dot_general(xt, we, dims, preferred_element_type=jnp.float32),
                         lambda: jnp.zeros((bm, n), jnp.float32))
        return carry, y

    return jax.lax.scan(one, None, (x_tiles, tile_expert))[1]


@jax.custom_vjp
def tile_matmul(x_tiles: jax.Array, w: jax.Array, tile_expert: jax.Array) -> jax.Array:
    """Per-tile expert matmul.

    Args:
      x_tiles: ``[T, bm, K]`` rows, each tile belonging to one expert (compute dtype).
      w: ``[E, K, N]`` expert matrices (cast to ``x_tiles.dtype``).
      tile_expert: ``[T]`` int32 expert of each tile, ``-1`` for unused tiles (their output is zero).

    Returns:
      float32 ``[T, bm, N]``.
    """
    return _tile_scan(x_tiles, w, tile_expert, transpose_w=False)


def _fwd(x_tiles, w, tile_expert):
    return _tile_scan(x_tiles, w, tile_expert, transpose_w=False), (x_tiles, w, tile_expert)


def _bwd(residuals, dy):
    """``dx``: the forward scan with transposed weights. ``dw``: a scan adding ``x_t^T dy_t`` into its expert's
    slice of a float32 carry (in place; measured faster on CPU than one scan doing both, or than a batched
    per-tile product followed by a segment sum)."""
    x_tiles, w, tile_expert = residuals
    dt = x_tiles.dtype
    dy = dy.astype(dt)
    dx = _tile_scan(dy, w, tile_expert, transpose_w=True).astype(dt)  # [T, bm, K]
    num_experts = w.shape[0]

    def add(dw, inp):
        xt, gt, e = inp
        safe = jnp.clip(e, 0, num_experts - 1)
        update = jnp.dot(xt.T, gt, preferred_element_type=jnp.float32)  # [K, N]
        return jax.lax.cond(e >= 0, lambda: dw.at[safe].add(update), lambda: dw), None

    dw, _ = jax.lax.scan(add, jnp.zeros(w.shape, jnp.float32), (x_tiles, dy, tile_expert))
    return dx, dw.astype(w.dtype), None


tile_matmul.defvjp(_fwd, _bwd)
