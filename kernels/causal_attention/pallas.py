"""Flash attention in Pallas: forward and backward kernels (causal, sliding window, GQA, packed segments).

**Geometry.** Query row ``t`` (its index in the padded sequence) attends to key ``j``, placed at position
``kpos_j = j * stride + offset``, iff ``kpos_j <= t``, ``t - kpos_j < window`` (``window > 0``), ``j <
num_keys`` and the segment ids of the row and the key are equal. Causal attention is ``stride = 1, offset = 0``;
SCOUT segment attention's checkpoints (row ``c_j = (j + 1) L - 1``, seen by queries ``t > c_j``) are
``stride = offset = L`` (``kernels.segment_attention`` uses these backward kernels). From the geometry each query
block knows the range of key blocks any of its rows can see and each key block the range of query blocks that can
see it: **fully masked blocks are outside the loop bounds** (the upper triangle; beyond a sliding window; padding),
not computed and masked.

**Forward** (``flash_fwd``): online softmax in float32 over the visible key blocks, running max / sum / output in
registers (GPU) or VMEM scratch (TPU); returns the normalised output and ``lse = m + log l`` per row. Masks are the
finite ``MASK_VALUE``: a key block that is all masked for a row before any visible key leaves ``p = 1`` entries
that the first visible key's rescale ``exp(MASK_VALUE - m) = 0`` wipes out, so rows end exactly as the dense
reference's softmax (and a row with no visible key, which causal attention cannot have, as its uniform softmax).

**Backward** (``flash_bwd``, FA2): ``delta = rowsum(do * o)`` comes in from the caller, ``P`` is recomputed
blockwise from ``lse`` (``p = exp(s - lse)``, exactly 0 where masked), two kernels:

* dq: one program per (batch, query head, query block) loops over its visible key blocks:
  ``dq += (p * (do v^T - delta)) k``;
* dk/dv: one program per (batch, **kv head**, key block) loops over the ``r = H / G`` query heads of its group and
  their query blocks that see the key block (one flat loop of ``r x`` blocks): ``dv += p^T do``,
  ``dk += ds^T q``, so grouped-query heads are summed in the kernel, never materialised per query head.

Matmul operands are in the input dtype (full precision for float32 inputs), accumulation and softmax float32;
gradients come out float32.

**Two lowerings**, chosen by ``platform``:

* ``"gpu"`` (Triton, ``num_warps``/``num_stages`` from ``tiles.compiler_params``): grid (batch, head, block);
  whole-sequence K/V (or Q/dO) BlockSpecs are pointers and the kernel walks its block range with
  ``lax.fori_loop(lo, hi)``.
* ``"tpu"`` (Mosaic): the loop becomes a fourth, sequential (``"arbitrary"``) grid axis of static length (the
  widest band of any block), whose index maps clamp to the block's range, so a step past the range re-uses the
  previous block (no DMA) and ``pl.when`` skips its compute; accumulators live in VMEM scratch; blocks are
  (8, 128)-aligned (``block_k`` a multiple of 128 or the whole padded length); ``vmem_limit_bytes`` is set from
  the footprint.

Layout (prepared by the callers, ``kernels.causal_attention.ops`` / ``kernels.segment_attention.ops``): head-major
``[B, H, T_q, D]`` queries, ``[B, G, T_k, D]`` keys and values, ``T`` padded to the tiles, ``D`` to a power of two
>= 16 (zeros), segment ids ``[B, T_q, 1]`` / ``[B, 1, T_k]`` int32.

Status: run in the Pallas interpreter (both variants) against the dense reference and lowered for Triton and
Mosaic from a CPU host in the tests; not compiled or run on an accelerator here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import tiles
from kernels.causal_attention.ref import MASK_VALUE

__all__ = ["BlockSizes", "Geometry", "flash_bwd", "flash_fwd", "footprints", "head_major", "token_major"]

_F32 = jnp.float32
_NT = ((1,), (1,))  # a [m, k] . b [n, k] -> [m, n]
_NN = ((1,), (0,))  # a [m, k] . b [k, n] -> [m, n]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (powers of two >= 16): forward kernel ``block_q x block_k``, dq and dk/dv kernels
    ``block_q_bwd x block_k_bwd``."""
    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64

    @classmethod
    def get_default(cls, platform: str = "gpu") -> "BlockSizes":
        """GPU 128 x 64 forward, 64 x 64 backward (Triton, 4 warps, 2 stages: fits 227 KiB of shared memory at
        D = 128 in bf16); TPU 128 x 128 (lane-dense score tiles); CPU interpreter 16 x 16."""
        if platform == "tpu":
            return cls(128, 128, 128, 128)
        if platform == "gpu":
            return cls(128, 64, 64, 64)
        return cls(16, 16, 16, 16)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if not isinstance(val, int) or val < tiles.MIN_TILE or val & (val - 1):
                raise ValueError(f"flash attention: {f.name} must be a power of two >= {tiles.MIN_TILE}, got {val!r}")

    def fit(self, length_q: int, length_k: int) -> "BlockSizes":
        """Shrinks the tiles to the padded problem (powers of two >= 16, so a short sequence is one block)."""
        self.validate()
        pq, pk = tiles.padded_dim(length_q), tiles.padded_dim(max(length_k, 1))
        return BlockSizes(min(self.block_q, pq), min(self.block_k, pk), min(self.block_q_bwd, pq),
                          min(self.block_k_bwd, pk))

    def padded_lengths(self, length_q: int, length_k: int) -> tuple[int, int]:
        """``(T_q, T_k)`` padded to every tile of the forward and backward kernels."""
        return (tiles.round_up(length_q, max(self.block_q, self.block_q_bwd)),
                tiles.round_up(max(length_k, 1), max(self.block_k, self.block_k_bwd)))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Which keys a query row sees (module docstring): ``kpos_j = j * stride + offset <= t``, within ``window``
    (0 = unbounded), ``j < num_keys``."""
    num_keys: int
    stride: int = 1
    offset: int = 0
    window: int = 0

    def key_range(self, q0, bq):
        """``[lo, hi)`` keys visible to any row of ``[q0, q0 + bq)`` (ints or traced scalars)."""
        t_max = q0 + bq - 1
        hi = _min(self.num_keys, _max((t_max - self.offset) // self.stride + 1, 0))
        lo = 0
        if self.window > 0:  # kpos_j > q0 - window
            lo = _max((q0 - self.window - self.offset) // self.stride + 1, 0)
        return lo, hi

    def query_range(self, k0, bk, length_q: int):
        """``[lo, hi)`` query rows (of ``length_q``) that see any key of ``[k0, k0 + bk)``."""
        lo = _min(k0 * self.stride + self.offset, length_q)
        if self.window > 0:
            k_last = _min(k0 + bk, self.num_keys) - 1
            hi = _min(k_last * self.stride + self.offset + self.window, length_q)
        else:
            hi = length_q
        hi = jnp.where(k0 >= self.num_keys, lo, hi) if _traced(k0) else (lo if k0 >= self.num_keys else hi)
        return lo, _max(hi, lo)

    def key_blocks(self, q0, bq, bk):
        lo, hi = self.key_range(q0, bq)
        return lo // bk, _max((hi + bk - 1) // bk, lo // bk)

    def query_blocks(self, k0, bk, bq, length_q: int):
        lo, hi = self.query_range(k0, bk, length_q)
        return lo // bq, _max((hi + bq - 1) // bq, lo // bq)

    def key_band(self, length_q: int, bq: int, bk: int) -> int:
        """Most key blocks any query block visits (the TPU grid's sequential axis)."""
        return max([int(h - l) for l, h in (self.key_blocks(i * bq, bq, bk) for i in range(length_q // bq))] + [1])

    def query_band(self, length_q: int, length_k: int, bq: int, bk: int) -> int:
        """Most query blocks (per query head) any key block is visited by."""
        return max([int(h - l) for l, h in (self.query_blocks(j * bk, bk, bq, length_q)
                                             for j in range(length_k // bk))] + [1])

    def visible(self, q0, k0, bq: int, bk: int, q_seg, k_seg):
        """``[bq, bk]`` visibility of rows ``q0 + i`` to keys ``k0 + j``; segs ``[bq, 1]`` and ``[1, bk]``."""
        t = q0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        j = k0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        kpos = j * self.stride + self.offset
        ok = (kpos <= t) & (j < self.num_keys) & (q_seg == k_seg)
        if self.window > 0:
            ok &= t - kpos < self.window
        return ok


def _traced(x) -> bool:
    return not isinstance(x, int)


def _max(a, b):
    return jnp.maximum(a, b) if (_traced(a) or _traced(b)) else max(a, b)


def _min(a, b):
    return jnp.minimum(a, b) if (_traced(a) or _traced(b)) else min(a, b)


def _clamp_block(lo, hi, step):
    """Block index of sequential step ``step`` over ``[lo, hi)``, clamped into the range (a step past the end
    re-uses the last block: no new DMA on TPU)."""
    return jnp.maximum(jnp.minimum(lo + step, hi - 1), 0)


# ---- block math shared by both lowerings ----------------------------------------------------------------------


def _dot(a, b, dims, mm_dtype):
    precision = jax.lax.Precision.HIGHEST if mm_dtype == _F32 else None
    return jax.lax.dot_general(a.astype(mm_dtype), b.astype(mm_dtype), (dims, ((), ())), precision=precision,
                               preferred_element_type=_F32)


def _fwd_block(q, k, v, ok, m, l, acc, *, scale, mm_dtype):
    """One key block of the online softmax: ``(m, l, acc)`` ``[bq, 1], [bq, 1], [bq, D]`` updated."""
    s = jnp.where(ok, _dot(q, k, _NT, mm_dtype) * scale, MASK_VALUE)  # [bq, bk]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    return m_new, l, alpha * acc + _dot(p, v, _NN, mm_dtype)


def _probs(q, k, ok, lse, *, scale, mm_dtype):
    s = jnp.where(ok, _dot(q, k, _NT, mm_dtype) * scale, MASK_VALUE)
    return jnp.exp(s - lse)  # [bq, bk], exactly 0 where masked


def _dq_block(q, do, lse, delta, k, v, ok, dq, *, scale, mm_dtype):
    p = _probs(q, k, ok, lse, scale=scale, mm_dtype=mm_dtype)
    ds = p * (_dot(do, v, _NT, mm_dtype) - delta)  # [bq, bk]
    return dq + _dot(ds, k, _NN, mm_dtype)  # [bq, D] (times scale at the end)


def _dkdv_block(q, do, lse, delta, k, v, ok, dk, dv, *, scale, mm_dtype):
    p = _probs(q, k, ok, lse, scale=scale, mm_dtype=mm_dtype)
    dv = dv + _dot(p.T, do, _NN, mm_dtype)  # [bk, D] (an explicit transpose, as Mosaic's own flash kernel does)
    ds = p * (_dot(do, v, _NT, mm_dtype) - delta)
    return dk + _dot(ds.T, q, _NN, mm_dtype), dv  # dk times scale at the end


# ---- GPU (Triton): grid (batch, head, block), block ranges walked by fori_loop --------------------------------


def _fwd_gpu(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, geo, scale, bq, bk, mm_dtype):
    """Refs: q/o ``[bq, D]``, k/v ``[T_k, D]``, qseg ``[bq, 1]``, kseg ``[1, T_k]``, lse ``[bq, 1]``."""
    q0 = pl.program_id(2) * bq
    q, q_seg = q_ref[...], qseg_ref[...]
    lo, hi = geo.key_blocks(q0, bq, bk)

    def body(kb, carry):
        k0 = pl.multiple_of(kb * bk, bk)
        ok = geo.visible(q0, k0, bq, bk, q_seg, kseg_ref[:, pl.ds(k0, bk)])
        return _fwd_block(q, k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :], ok, *carry, scale=scale,
                          mm_dtype=mm_dtype)

    init = (jnp.full((bq, 1), MASK_VALUE, _F32), jnp.zeros((bq, 1), _F32), jnp.zeros(q.shape, _F32))
    m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    l = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_gpu(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, dq_ref, *, geo, scale, bq, bk,
            mm_dtype):
    """Refs: q/do/dq ``[bq, D]``, lse/delta/qseg ``[bq, 1]``, k/v ``[T_k, D]``, kseg ``[1, T_k]``."""
    q0 = pl.program_id(2) * bq
    q, do, lse, delta, q_seg = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], qseg_ref[...]
    lo, hi = geo.key_blocks(q0, bq, bk)

    def body(kb, dq):
        k0 = pl.multiple_of(kb * bk, bk)
        ok = geo.visible(q0, k0, bq, bk, q_seg, kseg_ref[:, pl.ds(k0, bk)])
        return _dq_block(q, do, lse, delta, k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :], ok, dq,
                         scale=scale, mm_dtype=mm_dtype)

    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, _F32))
    dq_ref[...] = dq * scale


def _dkdv_gpu(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, dk_ref, dv_ref, *, geo, scale,
              bq, bk, rep, length_q, mm_dtype):
    """Refs: q/do ``[r * T_q, D]`` (the group's query heads stacked), lse/delta ``[r * T_q, 1]``, qseg ``[T_q, 1]``,
    k/v/dk/dv ``[bk, D]``, kseg ``[1, bk]``."""
    k0 = pl.program_id(2) * bk
    k, v, k_seg = k_ref[...], v_ref[...], kseg_ref[...]
    lo, hi = geo.query_blocks(k0, bk, bq, length_q)
    n = hi - lo
    n_safe = jnp.maximum(n, 1)

    def body(idx, carry):
        head, qb = idx // n_safe, lo + idx % n_safe
        q0 = pl.multiple_of(qb * bq, bq)
        row = pl.multiple_of(head * length_q + q0, bq)
        ok = geo.visible(q0, k0, bq, bk, qseg_ref[pl.ds(q0, bq), :], k_seg)
        return _dkdv_block(q_ref[pl.ds(row, bq), :], do_ref[pl.ds(row, bq), :], lse_ref[pl.ds(row, bq), :],
                           delta_ref[pl.ds(row, bq), :], k, v, ok, *carry, scale=scale, mm_dtype=mm_dtype)

    zeros = jnp.zeros(k.shape, _F32)
    dk, dv = jax.lax.fori_loop(0, rep * n, body, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


# ---- TPU (Mosaic): the block range is a sequential grid axis, accumulators in VMEM scratch ----------------------


def _fwd_tpu(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, geo, scale, bq, bk,
             mm_dtype):
    """Program (b, h, query block i, step j): key block ``lo(i) + j`` while inside ``[lo(i), hi(i))``."""
    q0, step = pl.program_id(2) * bq, pl.program_id(3)
    lo, hi = geo.key_blocks(q0, bq, bk)

    @pl.when(step == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when(lo + step < hi)
    def _compute():
        ok = geo.visible(q0, (lo + step) * bk, bq, bk, qseg_ref[...], kseg_ref[...])
        m, l, acc = _fwd_block(q_ref[...], k_ref[...], v_ref[...], ok, m_sc[...], l_sc[...], acc_sc[...],
                               scale=scale, mm_dtype=mm_dtype)
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(step == pl.num_programs(3) - 1)
    def _final():
        l = l_sc[...]
        l = jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l)


def _dq_tpu(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, dq_ref, dq_sc, *, geo, scale, bq,
            bk, mm_dtype):
    q0, step = pl.program_id(2) * bq, pl.program_id(3)
    lo, hi = geo.key_blocks(q0, bq, bk)

    @pl.when(step == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    @pl.when(lo + step < hi)
    def _compute():
        ok = geo.visible(q0, (lo + step) * bk, bq, bk, qseg_ref[...], kseg_ref[...])
        dq_sc[...] = _dq_block(q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], k_ref[...], v_ref[...], ok,
                               dq_sc[...], scale=scale, mm_dtype=mm_dtype)

    @pl.when(step == pl.num_programs(3) - 1)
    def _final():
        dq_ref[...] = dq_sc[...] * scale


def _dkdv_tpu(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc, *,
              geo, scale, bq, bk, band, length_q, mm_dtype):
    """Program (b, g, key block j, step s): query head ``s // band`` of the group, query block
    ``lo(j) + s % band`` while inside ``[lo(j), hi(j))``."""
    k0, step = pl.program_id(2) * bk, pl.program_id(3)
    lo, hi = geo.query_blocks(k0, bk, bq, length_q)
    qb = lo + step % band

    @pl.when(step == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    @pl.when(qb < hi)
    def _compute():
        ok = geo.visible(qb * bq, k0, bq, bk, qseg_ref[...], kseg_ref[...])
        dk, dv = _dkdv_block(q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], k_ref[...], v_ref[...], ok,
                             dk_sc[...], dv_sc[...], scale=scale, mm_dtype=mm_dtype)
        dk_sc[...], dv_sc[...] = dk, dv

    @pl.when(step == pl.num_programs(3) - 1)
    def _final():
        dk_ref[...] = dk_sc[...] * scale
        dv_ref[...] = dv_sc[...]


# ---- footprints -------------------------------------------------------------------------------------------------


def footprints(platform: str, dim: int, dtype, block_sizes: BlockSizes, *, name: str = "flash_attention",
               kinds: tuple[str, ...] = ("fwd", "dq", "dkdv")) -> dict[str, tiles.Footprint]:
    """On-chip bytes of one program of each kernel in ``kinds`` (``"fwd"``, ``"dq"``, ``"dkdv"``; computed and
    recorded by ``kernels.tiles``) at fitted tiles and padded head dim ``dim``."""
    bq, bk, bqb, bkb = block_sizes.block_q, block_sizes.block_k, block_sizes.block_q_bwd, block_sizes.block_k_bwd
    d, f32, i32 = dim, _F32, jnp.int32
    q_tile, k_tile, qb_tile, kb_tile = ((bq, d), dtype), ((bk, d), dtype), ((bqb, d), dtype), ((bkb, d), dtype)
    if platform == "tpu":  # double-buffered BlockSpec windows + VMEM scratch + the body's temporaries
        col, col_b = ((bq, 1), f32), ((bqb, 1), f32)
        models = {
            "fwd": lambda: tiles.tpu_footprint(
                f"{name}_fwd", [q_tile, k_tile, k_tile, ((bq, 1), i32), ((1, bk), i32), q_tile, col],
                scratch=[col, col, ((bq, d), f32)], temporaries=[((bq, bk), f32)] * 3 + [((bq, d), f32)]),
            "dq": lambda: tiles.tpu_footprint(
                f"{name}_dq", [qb_tile, qb_tile, col_b, col_b, ((bqb, 1), i32), kb_tile, kb_tile, ((1, bkb), i32),
                               ((bqb, d), f32)],
                scratch=[((bqb, d), f32)], temporaries=[((bqb, bkb), f32)] * 4 + [((bqb, d), f32)]),
            "dkdv": lambda: tiles.tpu_footprint(
                f"{name}_dkdv", [qb_tile, qb_tile, col_b, col_b, ((bqb, 1), i32), kb_tile, kb_tile, ((1, bkb), i32),
                                 ((bkb, d), f32), ((bkb, d), f32)],
                scratch=[((bkb, d), f32)] * 2, temporaries=[((bqb, bkb), f32)] * 4 + [((bkb, d), f32)] * 2),
        }
    else:  # tl.dot operand tiles (staged in shared memory) and live accumulators / score tiles (registers)
        models = {
            "fwd": lambda: tiles.gpu_footprint(
                f"{name}_fwd", [q_tile, k_tile, ((bq, bk), dtype), k_tile],
                live=[((bq, d), f32), ((bq, bk), f32), q_tile]),
            "dq": lambda: tiles.gpu_footprint(
                f"{name}_dq", [qb_tile, kb_tile, qb_tile, kb_tile, ((bqb, bkb), dtype)],
                live=[((bqb, d), f32), ((bqb, bkb), f32), ((bqb, bkb), f32), qb_tile, qb_tile]),
            "dkdv": lambda: tiles.gpu_footprint(
                f"{name}_dkdv", [qb_tile, kb_tile, ((bkb, bqb), dtype), qb_tile, kb_tile, ((bkb, bqb), dtype)],
                live=[((bkb, d), f32)] * 2 + [((bqb, bkb), f32)] * 2 + [kb_tile] * 2),
        }
    return {kind: models[kind]() for kind in kinds}


def tpu_alignment_reason(length_k: int, block_sizes: BlockSizes) -> str | None:
    """Mosaic needs key tiles that are multiples of 128 lanes (the ``[1, block_k]`` segment-id block) unless one
    tile holds the whole padded key sequence."""
    for field in ("block_k", "block_k_bwd"):
        bk = getattr(block_sizes, field)
        if bk % tiles.LANES and bk < length_k:
            return f"{field}={bk} is not a multiple of {tiles.LANES} and does not cover the {length_k} keys (TPU)"
    return None


# ---- wrappers ---------------------------------------------------------------------------------------------------


def head_major(x: jax.Array, rows: int, dim: int) -> jax.Array:
    """``[B, T, heads, D]`` -> ``[B, heads, rows, dim]``, zero padded (the kernels' layout)."""
    return jnp.transpose(tiles.pad_axis(tiles.pad_axis(x, 3, dim), 1, rows), (0, 2, 1, 3))


def token_major(x: jax.Array, length: int, dim: int) -> jax.Array:
    """Inverse of ``head_major``: ``[B, heads, rows, dim]`` -> ``[B, length, heads, dim]``."""
    return jnp.transpose(x, (0, 2, 1, 3))[:, :length, :, :dim]


def _tpu_key_specs(geometry: Geometry, bq: int, bk: int, rep: int, dim: int):
    """BlockSpecs of k/v and the key segment ids for a (b, head, query block i, step j) TPU grid: key block
    ``lo(i) + j`` clamped into the query block's range (``_clamp_block``)."""

    def block(i, j):
        lo, hi = geometry.key_blocks(i * bq, bq, bk)
        return _clamp_block(lo, hi, j)

    return (pl.BlockSpec((None, None, bk, dim), lambda b, h, i, j: (b, h // rep, block(i, j), 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, block(i, j))))


def _check(q, k, block_sizes, platform, interpret, name, kinds):
    _, heads, length_q, dim = q.shape
    groups, length_k = k.shape[1], k.shape[2]
    bs = block_sizes
    if heads % groups:
        raise ValueError(f"flash attention: {groups} kv heads must divide {heads} query heads")
    if length_q % max(bs.block_q, bs.block_q_bwd) or length_k % max(bs.block_k, bs.block_k_bwd):
        raise ValueError(f"flash attention: padded lengths T_q={length_q} / T_k={length_k} must be multiples of "
                         f"the tiles {bs}")
    if platform == "tpu" and not interpret:
        reason = tpu_alignment_reason(length_k, bs)
        if reason:
            raise ValueError(f"flash attention: {reason}")
    fps = footprints(platform, dim, q.dtype, bs, name=name, kinds=kinds)
    if not interpret:
        for fp in fps.values():
            tiles.require_fit(fp)
    return fps


def _mm_dtype(dtype):
    return _F32 if dtype == _F32 else dtype


@functools.partial(jax.jit, static_argnames=("geometry", "scale", "block_sizes", "interpret", "platform", "name"))
def flash_fwd(q, k, v, q_seg, k_seg, *, geometry: Geometry, scale: float, block_sizes: BlockSizes,
              interpret: bool, platform: str = "gpu", name: str = "flash_attention"):
    """Forward kernel on prepared arrays.

    Args:
      q: ``[B, H, T_q, D]``; ``T_q`` a multiple of the query tiles, ``D`` a power of two >= 16.
      k: ``[B, G, T_k, D]`` (``H % G == 0``; query head ``h`` reads kv head ``h // (H // G)``).
      v: ``[B, G, T_k, D]``.
      q_seg: ``[B, T_q, 1]`` int32 segment ids of the rows.
      k_seg: ``[B, 1, T_k]`` int32 segment ids of the keys.
      geometry: which keys each row sees (``Geometry``).
      scale: score scale.
      block_sizes: fitted tiles (``BlockSizes.fit``).
      interpret: run the Pallas interpreter (CPU).
      platform: ``"gpu"`` (Triton variant) or ``"tpu"`` (Mosaic variant); both run under ``interpret``.
      name: kernel name prefix (``<name>_fwd``).

    Returns:
      ``(o, lse)``: ``[B, H, T_q, D]`` in ``q.dtype``, ``[B, H, T_q, 1]`` float32.
    """
    batch, heads, length_q, dim = q.shape
    groups, length_k = k.shape[1], k.shape[2]
    rep = heads // groups
    fps = _check(q, k, block_sizes, platform, interpret, name, ("fwd",))
    bq, bk = block_sizes.block_q, block_sizes.block_k
    kw = dict(geo=geometry, scale=float(scale), bq=bq, bk=bk, mm_dtype=_mm_dtype(q.dtype))
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, length_q, 1), _F32)]
    params = tiles.compiler_params(platform, interpret, footprint=fps["fwd"],
                                   dimension_semantics=("parallel",) * 3 + ("arbitrary",))
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        band = geometry.key_band(length_q, bq, bk)
        kv_blk, kseg_blk = _tpu_key_specs(geometry, bq, bk, rep, dim)

        q_blk = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j: (b, h, i, 0))
        return pl.pallas_call(
            functools.partial(_fwd_tpu, **kw),
            grid=(batch, heads, length_q // bq, band),
            in_specs=[q_blk, kv_blk, kv_blk, pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
                      kseg_blk],
            out_specs=[q_blk, pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))],
            out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, dim), _F32)],
            interpret=interpret, compiler_params=params, name=f"{name}_fwd",
        )(q, k, v, q_seg, k_seg)
    q_blk = pl.BlockSpec((None, None, bq, dim), lambda b, h, i: (b, h, i, 0))
    kv_all = pl.BlockSpec((None, None, length_k, dim), lambda b, h, i: (b, h // rep, 0, 0))
    return pl.pallas_call(
        functools.partial(_fwd_gpu, **kw),
        grid=(batch, heads, length_q // bq),
        in_specs=[q_blk, kv_all, kv_all, pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
                  pl.BlockSpec((None, 1, length_k), lambda b, h, i: (b, 0, 0))],
        out_specs=[q_blk, pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
        out_shape=out_shape, interpret=interpret,
        compiler_params=tiles.compiler_params(platform, interpret, footprint=fps["fwd"]), name=f"{name}_fwd",
    )(q, k, v, q_seg, k_seg)


@functools.partial(jax.jit, static_argnames=("geometry", "scale", "block_sizes", "interpret", "platform", "name"))
def flash_bwd(q, k, v, q_seg, k_seg, lse, delta, do, *, geometry: Geometry, scale: float, block_sizes: BlockSizes,
              interpret: bool, platform: str = "gpu", name: str = "flash_attention"):
    """Backward kernels on prepared arrays (``flash_fwd``'s arguments plus):

    Args:
      lse: ``[B, H, T_q, 1]`` float32 log-sum-exp of each row's scaled scores over everything it attends to (for
        segment attention that includes the self term handled outside).
      delta: ``[B, H, T_q, 1]`` float32 ``rowsum(do * o)`` of the full output.
      do: ``[B, H, T_q, D]`` output cotangent (padded rows zero).

    Returns:
      ``(dq, dk, dv)`` float32: ``[B, H, T_q, D]``, ``[B, G, T_k, D]``, ``[B, G, T_k, D]`` (the keys' part only).
    """
    batch, heads, length_q, dim = q.shape
    groups, length_k = k.shape[1], k.shape[2]
    rep = heads // groups
    fps = _check(q, k, block_sizes, platform, interpret, name, ("dq", "dkdv"))
    bq, bk = block_sizes.block_q_bwd, block_sizes.block_k_bwd  # dq kernel
    bqb, bkb = bq, bk  # dk/dv kernel
    mm = _mm_dtype(q.dtype)
    do = do.astype(q.dtype)
    lse_s, delta_s = lse.astype(_F32), delta.astype(_F32)
    # dk/dv kernel: the group's query heads stacked along rows (a free reshape of the head-major layout).
    qg, dog = q.reshape(batch, groups, rep * length_q, dim), do.reshape(batch, groups, rep * length_q, dim)
    lseg, deltag = lse_s.reshape(batch, groups, rep * length_q, 1), delta_s.reshape(batch, groups, rep * length_q, 1)
    dq_shape = jax.ShapeDtypeStruct(q.shape, _F32)
    dkv_shape = [jax.ShapeDtypeStruct(k.shape, _F32)] * 2
    semantics = ("parallel",) * 3 + ("arbitrary",)
    dq_params = tiles.compiler_params(platform, interpret, footprint=fps["dq"], dimension_semantics=semantics)
    dkv_params = tiles.compiler_params(platform, interpret, footprint=fps["dkdv"], dimension_semantics=semantics)
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        kband = geometry.key_band(length_q, bq, bk)
        kv_blk, kseg_blk = _tpu_key_specs(geometry, bq, bk, rep, dim)

        q_blk = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j: (b, h, i, 0))
        col_blk = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
        dq = pl.pallas_call(
            functools.partial(_dq_tpu, geo=geometry, scale=float(scale), bq=bq, bk=bk, mm_dtype=mm),
            grid=(batch, heads, length_q // bq, kband),
            in_specs=[q_blk, q_blk, col_blk, col_blk, pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
                      kv_blk, kv_blk, kseg_blk],
            out_specs=q_blk, out_shape=dq_shape, scratch_shapes=[pltpu.VMEM((bq, dim), _F32)],
            interpret=interpret, compiler_params=dq_params, name=f"{name}_dq",
        )(q, do, lse_s, delta_s, q_seg, k, v, k_seg)

        qband = geometry.query_band(length_q, length_k, bqb, bkb)
        nq = length_q // bqb

        def q_block(j, s):
            lo, hi = geometry.query_blocks(j * bkb, bkb, bqb, length_q)
            return _clamp_block(lo, hi, s % qband)

        rows = pl.BlockSpec((None, None, bqb, dim), lambda b, g, j, s: (b, g, (s // qband) * nq + q_block(j, s), 0))
        rcol = pl.BlockSpec((None, None, bqb, 1), lambda b, g, j, s: (b, g, (s // qband) * nq + q_block(j, s), 0))
        k_blk = pl.BlockSpec((None, None, bkb, dim), lambda b, g, j, s: (b, g, j, 0))
        dk, dv = pl.pallas_call(
            functools.partial(_dkdv_tpu, geo=geometry, scale=float(scale), bq=bqb, bk=bkb, band=qband,
                              length_q=length_q, mm_dtype=mm),
            grid=(batch, groups, length_k // bkb, rep * qband),
            in_specs=[rows, rows, rcol, rcol, pl.BlockSpec((None, bqb, 1), lambda b, g, j, s: (b, q_block(j, s), 0)),
                      k_blk, k_blk, pl.BlockSpec((None, 1, bkb), lambda b, g, j, s: (b, 0, j))],
            out_specs=[k_blk, k_blk], out_shape=dkv_shape,
            scratch_shapes=[pltpu.VMEM((bkb, dim), _F32), pltpu.VMEM((bkb, dim), _F32)],
            interpret=interpret, compiler_params=dkv_params, name=f"{name}_dkdv",
        )(qg, dog, lseg, deltag, q_seg, k, v, k_seg)
        return dq, dk, dv

    q_blk = pl.BlockSpec((None, None, bq, dim), lambda b, h, i: (b, h, i, 0))
    col_blk = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    kv_all = pl.BlockSpec((None, None, length_k, dim), lambda b, h, i: (b, h // rep, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_gpu, geo=geometry, scale=float(scale), bq=bq, bk=bk, mm_dtype=mm),
        grid=(batch, heads, length_q // bq),
        in_specs=[q_blk, q_blk, col_blk, col_blk, pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
                  kv_all, kv_all, pl.BlockSpec((None, 1, length_k), lambda b, h, i: (b, 0, 0))],
        out_specs=q_blk, out_shape=dq_shape, interpret=interpret,
        compiler_params=tiles.compiler_params(platform, interpret, footprint=fps["dq"]), name=f"{name}_dq",
    )(q, do, lse_s, delta_s, q_seg, k, v, k_seg)
    rows = pl.BlockSpec((None, None, rep * length_q, dim), lambda b, g, j: (b, g, 0, 0))
    rcol = pl.BlockSpec((None, None, rep * length_q, 1), lambda b, g, j: (b, g, 0, 0))
    k_blk = pl.BlockSpec((None, None, bkb, dim), lambda b, g, j: (b, g, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_gpu, geo=geometry, scale=float(scale), bq=bqb, bk=bkb, rep=rep, length_q=length_q,
                          mm_dtype=mm),
        grid=(batch, groups, length_k // bkb),
        in_specs=[rows, rows, rcol, rcol, pl.BlockSpec((None, length_q, 1), lambda b, g, j: (b, 0, 0)),
                  k_blk, k_blk, pl.BlockSpec((None, 1, bkb), lambda b, g, j: (b, 0, j))],
        out_specs=[k_blk, k_blk], out_shape=dkv_shape, interpret=interpret,
        compiler_params=tiles.compiler_params(platform, interpret, footprint=fps["dkdv"]), name=f"{name}_dkdv",
    )(qg, dog, lseg, deltag, q_seg, k, v, k_seg)
    return dq, dk, dv
