"""Pallas backward kernels for chunked gated linear attention, with state recomputation.

The forward (``pallas.gla_fwd``) saves nothing but its inputs and final state. The backward runs:

1. ``gla_states``: the forward recurrence again, chunk by chunk (float32), writing the state *before* every
   chunk (``S_n``, ``[B, H, N, K, V]``; only the ``k``/``v`` state update, no outputs) in the matmul dtype: the
   backward reads it only as a matmul operand (``do S^T``), which the forward rounds to that dtype too;
2. ``gla_bwd`` (and ``gla_bwd_dv`` on GPU): the reverse recurrence. Walking the chunks backwards with ``dS`` (the gradient w.r.t. the state
   after the chunk; ``dS = d final_state`` before the last chunk) it computes, for chunk ``n`` with rows ``i, j``,
   the within-chunk cumulative log-decay ``G``, ``q`` already scaled, document masks as in the forward::

       dq_i  = exp(G_i) (do_i S_n^T)               + sum_{j <= i} (do_i . v_j) k_j exp(G_i - G_j)
       dk_j  = exp(G_last - G_j) (v_j dS^T)         + sum_{i >= j} (do_i . v_j) q_i exp(G_i - G_j)
       dv_j  = k_j exp(G_last - G_j) dS             + sum_{i >= j} A_ij do_i
       dS_n  = exp(G_last) dS + sum_i (q_i exp(G_i))^T do_i            (-> d initial_state after chunk 0)

   with the same sub-chunk split and reference rows as the forward (every exponent <= 0): sub-chunk pairs
   ``I > J`` meet at the row ``r`` before ``I`` (``q_I exp(G_I - G_r)``, ``k_J exp(G_r - G_J)``), pairs inside
   a sub-chunk go one key row at a time (no ``[c, c, K]`` tensor).

The log-decay gradient needs no kernel: ``g`` enters only through ``exp(+-B)`` factors of ``q`` and ``k`` (``B``
the cumulative log-decay of a document) and the final state's ``exp(B_T)``, so with ``dq, dk`` the full input
gradients::

    dB_t = q_t dq_t - k_t dk_t  (+ sum_v dS_T S_T at the last row),    dg_t = sum_{s >= t, same document} dB_s

(a segmented reverse cumulative sum, done in jnp on ``[B, T, H, K]``). It is a difference of terms that cancel
when decays are strong; its float error scales with those terms.

Layout and tiles are the forward's (``pallas.BlockSizes``). ``dq``/``dk`` rows sum over all value columns and
``dv`` rows over all key columns, while the state recurrence is elementwise in both:

* GPU (Triton): ``gla_bwd`` programs ``(B, H, K // block_k)`` (``block_k = block_v``) hold a key block and all
  values and write complete ``dq``, ``dk`` and ``d initial_state`` rows; ``gla_bwd_dv`` programs
  ``(B, H, V // block_v)`` hold all keys and a value block and write ``dv`` (running the cheap ``dS`` recurrence
  again; it needs no chunk states). Each walks all chunks of its row in a reverse ``fori_loop`` over
  whole-sequence refs, ``dS`` carried in the loop; ``gla_states`` walks them forwards. No partial sums.
* TPU (Mosaic): one ``gla_bwd`` over ``(B, H, V // block_v)`` and a fourth, "arbitrary" chunk axis whose index
  maps visit the chunks in reverse (``N - 1 - c``), ``dS`` in VMEM scratch, so VMEM holds one chunk whatever
  ``T``. The default ``block_v`` is all of ``V`` (one value block); with smaller ones ``dq``/``dk`` come out per
  value block, ``[B, H, V // block_v, T, K]`` float32, summed in the wrapper.

Transient HBM of the backward at ``sse_h_2b``'s GLA (8 heads, T = 4096, K = V = 256, chunk 64, bf16, one
sequence): chunk states 64 MiB (bf16), ``dq``/``dk`` float32 64 MiB, against the ~1.6 GiB that autodiff of the
chunked jnp form saves (what the earlier backward, ``jax.vjp`` of that form, materialised).

Status: run on CPU by the Pallas interpreter and lowered for Triton and Mosaic in the tests; not compiled or run
on an accelerator here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import tiles
from kernels.gla.pallas import BlockSizes, padded_dim, prepare, to_kernel_layout

__all__ = ["footprints", "gla_bwd", "segment_reverse_cumsum"]

def _dot(a, b, contract, mm_dtype):
    precision = jax.lax.Precision.HIGHEST if mm_dtype == jnp.float32 else None
    return jax.lax.dot_general(a.astype(mm_dtype), b.astype(mm_dtype), (contract, ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)


def _rows(r, start, size):
    return r[pl.ds(start, size), :]


def _state_update(k_ref, v_ref, cum_ref, doc_ref, state, carry, base, *, chunk, sub, mm_dtype):
    """State after the chunk at ``base``: ``carry * S + sum_I (k_I exp(G_last - G_I))^T v_I`` (the forward's)."""
    f32 = jnp.float32
    doc_last = _rows(doc_ref, base + chunk - 1, 1)  # [1, 1]
    cum_last = _rows(cum_ref, base + chunk - 1, 1)  # [1, K]
    update = jnp.zeros(state.shape, f32)
    for i_sub in range(chunk // sub):
        s_i = base + i_sub * sub
        k_i = _rows(k_ref, s_i, sub).astype(f32)
        k_up = jnp.where(_rows(doc_ref, s_i, sub) == doc_last, k_i * jnp.exp(cum_last - _rows(cum_ref, s_i, sub)),
                         0.0)  # [c, K]
        update = update + _dot(k_up, _rows(v_ref, s_i, sub), ((0,), (0,)), mm_dtype)  # [K, bv]
    return carry * state + update


def _bwd_chunk(q_ref, k_ref, v_ref, cum_ref, doc_ref, do_ref, dq_ref, dk_ref, dv_ref, state, dnext, carry,
               doc_prev, base, *, scale, chunk, sub, mm_dtype, want_dqk=True, want_dv=True):
    """Gradients of the chunk at row ``base``: writes its ``dq`` (w.r.t. the scaled q), ``dk``, ``dv`` rows,
    returns ``dS`` before the chunk. ``state`` ``[K, bv]`` is the state before the chunk, ``dnext`` the gradient
    w.r.t. the state after it, ``carry`` ``[K, 1]`` the chunk's state decay, ``doc_prev`` ``[1, 1]``.

    ``dq``/``dk`` rows sum over the value columns the refs hold, ``dv`` rows over the key columns, so a program
    holding all of one and a block of the other computes only the gradients that are complete for it:
    ``want_dqk`` (key block, all values: ``dq``, ``dk``) and ``want_dv`` (value block, all keys: ``dv``; no
    ``state`` needed). The state gradient ``[K, bv]`` is elementwise in both and comes out of either."""
    f32 = jnp.float32
    n_sub = chunk // sub
    rows = jax.lax.broadcasted_iota(jnp.int32, (sub, 1), 0)  # [c, 1]
    dot = functools.partial(_dot, mm_dtype=mm_dtype)
    doc_last = _rows(doc_ref, base + chunk - 1, 1)  # [1, 1]
    cum_last = _rows(cum_ref, base + chunk - 1, 1)  # [1, K]

    subs = []
    for i_sub in range(n_sub):
        s_i = base + i_sub * sub
        subs.append(dict(s=s_i, q=_rows(q_ref, s_i, sub).astype(f32) * scale, k=_rows(k_ref, s_i, sub).astype(f32),
                         v=_rows(v_ref, s_i, sub), do=_rows(do_ref, s_i, sub), cum=_rows(cum_ref, s_i, sub),
                         doc=_rows(doc_ref, s_i, sub)))
    dq = [None] * n_sub
    dk = [None] * n_sub
    dv = [None] * n_sub
    d_state = carry * dnext  # [K, bv]
    for i_sub, x in enumerate(subs):
        # The state before the chunk (read by q) and the state after it (written by k, v).
        m_in = x["doc"] == doc_prev  # [c, 1]
        e_in = jnp.exp(x["cum"])  # [c, K]
        d_state = d_state + dot(jnp.where(m_in, x["q"] * e_in, 0.0), x["do"], ((0,), (0,)))  # [K, bv]
        m_up = x["doc"] == doc_last
        e_up = jnp.exp(cum_last - x["cum"])  # [c, K]
        if want_dqk:
            dq[i_sub] = jnp.where(m_in, e_in * dot(x["do"], state, ((1,), (1,))), 0.0)  # [c, K]
            dk[i_sub] = jnp.where(m_up, e_up * dot(x["v"], dnext, ((1,), (1,))), 0.0)  # [c, K]
        if want_dv:
            dv[i_sub] = dot(jnp.where(m_up, x["k"] * e_up, 0.0), dnext, ((1,), (0,)))  # [c, bv]

    for i_sub, x in enumerate(subs):
        # Earlier sub-chunks J < I, referenced at r = the row before I.
        if i_sub > 0:
            cum_r = _rows(cum_ref, x["s"] - 1, 1)  # [1, K]
            doc_r = _rows(doc_ref, x["s"] - 1, 1)  # [1, 1]
            m_q = x["doc"] == doc_r
            e_q = jnp.exp(x["cum"] - cum_r)  # [c, K]
            q_off = jnp.where(m_q, x["q"] * e_q, 0.0)  # [c, K]
            dq_off = jnp.zeros(q_off.shape, f32)
            for j_sub in range(i_sub):
                y = subs[j_sub]
                m_k = y["doc"] == doc_r
                e_k = jnp.exp(cum_r - y["cum"])  # [c, K]
                k_off = jnp.where(m_k, y["k"] * e_k, 0.0)  # [c, K]
                if want_dqk:
                    d_scores = dot(x["do"], y["v"], ((1,), (1,)))  # [c(i), c(j)]
                    dq_off = dq_off + dot(d_scores, k_off, ((1,), (0,)))  # [c, K]
                    dk[j_sub] = dk[j_sub] + jnp.where(m_k, e_k * dot(d_scores, q_off, ((0,), (0,))), 0.0)
                if want_dv:
                    scores = dot(q_off, k_off, ((1,), (1,)))  # [c(i), c(j)]
                    dv[j_sub] = dv[j_sub] + dot(scores, x["do"], ((0,), (0,)))  # [c, bv]
            if want_dqk:
                dq[i_sub] = dq[i_sub] + jnp.where(m_q, e_q * dq_off, 0.0)

        # Inside sub-chunk I: one key row j at a time.
        do_i = x["do"].astype(f32)

        def column(j, acc, s_i=x["s"], q_i=x["q"], cum_i=x["cum"], doc_i=x["doc"], do_i=do_i):
            k_j = _rows(k_ref, s_i + j, 1).astype(f32)  # [1, K]
            v_j = _rows(v_ref, s_i + j, 1).astype(f32)  # [1, bv]
            cum_j = _rows(cum_ref, s_i + j, 1)  # [1, K]
            doc_j = _rows(doc_ref, s_i + j, 1)  # [1, 1]
            decay = jnp.exp(jnp.minimum(cum_i - cum_j, 0.0))  # [c, K]
            keep = (rows >= j) & (doc_i == doc_j)  # [c, 1]
            here = rows == j
            out = []
            if want_dqk:
                dq_a, dk_a = acc[0], acc[1]
                da = jnp.where(keep, jnp.sum(do_i * v_j, axis=1, keepdims=True), 0.0)  # [c, 1]  dA[:, j]
                dk_row = jnp.sum(da * q_i * decay, axis=0, keepdims=True)  # [1, K]
                out += [dq_a + da * k_j * decay, dk_a + jnp.where(here, dk_row, 0.0)]
            if want_dv:
                a = jnp.where(keep, jnp.sum(q_i * k_j * decay, axis=1, keepdims=True), 0.0)  # [c, 1]  A[:, j]
                dv_row = jnp.sum(a * do_i, axis=0, keepdims=True)  # [1, bv]
                out.append(acc[-1] + jnp.where(here, dv_row, 0.0))
            return tuple(out)

        init = ((dq[i_sub], dk[i_sub]) if want_dqk else ()) + ((dv[i_sub],) if want_dv else ())
        res = jax.lax.fori_loop(0, sub, column, init)
        if want_dqk:
            dq[i_sub], dk[i_sub] = res[0], res[1]
        if want_dv:
            dv[i_sub] = res[-1]

    for i_sub, x in enumerate(subs):
        if want_dqk:
            dq_ref[pl.ds(x["s"], sub), :] = dq[i_sub].astype(dq_ref.dtype)
            dk_ref[pl.ds(x["s"], sub), :] = dk[i_sub].astype(dk_ref.dtype)
        if want_dv:
            dv_ref[pl.ds(x["s"], sub), :] = dv[i_sub].astype(dv_ref.dtype)
    return d_state


# ---- GPU (Triton): one program per (batch, head, key or value block), a loop over chunks ----------------------

def _states_kernel_gpu(k_ref, v_ref, cum_ref, doc_ref, carry_ref, h0_ref, states_ref, *, chunk, sub, num_chunks,
                       mm_dtype):
    k_pad = k_ref.shape[-1]

    def body(ci, state):
        row = pl.multiple_of(ci * k_pad, k_pad)
        states_ref[pl.ds(row, k_pad), :] = state.astype(states_ref.dtype)
        carry = carry_ref[pl.ds(row, k_pad), :]  # [K, 1]
        return _state_update(k_ref, v_ref, cum_ref, doc_ref, state, carry, pl.multiple_of(ci * chunk, chunk),
                             chunk=chunk, sub=sub, mm_dtype=mm_dtype)

    jax.lax.fori_loop(0, num_chunks, body, h0_ref[...].astype(jnp.float32))


def _bwd_dqk_kernel_gpu(q_ref, k_ref, v_ref, cum_ref, doc_ref, carry_ref, states_ref, do_ref, dht_ref,  # inputs
                        dq_ref, dk_ref, dh0_ref,  # outputs
                        *, scale, chunk, sub, num_chunks, k_pad, mm_dtype):
    """``gla_bwd`` on GPU: program (batch, head, key block) with all value columns: ``dq``, ``dk`` (complete: no
    partial sums over value blocks) and the ``[block_k, V]`` rows of ``dS`` / ``d initial_state``. Refs: q/k/cum
    ``[T_pad, block_k]``, v/do ``[T_pad, V_pad]``, carry ``[N * K_pad, 1]``, states ``[N * K_pad, V_pad]``."""
    block_k = q_ref.shape[-1]
    k_off = pl.program_id(2) * block_k

    def body(i, d_state):
        ci = num_chunks - 1 - i
        base = pl.multiple_of(ci * chunk, chunk)
        row = pl.multiple_of(ci * k_pad + k_off, block_k)
        doc_prev = _rows(doc_ref, jnp.maximum(base - 1, 0), 1)  # [1, 1] (doc of pos -1 is 0)
        return _bwd_chunk(q_ref, k_ref, v_ref, cum_ref, doc_ref, do_ref, dq_ref, dk_ref, None,
                          _rows(states_ref, row, block_k), d_state, _rows(carry_ref, row, block_k), doc_prev, base,
                          scale=scale, chunk=chunk, sub=sub, mm_dtype=mm_dtype, want_dv=False)

    dh0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dht_ref[...].astype(jnp.float32))


def _bwd_dv_kernel_gpu(q_ref, k_ref, v_ref, cum_ref, doc_ref, carry_ref, do_ref, dht_ref, dv_ref,
                       *, scale, chunk, sub, num_chunks, mm_dtype):
    """``gla_bwd_dv`` on GPU: program (batch, head, value block) with all key columns: ``dv`` (the reverse state
    recurrence again, ``[K, block_v]``; the chunk states are not needed). Refs as the forward's."""
    k_pad = q_ref.shape[-1]

    def body(i, d_state):
        ci = num_chunks - 1 - i
        base = pl.multiple_of(ci * chunk, chunk)
        doc_prev = _rows(doc_ref, jnp.maximum(base - 1, 0), 1)
        return _bwd_chunk(q_ref, k_ref, v_ref, cum_ref, doc_ref, do_ref, None, None, dv_ref, None, d_state,
                          _rows(carry_ref, pl.multiple_of(ci * k_pad, k_pad), k_pad), doc_prev, base,
                          scale=scale, chunk=chunk, sub=sub, mm_dtype=mm_dtype, want_dqk=False)

    jax.lax.fori_loop(0, num_chunks, body, dht_ref[...].astype(jnp.float32))


# ---- TPU (Mosaic): a sequential chunk grid axis, the state / its gradient in VMEM scratch ------------------------

def _states_kernel_tpu(k_ref, v_ref, cum_ref, doc_ref, carry_ref, h0_ref, states_ref, state_ref, *, chunk, sub,
                       mm_dtype):
    ci = pl.program_id(3)

    @pl.when(ci == 0)
    def _init():
        state_ref[...] = h0_ref[...]

    state = state_ref[...]
    states_ref[...] = state.astype(states_ref.dtype)
    state_ref[...] = _state_update(k_ref, v_ref, cum_ref, doc_ref, state, carry_ref[...], 0, chunk=chunk, sub=sub,
                                   mm_dtype=mm_dtype)


def _bwd_kernel_tpu(q_ref, k_ref, v_ref, cum_ref, doc_ref, carry_ref, docprev_ref, states_ref, do_ref, dht_ref,
                    dq_ref, dk_ref, dv_ref, dh0_ref, dstate_ref, *, scale, chunk, sub, mm_dtype):
    ci = pl.program_id(3)  # visits chunk N - 1 - ci

    @pl.when(ci == 0)
    def _init():
        dstate_ref[...] = dht_ref[...]

    d_state = _bwd_chunk(q_ref, k_ref, v_ref, cum_ref, doc_ref, do_ref, dq_ref, dk_ref, dv_ref, states_ref[...],
                         dstate_ref[...], carry_ref[...], docprev_ref[...], 0, scale=scale, chunk=chunk, sub=sub,
                         mm_dtype=mm_dtype)
    dstate_ref[...] = d_state

    @pl.when(ci == pl.num_programs(3) - 1)
    def _final():
        dh0_ref[...] = d_state


# ---- footprints ------------------------------------------------------------------------------------------------

def footprints(platform: str, k_dim: int, v_dim: int, dtype, chunk_size: int,
               block_sizes: BlockSizes) -> tuple[tiles.Footprint, ...]:
    """On-chip bytes of one program of each backward kernel (``kernels.tiles``): ``(gla_states, gla_bwd)`` on
    TPU, from the BlockSpecs below and the per-sub-chunk values a chunk keeps live; ``(gla_states, gla_bwd,
    gla_bwd_dv)`` on GPU, from the dot operand tiles of one sub-chunk step and the live values (state, its
    gradient, the chunk's rows and their gradients).
    """
    chunk = int(chunk_size)
    sub = block_sizes.sub_chunk if chunk % block_sizes.sub_chunk == 0 else chunk
    n_sub = chunk // sub
    k_pad, v_pad = padded_dim(k_dim), padded_dim(v_dim)
    bv, f32, i32 = min(block_sizes.block_v, v_pad), jnp.float32, jnp.int32
    if platform == "tpu":
        states = tiles.tpu_footprint(
            "gla_states",
            [((chunk, k_pad), dtype), ((chunk, bv), dtype), ((chunk, k_pad), f32), ((chunk, 1), i32),
             ((k_pad, 1), f32), ((k_pad, bv), f32), ((k_pad, bv), dtype)],
            scratch=[((k_pad, bv), f32)],
            temporaries=[((k_pad, bv), f32)] * 2 + [((sub, k_pad), f32)] * 2)
        bwd = tiles.tpu_footprint(
            "gla_bwd",
            [((chunk, k_pad), dtype)] * 2 + [((chunk, bv), dtype)] * 2
            + [((chunk, k_pad), f32), ((chunk, 1), i32), ((k_pad, 1), f32), ((1, 1), i32), ((k_pad, bv), dtype),
               ((k_pad, bv), f32)]
            + [((chunk, k_pad), f32)] * 2 + [((chunk, bv), dtype), ((k_pad, bv), f32)],  # dq, dk, dv, dh0
            scratch=[((k_pad, bv), f32)],
            temporaries=[((k_pad, bv), f32)] * 3 + [((sub, k_pad), f32)] * (5 * n_sub + 4)
            + [((sub, bv), f32)] * (3 * n_sub) + [((sub, sub), f32)] * 2)
        return states, bwd
    states = tiles.gpu_footprint(
        "gla_states", [((sub, k_pad), dtype), ((sub, bv), dtype)],
        live=[((k_pad, bv), f32)] * 2 + [((sub, k_pad), f32)] * 2)
    bk = min(bv, k_pad)  # gla_bwd: a key block with all value columns
    bwd = tiles.gpu_footprint(
        "gla_bwd", [((sub, v_pad), dtype), ((bk, v_pad), dtype), ((sub, bk), dtype), ((sub, sub), dtype),
                    ((sub, v_pad), dtype)],
        live=[((bk, v_pad), f32)] * 3 + [((sub, bk), f32)] * (5 * n_sub) + [((sub, v_pad), f32)] * (2 * n_sub))
    bwd_dv = tiles.gpu_footprint(
        "gla_bwd_dv", [((sub, k_pad), dtype), ((k_pad, bv), dtype), ((sub, sub), dtype), ((sub, bv), dtype)],
        live=[((k_pad, bv), f32)] * 2 + [((sub, k_pad), f32)] * (3 * n_sub) + [((sub, bv), f32)] * (2 * n_sub))
    return states, bwd, bwd_dv


def segment_reverse_cumsum(x: jax.Array, doc: jax.Array) -> jax.Array:
    """``out[:, t] = sum_{s >= t, doc[:, s] == doc[:, t]} x[:, s]`` for ``x [B, T, ...]``, monotone ``doc [B, T]``
    (a segmented associative scan: no difference of running sums)."""
    xr = x[:, ::-1]
    dr = doc[:, ::-1]
    start = jnp.concatenate([jnp.ones_like(dr[:, :1], bool), dr[:, 1:] != dr[:, :-1]], axis=1)  # [B, T]
    start = start.reshape(start.shape + (1,) * (x.ndim - 2))

    def combine(a, b):
        (va, fa), (vb, fb) = a, b
        return jnp.where(fb, vb, va + vb), fa | fb

    out, _ = jax.lax.associative_scan(combine, (xr, jnp.broadcast_to(start, xr.shape)), axis=1)
    return out[:, ::-1]


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "block_sizes", "interpret", "platform"))
def gla_bwd(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, initial_state: jax.Array, doc: jax.Array,
            final_state: jax.Array, d_out: jax.Array, d_final: jax.Array, *, scale: float, chunk_size: int,
            block_sizes: BlockSizes, interpret: bool, platform: str = "gpu"):
    """Gradients of ``pallas.gla_fwd`` by the two backward kernels.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H, K]`` log-decay (float32).
      initial_state: ``[B, H, K, V]`` float32.
      doc: ``[B, T]`` int32 document index (``ref.document_index``).
      final_state: ``[B, H, K, V]`` the forward's final state (for the log-decay gradient).
      d_out: ``[B, T, H, V]`` cotangent of the output; d_final: ``[B, H, K, V]`` of the final state.
      scale, chunk_size, block_sizes, interpret, platform: as ``pallas.gla_fwd``.

    Returns:
      ``(dq, dk, dv, dg, d_initial_state)`` in the dtypes of ``(q, k, v, g, initial_state)``.
    """
    batch, length, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    f32 = jnp.float32
    p = prepare(q, k, v, g, initial_state, doc, chunk_size, block_sizes)
    chunk, sub, num_chunks, t_pad, k_pad, v_pad, block_v = (p.chunk, p.sub, p.num_chunks, p.t_pad, p.k_pad,
                                                            p.v_pad, p.block_v)
    n_vb = v_pad // block_v
    q_t, k_t, v_t, cum_t, doc_t, h0 = p.q, p.k, p.v, p.cum, p.doc, p.h0
    do_t = to_kernel_layout(d_out.astype(q.dtype), t_pad, v_pad)
    dht = jnp.pad(d_final.astype(f32), ((0, 0), (0, 0), (0, k_pad - k_dim), (0, v_pad - v_dim)))

    fps = footprints(platform, k_dim, v_dim, q.dtype, chunk, block_sizes)
    fp_states, fp_bwd, fp_dv = fps[0], fps[1], fps[-1]
    if not interpret:
        for fp in fps:
            tiles.require_fit(fp)
    out_shapes = [jax.ShapeDtypeStruct((batch, heads, n_vb, t_pad, k_pad), f32)] * 2 + [
        jax.ShapeDtypeStruct((batch, heads, t_pad, v_pad), v.dtype),  # dv: whole per program, no partial sums
        jax.ShapeDtypeStruct((batch, heads, k_pad, v_pad), f32)]
    kw = dict(chunk=chunk, sub=sub, mm_dtype=p.mm_dtype)
    if platform == "tpu":
        if chunk % 8 and num_chunks > 1:
            raise ValueError(f"gla: chunk_size={chunk} must be a multiple of 8 for the TPU kernel")
        from jax.experimental.pallas import tpu as pltpu
        carry_c, doc_prev_rows = p.carry, p.doc_prev_rows
        grid = (batch, heads, n_vb, num_chunks)
        scratch = [pltpu.VMEM((k_pad, block_v), f32)]
        st = pl.BlockSpec((None, None, k_pad, block_v), lambda b, h, j, c: (b, h, 0, j))
        fwd_k = pl.BlockSpec((None, None, chunk, k_pad), lambda b, h, j, c: (b, h, c, 0))
        fwd_v = pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, c: (b, h, c, j))
        fwd_states = pl.BlockSpec((None, None, None, k_pad, block_v), lambda b, h, j, c: (b, h, c, 0, j))
        states = pl.pallas_call(
            functools.partial(_states_kernel_tpu, **kw),
            grid=grid,
            in_specs=[fwd_k, fwd_v, fwd_k, pl.BlockSpec((None, chunk, 1), lambda b, h, j, c: (b, c, 0)),
                      pl.BlockSpec((None, None, None, k_pad, 1), lambda b, h, j, c: (b, h, c, 0, 0)), st],
            out_specs=fwd_states,
            out_shape=jax.ShapeDtypeStruct((batch, heads, num_chunks, k_pad, v_pad), p.mm_dtype),
            scratch_shapes=scratch, interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp_states,
                                                  dimension_semantics=("parallel",) * 3 + ("arbitrary",)),
            name="gla_states",
        )(k_t, v_t, cum_t, doc_t, carry_c, h0)

        last = num_chunks - 1
        rk = pl.BlockSpec((None, None, chunk, k_pad), lambda b, h, j, c: (b, h, last - c, 0))
        rv = pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, c: (b, h, last - c, j))
        rdk = pl.BlockSpec((None, None, None, chunk, k_pad), lambda b, h, j, c: (b, h, j, last - c, 0))
        dq_p, dk_p, dv_t, dh0 = pl.pallas_call(
            functools.partial(_bwd_kernel_tpu, scale=float(scale), **kw),
            grid=grid,
            in_specs=[rk, rk, rv, rk,
                      pl.BlockSpec((None, chunk, 1), lambda b, h, j, c: (b, last - c, 0)),  # doc
                      pl.BlockSpec((None, None, None, k_pad, 1), lambda b, h, j, c: (b, h, last - c, 0, 0)),  # carry
                      pl.BlockSpec((None, None, 1, 1), lambda b, h, j, c: (b, last - c, 0, 0)),  # doc before chunk
                      pl.BlockSpec((None, None, None, k_pad, block_v),
                                   lambda b, h, j, c: (b, h, last - c, 0, j)),  # state before the chunk
                      rv, st],
            out_specs=[rdk, rdk, rv, st],
            out_shape=out_shapes,
            scratch_shapes=scratch, interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp_bwd,
                                                  dimension_semantics=("parallel",) * 3 + ("arbitrary",)),
            name="gla_bwd",
        )(q_t, k_t, v_t, cum_t, doc_t, carry_c, doc_prev_rows, states, do_t, dht)
    else:
        carry_r = p.carry.reshape(batch, heads, num_chunks * k_pad, 1)
        seq_k = pl.BlockSpec((None, None, t_pad, k_pad), lambda b, h, j: (b, h, 0, 0))
        seq_v = pl.BlockSpec((None, None, t_pad, block_v), lambda b, h, j: (b, h, 0, j))
        seq_doc = pl.BlockSpec((None, t_pad, 1), lambda b, h, j: (b, 0, 0))
        seq_carry = pl.BlockSpec((None, None, num_chunks * k_pad, 1), lambda b, h, j: (b, h, 0, 0))
        seq_states = pl.BlockSpec((None, None, num_chunks * k_pad, block_v), lambda b, h, j: (b, h, 0, j))
        st = pl.BlockSpec((None, None, k_pad, block_v), lambda b, h, j: (b, h, 0, j))
        states = pl.pallas_call(
            functools.partial(_states_kernel_gpu, num_chunks=num_chunks, **kw),
            grid=(batch, heads, n_vb),
            in_specs=[seq_k, seq_v, seq_k, seq_doc, seq_carry, st],
            out_specs=seq_states,
            out_shape=jax.ShapeDtypeStruct((batch, heads, num_chunks * k_pad, v_pad), p.mm_dtype),
            interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp_states),
            name="gla_states",
        )(k_t, v_t, cum_t, doc_t, carry_r, h0)
        block_k = min(block_v, k_pad)  # key block of gla_bwd (dq, dk): the value block's size
        kb = lambda width: pl.BlockSpec((None, None, t_pad, width), lambda b, h, j: (b, h, 0, j))  # noqa: E731
        dq_p, dk_p, dh0 = pl.pallas_call(
            functools.partial(_bwd_dqk_kernel_gpu, scale=float(scale), num_chunks=num_chunks, k_pad=k_pad, **kw),
            grid=(batch, heads, k_pad // block_k),
            in_specs=[kb(block_k), kb(block_k), kb(v_pad), kb(block_k), seq_doc, seq_carry,
                      pl.BlockSpec((None, None, num_chunks * k_pad, v_pad), lambda b, h, j: (b, h, 0, 0)),
                      kb(v_pad), pl.BlockSpec((None, None, block_k, v_pad), lambda b, h, j: (b, h, j, 0))],
            out_specs=[kb(block_k), kb(block_k), pl.BlockSpec((None, None, block_k, v_pad), lambda b, h, j: (b, h, j, 0))],
            out_shape=[jax.ShapeDtypeStruct((batch, heads, t_pad, k_pad), f32)] * 2
            + [jax.ShapeDtypeStruct((batch, heads, k_pad, v_pad), f32)],
            interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp_bwd),
            name="gla_bwd",
        )(q_t, k_t, v_t, cum_t, doc_t, carry_r, states, do_t, dht)
        dq_p, dk_p = dq_p[:, :, None], dk_p[:, :, None]  # one (complete) partial
        dv_t = pl.pallas_call(
            functools.partial(_bwd_dv_kernel_gpu, scale=float(scale), num_chunks=num_chunks, **kw),
            grid=(batch, heads, n_vb),
            in_specs=[seq_k, seq_k, seq_v, seq_k, seq_doc, seq_carry, seq_v, st],
            out_specs=seq_v,
            out_shape=out_shapes[2],
            interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp_dv),
            name="gla_bwd_dv",
        )(q_t, k_t, v_t, cum_t, doc_t, carry_r, do_t, dht)

    def unprep(x, dim):  # [B, H, T_pad, D_pad] -> [B, T, H, D]
        return jnp.transpose(x, (0, 2, 1, 3))[:, :length, :, :dim]

    dqs = unprep(jnp.sum(dq_p, axis=2), k_dim)  # w.r.t. the scaled q
    dk = unprep(jnp.sum(dk_p, axis=2), k_dim)
    dv = unprep(dv_t, v_dim)  # v.dtype
    # Log-decay: dB = q dq - k dk (+ the final state's exp(B_T) at the last row), summed backwards per document.
    d_b = q.astype(f32) * scale * dqs - k.astype(f32) * dk  # [B, T, H, K]
    d_b = d_b.at[:, -1].add(jnp.sum(d_final.astype(f32) * final_state.astype(f32), axis=-1))
    dg = segment_reverse_cumsum(d_b, doc.astype(jnp.int32))
    return ((dqs * scale).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
            dh0[:, :, :k_dim, :v_dim].astype(initial_state.dtype))
