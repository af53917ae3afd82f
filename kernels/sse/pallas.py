"""Pallas forward kernel for the masked SSE recurrence (papers/sse.md §3.5a) without replication.

The mask form of SSE runs one GLA per partition on copies of q/k/v/g that are scaled by the
routing weight and whose log-decay is zeroed where the partition is not selected. This kernel
reads the *shared* ``q, k, v, g`` (one copy, ``[B, H, T, D]``) and the routing weights
``w [B, N, T, 1]``, and does the masking and scaling in registers:

    q^i_t = w_t[i] q_t,   k^i_t = w_t[i] k_t,   g^i_t = g_t if w_t[i] != 0 else 0.

Grid ``(B, H, N, V // block_v)``: one program per (batch, head, partition, block of value
columns). The partition's within-chunk cumulative log-decay ``G`` depends on its own selection
mask, so it is computed in the kernel, one sub-chunk at a time: ``G_I = G_{before I} + L @ g^i_I``
with ``L`` the ``[c, c]`` inclusive lower-triangular ones (a float32 matmul, which every Pallas
backend lowers); the per-chunk state decay ``exp(G_last)`` of each partition is a small
``[B, N, H, N_chunks, K]`` input (1/chunk of a replicated g). Apart from that the chunk math is
``kernels.gla.pallas`` (same decay references and finite document masks): state term, earlier
sub-chunks referenced at the row before the current one, a column loop inside a sub-chunk (no
``[c, c, K]`` tensor), all exponents <= 0. Row ``j`` of ``G_I`` inside the column loop is taken
with a masked reduction (values, unlike refs, cannot be indexed dynamically on every backend).

Each program writes its partition's output ``[T, block_v]`` in float32 to ``o[b, i, h]``; the
wrapper sums over ``N`` (float32) and casts to ``q.dtype``. This keeps every program independent
(partition outputs are not accumulated across grid steps, which GPU grids do not allow), at the
cost of an ``N``-times output buffer; q/k/v/g are never replicated.

The forward kernel: ``ops.py`` wraps it in ``jax.custom_vjp`` whose backward runs the GLA backward kernels
(``kernels.gla.pallas_bwd``) on the partitions folded into heads.
Status: run on CPU through the Pallas interpreter; the tests also lower it for Triton (GPU) and
Mosaic (TPU, ``vmem_limit_bytes`` from ``footprint``) without running it there. On TPU the chunk is a sequential
fifth grid axis with the state in VMEM scratch, so VMEM holds one chunk whatever ``T``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import tiles
from kernels.gla import pallas as gla_pallas
from kernels.gla import ref as gla_ref

__all__ = ["BlockSizes", "footprint", "sse_fwd"]

_pad_last = tiles.pad_last


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the SSE forward kernel.

    Attributes:
      block_v: value columns per program (a power of two dividing the padded V).
      sub_chunk: rows per sub-chunk ``c``; the chunk size must be a multiple of it (otherwise the
        whole chunk is one sub-chunk).
    """
    block_v: int = 64
    sub_chunk: int = gla_ref.SUB_CHUNK

    @classmethod
    def get_default(cls, v_dim: int, platform: str = "gpu") -> "BlockSizes":
        """64 value columns on GPU (more programs), all of V on TPU/CPU."""
        v_pad = gla_pallas.padded_dim(v_dim)
        return cls(block_v=min(v_pad, 64) if platform == "gpu" else v_pad)


def footprint(platform: str, length: int, k_dim: int, v_dim: int, n: int, dtype, chunk_size: int,
              block_sizes: BlockSizes) -> tiles.Footprint:
    """On-chip bytes of one program (``kernels.tiles``): TPU from the BlockSpecs below, GPU from the
    per-sub-chunk dot tiles, the sub-chunks kept for the state update and the carried state."""
    chunk = int(chunk_size)
    sub = block_sizes.sub_chunk if chunk % block_sizes.sub_chunk == 0 else chunk
    del length  # one chunk per program step on TPU; GPU tiles are per sub-chunk
    k_pad, v_pad = gla_pallas.padded_dim(k_dim), gla_pallas.padded_dim(v_dim)
    bv, f32, n_sub = min(block_sizes.block_v, v_pad), jnp.float32, chunk // sub
    if platform == "tpu":  # one chunk per grid step
        return tiles.tpu_footprint(
            "sse_fwd",
            [((chunk, k_pad), dtype)] * 2 + [((chunk, bv), dtype), ((chunk, k_pad), f32), ((chunk, 1), f32),
             ((chunk, 1), jnp.int32), ((k_pad, 1), f32), ((1, 1), jnp.int32), ((k_pad, bv), f32),
             ((chunk, bv), f32), ((k_pad, bv), f32)],
            scratch=[((k_pad, bv), f32)],
            temporaries=[((k_pad, bv), f32)] * 2 + [((sub, k_pad), f32)] * (2 * n_sub + 3)
            + [((sub, bv), f32)] * (n_sub + 1))
    return tiles.gpu_footprint(
        "sse_fwd", [((sub, sub), f32), ((sub, k_pad), dtype), ((sub, k_pad), dtype), ((k_pad, bv), dtype),
                    ((sub, sub), dtype), ((sub, bv), dtype)],
        live=[((k_pad, bv), f32)] * 2 + [((sub, k_pad), f32)] * (2 * n_sub + 2) + [((sub, bv), f32)] * (n_sub + 1))


