"""Pallas kernel for the fused MoE expert op: gather routed rows -> gate/up GEMM -> SiLU-gate -> down GEMM
-> weighted scatter-add combine, one program per row tile (papers/flashmoe.md, steps 4-6 on one device).

Data layout (``ref.tile_layout``): the ``N*k`` assignments sorted by expert, every expert's rows padded to whole
tiles of ``block_m`` rows, so each tile belongs to exactly one expert (``tile_expert[i]``; ``-1`` = unused tile,
skipped). ``rows`` holds each row's token (padding rows point at the zero row ``N`` appended to ``x``) and
``weights`` its combine weight (0 on padding). For one tile the kernel

1. gathers its ``block_m`` token rows of ``x`` (no ``[N*k, H]`` copy is ever written to memory),
2. loops over the expert hidden dim in chunks of ``block_i``: ``h = silu(x W_gate[:, c]) * (x W_up[:, c])``
   (float32, cast to the input dtype) and ``acc += h W_down[c, :]`` (float32) -- FlashMoE's preGEMM/postGEMM
   per N-tile, without materialising ``h`` for the whole hidden dim,
3. adds ``weights[r] * acc[r]`` into ``out[rows[r]]`` (float32): the combine.

Two block-spec variants share that math:

* ``"gpu"`` (Triton): grid ``(tiles,)``; ``x`` and the stacked expert weights are whole-array refs indexed by
  the tile's expert; the gather is an indexed load ``x[rows]``; the combine is ``atomic_add`` (tiles run in
  parallel; with ``k = 2`` a float32 sum of two terms is order-independent, for ``k > 2`` the rounding order is
  not deterministic). ``H`` and the hidden chunk are padded to powers of two >= 16 (``tl.dot``).
* ``"tpu"`` (Mosaic): grid ``(tiles, hidden chunks)`` with ``PrefetchScalarGridSpec``: ``tile_expert``, ``rows``
  and ``weights`` live in SMEM, the weight BlockSpecs fetch ``W[e][:, chunk]`` by the prefetched expert id (one
  chunk of one expert in VMEM at a time), the gathered rows and the accumulator sit in VMEM scratch, the gather
  and the combine are row loops of dynamic ``pl.ds`` copies. Both grid axes are sequential ("arbitrary"): the
  output block (all of ``out``) stays resident and is written back once. The whole ``x [N+1, H]`` is one VMEM
  block, which bounds the tokens per call (a few thousand at H=2048 in bf16).

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

__all__ = ["BlockSizes", "moe_ffn_fwd"]

_MIN_TILE = tiling.MIN_TILE
_next_pow2 = tiling.next_pow2
_round_up = tiling.round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the fused MoE kernel.

    Attributes:
      block_m: rows per tile (one expert per tile); expert groups are padded to a multiple of it.
      block_i: expert hidden columns per inner step (a power of two on GPU, a multiple of 128 on TPU).
    """
    block_m: int = 64
    block_i: int = 64

    @classmethod
    def get_default(cls, hidden: int, platform: str = "gpu") -> "BlockSizes":
        """GPU: 64 x 64 (Triton-friendly). TPU: 128-row tiles (MXU), up to 512 hidden columns per step.
        CPU interpreter: 16-row tiles (little padding on small test problems), the whole hidden dim."""
        if platform == "tpu":
            return cls(block_m=128, block_i=min(512, _round_up(hidden, 128)))
        if platform == "gpu":
            return cls(block_m=64, block_i=min(64, max(_next_pow2(hidden), _MIN_TILE)))
        return cls(block_m=16, block_i=max(_next_pow2(hidden), _MIN_TILE))


def _padded_dims(platform: str, h: int, i: int, block_i: int) -> tuple[int, int]:
    """Kernel sizes of the model dim and the hidden dim (zero padding is exact: silu(0) * 0 = 0)."""
    if platform == "tpu":
        return _round_up(h, 128), _round_up(i, block_i)
    return max(_next_pow2(h), _MIN_TILE), _round_up(i, block_i)


def footprint(platform: str, n_tokens: int, h: int, i_dim: int, dtype, block_sizes: BlockSizes) -> tiling.Footprint:
    """On-chip bytes of one program (``kernels.tiles``): TPU from the BlockSpecs and scratch of ``_call_tpu``,
    GPU from the gathered rows, the three weight chunks and the ``[block_m, H]`` accumulator of a tile."""
    bm, bi, f32 = block_sizes.block_m, block_sizes.block_i, jnp.float32
    h_pad, _ = _padded_dims(platform, h, i_dim, bi)
    n1 = n_tokens + 1
    if platform == "tpu":
        return tiling.tpu_footprint(
            "moe_ffn_fwd",
            [((n1, h_pad), dtype), ((h_pad, bi), dtype), ((h_pad, bi), dtype), ((bi, h_pad), dtype),
             ((n1, h_pad), f32), ((n1, h_pad), f32)],
            scratch=[((bm, h_pad), dtype), ((bm, h_pad), f32)],
            temporaries=[((bm, bi), f32)] * 3 + [((bm, h_pad), f32)])
    return tiling.gpu_footprint("moe_ffn_fwd", [((bm, h_pad), dtype), ((h_pad, bi), dtype), ((h_pad, bi), dtype),
                                               ((bm, bi), dtype), ((bi, h_pad), dtype)],
                               live=[((bm, h_pad), f32), ((bm, h_pad), dtype), ((bm, bi), f32)])


