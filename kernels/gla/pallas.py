"""Pallas forward kernel for gated linear attention (chunked form, state carried in the kernel).

Grid ``(B, H, V // block_v)``. Columns of the state ``S in R^{K x V}`` evolve independently, so each
program owns one ``block_v`` slice of the values, walks the chunks of its ``(b, h)`` row in order
with ``lax.fori_loop``, and keeps its ``[K, block_v]`` float32 state in registers/VMEM. Inside a
chunk it computes the same sums as ``ref.gla_chunked`` with the same finite masks for packed sequences,
split into ``SUB_CHUNK``-row sub-chunks and expressed with 2-D tiles only (``ref.gla_chunked`` splits
differently, into recursive halves down to ``LEAF``-row blocks; both keep every exponent <= 0):

* sub-chunk ``I`` against the chunk-start state: ``(q_I * exp(G_I)) @ S``;
* sub-chunk ``I`` against an earlier sub-chunk ``J``, referenced at the row ``r`` before ``I``:
  ``(q_I exp(G_I - G_r)) @ (k_J exp(G_r - G_J))^T @ v_J``;
* inside sub-chunk ``I``: a loop over its ``c`` columns ``j`` adding
  ``sum_k(q_I * k_j * exp(min(G_I - G_j, 0))) * v_j`` (rank-1 updates, no ``[c, c, K]`` tensor);
* state update: ``S <- exp(G_last) * S + sum_I (k_I exp(G_last - G_I))^T @ v_I``.

All exponents are <= 0. The wrapper pads ``T`` to a multiple of the chunk (zero q/k/v, zero
log-decay) and ``K``, ``V`` to powers of two >= 16 (zeros; Triton needs power-of-two tiles and
``tl.dot`` needs dims >= 16), precomputes the within-chunk cumulative log-decay ``G`` (float32), the
document index of every position, and the per-chunk state decay ``exp(G_last)`` (zeroed where a
chunk contains a segment reset), then transposes to ``[B, H, T, D]`` so every block's last two dims
are the full array dims (legal on TPU for any size, plain pointers on GPU).

The forward kernel: ``ops.py`` wraps it in ``jax.custom_vjp`` with the backward kernels of
``pallas_bwd`` (which share ``prepare``, the operand layout built here).

Status: exercised on CPU through the Pallas interpreter (``interpret=True``) and lowered for Triton (GPU,
parameters passed explicitly) and Mosaic (TPU, ``vmem_limit_bytes`` from ``footprint``) in the tests; not
compiled or run on an accelerator here.

Two block-spec variants share the chunk math (``_gla_chunk``): on GPU (Triton) a program walks all chunks of its
row in a ``fori_loop`` over whole-sequence refs (pointers, nothing staged); on TPU (Mosaic) the chunk is a
sequential ("arbitrary") fourth grid axis, every block is one chunk, and the state lives in VMEM scratch, so
VMEM holds one chunk whatever ``T`` (``footprint``: ~2.5 MiB at ``sse_h_2b``'s K = V = 256, chunk 64, against
~46 MiB for whole-sequence blocks).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import tiles
from kernels.gla import ref

__all__ = ["BlockSizes", "Prepared", "footprint", "gla_fwd", "padded_dim", "prepare", "to_kernel_layout"]

padded_dim = tiles.padded_dim
_pad_last = tiles.pad_last


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the GLA forward kernel.

    Attributes:
      block_v: value columns per program (a power of two; divides the padded V).
      sub_chunk: rows per sub-chunk ``c``; the chunk size must be a multiple of it.
    """
    block_v: int = 64
    sub_chunk: int = ref.SUB_CHUNK

    @classmethod
    def get_default(cls, v_dim: int, platform: str = "gpu") -> "BlockSizes":
        """Defaults: 64 value columns on GPU (more programs for small B*H), all of V on TPU/CPU."""
        v_pad = padded_dim(v_dim)
        block_v = min(v_pad, 64) if platform == "gpu" else v_pad
        return cls(block_v=block_v)


