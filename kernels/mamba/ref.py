"""Pure-jnp references for the Mamba scans: S6 selective scan (Mamba-1) and SSD (Mamba-2).

Each op has a recurrent ``lax.scan`` form (one token per step, the definition) and a chunked form
(what ``impl="chunked"`` runs and what the Pallas kernels take their backward from). All arithmetic
is float32; outputs are cast back to the input dtype, states stay float32.

Shape legend: b batch, t time, d channels (D_in), n state size, h heads, p head dim, g B/C groups,
q chunk length, c chunk index, r heads per group (h = g * r).

Segment resets are passed as ``resets`` [b, t] float32: 1.0 where the state is zeroed *before*
token t is absorbed (``segment_resets`` builds it from segment ids).

See /work/shared/papers/mamba_free_lunch.md §3.1 (S6) and §3.2 (SSD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


def segment_resets(segment_ids: jax.Array | None, batch: int, seq_len: int) -> jax.Array:
    """Returns resets [batch, seq_len] float32: 1.0 where ``segment_ids`` changes from t-1 to t.

    Position 0 never resets, so an ``initial_state`` applies to each row's first segment only.
    """
    if segment_ids is None:
        return jnp.zeros((batch, seq_len), _F32)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]  # [b, t-1]
    return jnp.pad(change, ((0, 0), (1, 0))).astype(_F32)  # [b, t]


def _pad_time(z: jax.Array, pad: int, value: float = 0.0) -> jax.Array:
    """Pads axis 1 (time) of ``z`` at the end with ``pad`` copies of ``value``."""
    if pad == 0:
        return z
    widths = [(0, 0)] * z.ndim
    widths[1] = (0, pad)
    return jnp.pad(z, widths, constant_values=value)


# ----------------------------------------------------------------------------------------------
# Mamba-1: S6 selective scan.
# ----------------------------------------------------------------------------------------------


def selective_scan_step(u_t: jax.Array, delta_t: jax.Array, A: jax.Array, B_t: jax.Array,
                        C_t: jax.Array, D: jax.Array | None,
                        state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token of the S6 recurrence.

    Args:
      u_t: [b, d] input.
      delta_t: [b, d] positive step sizes.
      A: [d, n] negative reals.
      B_t: [b, n] input projection.
      C_t: [b, n] output projection.
      D: [d] skip weights or None.
      state: [b, d, n] state before the token.

    Returns:
      (y_t [b, d] in u_t.dtype, state [b, d, n] float32 after the token).
    """
    u = u_t.astype(_F32)
    dt = delta_t.astype(_F32)
    decay = jnp.exp(dt[:, :, None] * A.astype(_F32)[None])  # [b, d, n]
    inp = (dt * u)[:, :, None] * B_t.astype(_F32)[:, None, :]  # [b, d, n]
    s = decay * state.astype(_F32) + inp  # [b, d, n]
    y = jnp.einsum("bdn,bn->bd", s, C_t.astype(_F32), precision=_HI)  # [b, d]
    if D is not None:
        y = y + D.astype(_F32) * u
    return y.astype(u_t.dtype), s


