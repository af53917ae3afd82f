"""Pallas forward kernels for the Mamba scans (forward only; ops.py takes the backward from ref).

Two block-spec variants per kernel share the math (``_s6_step``, ``_ssd_chunk``):

* GPU (Triton, ``platform="gpu"``): grid (batch, channel blocks) / (batch, heads); each program walks the
  whole sequence inside the kernel (``fori_loop``), carrying its state in registers, so the [t, d, n] state
  sequence never touches memory. Triton parameters are passed explicitly (without them ``pallas_call`` on GPU
  takes Mosaic GPU, which rejects these kernels: "multiple of 128 elements", "async_copy ... 16 bytes").
* TPU (Mosaic, ``platform="tpu"``): the time axis is a sequential ("arbitrary") grid axis of time blocks /
  chunks, the state sits in VMEM scratch, every block is (8, 128)-aligned or full-extent, no dynamic lane
  slice is taken (a token's B/C column comes from a masked lane reduction), and ``vmem_limit_bytes`` is set
  from the footprint (``kernels.tiles``).

Both kernels compute in float32. The wrappers transpose to kernel-friendly layouts and back.

Status: run on CPU through the Pallas interpreter (both variants) and lowered for Triton and Mosaic in the
tests; not yet compiled or run on an accelerator here.

Shape legend as in ref.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import tiles

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the selective-scan kernel.

    Attributes:
      block_d: channels per program; must divide D_in (on TPU a multiple of 128, or all of D_in).
      block_t: tokens per time block of the TPU variant (a multiple of 8; the sequence is padded to it).
    """

    block_d: int
    block_t: int = 128

    @classmethod
    def get_default(cls, d_in: int, platform: str = "gpu") -> "BlockSizes":
        """GPU: the largest power of two <= 64 dividing ``d_in``. TPU: the largest of 512/256/128 dividing
        ``d_in`` (lane-dense), else all of ``d_in``."""
        choices = (512, 256, 128) if platform == "tpu" else (64, 32, 16, 8, 4, 2)
        for bd in choices:
            if d_in % bd == 0:
                return cls(block_d=bd)
        return cls(block_d=d_in)


_STAGES = 2  # Triton software-pipelining depth


# ----------------------------------------------------------------------------------------------
# Mamba-1 selective scan.
# ----------------------------------------------------------------------------------------------


def _s6_step(s, u, dt, b_col, c_col, keep, a_t, d_skip):
    """One token of S6 on a [n, bd] state: u/dt/d_skip [1, bd], b_col/c_col [n, 1], keep [1, 1]."""
    s = jnp.exp(dt * a_t) * (s * keep) + (dt * u) * b_col  # [n, bd]
    y = jnp.sum(s * c_col, axis=0, keepdims=True) + d_skip * u  # [1, bd]
    return s, y


def _selective_scan_kernel(u_ref, dt_ref, at_ref, bt_ref, ct_ref, d_ref, s0_ref, keep_ref,
                           y_ref, s_ref, *, seq_len: int):
    """GPU (Triton): one (batch row, channel block) walks the whole sequence; state [n, block_d]."""
    a_t = at_ref[...].astype(_F32)  # [n, bd]
    d_skip = d_ref[...].astype(_F32)  # [1, bd]

    def body(i, s):
        s, y = _s6_step(s, u_ref[0, pl.ds(i, 1), :].astype(_F32), dt_ref[0, pl.ds(i, 1), :].astype(_F32),
                        bt_ref[0, :, pl.ds(i, 1)].astype(_F32), ct_ref[0, :, pl.ds(i, 1)].astype(_F32),
                        keep_ref[0, :, pl.ds(i, 1)], a_t, d_skip)
        y_ref[0, pl.ds(i, 1), :] = y.astype(y_ref.dtype)
        return s

    s = lax.fori_loop(0, seq_len, body, s0_ref[0, :, :].astype(_F32))
    s_ref[0, :, :] = s