def _gla_chunk(q_ref, k_ref, v_ref, cum_ref, doc_ref, o_ref, state, carry, doc_prev, base, *, scale: float,
               chunk: int, sub: int, mm_dtype):
    """One chunk starting at row ``base`` of the refs: writes its outputs, returns the state after it.

    ``state`` ``[K, bv]`` float32 is the state before the chunk, ``carry`` ``[K, 1]`` its decay over the chunk
    (zero where the chunk holds a document start), ``doc_prev`` ``[1, 1]`` the document of the row before it.
    """
    f32 = jnp.float32
    n_sub = chunk // sub
    precision = jax.lax.Precision.HIGHEST if mm_dtype == f32 else None
    rows = jax.lax.broadcasted_iota(jnp.int32, (sub, 1), 0)  # [c, 1]

    def dot(a, b, contract):
        return jax.lax.dot_general(a.astype(mm_dtype), b.astype(mm_dtype), (contract, ((), ())),
                                   precision=precision, preferred_element_type=f32)

    def rows_of(r, start, size):
        return r[pl.ds(start, size), :]

    last = base + chunk - 1
    doc_last = rows_of(doc_ref, last, 1)  # [1, 1]
    cum_last = rows_of(cum_ref, last, 1)  # [1, K]
    update = jnp.zeros(state.shape, f32)  # [K, bv]
    for i_sub in range(n_sub):
        s_i = base + i_sub * sub
        q_i = rows_of(q_ref, s_i, sub).astype(f32) * scale  # [c, K]
        k_i = rows_of(k_ref, s_i, sub).astype(f32)  # [c, K]
        v_i = rows_of(v_ref, s_i, sub)  # [c, bv]
        cum_i = rows_of(cum_ref, s_i, sub)  # [c, K]
        doc_i = rows_of(doc_ref, s_i, sub)  # [c, 1]

        # Against the state at the chunk start.
        q_in = jnp.where(doc_i == doc_prev, q_i * jnp.exp(cum_i), 0.0)  # [c, K]
        o_i = dot(q_in, state, ((1,), (0,)))  # [c, bv]

        # Against earlier sub-chunks of this chunk, referenced at r = the row before I.
        if i_sub > 0:
            cum_r = rows_of(cum_ref, s_i - 1, 1)  # [1, K]
            doc_r = rows_of(doc_ref, s_i - 1, 1)  # [1, 1]
            q_off = jnp.where(doc_i == doc_r, q_i * jnp.exp(cum_i - cum_r), 0.0)  # [c, K]
        for j_sub in range(i_sub):
            s_j = base + j_sub * sub
            cum_j = rows_of(cum_ref, s_j, sub)  # [c, K]
            doc_j = rows_of(doc_ref, s_j, sub)  # [c, 1]
            k_off = jnp.where(doc_j == doc_r,
                              rows_of(k_ref, s_j, sub).astype(f32) * jnp.exp(cum_r - cum_j),
                              0.0)  # [c, K]
            scores = dot(q_off, k_off, ((1,), (1,)))  # [c, c]
            o_i = o_i + dot(scores, rows_of(v_ref, s_j, sub), ((1,), (0,)))  # [c, bv]

        # Inside sub-chunk I: one column j at a time.
        def column(j, acc, s_i=s_i, q_i=q_i, cum_i=cum_i, doc_i=doc_i):
            k_j = rows_of(k_ref, s_i + j, 1).astype(f32)  # [1, K]
            cum_j = rows_of(cum_ref, s_i + j, 1)  # [1, K]
            doc_j = rows_of(doc_ref, s_i + j, 1)  # [1, 1]
            v_j = rows_of(v_ref, s_i + j, 1).astype(f32)  # [1, bv]
            w = jnp.sum(q_i * k_j * jnp.exp(jnp.minimum(cum_i - cum_j, 0.0)), axis=1,
                        keepdims=True)  # [c, 1]
            w = jnp.where((rows >= j) & (doc_i == doc_j), w, 0.0)
            return acc + w * v_j  # [c, bv]

        o_i = jax.lax.fori_loop(0, sub, column, o_i)
        o_ref[pl.ds(s_i, sub), :] = o_i.astype(o_ref.dtype)

        k_up = jnp.where(doc_i == doc_last, k_i * jnp.exp(cum_last - cum_i), 0.0)  # [c, K]
        update = update + dot(k_up, v_i, ((0,), (0,)))  # [K, bv]
    return carry * state + update