def _sse_fwd_kernel(*refs, scale: float, chunk: int, sub: int, num_chunks: int, mm_dtype, tpu: bool = False):
    """GPU (Triton): one program walks all chunks of one (batch, head, partition) for one block of value
    columns. TPU (Mosaic, ``tpu=True``): program (batch, head, partition, value block, chunk), the chunk axis
    sequential, every block one chunk (``T_pad`` below reads ``C``), an extra ``[1, 1]`` input with the document
    before the chunk, the carry block ``[K_pad, 1]`` of this chunk, and the state in VMEM scratch.

    Refs (leading grid dims squeezed): q/k/g ``[T_pad, K_pad]``, v ``[T_pad, block_v]``, w
    ``[T_pad, 1]`` float32 (this partition's weights), doc ``[T_pad, 1]`` int32, carry
    ``[N_chunks * K_pad, 1]`` float32 (this partition's per-chunk state decay), h0/ht
    ``[K_pad, block_v]`` float32, o ``[T_pad, block_v]`` float32.
    """
    if tpu:
        (q_ref, k_ref, v_ref, g_ref, w_ref, doc_ref, carry_ref, docprev_ref, h0_ref, o_ref, ht_ref,
         state_ref) = refs
    else:
        q_ref, k_ref, v_ref, g_ref, w_ref, doc_ref, carry_ref, h0_ref, o_ref, ht_ref = refs
    f32 = jnp.float32
    k_pad = q_ref.shape[-1]
    n_sub = chunk // sub
    precision = jax.lax.Precision.HIGHEST if mm_dtype == f32 else None
    hi = jax.lax.Precision.HIGHEST
    rows = jax.lax.broadcasted_iota(jnp.int32, (sub, 1), 0)  # [c, 1]
    lower = (jax.lax.broadcasted_iota(jnp.int32, (sub, sub), 1)
             <= jax.lax.broadcasted_iota(jnp.int32, (sub, sub), 0)).astype(f32)  # [c, c]

    def dot(a, b, contract):
        return jax.lax.dot_general(a.astype(mm_dtype), b.astype(mm_dtype), (contract, ((), ())),
                                   precision=precision, preferred_element_type=f32)

    def dot32(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=hi,
                                   preferred_element_type=f32)

    def rows_of(r, start, size):
        return r[pl.ds(start, size), :]

    def chunk_at(base, state, carry, doc_prev):
        doc_last = rows_of(doc_ref, base + chunk - 1, 1)  # [1, 1]
        before = jnp.zeros((1, k_pad), f32)  # G at the row before the current sub-chunk
        done = []  # (k, G, doc, v) of the sub-chunks already processed in this chunk
        for i_sub in range(n_sub):
            s_i = base + i_sub * sub
            w_i = rows_of(w_ref, s_i, sub)  # [c, 1]
            g_i = jnp.where(w_i != 0, rows_of(g_ref, s_i, sub).astype(f32), 0.0)  # [c, K]
            cum_i = before + dot32(lower, g_i)  # [c, K]  G of each row (chunk-relative)
            q_i = rows_of(q_ref, s_i, sub).astype(f32) * (w_i * scale)  # [c, K]
            k_i = rows_of(k_ref, s_i, sub).astype(f32) * w_i  # [c, K]
            v_i = rows_of(v_ref, s_i, sub)  # [c, bv]
            doc_i = rows_of(doc_ref, s_i, sub)  # [c, 1]

            # Against the state at the chunk start.
            q_in = jnp.where(doc_i == doc_prev, q_i * jnp.exp(cum_i), 0.0)  # [c, K]
            o_i = dot(q_in, state, ((1,), (0,)))  # [c, bv]

            # Against earlier sub-chunks, referenced at r = the row before this sub-chunk.
            if done:
                doc_r = rows_of(doc_ref, s_i - 1, 1)  # [1, 1]
                q_off = jnp.where(doc_i == doc_r, q_i * jnp.exp(cum_i - before), 0.0)  # [c, K]
                for k_j, cum_j, doc_j, v_j in done:
                    k_off = jnp.where(doc_j == doc_r, k_j * jnp.exp(before - cum_j), 0.0)  # [c,K]
                    scores = dot(q_off, k_off, ((1,), (1,)))  # [c, c]
                    o_i = o_i + dot(scores, v_j, ((1,), (0,)))  # [c, bv]

            # Inside the sub-chunk: one key row j at a time.
            def column(j, acc, s_i=s_i, q_i=q_i, cum_i=cum_i, doc_i=doc_i):
                w_j = rows_of(w_ref, s_i + j, 1)  # [1, 1]
                k_j = rows_of(k_ref, s_i + j, 1).astype(f32) * w_j  # [1, K]
                cum_j = jnp.sum(jnp.where(rows == j, cum_i, 0.0), axis=0, keepdims=True)  # [1, K]
                doc_j = rows_of(doc_ref, s_i + j, 1)  # [1, 1]
                v_j = rows_of(v_ref, s_i + j, 1).astype(f32)  # [1, bv]
                a = jnp.sum(q_i * k_j * jnp.exp(jnp.minimum(cum_i - cum_j, 0.0)), axis=1,
                            keepdims=True)  # [c, 1]
                a = jnp.where((rows >= j) & (doc_i == doc_j), a, 0.0)
                return acc + a * v_j  # [c, bv]

            o_i = jax.lax.fori_loop(0, sub, column, o_i)
            o_ref[pl.ds(s_i, sub), :] = o_i.astype(o_ref.dtype)
            done.append((k_i, cum_i, doc_i, v_i))
            before = before + jnp.sum(g_i, axis=0, keepdims=True)  # [1, K]

        # State update: S <- diag(exp(G_last)) S + sum_I (k_I exp(G_last - G_I))^T v_I.
        update = jnp.zeros(state.shape, f32)  # [K, bv]
        for k_j, cum_j, doc_j, v_j in done:
            k_up = jnp.where(doc_j == doc_last, k_j * jnp.exp(jnp.minimum(before - cum_j, 0.0)),
                             0.0)  # [c, K]
            update = update + dot(k_up, v_j, ((0,), (0,)))  # [K, bv]
        return carry * state + update

    if tpu:
        ci = pl.program_id(4)

        @pl.when(ci == 0)
        def _init():
            state_ref[...] = h0_ref[...]

        new_state = chunk_at(0, state_ref[...], carry_ref[...], docprev_ref[...])
        state_ref[...] = new_state

        @pl.when(ci == pl.num_programs(4) - 1)
        def _final():
            ht_ref[...] = new_state
        return

    def chunk_body(ci, state):
        base = pl.multiple_of(ci * chunk, chunk)
        doc_prev = rows_of(doc_ref, jnp.maximum(base - 1, 0), 1)  # [1, 1] (doc of pos -1 is 0)
        carry = carry_ref[pl.ds(pl.multiple_of(ci * k_pad, k_pad), k_pad), :]  # [K, 1]
        return chunk_at(base, state, carry, doc_prev)

    ht_ref[...] = jax.lax.fori_loop(0, num_chunks, chunk_body, h0_ref[...].astype(f32))


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "block_sizes", "interpret",
                                             "platform"))