def _selective_scan_tpu_kernel(u_ref, dt_ref, at_ref, bt_ref, ct_ref, d_ref, s0_ref, keep_ref,
                               y_ref, s_ref, state_ref, *, block_t: int):
    """TPU (Mosaic): program (batch row, channel block, time block); the [n, block_d] state lives in VMEM
    scratch across the sequential time axis. Token rows are dynamic sublane loads/stores; the token's B/C
    column is taken from the lane-major [n, block_t] block by a masked lane reduction (no dynamic lane slice).
    """
    tb = pl.program_id(2)

    @pl.when(tb == 0)
    def _init():
        state_ref[...] = s0_ref[...]

    a_t = at_ref[...]  # [n, bd] f32
    d_skip = d_ref[...]  # [1, bd] f32
    bt = bt_ref[...].astype(_F32)  # [n, tc]
    ct = ct_ref[...].astype(_F32)  # [n, tc]
    keep = keep_ref[...]  # [1, tc]
    lane = lax.broadcasted_iota(jnp.int32, (1, block_t), 1)

    def body(j, s):
        sel = lane == j  # [1, tc]
        b_col = jnp.sum(jnp.where(sel, bt, 0.0), axis=1, keepdims=True)  # [n, 1]
        c_col = jnp.sum(jnp.where(sel, ct, 0.0), axis=1, keepdims=True)  # [n, 1]
        k = jnp.sum(jnp.where(sel, keep, 0.0), axis=1, keepdims=True)  # [1, 1]
        s, y = _s6_step(s, u_ref[pl.ds(j, 1), :], dt_ref[pl.ds(j, 1), :], b_col, c_col, k, a_t, d_skip)
        y_ref[pl.ds(j, 1), :] = y
        return s

    s = lax.fori_loop(0, block_t, body, state_ref[...])
    state_ref[...] = s

    @pl.when(tb == pl.num_programs(2) - 1)
    def _final():
        s_ref[...] = s


def selective_scan_footprint(platform: str, t: int, d: int, n: int, dtype, bs: BlockSizes) -> tiles.Footprint:
    """On-chip bytes of one selective-scan program (see ``kernels.tiles``)."""
    bd = bs.block_d
    if platform == "tpu":
        tc = min(bs.block_t, tiles.round_up(t, 8))
        f32 = _F32
        return tiles.tpu_footprint(
            "mamba_selective_scan_fwd",
            [((tc, bd), f32), ((tc, bd), f32), ((n, bd), f32), ((n, tc), dtype), ((n, tc), dtype),
             ((1, bd), f32), ((n, bd), f32), ((1, tc), f32), ((tc, bd), f32), ((n, bd), f32)],
            scratch=[((n, bd), f32)], temporaries=[((n, bd), f32)] * 3 + [((n, tc), f32)] * 2)
    return tiles.gpu_footprint("mamba_selective_scan_fwd", [],
                               live=[((n, bd), _F32)] * 3 + [((1, bd), _F32)] * 4, num_stages=_STAGES)