def _ffn_chunk(xs, w_gate, w_up, w_down, mm_dtype):
    """One hidden chunk of the gated MLP: float32 ``[bm, H]`` contribution of ``block_i`` hidden units."""
    f32 = jnp.float32
    precision = jax.lax.Precision.HIGHEST if mm_dtype == f32 else None
    g = jnp.dot(xs, w_gate, precision=precision, preferred_element_type=f32)  # [bm, bi]
    u = jnp.dot(xs, w_up, precision=precision, preferred_element_type=f32)  # [bm, bi]
    h = (jax.nn.silu(g) * u).astype(mm_dtype)
    return jnp.dot(h, w_down, precision=precision, preferred_element_type=f32)  # [bm, H]


def _gpu_kernel(tile_expert_ref, rows_ref, w_ref, x_ref, wg_ref, wu_ref, wd_ref, out_in_ref, out_ref, *,
                block_i: int, num_chunks: int, atomic: bool):
    """One program = one tile. ``x``/``out`` ``[N+1, H]`` and ``W [E, ., .]`` are whole-array refs."""
    del out_in_ref  # aliased to out_ref (zeros)
    i = pl.program_id(0)
    e = tile_expert_ref[i]

    @pl.when(e >= 0)
    def _tile():
        rows = rows_ref[...]  # [bm]
        xs = x_ref[rows, :]  # [bm, H] gather of the routed rows
        mm_dtype = xs.dtype

        def chunk(c, acc):
            cols = pl.ds(pl.multiple_of(c * block_i, block_i), block_i)
            return acc + _ffn_chunk(xs, wg_ref[e, :, cols], wu_ref[e, :, cols], wd_ref[e, cols, :], mm_dtype)

        acc = jax.lax.fori_loop(0, num_chunks, chunk, jnp.zeros((xs.shape[0], xs.shape[1]), jnp.float32))
        y = acc * w_ref[...][:, None]  # [bm, H] weighted
        if atomic:
            from jax.experimental.pallas import triton as pltriton  # GPU-only import
            pltriton.atomic_add(out_ref, (rows, slice(None)), y)
        else:  # interpreter: programs run in order; rows of one tile are distinct tokens
            out_ref[rows, :] = out_ref[rows, :] + y


def _tpu_kernel(tile_expert_ref, rows_ref, w_ref, x_ref, wg_ref, wu_ref, wd_ref, out_in_ref, out_ref,
                xs_ref, acc_ref, *, block_m: int):
    """Program ``(tile i, hidden chunk c)``; ``wg/wu [H, bi]``, ``wd [bi, H]`` are expert ``e``'s chunk ``c``."""
    del out_in_ref  # aliased to out_ref (zeros)
    i, c = pl.program_id(0), pl.program_id(1)
    e = tile_expert_ref[i]
    base = i * block_m

    @pl.when((e >= 0) & (c == 0))
    def _gather():
        def copy(j, carry):
            r = rows_ref[base + j]
            xs_ref[pl.ds(j, 1), :] = x_ref[pl.ds(r, 1), :]
            return carry
        jax.lax.fori_loop(0, block_m, copy, 0)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(e >= 0)
    def _compute():
        acc_ref[...] += _ffn_chunk(xs_ref[...], wg_ref[...], wu_ref[...], wd_ref[...], xs_ref.dtype)

    @pl.when((e >= 0) & (c == pl.num_programs(1) - 1))
    def _combine():
        def add(j, carry):
            r = rows_ref[base + j]
            out_ref[pl.ds(r, 1), :] += acc_ref[pl.ds(j, 1), :] * w_ref[base + j]
            return carry
        jax.lax.fori_loop(0, block_m, add, 0)


