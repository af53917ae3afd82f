"""Pallas kernels for the MoE expert op, as two grouped GEMMs over expert-sorted row tiles
(papers/flashmoe.md, steps 4-6 on one device): ``up`` gathers the routed rows and computes
``h = silu(x W_gate) * (x W_up)``; ``down`` computes ``h W_down``, weights each row and combines it into its token.

Data layout (``ref.tile_layout``): the ``N*k`` assignments sorted by expert, every expert's rows padded to whole
tiles of ``block_m`` rows, so each tile belongs to exactly one expert (``tile_expert[i]``; ``-1`` = unused tile,
skipped). ``rows`` holds each row's token (padding rows point at the zero row ``N`` appended to ``x``) and
``weights`` its combine weight (0 on padding).

Every dimension is tiled, so one program's on-chip footprint does not depend on ``N``, ``H`` or ``I``
(``footprints``; at ``moe_large``'s H = I = 2048 the earlier single fused kernel, which held ``[block_m, H]``
rows and ``[H, block_i]`` weight slices per step, could not fit an H100/H200 SM or, with all of ``x`` as one
VMEM block, TPU VMEM):

* ``up``, grid ``(tiles, I / block_i)`` (+ ``H / block_h`` on TPU): ``g, u = x_rows W_gate[e][:, c], x_rows
  W_up[e][:, c]`` accumulated over ``H`` in ``block_h`` steps (float32), ``h = (silu(g) * u)`` cast to the
  input dtype and written to ``h [tiles * block_m, I]``: the only intermediate in HBM (the activations of the
  routed rows, ``I / H`` times the size of a gathered copy of ``x``).
* ``down``, grid ``(tiles, H / block_h)`` (+ ``I / block_i`` on TPU): ``y = h_rows W_down[e][:, n]``
  accumulated over ``I`` (float32), times each row's combine weight.

Two block-spec variants:

* ``"gpu"`` (Triton): ``x`` and the stacked expert weights are whole-array refs indexed by the tile's expert;
  ``up`` gathers with an indexed load ``x[rows, h_block]`` (no gathered copy of ``x`` is written); ``down``
  combines with ``atomic_add`` into ``out[rows, n_block]`` (with ``k = 2`` a float32 sum of two terms is
  order-independent; for ``k > 2`` the rounding order is not deterministic). The ``H`` and ``I`` reductions
  are ``fori_loop``s inside the program. ``H`` and ``I`` are padded to multiples of the (power-of-two) tiles.
* ``"tpu"`` (Mosaic): ``PrefetchScalarGridSpec`` with ``tile_expert`` in SMEM; the weight BlockSpecs fetch
  ``W[e]``'s ``[block_h, block_i]`` tile by the prefetched expert id, the reduction is the last ("arbitrary")
  grid axis with a float32 VMEM accumulator. The gather (``x[rows]``) and the combine (a scatter-add of the
  weighted rows) are XLA ops around the two calls. Tiles are multiples of (8, 128).

The interpreter (``interpret=True``, CPU) runs either variant with the grid in order, so the GPU variant's
combine becomes a read-modify-write of the same rows (the interpreter has no atomics).

Forward only: ``ops.py`` wraps it in ``jax.custom_vjp`` whose backward is ``jax.vjp`` of ``ref.moe_ffn_tiled``.

Status: exercised on CPU through the Pallas interpreter; both variants lower (Triton IR / Mosaic) in the tests,
but neither has been compiled or timed on a GPU or TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import tiles as tiling
from kernels.moe import ref

__all__ = ["BlockSizes", "footprints", "moe_ffn_fwd"]

_MIN_TILE = tiling.MIN_TILE
_next_pow2 = tiling.next_pow2
_round_up = tiling.round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the MoE kernels.

    Attributes:
      block_m: rows per tile (one expert per tile); expert groups are padded to a multiple of it.
      block_i: expert hidden columns per ``up`` program and per ``down`` reduction step.
      block_h: model columns per ``up`` reduction step and per ``down`` program.
    """
    block_m: int = 64
    block_i: int = 64
    block_h: int = 64

    @classmethod
    def get_default(cls, hidden: int, platform: str = "gpu", d_model: int | None = None) -> "BlockSizes":
        """GPU: 64 x 64 x 64 (Triton ``tl.dot`` tiles; ~48 KiB of shared memory per program at 2 stages).
        TPU: 128-row tiles (MXU), 256 hidden and 512 model columns (multiples of 128). CPU interpreter: 16-row
        tiles (little padding on small test problems), up to 64 columns."""
        h = hidden if d_model is None else d_model
        if platform == "tpu":
            return cls(block_m=128, block_i=min(256, _round_up(hidden, 128)), block_h=min(512, _round_up(h, 128)))
        cols = lambda n: min(64, max(_next_pow2(n), _MIN_TILE))  # noqa: E731
        return cls(block_m=64 if platform == "gpu" else 16, block_i=cols(hidden), block_h=cols(h))