def selective_scan_fwd(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                       D: jax.Array, initial_state: jax.Array, resets: jax.Array, *,
                       block_sizes: BlockSizes | None = None, interpret: bool = False,
                       platform: str = "gpu") -> tuple[jax.Array, jax.Array]:
    """S6 selective scan forward as one ``pallas_call``.

    Args:
      u, delta: [b, t, d].
      A: [d, n].
      B, C: [b, t, n].
      D: [d].
      initial_state: [b, d, n].
      resets: [b, t] float, 1.0 where the state is zeroed before token t.
      block_sizes: channel (and TPU time) block; ``BlockSizes.get_default(d, platform)`` when None.
      interpret: run the kernel with the Pallas interpreter.
      platform: kernel variant, ``"gpu"`` (Triton: whole sequence per program) or ``"tpu"`` (Mosaic: a
        sequential time-block grid axis, state in VMEM scratch).

    Returns:
      (y [b, t, d] in u.dtype, final_state [b, d, n] float32).
    """
    b, t, d = u.shape
    n = A.shape[1]
    bs = block_sizes or BlockSizes.get_default(d, platform)
    if d % bs.block_d:
        raise ValueError(f"selective_scan: block_d={bs.block_d} must divide D_in={d}")
    bd = bs.block_d
    fp = selective_scan_footprint(platform, t, d, n, B.dtype, bs)
    if not interpret:
        tiles.require_fit(fp)
    a_t = A.astype(_F32).T  # [n, d]
    d_row = D.astype(_F32).reshape(1, d)  # [1, d]
    s0_t = jnp.swapaxes(initial_state.astype(_F32), 1, 2)  # [b, n, d]
    keep = (1.0 - resets.astype(_F32)).reshape(b, 1, t)  # [b, 1, t]
    if platform == "tpu":
        tc = min(bs.block_t, tiles.round_up(t, 8))
        tp = tiles.round_up(t, tc)
        # Padded tokens have dt = 0 and u = 0: exp(0) = 1 keeps the state, no write -> exact.
        pad = lambda z, axis: tiles.pad_axis(z, axis, tp)  # noqa: E731
        u_k, dt_k = pad(u.astype(_F32), 1), pad(delta.astype(_F32), 1)  # [b, tp, d]
        b_t, c_t = pad(jnp.swapaxes(B, 1, 2), 2), pad(jnp.swapaxes(C, 1, 2), 2)  # [b, n, tp]
        keep_k = 1.0 - pad(1.0 - keep, 2)  # padded tokens keep the state
        seq = pl.BlockSpec((None, tc, bd), lambda i, j, c: (i, c, j))
        proj = pl.BlockSpec((None, n, tc), lambda i, j, c: (i, 0, c))
        state = pl.BlockSpec((None, n, bd), lambda i, j, c: (i, 0, j))
        from jax.experimental.pallas import tpu as pltpu
        y, s_t = pl.pallas_call(
            functools.partial(_selective_scan_tpu_kernel, block_t=tc),
            out_shape=(jax.ShapeDtypeStruct((b, tp, d), _F32), jax.ShapeDtypeStruct((b, n, d), _F32)),
            grid=(b, d // bd, tp // tc),
            in_specs=[seq, seq, pl.BlockSpec((n, bd), lambda i, j, c: (0, j)), proj, proj,
                      pl.BlockSpec((1, bd), lambda i, j, c: (0, j)), state,
                      pl.BlockSpec((None, 1, tc), lambda i, j, c: (i, 0, c))],
            out_specs=(seq, state),
            scratch_shapes=[pltpu.VMEM((n, bd), _F32)],
            interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp,
                                                  dimension_semantics=("parallel", "parallel", "arbitrary")),
            name="mamba_selective_scan_fwd",
        )(u_k, dt_k, a_t, b_t, c_t, d_row, s0_t, keep_k)
        return y[:, :t].astype(u.dtype), jnp.swapaxes(s_t, 1, 2)

    b_t = jnp.swapaxes(B, 1, 2)  # [b, n, t]
    c_t = jnp.swapaxes(C, 1, 2)  # [b, n, t]
    seq_spec = pl.BlockSpec((1, t, bd), lambda i, j: (i, 0, j))
    proj_spec = pl.BlockSpec((1, n, t), lambda i, j: (i, 0, 0))
    state_spec = pl.BlockSpec((1, n, bd), lambda i, j: (i, 0, j))
    y, s_t = pl.pallas_call(
        functools.partial(_selective_scan_kernel, seq_len=t),
        out_shape=(jax.ShapeDtypeStruct((b, t, d), u.dtype),
                   jax.ShapeDtypeStruct((b, n, d), _F32)),
        grid=(b, d // bd),
        in_specs=[
            seq_spec,  # u
            seq_spec,  # delta
            pl.BlockSpec((n, bd), lambda i, j: (0, j)),  # A^T
            proj_spec,  # B^T
            proj_spec,  # C^T
            pl.BlockSpec((1, bd), lambda i, j: (0, j)),  # D
            state_spec,  # initial state^T
            pl.BlockSpec((1, 1, t), lambda i, j: (i, 0, 0)),  # keep
        ],
        out_specs=(seq_spec, state_spec),
        interpret=interpret,
        compiler_params=tiles.compiler_params(platform, interpret, num_stages=_STAGES),
        name="mamba_selective_scan_fwd",
    )(u, delta, a_t, b_t, c_t, d_row, s0_t, keep)
    return y, jnp.swapaxes(s_t, 1, 2)  # final state: [b, n, d] -> [b, d, n]


# ----------------------------------------------------------------------------------------------
# Mamba-2 SSD.
# ----------------------------------------------------------------------------------------------


def _ssd_chunk(s, x, dt_col, dt_row, bm, cm, same, in_ok, out_ok, a, d_skip):
    """One chunk of SSD on a [p, n] state. x [q, p]; dt_col [q, 1]; dt_row [1, q]; bm/cm [q, n];
    same [q, q] bool (same segment); in_ok/out_ok [q, 1]; a/d_skip [1, 1]. Returns (y [q, p], new state)."""
    q = x.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (q, q), 0)  # i (query / later position)
    col = lax.broadcasted_iota(jnp.int32, (q, q), 1)  # j (key / earlier position)
    incl = (col <= row).astype(_F32)  # [q, q]
    da_col = dt_col * a  # [q, 1]
    da_row = dt_row * a  # [1, q]
    # Stable segsum: seg[i, j] = sum_k [k <= i] * [k > j] * dA_k, a masked cumsum as a matmul.
    strict_da = jnp.where(row > col, da_col, 0.0)  # [q(k), q(j)]
    seg = jnp.dot(incl, strict_da, precision=_HI, preferred_element_type=_F32)  # [q, q]
    mask = (col <= row) & same
    lmat = jnp.where(mask, jnp.exp(jnp.where(mask, seg, 0.0)), 0.0)  # [q, q]
    cum_in = jnp.sum(jnp.where(col <= row, da_row, 0.0), axis=1, keepdims=True)  # [q, 1]
    cum_out = jnp.sum(jnp.where(col > row, da_row, 0.0), axis=1, keepdims=True)  # [q, 1]
    w_in = jnp.where(in_ok > 0, jnp.exp(cum_in), 0.0)  # [q, 1]
    w_out = jnp.where(out_ok > 0, jnp.exp(cum_out), 0.0)  # [q, 1]
    chunk_decay = (jnp.exp(jnp.sum(da_row, axis=1, keepdims=True))
                   * jnp.min(in_ok, axis=0, keepdims=True))  # [1, 1]

    xdt = x * dt_col  # [q, p]
    scores = lax.dot_general(cm, bm, (((1,), (1,)), ((), ())), precision=_HI,
                             preferred_element_type=_F32)  # [q, q] = C B^T
    y = jnp.dot(lmat * scores, xdt, precision=_HI, preferred_element_type=_F32)  # [q, p]
    y_state = lax.dot_general(cm, s, (((1,), (1,)), ((), ())), precision=_HI,
                              preferred_element_type=_F32)  # [q, p] = C S^T
    y = y + w_in * y_state + d_skip * x
    new = lax.dot_general(xdt * w_out, bm, (((0,), (0,)), ((), ())), precision=_HI,
                          preferred_element_type=_F32)  # [p, n]
    return y, chunk_decay * s + new