def _call_gpu(args, *, n1, h_pad, i_pad, num_experts, tiles, block_sizes, interpret):
    bm, bi = block_sizes.block_m, block_sizes.block_i
    kernel = functools.partial(_gpu_kernel, block_i=bi, num_chunks=i_pad // bi, atomic=not interpret)
    whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    params = tiling.compiler_params("gpu", interpret)
    return pl.pallas_call(
        kernel,
        grid=(tiles,),
        in_specs=[whole(tiles), pl.BlockSpec((bm,), lambda i: (i,)), pl.BlockSpec((bm,), lambda i: (i,)),
                  whole(n1, h_pad), whole(num_experts, h_pad, i_pad), whole(num_experts, h_pad, i_pad),
                  whole(num_experts, i_pad, h_pad), whole(n1, h_pad)],
        out_specs=whole(n1, h_pad),
        out_shape=jax.ShapeDtypeStruct((n1, h_pad), jnp.float32),
        input_output_aliases={7: 0},
        interpret=interpret,
        compiler_params=params,
        name="moe_ffn_fwd",
    )(*args)


def _call_tpu(args, *, n1, h_pad, i_pad, tiles, block_sizes, interpret, x_dtype, fp):
    from jax.experimental.pallas import tpu as pltpu
    bm, bi = block_sizes.block_m, block_sizes.block_i

    def expert(i, te):
        return jnp.maximum(te[i], 0)  # unused tiles (-1) fetch expert 0 and skip the work

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,  # tile_expert, rows, weights -> SMEM
        grid=(tiles, i_pad // bi),
        in_specs=[pl.BlockSpec((n1, h_pad), lambda i, c, te, r, w: (0, 0)),
                  pl.BlockSpec((None, h_pad, bi), lambda i, c, te, r, w: (expert(i, te), 0, c)),
                  pl.BlockSpec((None, h_pad, bi), lambda i, c, te, r, w: (expert(i, te), 0, c)),
                  pl.BlockSpec((None, bi, h_pad), lambda i, c, te, r, w: (expert(i, te), c, 0)),
                  pl.BlockSpec((n1, h_pad), lambda i, c, te, r, w: (0, 0))],
        out_specs=pl.BlockSpec((n1, h_pad), lambda i, c, te, r, w: (0, 0)),
        scratch_shapes=[pltpu.VMEM((bm, h_pad), x_dtype), pltpu.VMEM((bm, h_pad), jnp.float32)])
    params = None if interpret else pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary"),
                                                         vmem_limit_bytes=fp.vmem_limit_bytes)
    return pl.pallas_call(
        functools.partial(_tpu_kernel, block_m=bm),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((n1, h_pad), jnp.float32),
        input_output_aliases={7: 0},  # operand index counts the scalar-prefetch args
        interpret=interpret,
        compiler_params=params,
        name="moe_ffn_fwd",
    )(*args)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "platform"))
def moe_ffn_fwd(x_pad: jax.Array, layout: ref.TileLayout, w_gate: jax.Array, w_up: jax.Array,
                w_down: jax.Array, *, block_sizes: BlockSizes, interpret: bool,
                platform: str = "gpu") -> jax.Array:
    """Runs the fused kernel.

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
    n1, h = x_pad.shape
    num_experts, _, i_dim = w_gate.shape
    bm = block_sizes.block_m
    tiles = layout.tile_expert.shape[0]
    if layout.rows.shape[0] != tiles * bm:
        raise ValueError(f"moe_ffn: the layout has {layout.rows.shape[0]} rows, expected tiles*block_m = "
                         f"{tiles}*{bm} (build it with block_m={bm})")
    h_pad, i_pad = _padded_dims(platform, h, i_dim, block_sizes.block_i)
    fp = footprint(platform, n1 - 1, h, i_dim, x_pad.dtype, block_sizes)
    if not interpret:
        tiling.require_fit(fp)
    dt = x_pad.dtype
    x_k = jnp.pad(x_pad, ((0, 0), (0, h_pad - h)))  # [N+1, Hp]
    pad_w = lambda w, a, b: jnp.pad(w.astype(dt), ((0, 0), (0, a), (0, b)))  # noqa: E731
    wg = pad_w(w_gate, h_pad - h, i_pad - i_dim)  # [E, Hp, Ip]
    wu = pad_w(w_up, h_pad - h, i_pad - i_dim)  # [E, Hp, Ip]
    wd = pad_w(w_down, i_pad - i_dim, h_pad - h)  # [E, Ip, Hp]
    zeros = jnp.zeros((n1, h_pad), jnp.float32)
    args = (layout.tile_expert, layout.rows, layout.weights, x_k, wg, wu, wd, zeros)
    if platform == "tpu":
        out = _call_tpu(args, n1=n1, h_pad=h_pad, i_pad=i_pad, tiles=tiles, block_sizes=block_sizes,
                        interpret=interpret, x_dtype=dt, fp=fp)
    else:
        out = _call_gpu(args, n1=n1, h_pad=h_pad, i_pad=i_pad, num_experts=num_experts, tiles=tiles,
                        block_sizes=block_sizes, interpret=interpret)
    return out[:, :h]