def _padded_dims(h: int, i: int, block_sizes: BlockSizes) -> tuple[int, int]:
    """Kernel sizes of the model dim and the hidden dim (zero padding is exact: silu(0) * 0 = 0)."""
    return _round_up(h, block_sizes.block_h), _round_up(i, block_sizes.block_i)


def footprints(platform: str, dtype, block_sizes: BlockSizes) -> tuple[tiling.Footprint, tiling.Footprint]:
    """On-chip bytes of one program of ``up`` and ``down`` (``kernels.tiles``): TPU from the BlockSpecs and
    scratch of ``_call_tpu``; GPU from the per-step dot tiles and the float32 accumulators. Independent of the
    token count and of ``H`` and ``I`` (every dimension is tiled)."""
    bm, bi, bh, f32 = block_sizes.block_m, block_sizes.block_i, block_sizes.block_h, jnp.float32
    if platform == "tpu":
        up = tiling.tpu_footprint("moe_ffn_fwd_up", [((bm, bh), dtype), ((bh, bi), dtype), ((bh, bi), dtype),
                                                     ((bm, bi), dtype)],
                                  scratch=[((bm, bi), f32)] * 2, temporaries=[((bm, bi), f32)] * 2)
        down = tiling.tpu_footprint("moe_ffn_fwd_down", [((bm, bi), dtype), ((bi, bh), dtype), ((bm, 1), f32),
                                                         ((bm, bh), f32)],
                                    scratch=[((bm, bh), f32)], temporaries=[((bm, bh), f32)])
        return up, down
    up = tiling.gpu_footprint("moe_ffn_fwd_up", [((bm, bh), dtype), ((bh, bi), dtype), ((bh, bi), dtype)],
                              live=[((bm, bi), f32)] * 2 + [((bm, bh), dtype)])
    down = tiling.gpu_footprint("moe_ffn_fwd_down", [((bm, bi), dtype), ((bi, bh), dtype)],
                                live=[((bm, bh), f32)])
    return up, down


def _dot(a, b):
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


# ---- GPU (Triton) -------------------------------------------------------------------------------------------

def _up_kernel_gpu(tile_expert_ref, rows_ref, x_ref, wg_ref, wu_ref, h_ref, *, block_h: int, num_h: int):
    """Program (tile i, hidden block c): ``h[tile rows, c] = silu(x[rows] Wg[e][:, c]) * (x[rows] Wu[e][:, c])``."""
    i, c = pl.program_id(0), pl.program_id(1)
    e = tile_expert_ref[i]
    bm, bi = h_ref.shape
    cols = pl.ds(pl.multiple_of(c * bi, bi), bi)

    @pl.when(e >= 0)
    def _tile():
        rows = rows_ref[...]  # [bm]

        def step(kk, acc):
            hs = pl.ds(pl.multiple_of(kk * block_h, block_h), block_h)
            xs = x_ref[rows, hs]  # [bm, bh] gather of the routed rows
            return acc[0] + _dot(xs, wg_ref[e, hs, cols]), acc[1] + _dot(xs, wu_ref[e, hs, cols])

        zeros = jnp.zeros((bm, bi), jnp.float32)
        g, u = jax.lax.fori_loop(0, num_h, step, (zeros, zeros))
        h_ref[...] = (jax.nn.silu(g) * u).astype(h_ref.dtype)

    @pl.when(e < 0)
    def _skip():
        h_ref[...] = jnp.zeros(h_ref.shape, h_ref.dtype)


def _down_kernel_gpu(tile_expert_ref, rows_ref, w_ref, h_ref, wd_ref, out_in_ref, out_ref, *, block_i: int,
                     block_h: int, num_i: int, atomic: bool):
    """Program (tile i, model block n): ``out[rows, n] += w * (h[tile rows] Wd[e][:, n])``."""
    del out_in_ref  # aliased to out_ref (zeros)
    i, n = pl.program_id(0), pl.program_id(1)
    e = tile_expert_ref[i]
    cols = pl.ds(pl.multiple_of(n * block_h, block_h), block_h)

    @pl.when(e >= 0)
    def _tile():
        def step(kk, acc):
            ks = pl.ds(pl.multiple_of(kk * block_i, block_i), block_i)
            return acc + _dot(h_ref[:, ks], wd_ref[e, ks, cols])

        acc = jax.lax.fori_loop(0, num_i, step, jnp.zeros((h_ref.shape[0], block_h), jnp.float32))
        y = acc * w_ref[...][:, None]  # [bm, bh] weighted
        rows = rows_ref[...]
        if atomic:
            from jax.experimental.pallas import triton as pltriton  # GPU-only import
            pltriton.atomic_add(out_ref, (rows, cols), y)
        else:  # interpreter: programs run in order; rows of one tile are distinct tokens
            out_ref[rows, cols] = out_ref[rows, cols] + y