def _ssd_kernel(x_ref, dtc_ref, dtr_ref, b_ref, c_ref, a_ref, d_ref, s0_ref, cntc_ref, cntr_ref,
                inok_ref, outok_ref, y_ref, s_ref, *, num_chunks: int, chunk: int):
    """GPU (Triton): one (batch row, head) loops over its chunks carrying the [p, n] state."""
    q = chunk
    a = a_ref[0].astype(_F32)  # [1, 1]
    d_skip = d_ref[0].astype(_F32)  # [1, 1]

    def body(c, s):
        sl = pl.ds(c * q, q)
        y, s = _ssd_chunk(s, x_ref[0, 0, sl, :].astype(_F32), dtc_ref[0, 0, sl, :].astype(_F32),
                          dtr_ref[0, 0, :, sl].astype(_F32), b_ref[0, 0, sl, :].astype(_F32),
                          c_ref[0, 0, sl, :].astype(_F32), cntc_ref[0, sl, :] == cntr_ref[0, :, sl],
                          inok_ref[0, sl, :], outok_ref[0, sl, :], a, d_skip)
        y_ref[0, 0, sl, :] = y.astype(y_ref.dtype)
        return s

    s = lax.fori_loop(0, num_chunks, body, s0_ref[0, 0, :, :].astype(_F32))
    s_ref[0, 0, :, :] = s


def _ssd_tpu_kernel(x_ref, dtc_ref, dtr_ref, b_ref, c_ref, a_ref, d_ref, s0_ref, cntc_ref, cntr_ref,
                    inok_ref, outok_ref, y_ref, s_ref, state_ref):
    """TPU (Mosaic): program (batch row, head, chunk); the [p, n] state lives in VMEM scratch across the
    sequential chunk axis; every block is one chunk (no dynamic slicing)."""
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        state_ref[...] = s0_ref[...]

    y, s = _ssd_chunk(state_ref[...], x_ref[...].astype(_F32), dtc_ref[...], dtr_ref[...],
                      b_ref[...].astype(_F32), c_ref[...].astype(_F32), cntc_ref[...] == cntr_ref[...],
                      inok_ref[...], outok_ref[...], a_ref[...], d_ref[...])
    y_ref[...] = y.astype(y_ref.dtype)
    state_ref[...] = s

    @pl.when(c == pl.num_programs(2) - 1)
    def _final():
        s_ref[...] = s