def sse_fwd(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, w: jax.Array,
            initial_state: jax.Array, doc: jax.Array, *, scale: float, chunk_size: int,
            block_sizes: BlockSizes, interpret: bool,
            platform: str = "gpu") -> tuple[jax.Array, jax.Array]:
    """Runs the forward kernel.

    Args:
      q: ``[B, T, H, K]``.
      k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` log-decay (float32 recommended), shared by all partitions.
      w: ``[B, T, N]`` routing weights, 0 where a partition is not selected.
      initial_state: ``[B, N, H, K, V]`` float32.
      doc: ``[B, T]`` int32 document index (``kernels.gla.ref.document_index``).
      scale: output scale.
      chunk_size: chunk length (a multiple of ``block_sizes.sub_chunk``, or the whole chunk is one
        sub-chunk).
      block_sizes: tiles.
      interpret: run the Pallas interpreter (CPU).
      platform: compile target, ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic); unused when
        interpreting.

    Returns:
      ``(o, final_state)``: ``[B, T, H, V]`` in ``q.dtype``, ``[B, N, H, K, V]`` float32.
    """
    batch, length, heads, k_dim = q.shape
    n = w.shape[-1]
    v_dim = v.shape[-1]
    chunk = int(chunk_size)
    sub = block_sizes.sub_chunk if chunk % block_sizes.sub_chunk == 0 else chunk
    num_chunks = -(-length // chunk)
    t_pad = num_chunks * chunk
    k_pad, v_pad = gla_pallas.padded_dim(k_dim), gla_pallas.padded_dim(v_dim)
    block_v = min(block_sizes.block_v, v_pad)
    if v_pad % block_v:
        raise ValueError(f"sse: block_v={block_v} must divide the padded V={v_pad}")
    mm_dtype = jnp.float32 if q.dtype == jnp.float32 else q.dtype

    def prep(x, dim):  # [B, T, H, D] -> [B, H, T_pad, D_pad]
        return jnp.transpose(_pad_last(gla_ref.pad_time(x, t_pad), dim), (0, 2, 1, 3))

    q_t, k_t = prep(q, k_pad), prep(k, k_pad)  # [B, H, T_pad, K_pad]
    g_t = prep(g.astype(jnp.float32), k_pad)  # [B, H, T_pad, K_pad]
    v_t = prep(v, v_pad)  # [B, H, T_pad, V_pad]
    w_t = jnp.transpose(gla_ref.pad_time(w.astype(jnp.float32), t_pad),
                        (0, 2, 1))[..., None]  # [B, N, T_pad, 1]  (padding: not selected)
    doc = gla_ref.pad_time(doc.astype(jnp.int32), t_pad, mode="edge")  # [B, T_pad]

    # Per-chunk state decay of each partition, exp(sum of its masked log-decays over the chunk),
    # zeroed where the chunk contains a document start: [B, N, H, N_chunks * K_pad, 1]. It is
    # 1/chunk the size of a replicated g, and spares the kernel a [K, 1] transpose.
    sel = (gla_ref.pad_time(w, t_pad) != 0).astype(jnp.float32)  # [B, T_pad, N]
    g_c = _pad_last(gla_ref.pad_time(g.astype(jnp.float32), t_pad), k_pad).reshape(
        batch, num_chunks, chunk, heads, k_pad)  # [B, Nc, C, H, K_pad]
    g_sum = jnp.einsum("bctn,bcthk->bnhck", sel.reshape(batch, num_chunks, chunk, n), g_c,
                       precision=jax.lax.Precision.HIGHEST)  # [B, N, H, Nc, K_pad]
    doc_c = doc.reshape(batch, num_chunks, chunk)  # [B, Nc, C]
    doc_prev = jnp.concatenate([jnp.zeros_like(doc_c[:, :1, 0]), doc_c[:, :-1, -1]], axis=1)
    keep = (doc_c[:, :, -1] == doc_prev)[:, None, None, :, None]  # [B, 1, 1, Nc, 1]
    carry = jnp.where(keep, jnp.exp(g_sum), 0.0).reshape(batch, n, heads, num_chunks * k_pad, 1)
    doc_t = doc[:, :, None]  # [B, T_pad, 1]
    h0 = jnp.pad(initial_state.astype(jnp.float32),
                 ((0, 0),) * 3 + ((0, k_pad - k_dim), (0, v_pad - v_dim)))  # [B, N, H, Kp, Vp]

    fp = footprint(platform, length, k_dim, v_dim, n, q.dtype, chunk, block_sizes)
    if not interpret:
        tiles.require_fit(fp)
    if platform == "tpu":
        if chunk % 8 and num_chunks > 1:
            raise ValueError(f"sse: chunk_size={chunk} must be a multiple of 8 for the TPU kernel")
        from jax.experimental.pallas import tpu as pltpu
        doc_prev_rows = jnp.concatenate([doc[:, :1], doc_c[:, :-1, -1]], axis=1).reshape(batch, num_chunks, 1, 1)
        ck = pl.BlockSpec((None, None, chunk, k_pad), lambda b, h, i, j, c: (b, h, c, 0))
        cv = pl.BlockSpec((None, None, chunk, block_v), lambda b, h, i, j, c: (b, h, c, j))
        st = pl.BlockSpec((None, None, None, k_pad, block_v), lambda b, h, i, j, c: (b, i, h, 0, j))
        o, final_state = pl.pallas_call(
            functools.partial(_sse_fwd_kernel, scale=float(scale), chunk=chunk, sub=sub, num_chunks=num_chunks,
                              mm_dtype=mm_dtype, tpu=True),
            grid=(batch, heads, n, v_pad // block_v, num_chunks),
            in_specs=[
                ck, ck, cv, ck,
                pl.BlockSpec((None, None, chunk, 1), lambda b, h, i, j, c: (b, i, c, 0)),  # w
                pl.BlockSpec((None, chunk, 1), lambda b, h, i, j, c: (b, c, 0)),  # doc
                pl.BlockSpec((None, None, None, None, k_pad, 1),
                             lambda b, h, i, j, c: (b, i, h, c, 0, 0)),  # carry of this chunk
                pl.BlockSpec((None, None, 1, 1), lambda b, h, i, j, c: (b, c, 0, 0)),  # doc before the chunk
                st,
            ],
            out_specs=[pl.BlockSpec((None, None, None, chunk, block_v), lambda b, h, i, j, c: (b, i, h, c, j)), st],
            out_shape=[
                jax.ShapeDtypeStruct((batch, n, heads, t_pad, v_pad), jnp.float32),
                jax.ShapeDtypeStruct((batch, n, heads, k_pad, v_pad), jnp.float32),
            ],
            scratch_shapes=[pltpu.VMEM((k_pad, block_v), jnp.float32)],
            interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp,
                                                  dimension_semantics=("parallel",) * 4 + ("arbitrary",)),
            name="sse_fwd",
        )(q_t, k_t, v_t, g_t, w_t, doc_t, carry.reshape(batch, n, heads, num_chunks, k_pad, 1), doc_prev_rows, h0)
        o = jnp.sum(o, axis=1)  # [B, H, T_pad, V_pad]  sum over partitions, float32
        o = jnp.transpose(o, (0, 2, 1, 3))[:, :length, :, :v_dim]  # [B, T, H, V]
        return o.astype(q.dtype), final_state[..., :k_dim, :v_dim]

    kernel = functools.partial(_sse_fwd_kernel, scale=float(scale), chunk=chunk, sub=sub,
                               num_chunks=num_chunks, mm_dtype=mm_dtype)
    seq_k = pl.BlockSpec((None, None, t_pad, k_pad), lambda b, h, i, j: (b, h, 0, 0))
    seq_v = pl.BlockSpec((None, None, t_pad, block_v), lambda b, h, i, j: (b, h, 0, j))
    state = pl.BlockSpec((None, None, None, k_pad, block_v), lambda b, h, i, j: (b, i, h, 0, j))
    out = pl.BlockSpec((None, None, None, t_pad, block_v), lambda b, h, i, j: (b, i, h, 0, j))
    o, final_state = pl.pallas_call(
        kernel,
        grid=(batch, heads, n, v_pad // block_v),
        in_specs=[
            seq_k, seq_k, seq_v, seq_k,
            pl.BlockSpec((None, None, t_pad, 1), lambda b, h, i, j: (b, i, 0, 0)),  # w
            pl.BlockSpec((None, t_pad, 1), lambda b, h, i, j: (b, 0, 0)),  # doc
            pl.BlockSpec((None, None, None, num_chunks * k_pad, 1),
                         lambda b, h, i, j: (b, i, h, 0, 0)),  # carry
            state,
        ],
        out_specs=[out, state],
        out_shape=[
            jax.ShapeDtypeStruct((batch, n, heads, t_pad, v_pad), jnp.float32),
            jax.ShapeDtypeStruct((batch, n, heads, k_pad, v_pad), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=tiles.compiler_params(platform, interpret, footprint=fp,
                                              dimension_semantics=("parallel",) * 4),
        name="sse_fwd",
    )(q_t, k_t, v_t, g_t, w_t, doc_t, carry, h0)
    o = jnp.sum(o, axis=1)  # [B, H, T_pad, V_pad]  sum over partitions, float32
    o = jnp.transpose(o, (0, 2, 1, 3))[:, :length, :, :v_dim]  # [B, T, H, V]
    return o.astype(q.dtype), final_state[..., :k_dim, :v_dim]
