"""Pallas forward kernel for SCOUT segment attention (flash attention over the checkpoints).

Grid ``(B, H, T_pad // block_q)``. A program owns one block of ``block_q`` queries of one head ``h`` and
reads kv head ``h // r``. It holds that head's whole (pre-gathered, padded) checkpoint keys/values
``[S_pad, D]`` and walks them in blocks of ``block_k`` with ``lax.fori_loop`` **only up to the last block
any of its queries can see**: query ``t`` sees checkpoint ``j`` (row index ``c_j = (j + 1) L - 1``) iff
``c_j < t``, so the block needs ``min(t_max // L, S)`` checkpoints. That block-causal skipping is what
makes the work ``~T^2 / (2L)`` per head instead of ``T^2 / 2``.

Online softmax in float32. The self term ``s_t = q_t . k_t * scale`` seeds the running state
(``m = s_t``, ``l = 1``, ``acc = v_t``): this is the log-sum-exp merge of scout.md's kernel note done first
instead of last, and since the self key is always admissible every row max is finite, masked scores are a
finite ``-1e30`` and a row that sees no checkpoint ends with ``acc / l = v_t`` exactly (no NaN, no
``-inf``). Packed documents: a checkpoint is masked unless its segment id equals the query's.

The wrapper in ``ops.py`` gathers ``K_c = k[:, L-1::L]``, ``V_c`` likewise, pads ``T`` to a multiple of
``block_q``, the checkpoint count to a multiple of ``block_k`` (at least one block) and ``D`` to a power of
two >= 16 (zeros; Triton ``tl.dot`` needs power-of-two tiles >= 16), and transposes to ``[B, heads, T, D]``
so every block's last two dims are full array dims or tile multiples. Padded checkpoints are never visible
to a real query (their row index is ``>= T``); padded query rows are sliced off.

Forward only: ``ops.py`` wraps it in ``jax.custom_vjp``; the backward runs the flash-attention backward kernels
of ``kernels.causal_attention.pallas`` from the ``lse`` saved here (``ops._kernel_backward``).

Status: exercised on CPU through the Pallas interpreter (``interpret=True``) and lowered for Triton (GPU) and
Mosaic (TPU; from a CPU host inside ``kernels.dispatch.lowering_target("tpu")``, which names the chip) in the
tests; not compiled or run on an accelerator here. On TPU every program holds the head's ``[S_pad, D]`` checkpoints in
VMEM (``T / L`` rows), which bounds ``T / L``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import tiles
from kernels.segment_attention.ref import MASK_VALUE

__all__ = ["BlockSizes", "footprint", "padded_dim", "segment_attention_fwd"]

padded_dim = tiles.padded_dim

_MIN_TILE = tiles.MIN_TILE


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the forward kernel.

    Attributes:
      block_q: queries per program (a power of two >= 16; a multiple of 8 sublanes on TPU).
      block_k: checkpoints per inner-loop step (a power of two >= 16; 128 = one lane tile on TPU).
    """
    block_q: int = 128
    block_k: int = 128

    @classmethod
    def get_default(cls, platform: str = "gpu") -> "BlockSizes":
        """GPU 128 x 64 (Triton, 4 warps), TPU 128 x 128 (lane-dense), CPU interpreter 32 x 16."""
        if platform == "tpu":
            return cls(block_q=128, block_k=128)
        if platform == "gpu":
            return cls(block_q=128, block_k=64)
        return cls(block_q=32, block_k=16)

    def fit(self, length: int, num_ck: int) -> "BlockSizes":
        """Shrinks the tiles to the padded problem (``T`` queries, ``num_ck`` checkpoints); keeps them
        powers of two >= 16 so short sequences do not pay for a 128-row tile."""
        for name, val in (("block_q", self.block_q), ("block_k", self.block_k)):
            if val < _MIN_TILE or val & (val - 1):
                raise ValueError(f"segment_attention: {name} must be a power of two >= {_MIN_TILE}, "
                                 f"got {val}")
        return BlockSizes(block_q=min(self.block_q, padded_dim(length)),
                          block_k=min(self.block_k, padded_dim(max(num_ck, 1))))


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, ck_ref, cv_ref, cseg_ref,  # inputs
                o_ref, lse_ref,  # outputs
                *, scale: float, segment_len: int, num_ck: int, block_q: int, block_k: int,
                mm_dtype):
    """One program: ``block_q`` queries of one head against the checkpoints they can see.

    Refs (leading grid dims squeezed): q/k/v/o ``[block_q, D]``, qseg ``[block_q, 1]`` int32,
    ck/cv ``[S_pad, D]``, cseg ``[1, S_pad]`` int32, lse ``[block_q, 1]`` float32.
    """
    f32 = jnp.float32
    precision = jax.lax.Precision.HIGHEST if mm_dtype == f32 else None
    q_start = pl.program_id(2) * block_q

    q = q_ref[...]  # [bq, D]
    q_seg = qseg_ref[...]  # [bq, 1]
    t_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)  # [bq, bk]

    # Self term seeds the online softmax (always admissible, so every running max is finite).
    m = jnp.sum(q.astype(f32) * k_ref[...].astype(f32), axis=1, keepdims=True) * scale  # [bq, 1]
    l = jnp.ones((block_q, 1), f32)  # [bq, 1]
    acc = v_ref[...].astype(f32)  # [bq, D]

    # Checkpoints visible to the last query of the block: j < t_max // L (capped at S).
    t_max = q_start + block_q - 1
    n_vis = jnp.minimum(t_max // segment_len, num_ck)
    n_blocks = (n_vis + block_k - 1) // block_k

    def body(kb, carry):
        m, l, acc = carry
        start = pl.multiple_of(kb * block_k, block_k)
        ck = ck_ref[pl.ds(start, block_k), :]  # [bk, D]
        cv = cv_ref[pl.ds(start, block_k), :]  # [bk, D]
        c_seg = cseg_ref[:, pl.ds(start, block_k)]  # [1, bk]
        s = jax.lax.dot_general(q.astype(mm_dtype), ck.astype(mm_dtype), (((1,), (1,)), ((), ())),
                                precision=precision, preferred_element_type=f32) * scale  # [bq, bk]
        j = start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)  # [bq, bk]
        visible = ((j + 1) * segment_len <= t_pos) & (q_seg == c_seg)  # c_j = (j+1)L - 1 < t
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
        alpha = jnp.exp(m - m_new)  # [bq, 1]
        p = jnp.exp(s - m_new)  # [bq, bk]  exactly 0 where masked
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(mm_dtype), cv.astype(mm_dtype), (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=f32)  # [bq, D]
        return m_new, l, alpha * acc + pv

    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, (m, l, acc))
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def footprint(platform: str, length: int, num_ck: int, dim: int, dtype, block_sizes: BlockSizes) -> tiles.Footprint:
    """On-chip bytes of one program (``kernels.tiles``) for the fitted tiles of ``ops._kernel_forward``."""
    bs = block_sizes.fit(length, num_ck)
    bq, bk, d_pad, f32 = bs.block_q, bs.block_k, padded_dim(dim), jnp.float32
    s_pad = max(-(-num_ck // bk), 1) * bk
    if platform == "tpu":
        return tiles.tpu_footprint(
            "segment_attention_fwd",
            [((bq, d_pad), dtype)] * 3 + [((bq, 1), jnp.int32), ((s_pad, d_pad), dtype), ((s_pad, d_pad), dtype),
             ((1, s_pad), jnp.int32), ((bq, d_pad), dtype), ((bq, 1), f32)],
            temporaries=[((bq, d_pad), f32)] * 2 + [((bq, bk), f32)] * 3)
    return tiles.gpu_footprint("segment_attention_fwd",
                               [((bq, d_pad), dtype), ((bk, d_pad), dtype), ((bq, bk), dtype), ((bk, d_pad), dtype)],
                               live=[((bq, d_pad), f32), ((bq, bk), f32), ((bq, d_pad), dtype)])


@functools.partial(jax.jit, static_argnames=("scale", "segment_len", "num_ck", "block_sizes",
                                             "interpret", "platform"))
def segment_attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, ck: jax.Array,
                          cv: jax.Array, c_seg: jax.Array, *, scale: float, segment_len: int,
                          num_ck: int, block_sizes: BlockSizes, interpret: bool,
                          platform: str = "gpu") -> tuple[jax.Array, jax.Array]:
    """Runs the kernel on pre-padded, head-major arrays (``ops.py`` prepares them).

    Args:
      q: ``[B, H, T_pad, D_pad]``; ``T_pad`` a multiple of ``block_q``.
      k: ``[B, G, T_pad, D_pad]`` keys of the same rows (self term).
      v: ``[B, G, T_pad, D_pad]`` values of the same rows.
      q_seg: ``[B, T_pad, 1]`` int32 segment ids of the queries.
      ck: ``[B, G, S_pad, D_pad]`` checkpoint keys; ``S_pad`` a positive multiple of ``block_k``.
      cv: ``[B, G, S_pad, D_pad]`` checkpoint values.
      c_seg: ``[B, 1, S_pad]`` int32 segment ids of the checkpoints.
      scale: score scale.
      segment_len: ``L``.
      num_ck: number of real checkpoints ``S = T // L`` (the rest is padding).
      block_sizes: tiles (already ``fit``).
      interpret: run the Pallas interpreter (CPU).
      platform: compile target, ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic); unused when interpreting.

    Returns:
      ``(o, lse)``: ``[B, H, T_pad, D_pad]`` in ``q.dtype`` and ``[B, H, T_pad, 1]`` float32 log-sum-exp
      of the scaled scores over each query's admissible set.
    """
    batch, heads, t_pad, d_pad = q.shape
    groups, s_pad = k.shape[1], ck.shape[2]
    rep = heads // groups
    bq, bk = block_sizes.block_q, block_sizes.block_k
    if t_pad % bq or s_pad % bk or s_pad == 0:
        raise ValueError(f"segment_attention: padded T={t_pad} / S={s_pad} must be positive multiples "
                         f"of block_q={bq} / block_k={bk}")
    mm_dtype = jnp.float32 if q.dtype == jnp.float32 else q.dtype
    fp = footprint(platform, t_pad, num_ck, d_pad, q.dtype, block_sizes)
    if not interpret:
        tiles.require_fit(fp)
    kernel = functools.partial(_fwd_kernel, scale=float(scale), segment_len=int(segment_len),
                               num_ck=int(num_ck), block_q=bq, block_k=bk, mm_dtype=mm_dtype)
    q_blk = pl.BlockSpec((None, None, bq, d_pad), lambda b, h, i: (b, h, i, 0))
    kv_blk = pl.BlockSpec((None, None, bq, d_pad), lambda b, h, i: (b, h // rep, i, 0))
    ck_all = pl.BlockSpec((None, None, s_pad, d_pad), lambda b, h, i: (b, h // rep, 0, 0))
    o, lse = pl.pallas_call(
        kernel,
        grid=(batch, heads, t_pad // bq),
        in_specs=[
            q_blk, kv_blk, kv_blk,
            pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),  # q_seg
            ck_all, ck_all,
            pl.BlockSpec((None, 1, s_pad), lambda b, h, i: (b, 0, 0)),  # c_seg
        ],
        out_specs=[q_blk, pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, t_pad, d_pad), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, t_pad, 1), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=tiles.compiler_params(platform, interpret, footprint=fp,
                                              dimension_semantics=("parallel",) * 3),
        name="segment_attention_fwd",
    )(q, k, v, q_seg, ck, cv, c_seg)
    return o, lse