def _call_gpu(layout, x_k, wg, wu, wd, *, block_sizes, interpret):
    bm, bi, bh = block_sizes.block_m, block_sizes.block_i, block_sizes.block_h
    n1, h_pad = x_k.shape
    i_pad = wg.shape[-1]
    tiles = layout.tile_expert.shape[0]
    whole = lambda *shape: pl.BlockSpec(shape, lambda i, c: (0,) * len(shape))  # noqa: E731
    per_tile = pl.BlockSpec((bm,), lambda i, c: (i,))
    params = tiling.compiler_params("gpu", interpret)
    h = pl.pallas_call(
        functools.partial(_up_kernel_gpu, block_h=bh, num_h=h_pad // bh),
        grid=(tiles, i_pad // bi),
        in_specs=[whole(tiles), per_tile, whole(n1, h_pad), whole(*wg.shape), whole(*wu.shape)],
        out_specs=pl.BlockSpec((bm, bi), lambda i, c: (i, c)),
        out_shape=jax.ShapeDtypeStruct((tiles * bm, i_pad), x_k.dtype),
        interpret=interpret, compiler_params=params, name="moe_ffn_fwd_up",
    )(layout.tile_expert, layout.rows, x_k, wg, wu)
    return pl.pallas_call(
        functools.partial(_down_kernel_gpu, block_i=bi, block_h=bh, num_i=i_pad // bi, atomic=not interpret),
        grid=(tiles, h_pad // bh),
        in_specs=[whole(tiles), per_tile, per_tile, pl.BlockSpec((bm, i_pad), lambda i, n: (i, 0)),
                  whole(*wd.shape), whole(n1, h_pad)],
        out_specs=whole(n1, h_pad),
        out_shape=jax.ShapeDtypeStruct((n1, h_pad), jnp.float32),
        input_output_aliases={5: 0},
        interpret=interpret, compiler_params=params, name="moe_ffn_fwd_down",
    )(layout.tile_expert, layout.rows, layout.weights, h, wd, jnp.zeros((n1, h_pad), jnp.float32))


# ---- TPU (Mosaic) -------------------------------------------------------------------------------------------

def _up_kernel_tpu(tile_expert_ref, xs_ref, wg_ref, wu_ref, h_ref, g_acc, u_acc):
    """Program (tile i, hidden block c, model block k): accumulate ``x W_gate``, ``x W_up`` over k."""
    i, k = pl.program_id(0), pl.program_id(2)

    @pl.when(k == 0)
    def _zero():
        g_acc[...] = jnp.zeros(g_acc.shape, jnp.float32)
        u_acc[...] = jnp.zeros(u_acc.shape, jnp.float32)

    @pl.when(tile_expert_ref[i] >= 0)
    def _step():
        g_acc[...] += _dot(xs_ref[...], wg_ref[...])
        u_acc[...] += _dot(xs_ref[...], wu_ref[...])

    @pl.when(k == pl.num_programs(2) - 1)
    def _write():
        h_ref[...] = (jax.nn.silu(g_acc[...]) * u_acc[...]).astype(h_ref.dtype)


def _down_kernel_tpu(tile_expert_ref, h_ref, wd_ref, w_ref, y_ref, acc):
    """Program (tile i, model block n, hidden block k): ``y = w * sum_k h[:, k] W_down[k, n]``."""
    i, k = pl.program_id(0), pl.program_id(2)

    @pl.when(k == 0)
    def _zero():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    @pl.when(tile_expert_ref[i] >= 0)
    def _step():
        acc[...] += _dot(h_ref[...], wd_ref[...])

    @pl.when(k == pl.num_programs(2) - 1)
    def _write():
        y_ref[...] = acc[...] * w_ref[...]


def _call_tpu(layout, x_k, wg, wu, wd, *, block_sizes, interpret, fps):
    from jax.experimental.pallas import tpu as pltpu
    bm, bi, bh = block_sizes.block_m, block_sizes.block_i, block_sizes.block_h
    n1, h_pad = x_k.shape
    i_pad = wg.shape[-1]
    tiles = layout.tile_expert.shape[0]
    f32 = jnp.float32

    def expert(i, te):
        return jnp.maximum(te[i], 0)  # unused tiles (-1) fetch expert 0 and skip the work

    def params(fp):
        return tiling.compiler_params("tpu", interpret, footprint=fp,
                                      dimension_semantics=("parallel", "parallel", "arbitrary"))

    xs = x_k[layout.rows]  # [T * bm, Hp] the routed rows, expert-sorted (XLA gather)
    h = pl.pallas_call(
        _up_kernel_tpu,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,  # tile_expert -> SMEM
            grid=(tiles, i_pad // bi, h_pad // bh),
            in_specs=[pl.BlockSpec((bm, bh), lambda i, c, k, te: (i, k)),
                      pl.BlockSpec((None, bh, bi), lambda i, c, k, te: (expert(i, te), k, c)),
                      pl.BlockSpec((None, bh, bi), lambda i, c, k, te: (expert(i, te), k, c))],
            out_specs=pl.BlockSpec((bm, bi), lambda i, c, k, te: (i, c)),
            scratch_shapes=[pltpu.VMEM((bm, bi), f32), pltpu.VMEM((bm, bi), f32)]),
        out_shape=jax.ShapeDtypeStruct((tiles * bm, i_pad), x_k.dtype),
        interpret=interpret, compiler_params=params(fps[0]), name="moe_ffn_fwd_up",
    )(layout.tile_expert, xs, wg, wu)
    y = pl.pallas_call(
        _down_kernel_tpu,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(tiles, h_pad // bh, i_pad // bi),
            in_specs=[pl.BlockSpec((bm, bi), lambda i, n, k, te: (i, k)),
                      pl.BlockSpec((None, bi, bh), lambda i, n, k, te: (expert(i, te), k, n)),
                      pl.BlockSpec((bm, 1), lambda i, n, k, te: (i, 0))],
            out_specs=pl.BlockSpec((bm, bh), lambda i, n, k, te: (i, n)),
            scratch_shapes=[pltpu.VMEM((bm, bh), f32)]),
        out_shape=jax.ShapeDtypeStruct((tiles * bm, h_pad), f32),
        interpret=interpret, compiler_params=params(fps[1]), name="moe_ffn_fwd_down",
    )(layout.tile_expert, h, wd, layout.weights[:, None])
    return jnp.zeros((n1, h_pad), f32).at[layout.rows].add(y)  # combine (XLA scatter-add)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "platform"))
def moe_ffn_fwd(x_pad: jax.Array, layout: ref.TileLayout, w_gate: jax.Array, w_up: jax.Array,
                w_down: jax.Array, *, block_sizes: BlockSizes, interpret: bool,
                platform: str = "gpu") -> jax.Array:
    """Runs the two kernels.

    Args:
      x_pad: ``[N+1, H]`` tokens with a zero row appended (padding rows point at it).
      layout: ``ref.tile_layout(..., block_m=block_sizes.block_m)``.
      w_gate: ``[E, H, I]``.
      w_up: ``[E, H, I]``.
      w_down: ``[E, I, H]``.
      block_sizes: tiles; ``block_m`` must be the layout's.
      interpret: run the Pallas interpreter (CPU).
      platform: block-spec variant, ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).

    Returns:
      float32 ``[N+1, H]``: row ``t`` is ``sum_j w_{t,j} FFN_{e_{t,j}}(x_t)``; row ``N`` is zero.
    """
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"moe_ffn: platform must be 'gpu' or 'tpu', got {platform!r}")
    _, h = x_pad.shape
    i_dim = w_gate.shape[-1]
    bm = block_sizes.block_m
    tiles = layout.tile_expert.shape[0]
    if layout.rows.shape[0] != tiles * bm:
        raise ValueError(f"moe_ffn: the layout has {layout.rows.shape[0]} rows, expected tiles*block_m = "
                         f"{tiles}*{bm} (build it with block_m={bm})")
    h_pad, i_pad = _padded_dims(h, i_dim, block_sizes)
    fps = footprints(platform, x_pad.dtype, block_sizes)
    if not interpret:
        for fp in fps:
            tiling.require_fit(fp)
    dt = x_pad.dtype
    x_k = jnp.pad(x_pad, ((0, 0), (0, h_pad - h)))  # [N+1, Hp]
    pad_w = lambda w, a, b: jnp.pad(w.astype(dt), ((0, 0), (0, a), (0, b)))  # noqa: E731
    wg = pad_w(w_gate, h_pad - h, i_pad - i_dim)  # [E, Hp, Ip]
    wu = pad_w(w_up, h_pad - h, i_pad - i_dim)  # [E, Hp, Ip]
    wd = pad_w(w_down, i_pad - i_dim, h_pad - h)  # [E, Ip, Hp]
    if platform == "tpu":
        out = _call_tpu(layout, x_k, wg, wu, wd, block_sizes=block_sizes, interpret=interpret, fps=fps)
    else:
        out = _call_gpu(layout, x_k, wg, wu, wd, block_sizes=block_sizes, interpret=interpret)
    return out[:, :h]