def ssd_footprint(platform: str, t: int, p: int, n: int, dtype, chunk_size: int) -> tiles.Footprint:
    """On-chip bytes of one SSD program (see ``kernels.tiles``)."""
    q, f32 = int(chunk_size), _F32
    if platform == "tpu":
        return tiles.tpu_footprint(
            "mamba_ssd_fwd",
            [((q, p), dtype), ((q, 1), f32), ((1, q), f32), ((q, n), dtype), ((q, n), dtype), ((1, 1), f32),
             ((1, 1), f32), ((p, n), f32), ((q, 1), f32), ((1, q), f32), ((q, 1), f32), ((q, 1), f32),
             ((q, p), dtype), ((p, n), f32)],
            scratch=[((p, n), f32)], temporaries=[((q, q), f32)] * 5 + [((q, p), f32)] * 3 + [((p, n), f32)])
    return tiles.gpu_footprint("mamba_ssd_fwd", [((q, q), f32)] * 2 + [((q, n), f32)] * 2 + [((q, p), f32)],
                               live=[((p, n), f32), ((q, q), f32), ((q, p), f32)], num_stages=_STAGES)


def ssd_fwd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
            initial_state: jax.Array, resets: jax.Array, *, chunk_size: int = 64,
            interpret: bool = False, platform: str = "gpu") -> tuple[jax.Array, jax.Array]:
    """SSD forward (chunked algorithm) as one ``pallas_call``.

    Args:
      x: [b, t, h, p].
      dt: [b, t, h].
      A: [h].
      B, C: [b, t, g, n].
      D: [h].
      initial_state: [b, h, p, n].
      resets: [b, t] float, 1.0 where the state is zeroed before token t.
      chunk_size: q, tokens per chunk inside the kernel (a multiple of 8 on TPU, unless it covers ``t``).
      interpret: run the kernel with the Pallas interpreter.
      platform: kernel variant, ``"gpu"`` (Triton: chunk loop inside the program) or ``"tpu"`` (Mosaic: a
        sequential chunk grid axis, state in VMEM scratch).

    Returns:
      (y [b, t, h, p] in x.dtype, final_state [b, h, p, n] float32).
    """
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    q = int(chunk_size)
    nc = -(-t // q)
    tp = nc * q
    pad = tp - t
    if platform == "tpu" and q % 8 and nc > 1:
        raise ValueError(f"ssd: chunk_size={q} must be a multiple of 8 for the TPU kernel")
    fp = ssd_footprint(platform, t, p, n, x.dtype, q)
    if not interpret:
        tiles.require_fit(fp)

    def pad_t(z: jax.Array) -> jax.Array:  # pads axis 1 (time) with zeros
        return jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2)) if pad else z

    x_k = jnp.transpose(pad_t(x), (0, 2, 1, 3))  # [b, h, tp, p]
    dt_k = jnp.transpose(pad_t(dt.astype(_F32)), (0, 2, 1))  # [b, h, tp]
    dt_col = dt_k[..., None]  # [b, h, tp, 1]
    b_k = jnp.transpose(pad_t(B), (0, 2, 1, 3))  # [b, g, tp, n]
    c_k = jnp.transpose(pad_t(C), (0, 2, 1, 3))  # [b, g, tp, n]
    a_k = A.astype(_F32).reshape(h, 1, 1)  # [h, 1, 1]: per-head scalars in full-extent tiles
    d_k = D.astype(_F32).reshape(h, 1, 1)  # [h, 1, 1]

    # Segment bookkeeping, per position: reset count, "no reset since chunk start" and
    # "no reset after this position up to chunk end".
    res = pad_t(resets.astype(_F32)).astype(jnp.int32)  # [b, tp]
    cnt = jnp.cumsum(res, axis=1)  # [b, tp]
    cnt_ch = cnt.reshape(b, nc, q)  # [b, nc, q]
    cnt_before = cnt_ch[..., :1] - res.reshape(b, nc, q)[..., :1]  # [b, nc, 1]
    in_ok = (cnt_ch == cnt_before).astype(_F32).reshape(b, tp, 1)  # [b, tp, 1]
    out_ok = (cnt_ch == cnt_ch[..., -1:]).astype(_F32).reshape(b, tp, 1)  # [b, tp, 1]
    cnt_f = cnt.astype(_F32)
    cnt_col = cnt_f[..., None]  # [b, tp, 1]
    args_tail = (a_k, d_k, initial_state.astype(_F32))
    out_shape = (jax.ShapeDtypeStruct((b, h, tp, p), x.dtype), jax.ShapeDtypeStruct((b, h, p, n), _F32))

    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        # Row-layout inputs as [.., nc, 1, q] so a chunk's block is a full-extent (1, q) tile.
        dt_row = dt_k.reshape(b, h, nc, 1, q)
        cnt_row = cnt_f.reshape(b, nc, 1, q)
        col = pl.BlockSpec((None, q, 1), lambda i, j, c: (i, c, 0))
        state_spec = pl.BlockSpec((None, None, p, n), lambda i, j, c: (i, j, 0, 0))
        y_k, s_final = pl.pallas_call(
            _ssd_tpu_kernel,
            out_shape=out_shape,
            grid=(b, h, nc),
            in_specs=[
                pl.BlockSpec((None, None, q, p), lambda i, j, c: (i, j, c, 0)),  # x
                pl.BlockSpec((None, None, q, 1), lambda i, j, c: (i, j, c, 0)),  # dt as columns
                pl.BlockSpec((None, None, None, 1, q), lambda i, j, c: (i, j, c, 0, 0)),  # dt as rows
                pl.BlockSpec((None, None, q, n), lambda i, j, c: (i, j // r, c, 0)),  # B
                pl.BlockSpec((None, None, q, n), lambda i, j, c: (i, j // r, c, 0)),  # C
                pl.BlockSpec((None, 1, 1), lambda i, j, c: (j, 0, 0)),  # A
                pl.BlockSpec((None, 1, 1), lambda i, j, c: (j, 0, 0)),  # D
                state_spec,  # initial state
                col,  # reset count, columns
                pl.BlockSpec((None, None, 1, q), lambda i, j, c: (i, c, 0, 0)),  # reset count, rows
                col, col,  # in_ok, out_ok
            ],
            out_specs=(pl.BlockSpec((None, None, q, p), lambda i, j, c: (i, j, c, 0)), state_spec),
            scratch_shapes=[pltpu.VMEM((p, n), _F32)],
            interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp,
                                                  dimension_semantics=("parallel", "parallel", "arbitrary")),
            name="mamba_ssd_fwd",
        )(x_k, dt_col, dt_row, b_k, c_k, *args_tail, cnt_col, cnt_row, in_ok, out_ok)
    else:
        dt_row = dt_k[:, :, None, :]  # [b, h, 1, tp]
        cnt_row = cnt_f[:, None, :]  # [b, 1, tp]

        def head_seq(last: int) -> pl.BlockSpec:  # one head's whole (padded) sequence
            return pl.BlockSpec((1, 1, tp, last), lambda i, j: (i, j, 0, 0))

        group_seq = pl.BlockSpec((1, 1, tp, n), lambda i, j: (i, j // r, 0, 0))
        scalar = pl.BlockSpec((1, 1, 1), lambda i, j: (j, 0, 0))
        col_spec = pl.BlockSpec((1, tp, 1), lambda i, j: (i, 0, 0))
        state_spec = pl.BlockSpec((1, 1, p, n), lambda i, j: (i, j, 0, 0))
        y_k, s_final = pl.pallas_call(
            functools.partial(_ssd_kernel, num_chunks=nc, chunk=q),
            out_shape=out_shape,
            grid=(b, h),
            in_specs=[
                head_seq(p),  # x
                head_seq(1),  # dt as columns
                pl.BlockSpec((1, 1, 1, tp), lambda i, j: (i, j, 0, 0)),  # dt as rows
                group_seq,  # B
                group_seq,  # C
                scalar,  # A
                scalar,  # D
                state_spec,  # initial state
                col_spec,  # reset count, columns
                pl.BlockSpec((1, 1, tp), lambda i, j: (i, 0, 0)),  # reset count, rows
                col_spec,  # in_ok
                col_spec,  # out_ok
            ],
            out_specs=(head_seq(p), state_spec),
            interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, num_stages=_STAGES),
            name="mamba_ssd_fwd",
        )(x_k, dt_col, dt_row, b_k, c_k, *args_tail, cnt_col, cnt_row, in_ok, out_ok)
    y = jnp.transpose(y_k, (0, 2, 1, 3))[:, :t]  # [b, h, tp, p] -> [b, t, h, p]
    return y, s_final
