"""Pallas forward kernels for the Mamba scans (forward only; ops.py takes the backward from ref).

* ``selective_scan_fwd``: grid (batch, channel blocks). Each program walks the sequence one token
  at a time inside the kernel, carrying its [n, block_d] slice of the S6 state in registers, so
  the [t, d, n] state sequence never touches memory.
* ``ssd_fwd``: grid (batch, heads). Each program walks the sequence one chunk at a time and
  applies the chunked SSD algorithm to it (quadratic intra-chunk form + carried [p, n] state),
  with the stable (masked) segment sum done as a triangular matmul.

Both kernels read their inputs in the input dtype and compute in float32. The wrappers transpose
to kernel-friendly layouts (time-major columns for per-token loads) and back.

Status: verified with ``interpret=True`` on CPU. The compiled paths are written for the Triton
(GPU) lowering; they have not been run on an accelerator in this repository yet. The Triton
lowering wants power-of-two value shapes (block_d, n; and q, p, n >= 16 for the SSD matmuls).

Shape legend as in ref.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the selective-scan kernel.

    Attributes:
      block_d: channels per program; must divide D_in.
    """

    block_d: int

    @classmethod
    def get_default(cls, d_in: int) -> "BlockSizes":
        """Largest power of two <= 64 dividing ``d_in`` (or ``d_in`` itself if none > 1)."""
        for bd in (64, 32, 16, 8, 4, 2):
            if d_in % bd == 0:
                return cls(block_d=bd)
        return cls(block_d=d_in)


# ----------------------------------------------------------------------------------------------
# Mamba-1 selective scan.
# ----------------------------------------------------------------------------------------------


def _selective_scan_kernel(u_ref, dt_ref, at_ref, bt_ref, ct_ref, d_ref, s0_ref, keep_ref,
                           y_ref, s_ref, *, seq_len: int):
    """One (batch row, channel block); the state is kept transposed as [n, block_d]."""
    a_t = at_ref[...].astype(_F32)  # [n, bd]
    d_skip = d_ref[...].astype(_F32)  # [1, bd]

    def body(i, s):
        u = u_ref[0, pl.ds(i, 1), :].astype(_F32)  # [1, bd]
        dt = dt_ref[0, pl.ds(i, 1), :].astype(_F32)  # [1, bd]
        b_col = bt_ref[0, :, pl.ds(i, 1)].astype(_F32)  # [n, 1]
        c_col = ct_ref[0, :, pl.ds(i, 1)].astype(_F32)  # [n, 1]
        keep = keep_ref[0, :, pl.ds(i, 1)]  # [1, 1]
        s = jnp.exp(dt * a_t) * (s * keep) + (dt * u) * b_col  # [n, bd]
        y = jnp.sum(s * c_col, axis=0, keepdims=True) + d_skip * u  # [1, bd]
        y_ref[0, pl.ds(i, 1), :] = y.astype(y_ref.dtype)
        return s

    s = lax.fori_loop(0, seq_len, body, s0_ref[0, :, :].astype(_F32))
    s_ref[0, :, :] = s


def selective_scan_fwd(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                       D: jax.Array, initial_state: jax.Array, resets: jax.Array, *,
                       block_sizes: BlockSizes | None = None,
                       interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """S6 selective scan forward as one ``pallas_call``.

    Args:
      u, delta: [b, t, d].
      A: [d, n].
      B, C: [b, t, n].
      D: [d].
      initial_state: [b, d, n].
      resets: [b, t] float, 1.0 where the state is zeroed before token t.
      block_sizes: channel block; ``BlockSizes.get_default(d)`` when None.
      interpret: run the kernel with the Pallas interpreter.

    Returns:
      (y [b, t, d] in u.dtype, final_state [b, d, n] float32).
    """
    b, t, d = u.shape
    n = A.shape[1]
    bs = block_sizes or BlockSizes.get_default(d)
    if d % bs.block_d:
        raise ValueError(f"selective_scan: block_d={bs.block_d} must divide D_in={d}")
    bd = bs.block_d
    a_t = A.astype(_F32).T  # [n, d]
    b_t = jnp.swapaxes(B, 1, 2)  # [b, n, t]
    c_t = jnp.swapaxes(C, 1, 2)  # [b, n, t]
    d_row = D.astype(_F32).reshape(1, d)  # [1, d]
    s0_t = jnp.swapaxes(initial_state.astype(_F32), 1, 2)  # [b, n, d]
    keep = (1.0 - resets.astype(_F32)).reshape(b, 1, t)  # [b, 1, t]

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
        name="mamba_selective_scan_fwd",
    )(u, delta, a_t, b_t, c_t, d_row, s0_t, keep)
    return y, jnp.swapaxes(s_t, 1, 2)  # final state: [b, n, d] -> [b, d, n]


# ----------------------------------------------------------------------------------------------
# Mamba-2 SSD.
# ----------------------------------------------------------------------------------------------