def _gla_fwd_kernel(q_ref, k_ref, v_ref, cum_ref, doc_ref, carry_ref, h0_ref,  # inputs
                    o_ref, ht_ref,  # outputs
                    *, scale: float, chunk: int, sub: int, num_chunks: int, mm_dtype):
    """GPU (Triton): one program walks all chunks of one (batch, head) for one block of value columns.

    Refs (leading grid dims squeezed): q/k/cum ``[T_pad, K_pad]``, v/o ``[T_pad, block_v]``,
    doc ``[T_pad, 1]`` int32, carry ``[N * K_pad, 1]``, h0/ht ``[K_pad, block_v]``.
    """
    k_pad = q_ref.shape[-1]

    def chunk_body(ci, state):
        base = pl.multiple_of(ci * chunk, chunk)
        doc_prev = doc_ref[pl.ds(jnp.maximum(base - 1, 0), 1), :]  # [1, 1] (doc of pos -1 is 0)
        carry = carry_ref[pl.ds(pl.multiple_of(ci * k_pad, k_pad), k_pad), :]  # [K, 1]
        return _gla_chunk(q_ref, k_ref, v_ref, cum_ref, doc_ref, o_ref, state, carry, doc_prev, base,
                          scale=scale, chunk=chunk, sub=sub, mm_dtype=mm_dtype)

    ht_ref[...] = jax.lax.fori_loop(0, num_chunks, chunk_body, h0_ref[...].astype(jnp.float32))


def _gla_tpu_kernel(q_ref, k_ref, v_ref, cum_ref, doc_ref, carry_ref, docprev_ref, h0_ref,  # inputs
                    o_ref, ht_ref,  # outputs
                    state_ref,  # scratch
                    *, scale: float, chunk: int, sub: int, mm_dtype):
    """TPU (Mosaic): program (batch, head, value block, chunk); the chunk axis is sequential and the
    ``[K_pad, block_v]`` state lives in VMEM scratch, so VMEM holds one chunk, not the whole sequence.

    Refs: q/k/cum ``[C, K_pad]``, v/o ``[C, block_v]``, doc ``[C, 1]``, carry ``[K_pad, 1]``, docprev ``[1, 1]``,
    h0/ht ``[K_pad, block_v]``.
    """
    ci = pl.program_id(3)

    @pl.when(ci == 0)
    def _init():
        state_ref[...] = h0_ref[...]

    state = _gla_chunk(q_ref, k_ref, v_ref, cum_ref, doc_ref, o_ref, state_ref[...], carry_ref[...],
                       docprev_ref[...], 0, scale=scale, chunk=chunk, sub=sub, mm_dtype=mm_dtype)
    state_ref[...] = state

    @pl.when(ci == pl.num_programs(3) - 1)
    def _final():
        ht_ref[...] = state