def selective_scan_ref(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                       D: jax.Array | None = None, initial_state: jax.Array | None = None,
                       resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """S6 selective scan, one token per ``lax.scan`` step (the definition).

    Args:
      u, delta: [b, t, d].
      A: [d, n].
      B, C: [b, t, n].
      D: [d] or None.
      initial_state: [b, d, n] or None (zeros).
      resets: [b, t] float, 1.0 where the state is zeroed before token t; None for no resets.

    Returns:
      (y [b, t, d] in u.dtype, final_state [b, d, n] float32).
    """
    b, t, d = u.shape
    n = A.shape[1]
    s0 = jnp.zeros((b, d, n), _F32) if initial_state is None else initial_state.astype(_F32)
    keep = 1.0 - (jnp.zeros((b, t), _F32) if resets is None else resets.astype(_F32))  # [b, t]

    def body(s, xs):
        u_t, dt_t, b_t, c_t, k_t = xs
        y_t, s = selective_scan_step(u_t, dt_t, A, b_t, c_t, D, s * k_t[:, None, None])
        return s, y_t

    xs = tuple(jnp.moveaxis(z, 1, 0) for z in (u, delta, B, C, keep))  # time-major
    s_final, y = lax.scan(body, s0, xs)
    return jnp.moveaxis(y, 0, 1), s_final  # y: [t, b, d] -> [b, t, d]


def _shift_time(z: jax.Array, k: int, fill: float) -> jax.Array:
    """out[:, i] = z[:, i - k] for i >= k, else ``fill`` (axis 1 is time)."""
    return jnp.concatenate([jnp.full_like(z[:, :k], fill), z[:, :-k]], axis=1)


def _linear_scan_doubling(a: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inclusive scan of h_i = a_i h_{i-1} + x_i (h_{-1} = 0) along axis 1 by recursive doubling.

    log2(q) levels; after level k, element i holds the composition of the window
    (i - 2^k, i]. Returns (prod_{j<=i} a_j, h_i). Same result as ``lax.associative_scan`` with
    the (a, x) operator, with fewer ops (cheaper to compile and differentiate on CPU).
    """
    k = 1
    while k < a.shape[1]:
        a, x = a * _shift_time(a, k, 1.0), x + a * _shift_time(x, k, 0.0)
        k *= 2
    return a, x


def selective_scan_chunked(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                           C: jax.Array, D: jax.Array | None = None,
                           initial_state: jax.Array | None = None,
                           resets: jax.Array | None = None,
                           chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """S6 selective scan in chunks: parallel (associative) scan in a chunk, ``lax.scan`` across.

    Only one chunk's [b, q, d, n] states exist at a time; the chunk body is rematerialised
    (``jax.checkpoint``), so the backward pass stores just the [b, d, n] state at each chunk
    boundary, never the full [b, t, d, n] state sequence. T need not be a multiple of
    ``chunk_size``: the tail is padded with delta = 0 (decay 1, no input), which leaves the
    state unchanged.

    Args and returns as in ``selective_scan_ref``, plus ``chunk_size`` (q).
    """
    b, t, d = u.shape
    n = A.shape[1]
    q = int(chunk_size)
    nc = -(-t // q)
    pad = nc * q - t
    s0 = jnp.zeros((b, d, n), _F32) if initial_state is None else initial_state.astype(_F32)
    keep = 1.0 - (jnp.zeros((b, t), _F32) if resets is None else resets.astype(_F32))  # [b, t]
    a32 = A.astype(_F32)

    def to_chunks(z: jax.Array, value: float = 0.0) -> jax.Array:
        z = _pad_time(z.astype(_F32), pad, value)
        z = z.reshape(b, nc, q, *z.shape[2:])  # [b, nc, q, ...]
        return jnp.moveaxis(z, 1, 0)  # [nc, b, q, ...]

    xs = (to_chunks(u), to_chunks(delta), to_chunks(B), to_chunks(C), to_chunks(keep, 1.0))

    @jax.checkpoint
    def chunk_body(s, chunk):
        u_c, dt_c, b_c, c_c, k_c = chunk  # [b,q,d] [b,q,d] [b,q,n] [b,q,n] [b,q]
        a = jnp.exp(dt_c[..., None] * a32) * k_c[:, :, None, None]  # [b, q, d, n]
        x = (dt_c * u_c)[..., None] * b_c[:, :, None, :]  # [b, q, d, n]
        a_cum, h = _linear_scan_doubling(a, x)  # [b, q, d, n] each
        h = h + a_cum * s[:, None]  # add the carried state, decayed to each position
        y = jnp.einsum("bqdn,bqn->bqd", h, c_c, precision=_HI)  # [b, q, d]
        return h[:, -1], y

    s_final, y = lax.scan(chunk_body, s0, xs)  # y: [nc, b, q, d]
    y = jnp.moveaxis(y, 0, 1).reshape(b, nc * q, d)[:, :t]  # [b, t, d]
    if D is not None:
        y = y + D.astype(_F32) * u.astype(_F32)
    return y.astype(u.dtype), s_final


# ----------------------------------------------------------------------------------------------
# Mamba-2: SSD (scalar decay per head).
# ----------------------------------------------------------------------------------------------


def ssd_step(x_t: jax.Array, dt_t: jax.Array, A: jax.Array, B_t: jax.Array, C_t: jax.Array,
             D: jax.Array | None, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token of the SSD recurrence.

    Args:
      x_t: [b, h, p] input.
      dt_t: [b, h] positive step sizes (already softplus'ed).
      A: [h] negative reals.
      B_t, C_t: [b, g, n], g dividing h; head i uses group i // (h // g).
      D: [h] or None.
      state: [b, h, p, n].

    Returns:
      (y_t [b, h, p] in x_t.dtype, state [b, h, p, n] float32).
    """
    h = x_t.shape[1]
    r = h // B_t.shape[1]
    x = x_t.astype(_F32)
    dt = dt_t.astype(_F32)
    bh = jnp.repeat(B_t.astype(_F32), r, axis=1)  # [b, h, n]
    ch = jnp.repeat(C_t.astype(_F32), r, axis=1)  # [b, h, n]
    decay = jnp.exp(dt * A.astype(_F32))  # [b, h]
    s = decay[..., None, None] * state.astype(_F32) + (dt[..., None] * x)[..., None] * bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", s, ch, precision=_HI)  # [b, h, p]
    if D is not None:
        y = y + D.astype(_F32)[:, None] * x
    return y.astype(x_t.dtype), s


def ssd_ref(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
            D: jax.Array | None = None, initial_state: jax.Array | None = None,
            resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """SSD, one token per ``lax.scan`` step (the definition).

    Args:
      x: [b, t, h, p].
      dt: [b, t, h].
      A: [h].
      B, C: [b, t, g, n].
      D: [h] or None.
      initial_state: [b, h, p, n] or None (zeros).
      resets: [b, t] float, 1.0 where the state is zeroed before token t; None for no resets.

    Returns:
      (y [b, t, h, p] in x.dtype, final_state [b, h, p, n] float32).
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    s0 = jnp.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)
    keep = 1.0 - (jnp.zeros((b, t), _F32) if resets is None else resets.astype(_F32))  # [b, t]

    def body(s, xs):
        x_t, dt_t, b_t, c_t, k_t = xs
        y_t, s = ssd_step(x_t, dt_t, A, b_t, c_t, D, s * k_t[:, None, None, None])
        return s, y_t

    xs = tuple(jnp.moveaxis(z, 1, 0) for z in (x, dt, B, C, keep))  # time-major
    s_final, y = lax.scan(body, s0, xs)
    return jnp.moveaxis(y, 0, 1), s_final  # y: [t, b, h, p] -> [b, t, h, p]


def stable_segsum(a: jax.Array) -> jax.Array:
    """Segment sums without differences of cumulative sums.

    Args:
      a: [..., q] per-step log-decays.

    Returns:
      [..., q, q] with out[..., i, j] = sum_{j < k <= i} a[..., k] for i > j and 0 for i <= j,
      built as a masked cumulative sum, so each entry only ever adds the terms it contains
      (no catastrophic cancellation for strong decays) and every entry is finite.
    """
    q = a.shape[-1]
    strict = jnp.tril(jnp.ones((q, q), bool), -1)  # [q, q]: i > j
    z = jnp.where(strict, a[..., :, None], 0.0)  # [..., i, j] = a_i where i > j
    return jnp.cumsum(z, axis=-2)  # [..., i, j]


def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                D: jax.Array | None = None, initial_state: jax.Array | None = None,
                resets: jax.Array | None = None,
                chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """SSD by the four-step chunked algorithm (Mamba-2 ``ssd_minimal``), with a stable segsum.

    1. intra-chunk outputs through the quadratic (dual) form ``(L o C B^T) (x dt)``;
    2. per-chunk end states ``sum_s exp(segsum[end, s]) B_s (x_s dt_s)^T``;
    3. a ``lax.scan`` over chunks of those states with decay ``exp(chunk total)``;
    4. the carried state's contribution ``exp(cum_t) C_t S_in``.

    Decay factors are masked with ``where`` *before and after* the exp (finite fill values), so
    neither the forward nor the gradient sees inf or NaN, also for very strong decays. Segment
    resets are exact: pairs of positions in different segments get weight 0 and the carried
    state is cut at a reset. T need not be a multiple of ``chunk_size`` (padding with dt = 0).

    Args and returns as in ``ssd_ref``, plus ``chunk_size`` (q).
    """
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    q = int(chunk_size)
    nc = -(-t // q)
    pad = nc * q - t
    s0 = jnp.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)
    res = jnp.zeros((b, t), _F32) if resets is None else resets.astype(_F32)

    xc = _pad_time(x.astype(_F32), pad).reshape(b, nc, q, g, r, p)  # [b, c, q, g, r, p]
    dtc = _pad_time(dt.astype(_F32), pad).reshape(b, nc, q, g, r)  # [b, c, q, g, r]
    bc = _pad_time(B.astype(_F32), pad).reshape(b, nc, q, g, n)  # [b, c, q, g, n]
    cc = _pad_time(C.astype(_F32), pad).reshape(b, nc, q, g, n)  # [b, c, q, g, n]
    resc = _pad_time(res, pad).reshape(b, nc, q)  # [b, c, q]
    cnt = jnp.cumsum(resc.reshape(b, nc * q).astype(jnp.int32), axis=1).reshape(b, nc, q)

    da = jnp.moveaxis(dtc * A.astype(_F32).reshape(g, r), 2, -1)  # [b, c, g, r, q]
    xdt = xc * dtc[..., None]  # [b, c, q, g, r, p]

    # Intra-chunk decay matrix L[i, j] = exp(sum_{j<k<=i} dA_k) for j <= i in the same segment.
    causal = jnp.tril(jnp.ones((q, q), bool))  # [q, q]
    same = (cnt[..., :, None] == cnt[..., None, :]) & causal  # [b, c, q, q]
    mask = same[:, :, None, None]  # [b, c, 1, 1, q, q]
    seg = stable_segsum(da)  # [b, c, g, r, q, q]
    lmat = jnp.where(mask, jnp.exp(jnp.where(mask, seg, 0.0)), 0.0)  # [b, c, g, r, q, q]

    # 1. Intra-chunk (diagonal blocks).
    cb = jnp.einsum("bcign,bcjgn->bcgij", cc, bc, precision=_HI)  # [b, c, g, q, q]
    y_diag = jnp.einsum("bcgij,bcgrij,bcjgrp->bcigrp", cb, lmat, xdt,
                        precision=_HI)  # [b, c, q, g, r, p]

    # 2. State at each chunk's end from its own tokens; the last row of L is exactly that decay.
    w_out = lmat[..., -1, :]  # [b, c, g, r, q]
    states = jnp.einsum("bcjgn,bcgrj,bcjgrp->bcgrpn", bc, w_out, xdt,
                        precision=_HI)  # [b, c, g, r, p, n]

    # 3. Carry states across chunks. w_in[i] = exp(sum_{k<=i} dA_k), cut by a reset in [0, i].
    cum = jnp.cumsum(da, axis=-1)  # [b, c, g, r, q]
    cnt_before = cnt[..., 0] - resc[..., 0].astype(jnp.int32)  # [b, c]
    in_ok = (cnt == cnt_before[..., None])[:, :, None, None, :]  # [b, c, 1, 1, q]
    w_in = jnp.where(in_ok, jnp.exp(jnp.where(in_ok, cum, 0.0)), 0.0)  # [b, c, g, r, q]
    chunk_decay = w_in[..., -1]  # [b, c, g, r]

    def carry(s, inp):
        decay, st = inp  # [b, g, r], [b, g, r, p, n]
        return decay[..., None, None] * s + st, s

    s_final, s_in = lax.scan(
        carry, s0.reshape(b, g, r, p, n),
        (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))  # s_in: [c, b, g, r, p, n]
    s_in = jnp.moveaxis(s_in, 0, 1)  # [b, c, g, r, p, n]

    # 4. Carried state -> outputs.
    y_off = jnp.einsum("bcign,bcgrpn,bcgri->bcigrp", cc, s_in, w_in,
                       precision=_HI)  # [b, c, q, g, r, p]

    y = (y_diag + y_off).reshape(b, nc * q, h, p)[:, :t]  # [b, t, h, p]
    if D is not None:
        y = y + D.astype(_F32)[:, None] * x.astype(_F32)
    return y.astype(x.dtype), s_final.reshape(b, h, p, n)
