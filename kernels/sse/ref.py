"""Reference Sparse State Expansion (SSE) recurrence: routing helpers, one decoding step, and the
replicated ("mask") sequence form in pure jnp (papers/sse.md §3.3, §3.5a, §3.6).

The op covers the N *sparse* partitions of one SSE layer (the always-on shared partition is a plain
GLA, ``kernels.gla``). Per batch ``b``, head ``h`` and partition ``i``, with routing weight
``w_t[i]`` (the router probability ``e_t[i]`` where partition ``i`` is among the token's top-K, and
exactly 0 elsewhere)::

    selected (w_t[i] != 0):  S^i_t = diag(exp(g_t)) S^i_{t-1} + w_t[i] k_t^T v_t
    unselected:              S^i_t = S^i_{t-1}                (no decay, no write)
    o_t = scale * sum_i w_t[i] q_t S^i_t

so the same weight scales the key on write and the query on read, and a token leaves the
partitions it does not select untouched (the pitfall of papers/sse.md §8).

Forms here:

* ``topk_rank`` / ``topk_mask`` / ``topk_indices``: top-K selection with deterministic ties (equal
  probabilities go to the lowest partition index, like FLA's fused router).
* ``sse_step``: one decoding step over the ``[B, N, H, K, V]`` partition states.
* ``replicate``: the mask form's inputs: q/k/v/g copied into ``N * H`` heads, k and q scaled by the
  weight, the log-decay zeroed where a partition is not selected.
* ``sse_masked``: ``replicate`` then one GLA call (``kernels.gla.ref``: the per-token scan or the
  chunked form) and a float32 sum over partitions. This is the reference the Pallas kernel is
  tested against and whose ``jax.vjp`` is the kernel's backward.

Shape legend: B batch, T length, N partitions, H heads, K key dim, V value dim, k top-K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gla import ref as gla_ref

__all__ = ["replicate", "selection", "sse_masked", "sse_step", "topk_indices", "topk_mask",
           "topk_rank"]


def topk_rank(probs: jax.Array) -> jax.Array:
    """Rank of every partition by probability, ties broken by the lower index.

    ``rank[..., i]`` is the number of partitions ``j`` with ``p_j > p_i`` or ``p_j == p_i and
    j < i``; the ranks of one token are a permutation of ``0..N-1``.

    Args:
      probs: ``[..., N]`` router probabilities (or logits: only their order matters).

    Returns:
      ``[..., N]`` int32.
    """
    n = probs.shape[-1]
    idx = jnp.arange(n)
    p_i, p_j = probs[..., :, None], probs[..., None, :]  # [..., N(i), N(j)]
    ahead = (p_j > p_i) | ((p_j == p_i) & (idx[None, :] < idx[:, None]))  # [..., N, N]
    return jnp.sum(ahead, axis=-1, dtype=jnp.int32)  # [..., N]


def topk_mask(probs: jax.Array, top_k: int) -> jax.Array:
    """``[..., N]`` bool: the ``top_k`` largest entries, ties to the lowest index."""
    return topk_rank(probs) < top_k


def topk_indices(probs: jax.Array, top_k: int) -> jax.Array:
    """``[..., top_k]`` int32 partition indices in descending order (ties: lowest index first)."""
    rank = topk_rank(probs)  # [..., N]
    slots = jnp.arange(top_k)
    hit = rank[..., None, :] == slots[:, None]  # [..., k, N]
    return jnp.sum(jnp.where(hit, jnp.arange(probs.shape[-1]), 0), axis=-1,
                   dtype=jnp.int32)  # [..., k]


def selection(w: jax.Array) -> jax.Array:
    """Which partitions a token selects: ``w != 0`` (``[..., N]`` bool)."""
    return w != 0


def sse_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, w_t: jax.Array,
             state: jax.Array, *, scale: float) -> tuple[jax.Array, jax.Array]:
    """One recurrent SSE step over the sparse partitions (decoding).

    Args:
      q_t: ``[B, H, K]`` query.
      k_t: ``[B, H, K]`` key.
      v_t: ``[B, H, V]`` value.
      g_t: ``[B, H, K]`` (or ``[B, H]``) log-decay (<= 0), applied only to selected partitions.
      w_t: ``[B, N]`` routing weights, 0 where a partition is not selected.
      state: ``[B, N, H, K, V]`` float32 partition states before this token.
      scale: output scale.

    Returns:
      ``(o_t, new_state)``: ``[B, H, V]`` in ``q_t.dtype`` and ``[B, N, H, K, V]`` float32.
    """
    f32 = jnp.float32
    w = w_t.astype(f32)  # [B, N]
    sel = selection(w_t)[:, :, None, None]  # [B, N, 1, 1]
    g = gla_ref.expand_decay(g_t, q_t)  # [B, H, K]
    decay = jnp.where(sel, jnp.exp(g)[:, None], 1.0)  # [B, N, H, K]
    k_w = w[:, :, None, None] * k_t.astype(f32)[:, None]  # [B, N, H, K]
    write = k_w[..., :, None] * v_t.astype(f32)[:, None, :, None, :]  # [B, N, H, K, V]
    new_state = decay[..., None] * state.astype(f32) + write  # [B, N, H, K, V]
    q_w = (w * scale)[:, :, None, None] * q_t.astype(f32)[:, None]  # [B, N, H, K]
    o_t = jnp.einsum("bnhk,bnhkv->bhv", q_w, new_state,
                     precision=jax.lax.Precision.HIGHEST)  # [B, H, V]
    return o_t.astype(q_t.dtype), new_state


def replicate(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, w: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The mask form's per-partition copies, partitions folded into heads (index ``i * H + h``).

    Args:
      q: ``[B, T, H, K]``.
      k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` or ``[B, T, H]`` log-decay.
      w: ``[B, T, N]`` routing weights (0 = not selected).

    Returns:
      float32 ``(q_rep, k_rep, v_rep, g_rep)``: ``[B, T, N*H, K]`` x2, ``[B, T, N*H, V]``,
      ``[B, T, N*H, K]`` with ``q, k`` scaled by ``w`` and ``g`` zeroed where not selected.
    """
    batch, length, heads, k_dim = q.shape
    n = w.shape[-1]
    f32 = jnp.float32
    wf = w.astype(f32)[..., None, None]  # [B, T, N, 1, 1]
    sel = selection(w)[..., None, None]  # [B, T, N, 1, 1]
    g = gla_ref.expand_decay(g, q)  # [B, T, H, K]
    q_rep = wf * q.astype(f32)[:, :, None]  # [B, T, N, H, K]
    k_rep = wf * k.astype(f32)[:, :, None]  # [B, T, N, H, K]
    g_rep = jnp.where(sel, g[:, :, None], 0.0)  # [B, T, N, H, K]
    v_rep = jnp.broadcast_to(v.astype(f32)[:, :, None],
                             (batch, length, n) + v.shape[2:])  # [B, T, N, H, V]
    fold = lambda x: x.reshape(batch, length, n * heads, x.shape[-1])  # [B, T, N*H, D]
    return fold(q_rep), fold(k_rep), fold(v_rep), fold(g_rep)