def footprint(platform: str, length: int, k_dim: int, v_dim: int, dtype, chunk_size: int,
              block_sizes: BlockSizes) -> tiles.Footprint:
    """On-chip bytes of one program (``kernels.tiles``): TPU from the BlockSpecs below, GPU from the
    per-sub-chunk dot tiles and the carried state."""
    chunk = int(chunk_size)
    sub = block_sizes.sub_chunk if chunk % block_sizes.sub_chunk == 0 else chunk
    del length  # one chunk per program step on TPU; GPU tiles are per sub-chunk
    k_pad, v_pad = padded_dim(k_dim), padded_dim(v_dim)
    bv, f32 = min(block_sizes.block_v, v_pad), jnp.float32
    if platform == "tpu":  # one chunk per grid step (``_gla_tpu_kernel``)
        return tiles.tpu_footprint(
            "gla_fwd",
            [((chunk, k_pad), dtype)] * 2 + [((chunk, bv), dtype), ((chunk, k_pad), f32), ((chunk, 1), jnp.int32),
             ((k_pad, 1), f32), ((1, 1), jnp.int32), ((k_pad, bv), f32), ((chunk, bv), dtype), ((k_pad, bv), f32)],
            scratch=[((k_pad, bv), f32)],
            temporaries=[((k_pad, bv), f32)] * 2 + [((sub, k_pad), f32)] * 4 + [((sub, bv), f32)] * 2)
    return tiles.gpu_footprint(
        "gla_fwd", [((sub, k_pad), dtype)] * 2 + [((k_pad, bv), dtype), ((sub, sub), dtype), ((sub, bv), dtype)],
        live=[((k_pad, bv), f32)] * 2 + [((sub, k_pad), f32)] * 3 + [((sub, bv), f32)])


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Kernel operands shared by the forward and backward kernels (``prepare``).

    ``q, k, cum`` ``[B, H, T_pad, K_pad]`` (``cum`` the float32 within-chunk cumulative log-decay), ``v``
    ``[B, H, T_pad, V_pad]``, ``doc`` ``[B, T_pad, 1]`` int32, ``carry`` ``[B, H, N, K_pad, 1]`` each chunk's
    state decay (zero where the chunk holds a document start), ``doc_prev_rows`` ``[B, N, 1, 1]`` the document
    of the row before each chunk (row 0's for chunk 0), ``h0`` ``[B, H, K_pad, V_pad]`` float32.
    """
    chunk: int
    sub: int
    num_chunks: int
    t_pad: int
    k_pad: int
    v_pad: int
    block_v: int
    mm_dtype: object
    q: jax.Array
    k: jax.Array
    v: jax.Array
    cum: jax.Array
    doc: jax.Array
    carry: jax.Array
    doc_prev_rows: jax.Array
    h0: jax.Array


def to_kernel_layout(x: jax.Array, t_pad: int, dim: int) -> jax.Array:
    """``[B, T, H, D]`` -> ``[B, H, T_pad, dim]`` (zero padding)."""
    return jnp.transpose(_pad_last(ref.pad_time(x, t_pad), dim), (0, 2, 1, 3))


def prepare(q, k, v, g, initial_state, doc, chunk_size: int, block_sizes: BlockSizes) -> Prepared:
    """Pads ``T`` to whole chunks and ``K``, ``V`` to kernel sizes, transposes to ``[B, H, T, D]`` and computes
    the within-chunk cumulative log-decay, the per-chunk state decays and document rows (see ``Prepared``)."""
    batch, length, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    chunk = int(chunk_size)
    sub = block_sizes.sub_chunk if chunk % block_sizes.sub_chunk == 0 else chunk
    num_chunks = -(-length // chunk)
    t_pad = num_chunks * chunk
    k_pad, v_pad = padded_dim(k_dim), padded_dim(v_dim)
    block_v = min(block_sizes.block_v, v_pad)
    if v_pad % block_v:
        raise ValueError(f"gla: block_v={block_v} must divide the padded V={v_pad}")
    g = _pad_last(ref.pad_time(g.astype(jnp.float32), t_pad), k_pad)  # [B, T_pad, H, K_pad]
    cum = jnp.cumsum(g.reshape(batch, num_chunks, chunk, heads, k_pad), axis=2)  # [B,N,C,H,K]
    doc = ref.pad_time(doc.astype(jnp.int32), t_pad, mode="edge")  # [B, T_pad]
    doc_c = doc.reshape(batch, num_chunks, chunk)  # [B, N, C]
    doc_last = doc_c[:, :, -1]  # [B, N]
    doc_prev = jnp.concatenate([jnp.zeros_like(doc_last[:, :1]), doc_last[:, :-1]], axis=1)
    carry = jnp.where((doc_last == doc_prev)[:, :, None, None], jnp.exp(cum[:, :, -1]),
                      0.0)  # [B, N, H, K]
    carry = jnp.transpose(carry, (0, 2, 1, 3))[..., None]  # [B, H, N, K_pad, 1]
    doc_prev_rows = jnp.concatenate([doc[:, :1], doc_c[:, :-1, -1]], axis=1).reshape(batch, num_chunks, 1, 1)
    h0 = jnp.pad(initial_state.astype(jnp.float32),
                 ((0, 0), (0, 0), (0, k_pad - k_dim), (0, v_pad - v_dim)))  # [B, H, Kp, Vp]
    return Prepared(
        chunk=chunk, sub=sub, num_chunks=num_chunks, t_pad=t_pad, k_pad=k_pad, v_pad=v_pad, block_v=block_v,
        mm_dtype=jnp.float32 if q.dtype == jnp.float32 else q.dtype,
        q=to_kernel_layout(q, t_pad, k_pad), k=to_kernel_layout(k, t_pad, k_pad), v=to_kernel_layout(v, t_pad, v_pad),
        cum=jnp.transpose(cum.reshape(batch, t_pad, heads, k_pad), (0, 2, 1, 3)), doc=doc[:, :, None],
        carry=carry, doc_prev_rows=doc_prev_rows, h0=h0)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "block_sizes", "interpret",
                                             "platform"))
def gla_fwd(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, initial_state: jax.Array,
            doc: jax.Array, *, scale: float, chunk_size: int, block_sizes: BlockSizes,
            interpret: bool, platform: str = "gpu") -> tuple[jax.Array, jax.Array]:
    """Runs the forward kernel.

    Args:
      q: ``[B, T, H, K]``.
      k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` log-decay (float32 recommended).
      initial_state: ``[B, H, K, V]`` float32.
      doc: ``[B, T]`` int32 document index (``ref.document_index``).
      scale: output scale.
      chunk_size: chunk length; a multiple of ``block_sizes.sub_chunk`` (or smaller than it, in
        which case the chunk is one sub-chunk).
      block_sizes: tiles.
      interpret: run the Pallas interpreter (CPU).
      platform: compile target, ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic); unused when
        interpreting.

    Returns:
      ``(o, final_state)``: ``[B, T, H, V]`` in ``q.dtype``, ``[B, H, K, V]`` float32.
    """
    batch, length, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    p = prepare(q, k, v, g, initial_state, doc, chunk_size, block_sizes)
    chunk, sub, num_chunks, t_pad, k_pad, v_pad, block_v = (p.chunk, p.sub, p.num_chunks, p.t_pad, p.k_pad,
                                                            p.v_pad, p.block_v)
    q_t, k_t, v_t, cum_t, doc, h0, mm_dtype = p.q, p.k, p.v, p.cum, p.doc, p.h0, p.mm_dtype
    carry = p.carry.reshape(batch, heads, num_chunks * k_pad, 1)

    fp = footprint(platform, length, k_dim, v_dim, q.dtype, chunk, block_sizes)
    if not interpret:
        tiles.require_fit(fp)
    if platform == "tpu":
        if chunk % 8 and num_chunks > 1:
            raise ValueError(f"gla: chunk_size={chunk} must be a multiple of 8 for the TPU kernel")
        from jax.experimental.pallas import tpu as pltpu
        carry_c, doc_prev_rows = p.carry, p.doc_prev_rows
        ck = pl.BlockSpec((None, None, chunk, k_pad), lambda b, h, j, c: (b, h, c, 0))
        cv = pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, c: (b, h, c, j))
        st = pl.BlockSpec((None, None, k_pad, block_v), lambda b, h, j, c: (b, h, 0, j))
        o, final_state = pl.pallas_call(
            functools.partial(_gla_tpu_kernel, scale=float(scale), chunk=chunk, sub=sub, mm_dtype=mm_dtype),
            grid=(batch, heads, v_pad // block_v, num_chunks),
            in_specs=[
                ck, ck, cv, ck,
                pl.BlockSpec((None, chunk, 1), lambda b, h, j, c: (b, c, 0)),  # doc
                pl.BlockSpec((None, None, None, k_pad, 1), lambda b, h, j, c: (b, h, c, 0, 0)),  # carry
                pl.BlockSpec((None, None, 1, 1), lambda b, h, j, c: (b, c, 0, 0)),  # doc before the chunk
                st,
            ],
            out_specs=[cv, st],
            out_shape=[
                jax.ShapeDtypeStruct((batch, heads, t_pad, v_pad), q.dtype),
                jax.ShapeDtypeStruct((batch, heads, k_pad, v_pad), jnp.float32),
            ],
            scratch_shapes=[pltpu.VMEM((k_pad, block_v), jnp.float32)],
            interpret=interpret,
            compiler_params=tiles.compiler_params(platform, interpret, footprint=fp,
                                                  dimension_semantics=("parallel",) * 3 + ("arbitrary",)),
            name="gla_fwd",
        )(q_t, k_t, v_t, cum_t, doc, carry_c, doc_prev_rows, h0)
        o = jnp.transpose(o, (0, 2, 1, 3))[:, :length, :, :v_dim]  # [B, T, H, V]
        return o, final_state[:, :, :k_dim, :v_dim]

    kernel = functools.partial(_gla_fwd_kernel, scale=float(scale), chunk=chunk, sub=sub,
                               num_chunks=num_chunks, mm_dtype=mm_dtype)
    seq_k = pl.BlockSpec((None, None, t_pad, k_pad), lambda b, h, j: (b, h, 0, 0))
    seq_v = pl.BlockSpec((None, None, t_pad, block_v), lambda b, h, j: (b, h, 0, j))
    state = pl.BlockSpec((None, None, k_pad, block_v), lambda b, h, j: (b, h, 0, j))
    o, final_state = pl.pallas_call(
        kernel,
        grid=(batch, heads, v_pad // block_v),
        in_specs=[
            seq_k, seq_k, seq_v, seq_k,
            pl.BlockSpec((None, t_pad, 1), lambda b, h, j: (b, 0, 0)),  # doc
            pl.BlockSpec((None, None, num_chunks * k_pad, 1), lambda b, h, j: (b, h, 0, 0)),
            state,
        ],
        out_specs=[seq_v, state],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, t_pad, v_pad), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, k_pad, v_pad), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=tiles.compiler_params(platform, interpret, footprint=fp,
                                              dimension_semantics=("parallel",) * 3),
        name="gla_fwd",
    )(q_t, k_t, v_t, cum_t, doc, carry, h0)
    o = jnp.transpose(o, (0, 2, 1, 3))[:, :length, :, :v_dim]  # [B, T, H, V]
    return o, final_state[:, :, :k_dim, :v_dim]