def _ssd_kernel(x_ref, dtc_ref, dtr_ref, b_ref, c_ref, a_ref, d_ref, s0_ref, cntc_ref, cntr_ref,
                inok_ref, outok_ref, y_ref, s_ref, *, num_chunks: int, chunk: int):
    """One (batch row, head): loop over chunks carrying the [p, n] state."""
    q = chunk
    a = a_ref[0].astype(_F32)  # [1, 1]
    d_skip = d_ref[0].astype(_F32)  # [1, 1]
    row = lax.broadcasted_iota(jnp.int32, (q, q), 0)  # i (query / later position)
    col = lax.broadcasted_iota(jnp.int32, (q, q), 1)  # j (key / earlier position)
    incl = (col <= row).astype(_F32)  # [q, q]

    def body(c, s):
        sl = pl.ds(c * q, q)
        x = x_ref[0, 0, sl, :].astype(_F32)  # [q, p]
        dt_col = dtc_ref[0, 0, sl, :].astype(_F32)  # [q, 1]
        da_col = dt_col * a  # [q, 1]
        da_row = dtr_ref[0, 0, :, sl].astype(_F32) * a  # [1, q]
        bm = b_ref[0, 0, sl, :].astype(_F32)  # [q, n]
        cm = c_ref[0, 0, sl, :].astype(_F32)  # [q, n]
        same = cntc_ref[0, sl, :] == cntr_ref[0, :, sl]  # [q, q]
        in_ok = inok_ref[0, sl, :]  # [q, 1]
        out_ok = outok_ref[0, sl, :]  # [q, 1]

        # Stable segsum: seg[i, j] = sum_k [k <= i] * [k > j] * dA_k, a masked cumsum as a matmul.
        strict_da = jnp.where(row > col, da_col, 0.0)  # [q(k), q(j)]
        seg = jnp.dot(incl, strict_da, precision=_HI, preferred_element_type=_F32)  # [q, q]
        mask = (col <= row) & same
        lmat = jnp.where(mask, jnp.exp(jnp.where(mask, seg, 0.0)), 0.0)  # [q, q]
        cum_in = jnp.sum(jnp.where(col <= row, da_row, 0.0), axis=1, keepdims=True)  # [q, 1]
        cum_out = jnp.sum(jnp.where(col > row, da_row, 0.0), axis=1, keepdims=True)  # [q, 1]
        w_in = jnp.where(in_ok > 0, jnp.exp(cum_in), 0.0)  # [q, 1]
        w_out = jnp.where(out_ok > 0, jnp.exp(cum_out), 0.0)  # [q, 1]
        chunk_decay = jnp.exp(jnp.sum(da_row)) * jnp.min(in_ok)  # scalar

        xdt = x * dt_col  # [q, p]
        scores = lax.dot_general(cm, bm, (((1,), (1,)), ((), ())), precision=_HI,
                                 preferred_element_type=_F32)  # [q, q] = C B^T
        y = jnp.dot(lmat * scores, xdt, precision=_HI, preferred_element_type=_F32)  # [q, p]
        y_state = lax.dot_general(cm, s, (((1,), (1,)), ((), ())), precision=_HI,
                                  preferred_element_type=_F32)  # [q, p] = C S^T
        y = y + w_in * y_state + d_skip * x
        y_ref[0, 0, sl, :] = y.astype(y_ref.dtype)
        new = lax.dot_general(xdt * w_out, bm, (((0,), (0,)), ((), ())), precision=_HI,
                              preferred_element_type=_F32)  # [p, n]
        return chunk_decay * s + new

    s = lax.fori_loop(0, num_chunks, body, s0_ref[0, 0, :, :].astype(_F32))
    s_ref[0, 0, :, :] = s


def ssd_fwd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
            initial_state: jax.Array, resets: jax.Array, *, chunk_size: int = 64,
            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """SSD forward (chunked algorithm) as one ``pallas_call``.

    Args:
      x: [b, t, h, p].
      dt: [b, t, h].
      A: [h].
      B, C: [b, t, g, n].
      D: [h].
      initial_state: [b, h, p, n].
      resets: [b, t] float, 1.0 where the state is zeroed before token t.
      chunk_size: q, tokens per chunk inside the kernel.
      interpret: run the kernel with the Pallas interpreter.

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

    def pad_t(z: jax.Array) -> jax.Array:  # pads axis 1 (time) with zeros
        return jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2)) if pad else z

    x_k = jnp.transpose(pad_t(x), (0, 2, 1, 3))  # [b, h, tp, p]
    dt_k = jnp.transpose(pad_t(dt), (0, 2, 1))  # [b, h, tp]
    dt_col = dt_k[..., None]  # [b, h, tp, 1]
    dt_row = dt_k[:, :, None, :]  # [b, h, 1, tp]
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
    cnt_row = cnt_f[:, None, :]  # [b, 1, tp]

    def head_seq(last: int) -> pl.BlockSpec:  # one head's whole (padded) sequence
        return pl.BlockSpec((1, 1, tp, last), lambda i, j: (i, j, 0, 0))

    group_seq = pl.BlockSpec((1, 1, tp, n), lambda i, j: (i, j // r, 0, 0))
    scalar = pl.BlockSpec((1, 1, 1), lambda i, j: (j, 0, 0))
    col_spec = pl.BlockSpec((1, tp, 1), lambda i, j: (i, 0, 0))
    state_spec = pl.BlockSpec((1, 1, p, n), lambda i, j: (i, j, 0, 0))
    y_k, s_final = pl.pallas_call(
        functools.partial(_ssd_kernel, num_chunks=nc, chunk=q),
        out_shape=(jax.ShapeDtypeStruct((b, h, tp, p), x.dtype),
                   jax.ShapeDtypeStruct((b, h, p, n), _F32)),
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
        name="mamba_ssd_fwd",
    )(x_k, dt_col, dt_row, b_k, c_k, a_k, d_k, initial_state.astype(_F32), cnt_col, cnt_row,
      in_ok, out_ok)
    y = jnp.transpose(y_k, (0, 2, 1, 3))[:, :t]  # [b, h, tp, p] -> [b, t, h, p]
    return y, s_final