def sse_masked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, w: jax.Array, *,
               scale: float, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, chunk_size: int = 64,
               form: str = "chunked") -> tuple[jax.Array, jax.Array]:
    """SSE sparse partitions by replication into ``N * H`` heads and one GLA call.

    Args:
      q: ``[B, T, H, K]``.
      k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` or ``[B, T, H]`` log-decay (<= 0).
      w: ``[B, T, N]`` routing weights, 0 where not selected.
      scale: output scale.
      initial_state: ``[B, N, H, K, V]`` or ``None`` (zeros); reaches each row's first segment.
      segment_ids: ``[B, T]`` ints or ``None``; every partition state resets where the id changes.
      chunk_size: chunk length of the chunked form.
      form: ``"chunked"`` (``gla_ref.gla_chunked``) or ``"recurrent"`` (``gla_ref.gla_recurrent``).

    Returns:
      ``(o, final_state)``: ``[B, T, H, V]`` in ``q.dtype`` (partition outputs summed in float32),
      ``[B, N, H, K, V]`` float32.
    """
    batch, length, heads, k_dim = q.shape
    n, v_dim = w.shape[-1], v.shape[-1]
    q_rep, k_rep, v_rep, g_rep = replicate(q, k, v, g, w)
    h0 = None
    if initial_state is not None:
        h0 = initial_state.astype(jnp.float32).reshape(batch, n * heads, k_dim, v_dim)
    if form == "chunked":
        o, final = gla_ref.gla_chunked(q_rep, k_rep, v_rep, g_rep, scale=scale, initial_state=h0,
                                       segment_ids=segment_ids, chunk_size=chunk_size)
    elif form == "recurrent":
        o, final = gla_ref.gla_recurrent(q_rep, k_rep, v_rep, g_rep, scale=scale,
                                         initial_state=h0, segment_ids=segment_ids)
    else:
        raise ValueError(f"sse_masked: form must be 'chunked' or 'recurrent', got {form!r}")
    o = o.reshape(batch, length, n, heads, v_dim).sum(axis=2)  # [B, T, H, V] f32
    return o.astype(q.dtype), final.reshape(batch, n, heads, k_dim, v_dim)
