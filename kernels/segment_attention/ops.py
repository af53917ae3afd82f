"""SCOUT segment attention: the public op (papers/scout.md "SCOUT attention").

Every query attends, with one float32 softmax, to itself and to the *checkpoints* before it: the last
token of every complete segment of length ``L`` (row indices ``c`` with ``(c + 1) % L == 0``, 0-based)::

    S_t = {t} U {c : (c + 1) % L == 0, c < t}          o_t = softmax_{s in S_t}(q_t . k_s * scale) v_s

``L = 1`` is causal softmax attention. Score entries per head are ``sum_t (t // L + 1) ~ T^2 / (2L)``
(``score_entries``). With ``segment_ids`` ``[B, T]`` (packed documents) a checkpoint is visible only to
queries with the same id; checkpoints stay defined by the row index, so a document that starts at a
multiple of ``L`` sees exactly the checkpoints it would see alone. A row that sees no checkpoint
(``t < L``, or the start of a document) returns exactly ``v_t``; masks are finite, so no NaN appears in the
forward or backward pass.

Layout is ``[B, T, H, D]`` with grouped-query attention: ``k, v`` are ``[B, T, G, D]``, ``H % G == 0``,
query head ``h`` reads kv head ``h // (H // G)``. ``q`` and ``k`` must already carry RoPE (checkpoints are
gathered after RoPE). Output dtype is ``q.dtype``; scores and softmax are float32.

Implementations (``impl``, resolved by ``kernels.dispatch.resolve_impl``):

* ``"ref"``: ``ref.segment_attention_ref``, gathered checkpoints and a dense masked ``[T, T // L]`` score
  matrix (already ``T^2 / L`` work): what ``"auto"`` runs on CPU. Differentiated by plain autodiff.
* ``"pallas"`` / ``"interpret"``: the Pallas forward kernel (``pallas.segment_attention_fwd``: flash
  attention over the checkpoints with block-causal skipping, self term merged in the online softmax; it saves
  the log-sum-exp), compiled (GPU/TPU) or run by the Pallas interpreter (CPU tests), inside a
  ``jax.custom_vjp`` whose **backward is flash-style** (``_kernel_backward``): from the saved ``lse`` the self
  term's gradient is elementwise, and the checkpoint part runs the flash-attention backward kernels of
  ``kernels.causal_attention.pallas`` (dq kernel; dk/dv kernel summing each kv head's query heads) with the
  checkpoints as keys, so no ``[T, T / L]`` probability matrix is stored. ``"auto"`` picks it on GPU/TPU.

Example (runs on CPU)::

    import jax, jax.numpy as jnp
    from kernels.segment_attention import segment_attention, segment_attention_step

    B, T, H, G, D, L = 2, 100, 4, 2, 32, 10
    rng = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(rng[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(rng[1], (B, T, G, D), jnp.bfloat16)
    v = jax.random.normal(rng[2], (B, T, G, D), jnp.bfloat16)
    o = segment_attention(q, k, v, segment_len=L)                        # [B, T, H, D] bf16
    o_k = segment_attention(q, k, v, segment_len=L, impl="interpret")    # the Pallas kernel, on CPU
    # Decoding token t = 57 from a checkpoint-only cache (57 // L = 5 valid slots):
    ck, cv = k[:, L - 1::L], v[:, L - 1::L]                              # [B, T // L, G, D]
    o_t = segment_attention_step(q[:, 57], k[:, 57], v[:, 57], ck, cv, 57 // L)   # == o[:, 57]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import dispatch, tiles
from kernels.causal_attention import pallas as flash
from kernels.segment_attention import pallas, ref
from kernels.segment_attention.ref import score_entries

__all__ = ["score_entries", "segment_attention", "segment_attention_step"]

_OP = "segment_attention"


def _check_float(op: str, name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{op}: {name} must be a floating dtype, got {x.dtype}")


def _check_segment_len(op: str, segment_len) -> None:
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"{op}: segment_len (L) must be an int >= 1, got {segment_len!r}")


def _validate(q, k, v, segment_len, segment_ids) -> None:
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
        _check_float(_OP, name, x)
    _check_segment_len(_OP, segment_len)
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (batch, length):
            raise ValueError(f"{_OP}: segment_ids must have shape [B, T] = {(batch, length)}, "
                             f"got {tuple(segment_ids.shape)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{_OP}: segment_ids must be an integer dtype, got {segment_ids.dtype}")


def _kernel_forward(q, k, v, seg, segment_len, scale, block_sizes, interpret, platform):
    """Gathers checkpoints, pads to the tiles, runs the kernel and un-pads. ``seg`` ``[B, T]`` int32."""
    batch, length, heads, dim = q.shape
    num_ck = ref.num_checkpoints(length, segment_len)
    bs = block_sizes.fit(length, num_ck)
    t_pad = -(-length // bs.block_q) * bs.block_q
    s_pad = max(-(-num_ck // bs.block_k), 1) * bs.block_k
    d_pad = pallas.padded_dim(dim)

    def head_major(x, rows):  # [B, n, heads, D] -> [B, heads, rows, D_pad]
        x = tiles.pad_axis(tiles.pad_axis(x, 3, d_pad), 1, rows)
        return jnp.transpose(x, (0, 2, 1, 3))

    ck = k[:, segment_len - 1::segment_len]  # [B, S, G, D]
    cv = v[:, segment_len - 1::segment_len]  # [B, S, G, D]
    c_seg = tiles.pad_axis(seg[:, segment_len - 1::segment_len], 1, s_pad)  # [B, S_pad]
    o, lse = pallas.segment_attention_fwd(
        head_major(q, t_pad), head_major(k, t_pad), head_major(v, t_pad),
        tiles.pad_axis(seg, 1, t_pad)[:, :, None],  # [B, T_pad, 1]
        head_major(ck, s_pad), head_major(cv, s_pad), c_seg[:, None, :],  # [B, 1, S_pad]
        scale=scale, segment_len=segment_len, num_ck=num_ck, block_sizes=bs, interpret=interpret,
        platform=platform)
    return flash.token_major(o, length, dim), lse[:, :, :length, 0]  # [B, T, H, D], [B, H, T] float32


def bwd_block_sizes(block_sizes: pallas.BlockSizes, platform: str, length: int, num_ck: int) -> flash.BlockSizes:
    """Tiles of the backward kernels (``kernels.causal_attention.pallas``): the forward's, capped at the flash
    backward tiles of ``platform`` (GPU 64 x 64: the dk/dv kernel stages six tiles), fitted to the problem."""
    d = flash.BlockSizes.get_default(platform)
    bq, bk = min(block_sizes.block_q, d.block_q_bwd), min(block_sizes.block_k, d.block_k_bwd)
    return flash.BlockSizes(bq, bk, bq, bk).fit(length, num_ck)


def _kernel_backward(q, k, v, seg, o, lse, do, segment_len, scale, block_sizes, interpret, platform):
    """Flash-style backward from the saved log-sum-exp ``lse`` ``[B, H, T]`` (self term included).

    ``P`` is never stored: the self term (one key per query) is elementwise here; the checkpoint part runs the
    flash-attention backward kernels (``kernels.causal_attention.pallas.flash_bwd``: dq over the checkpoint blocks
    a query block sees, dk/dv over the query blocks that see a checkpoint block) with the checkpoints as keys at
    positions ``c_j + 1 = (j + 1) L`` (``Geometry(stride=L, offset=L)``: visible iff ``c_j < t``), and their
    gradients are added into the checkpoint rows of ``dk``/``dv``.
    """
    f32 = jnp.float32
    batch, length, heads, dim = q.shape
    groups = k.shape[2]
    rep = heads // groups
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)  # [B, T, H]
    lse_t = jnp.transpose(lse, (0, 2, 1))  # [B, T, H]
    q32, do32 = q.astype(f32), do.astype(f32)
    k_h, v_h = jnp.repeat(k, rep, axis=2).astype(f32), jnp.repeat(v, rep, axis=2).astype(f32)  # [B, T, H, D]
    p_self = jnp.exp(jnp.sum(q32 * k_h, axis=-1) * scale - lse_t)  # [B, T, H]
    ds_self = p_self * (jnp.sum(do32 * v_h, axis=-1) - delta)  # [B, T, H]

    def per_kv_head(x):  # [B, T, H, D] -> [B, T, G, D], summing each group's query heads
        return jnp.sum(x.reshape(batch, length, groups, rep, dim), axis=3)

    dq = ds_self[..., None] * k_h * scale
    dk = per_kv_head(ds_self[..., None] * q32 * scale)
    dv = per_kv_head(p_self[..., None] * do32)
    num_ck = ref.num_checkpoints(length, segment_len)
    if num_ck:
        bs = bwd_block_sizes(block_sizes, platform, length, num_ck)
        t_pad, s_pad = bs.padded_lengths(length, num_ck)
        d_pad = pallas.padded_dim(dim)
        cut = slice(segment_len - 1, None, segment_len)

        def column(x):  # [B, H, T] -> [B, H, T_pad, 1]
            return tiles.pad_axis(x, 2, t_pad)[..., None]

        dq_c, dk_c, dv_c = flash.flash_bwd(
            flash.head_major(q, t_pad, d_pad), flash.head_major(k[:, cut], s_pad, d_pad),
            flash.head_major(v[:, cut], s_pad, d_pad), tiles.pad_axis(seg, 1, t_pad)[:, :, None],
            tiles.pad_axis(seg[:, cut], 1, s_pad)[:, None, :], column(lse), column(jnp.transpose(delta, (0, 2, 1))),
            flash.head_major(do, t_pad, d_pad),
            geometry=flash.Geometry(num_keys=num_ck, stride=segment_len, offset=segment_len), scale=scale,
            block_sizes=bs, interpret=interpret, platform=platform, name="segment_attention_bwd")
        dq = dq + flash.token_major(dq_c, length, dim)
        dk = dk.at[:, cut].add(flash.token_major(dk_c, num_ck, dim))
        dv = dv.at[:, cut].add(flash.token_major(dv_c, num_ck, dim))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _pallas_op(q, k, v, seg, segment_len, scale, block_sizes, interpret, platform):
    return _kernel_forward(q, k, v, seg, segment_len, scale, block_sizes, interpret, platform)[0]


def _pallas_op_fwd(q, k, v, seg, segment_len, scale, block_sizes, interpret, platform):
    o, lse = _kernel_forward(q, k, v, seg, segment_len, scale, block_sizes, interpret, platform)
    return o, (q, k, v, seg, o, lse)


def _pallas_op_bwd(segment_len, scale, block_sizes, interpret, platform, residuals, do):
    q, k, v, seg, o, lse = residuals
    return (*_kernel_backward(q, k, v, seg, o, lse, do, segment_len, scale, block_sizes, interpret, platform),
            None)


_pallas_op.defvjp(_pallas_op_fwd, _pallas_op_bwd)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_len: int,
                      segment_ids: jax.Array | None = None, scale: float | None = None,
                      impl: str = "auto", block_q: int | None = None, block_k: int | None = None,
                      interpret: bool | None = None, target: str | None = None) -> jax.Array:
    """SCOUT attention: each query over itself and the segment checkpoints before it.

    Args:
      q: ``[B, T, H, D]`` queries, RoPE applied.
      k: ``[B, T, G, D]`` keys, RoPE applied (``H % G == 0``).
      v: ``[B, T, G, D]`` values.
      segment_len: segment length ``L >= 1`` (a Python int); checkpoints are rows ``L-1, 2L-1, ...``.
      segment_ids: ``[B, T]`` integer document ids of packed rows; a checkpoint is visible only to queries
        with the same id. ``None``: one document per row.
      scale: score scale, a Python float; defaults to ``D ** -0.5``.
      impl: ``"auto"``, ``"ref"``, ``"pallas"`` or ``"interpret"`` (``"chunked"`` means ``"ref"``).
      block_q: query tile of the kernel (power of two >= 16); default per platform
        (``pallas.BlockSizes.get_default``), shrunk to the problem.
      block_k: checkpoint tile of the kernel (power of two >= 16); as ``block_q``.
      interpret: ``True`` runs the kernel through the Pallas interpreter even where ``impl`` resolves to
        ``"pallas"`` (same as ``impl="interpret"``); ``None``/``False`` keep ``impl``'s choice.
      target: platform to compile for (``"cpu"``, ``"gpu"``, ``"tpu"``); default: the context's
        (``kernels.dispatch.target_platform``: lowering target, mesh devices, then the default backend).

    Returns:
      ``[B, T, H, D]`` in ``q.dtype``.

    Raises:
      ValueError: on a shape, dtype or argument that does not fit; the message names it.
    """
    _validate(q, k, v, segment_len, segment_ids)
    batch, length, _, dim = q.shape
    scale = float(dim ** -0.5 if scale is None else scale)
    def unsupported(platform):
        d = pallas.BlockSizes.get_default(platform)
        bs = pallas.BlockSizes(block_q=block_q or d.block_q, block_k=block_k or d.block_k)
        return pallas.footprint(platform, length, ref.num_checkpoints(length, segment_len), dim, q.dtype,
                                bs).reason()

    resolved = dispatch.resolve_impl(impl, op=_OP, cpu_default="ref", target=target, unsupported=unsupported)
    if interpret and resolved == "pallas":
        resolved = "interpret"
    if resolved in ("ref", "chunked"):
        return ref.segment_attention_ref(q, k, v, segment_len=segment_len, segment_ids=segment_ids,
                                         scale=scale)
    platform = dispatch.target_platform(target)
    default = pallas.BlockSizes.get_default(platform if resolved == "pallas" else "cpu")
    block_sizes = pallas.BlockSizes(block_q=block_q or default.block_q, block_k=block_k or default.block_k)
    block_sizes.fit(length, 1)  # validates the tiles (ValueError naming block_q / block_k)
    seg = (jnp.zeros((batch, length), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    kernel_platform = platform if platform in ("gpu", "tpu") else "gpu"

    def run(q, k, v, seg):
        return _pallas_op(q, k, v, seg, segment_len, scale, block_sizes, resolved == "interpret",
                          kernel_platform)

    # Under a mesh: shard_map over batch and (query and kv) heads (kernels.dispatch.shard_op).
    return dispatch.shard_op(run, (q, k, v, seg), [(0, 2), (0, 2), (0, 2), (0, None)], [(0, 2)])


def segment_attention_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, ck: jax.Array,
                           cv: jax.Array, n_valid: jax.Array | int, *,
                           scale: float | None = None) -> jax.Array:
    """One decoding step of SCOUT attention from a checkpoint-only cache.

    The token at absolute position ``p`` sees the ``p // L`` checkpoints before it; pass them as the first
    ``n_valid = p // L`` slots of ``ck``/``cv`` (the token itself enters through ``k_t``, ``v_t``, so a
    checkpoint token is counted once even if it was already written to the cache).

    Args:
      q_t: ``[B, H, D]`` query (RoPE applied).
      k_t: ``[B, G, D]`` key of the same token (RoPE applied).
      v_t: ``[B, G, D]`` value of the same token.
      ck: ``[B, S, G, D]`` cached checkpoint keys.
      cv: ``[B, S, G, D]`` cached checkpoint values.
      n_valid: ``[]`` int, number of leading valid slots (``0 <= n_valid <= S``).
      scale: score scale; defaults to ``D ** -0.5``.

    Returns:
      ``[B, H, D]`` in ``q_t.dtype``.
    """
    op = "segment_attention_step"
    if q_t.ndim != 3:
        raise ValueError(f"{op}: q_t must have shape [B, H, D], got {tuple(q_t.shape)}")
    batch, heads, dim = q_t.shape
    if k_t.ndim != 3 or (k_t.shape[0], k_t.shape[2]) != (batch, dim) or heads % max(k_t.shape[1], 1):
        raise ValueError(f"{op}: k_t must have shape [B, G, D] = ({batch}, G, {dim}) with G dividing "
                         f"H={heads}, got {tuple(k_t.shape)}")
    if tuple(v_t.shape) != tuple(k_t.shape):
        raise ValueError(f"{op}: v_t must have shape [B, G, D] = {tuple(k_t.shape)}, got {tuple(v_t.shape)}")
    groups = k_t.shape[1]
    if ck.ndim != 4 or (ck.shape[0], ck.shape[2], ck.shape[3]) != (batch, groups, dim):
        raise ValueError(f"{op}: ck must have shape [B, S, G, D] = ({batch}, S, {groups}, {dim}), "
                         f"got {tuple(ck.shape)}")
    if tuple(cv.shape) != tuple(ck.shape):
        raise ValueError(f"{op}: cv must have shape [B, S, G, D] = {tuple(ck.shape)}, got {tuple(cv.shape)}")
    if jnp.ndim(n_valid) != 0:
        raise ValueError(f"{op}: n_valid must be a scalar, got shape {jnp.shape(n_valid)}")
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("ck", ck), ("cv", cv)):
        _check_float(op, name, x)
    scale = float(dim ** -0.5 if scale is None else scale)
    return ref.segment_attention_step_ref(q_t, k_t, v_t, ck, cv, jnp.asarray(n_valid, jnp.int32),
                                          scale=scale)
