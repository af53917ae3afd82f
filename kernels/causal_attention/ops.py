"""Causal softmax attention of a whole sequence: the public op.

    o_t = softmax_{s in S_t}(q_t . k_s * scale) v_s,   S_t = {s <= t} (and s > t - W with a sliding window
                                                        W > 0, and segment_ids[s] == segment_ids[t])

Layout ``[B, T, H, D]`` with grouped-query attention: ``k, v`` are ``[B, T, G, D]``, ``H % G == 0``, query
head ``h`` reads kv head ``h // (H // G)``. ``q`` and ``k`` already carry RoPE. Output dtype is ``q.dtype``;
scores and softmax are float32.

Implementations (``impl``, resolved by ``kernels.dispatch.resolve_impl`` from the target):

* ``"pallas"``: the flash-attention kernels of ``pallas.py`` (forward saving the log-sum-exp, dq and dk/dv
  backward kernels recomputing ``P`` blockwise, fully masked key blocks outside the loop bounds) under a
  ``jax.custom_vjp``, Triton on GPU, Mosaic on TPU, inside ``dispatch.shard_op`` over batch and heads. What
  ``"auto"`` runs on a GPU/TPU target, unless the tiles do not fit the chip (then ``"chunked"``, logged with the
  reason). ``"interpret"`` runs the same kernels in the Pallas interpreter (CPU tests).
* ``"chunked"``: ``chunked.blocked_fwd`` / ``blocked_bwd`` under a ``jax.custom_vjp``: online softmax over
  key blocks grouped by block diagonal, fully masked blocks skipped (the upper triangle; beyond a sliding
  window), no ``[T, T]`` buffer forward or backward. ``block_size`` (default ``DEFAULT_BLOCK``, shrunk to a
  sliding window, grown so at most ``MAX_DIAGONALS`` diagonals are unrolled) sets the tile. What ``"auto"`` runs
  on CPU, except that a sequence that fits in one block (``T <= block``, e.g. ``lm_tiny``'s T = 128) runs
  ``"ref"``: there is nothing to skip, the work is the same, and the result is bit-identical to the dense math
  that decoding and other mixers (Liger's SWA) use.
* ``"ref"``: ``ref.causal_attention_dense``, the dense masked reference (autodiff backward).

Example (runs on CPU)::

    import jax, jax.numpy as jnp
    from kernels.causal_attention import causal_attention
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 1000, 4, 32), jnp.bfloat16)
    k = jax.random.normal(ks[1], (2, 1000, 2, 32), jnp.bfloat16)
    v = jax.random.normal(ks[2], (2, 1000, 2, 32), jnp.bfloat16)
    o = causal_attention(q, k, v)                              # [2, 1000, 4, 32] bf16, blocked
    o_swa = causal_attention(q, k, v, window=64)               # sliding window: O(T (W + B)) work
    o_k = causal_attention(q[:, :40], k[:, :40], v[:, :40], impl="interpret")   # the Pallas kernels, on CPU
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import dispatch, tiles
from kernels.causal_attention import chunked, pallas, ref

__all__ = ["DEFAULT_BLOCK", "MAX_DIAGONALS", "causal_attention", "choose_block"]

_OP = "causal_attention"
DEFAULT_BLOCK = 128     # tokens per block (see choose_block); 128 beat 256 and 512 at T = 1024, bf16 (loaded machine)
MAX_DIAGONALS = 32      # at most this many diagonals are unrolled into the program (longer T: larger blocks)
_MIN_BLOCK = 8


def choose_block(length: int, window: int = 0, block_size: int | None = None) -> int:
    """Block of the chunked path: ``block_size`` (default ``DEFAULT_BLOCK``), at most the (8-rounded) length;
    under a sliding window at most the 8-rounded window (so a query meets ~2W keys, not 2B); for full attention
    at least ``T / MAX_DIAGONALS`` (a bounded program)."""
    block = DEFAULT_BLOCK if block_size is None else int(block_size)
    if block < 1:
        raise ValueError(f"{_OP}: block_size must be >= 1, got {block_size!r}")
    block = min(block, tiles.round_up(length, _MIN_BLOCK))
    if window > 0:
        block = min(block, tiles.round_up(window, _MIN_BLOCK))
    elif block_size is None:
        block = max(block, tiles.round_up(-(-length // MAX_DIAGONALS), _MIN_BLOCK))
    return max(block, 1)


def _validate(q, k, v, window, segment_ids) -> None:
    if q.ndim != 4:
        raise ValueError(f"{_OP}: q must have shape [B, T, H, D], got {tuple(q.shape)}")
    batch, length, heads, dim = q.shape
    if k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (batch, length, dim):
        raise ValueError(f"{_OP}: k must have shape [B, T, G, D] = ({batch}, {length}, G, {dim}), "
                         f"got {tuple(k.shape)}")
    groups = k.shape[2]
    if groups < 1 or heads % groups:
        raise ValueError(f"{_OP}: k has G={groups} kv heads, which must divide the H={heads} query heads")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{_OP}: v must have shape [B, T, G, D] = {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{_OP}: {name} must be a floating dtype, got {x.dtype}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{_OP}: window must be an int >= 0 (0 = full attention), got {window!r}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (batch, length):
            raise ValueError(f"{_OP}: segment_ids must have shape [B, T] = {(batch, length)}, "
                             f"got {tuple(segment_ids.shape)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{_OP}: segment_ids must be an integer dtype, got {segment_ids.dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked(qb, kb, vb, segb, block, window, scale):
    return chunked.blocked_fwd(qb, kb, vb, segb, block=block, window=window, scale=scale)[0].astype(qb.dtype)


def _blocked_fwd(qb, kb, vb, segb, block, window, scale):
    o, lse = chunked.blocked_fwd(qb, kb, vb, segb, block=block, window=window, scale=scale)
    return o.astype(qb.dtype), (qb, kb, vb, segb, o, lse)


def _blocked_bwd(block, window, scale, residuals, do):
    qb, kb, vb, segb, o, lse = residuals
    dq, dk, dv = chunked.blocked_bwd(qb, kb, vb, segb, o, lse, do, block=block, window=window, scale=scale)
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ---- the Pallas flash-attention path --------------------------------------------------------------------------


def flash_block_sizes(platform: str, length: int, block_q: int | None = None,
                      block_k: int | None = None) -> pallas.BlockSizes:
    """Tiles of the kernels for ``platform`` (``pallas.BlockSizes.get_default``; ``block_q``/``block_k`` override
    the forward and backward tiles), fitted to ``length``."""
    d = pallas.BlockSizes.get_default(platform)
    bs = pallas.BlockSizes(block_q or d.block_q, block_k or d.block_k, block_q or d.block_q_bwd,
                           block_k or d.block_k_bwd)
    return bs.fit(length, length)


def _flash_prepare(q, k, v, seg, block_sizes):
    length, dim = q.shape[1], q.shape[3]
    rows, _ = block_sizes.padded_lengths(length, length)
    d_pad = tiles.padded_dim(dim)
    seg = tiles.pad_axis(seg, 1, rows)                                            # [B, T_pad]
    return (pallas.head_major(q, rows, d_pad), pallas.head_major(k, rows, d_pad), pallas.head_major(v, rows, d_pad),
            seg[:, :, None], seg[:, None, :])


def _flash_run(q, k, v, seg, window, scale, block_sizes, interpret, platform):
    length = q.shape[1]
    qh, kh, vh, q_seg, k_seg = _flash_prepare(q, k, v, seg, block_sizes)
    geo = pallas.Geometry(num_keys=length, window=window)
    o, lse = pallas.flash_fwd(qh, kh, vh, q_seg, k_seg, geometry=geo, scale=scale, block_sizes=block_sizes,
                              interpret=interpret, platform=platform)
    return o, lse, (qh, kh, vh, q_seg, k_seg, o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, seg, window, scale, block_sizes, interpret, platform):
    o = _flash_run(q, k, v, seg, window, scale, block_sizes, interpret, platform)[0]
    return pallas.token_major(o, q.shape[1], q.shape[3])


def _flash_fwd(q, k, v, seg, window, scale, block_sizes, interpret, platform):
    o, _, residuals = _flash_run(q, k, v, seg, window, scale, block_sizes, interpret, platform)
    return pallas.token_major(o, q.shape[1], q.shape[3]), residuals


def _flash_bwd(window, scale, block_sizes, interpret, platform, residuals, do):
    qh, kh, vh, q_seg, k_seg, o, lse = residuals
    batch, length, heads, dim = do.shape
    doh = pallas.head_major(do, qh.shape[2], qh.shape[3])                                # [B, H, T_pad, D_pad]
    delta = jnp.sum(doh.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    geo = pallas.Geometry(num_keys=length, window=window)
    dq, dk, dv = pallas.flash_bwd(qh, kh, vh, q_seg, k_seg, lse, delta, doh, geometry=geo, scale=scale,
                                  block_sizes=block_sizes, interpret=interpret, platform=platform)
    return (pallas.token_major(dq, length, dim).astype(do.dtype), pallas.token_major(dk, length, dim).astype(kh.dtype),
            pallas.token_major(dv, length, dim).astype(vh.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _flash_unsupported(platform, length, dim, dtype, block_q, block_k):
    bs = flash_block_sizes(platform, length, block_q, block_k)
    if platform == "tpu":
        _, t_pad = bs.padded_lengths(length, length)
        reason = pallas.tpu_alignment_reason(t_pad, bs)
        if reason:
            return reason
    for fp in pallas.footprints(platform, tiles.padded_dim(dim), dtype, bs).values():
        if fp.reason():
            return fp.reason()
    return None


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int = 0,
                     segment_ids: jax.Array | None = None, scale: float | None = None, impl: str = "auto",
                     block_size: int | None = None, block_q: int | None = None, block_k: int | None = None,
                     target: str | None = None) -> jax.Array:
    """Causal softmax attention (full or sliding window, packed segments, GQA).

    Args:
      q: ``[B, T, H, D]`` queries, RoPE applied.
      k: ``[B, T, G, D]`` keys, RoPE applied (``H % G == 0``).
      v: ``[B, T, G, D]`` values.
      window: 0 = full causal attention; ``W > 0``: query t sees keys ``t - W < s <= t``.
      segment_ids: ``[B, T]`` integer document ids of packed rows (a key is visible only to queries with the
        same id), or None.
      scale: score scale, a Python float; defaults to ``D ** -0.5``.
      impl: ``"auto"`` (the flash kernel on a GPU/TPU target, else blocked; dense when ``T`` fits in one block),
        ``"pallas"`` (the compiled kernel, GPU/TPU), ``"interpret"`` (the kernel in the Pallas interpreter),
        ``"chunked"`` (always blocked) or ``"ref"`` (dense reference).
      block_size: tokens per block of the chunked path (``choose_block`` when None).
      block_q: query tile of the kernels (power of two >= 16; default per platform,
        ``pallas.BlockSizes.get_default``), shrunk to the sequence.
      block_k: key tile of the kernels (likewise; on TPU a multiple of 128 unless one tile covers the keys).
      target: platform to compile for (``"cpu"``, ``"gpu"``, ``"tpu"``); default: the context's
        (``kernels.dispatch.target_platform``).

    Returns:
      ``[B, T, H, D]`` in ``q.dtype``.

    Raises:
      ValueError: on a shape, dtype or argument that does not fit; the message names it.
    """
    _validate(q, k, v, window, segment_ids)
    batch, length, heads, dim = q.shape
    scale = float(dim ** -0.5 if scale is None else scale)

    def unsupported(platform):
        return _flash_unsupported(platform, length, dim, q.dtype, block_q, block_k)

    resolved = dispatch.resolve_impl(impl, op=_OP, cpu_default="chunked", target=target, unsupported=unsupported)
    if resolved in ("pallas", "interpret"):
        platform = dispatch.target_platform(target)
        kernel_platform = platform if platform in ("gpu", "tpu") else "gpu"
        block_sizes = flash_block_sizes(kernel_platform if resolved == "pallas" else "cpu", length, block_q,
                                        block_k)
        seg = (jnp.zeros((batch, length), jnp.int32) if segment_ids is None
               else segment_ids.astype(jnp.int32))

        def run(q, k, v, seg):
            return _flash(q, k, v, seg, window, scale, block_sizes, resolved == "interpret", kernel_platform)

        # Under a mesh: shard_map over batch and (query and kv) heads (kernels.dispatch.shard_op).
        return dispatch.shard_op(run, (q, k, v, seg), [(0, 2), (0, 2), (0, 2), (0, None)], [(0, 2)])
    block = choose_block(length, window, block_size)
    n = -(-length // block)
    if resolved == "ref" or (impl == "auto" and n == 1):
        return ref.causal_attention_dense(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
    groups = k.shape[2]
    padded = n * block
    q, k, v = (tiles.pad_axis(x, 1, padded) for x in (q, k, v))     # padded keys are after every real query
    segb = None
    if segment_ids is not None:
        segb = tiles.pad_axis(segment_ids.astype(jnp.int32), 1, padded).reshape(batch, n, block)
    o = _blocked(chunked.to_blocks(q, n, block, groups), chunked.to_blocks(k, n, block, groups),
                 chunked.to_blocks(v, n, block, groups), segb, block, window, scale)
    return chunked.from_blocks(o, block)[:, :length]
