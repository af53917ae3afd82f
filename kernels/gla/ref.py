"""Reference gated linear attention (GLA): recurrent, single-step and chunked forms in pure jnp.

This module is the single reference for the GLA recurrence used by the GLA, SSE and Liger mixers
(papers/sse.md §3.1, papers/liger.md §3.3). Per batch ``b`` and head ``h``::

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        S_t in R^{K x V}, g_t in R^K, g_t <= 0
    o_t = scale * q_t S_t

Three forms live here and check each other in tests:

* ``gla_recurrent``: a per-token ``lax.scan`` over the state (exact, O(T) sequential steps).
* ``gla_step``: one decoding step; ``gla_recurrent`` is a scan of it.
* ``gla_chunked``: the chunked parallel form (attention-like intra-chunk matrices plus a
  ``lax.scan`` over chunk states). It is what ``impl="chunked"`` runs and what the Pallas kernel's
  backward differentiates.

Shape legend: B batch, T length, H heads, K key dim, V value dim, N chunks, C chunk size,
n sub-chunks per chunk, c sub-chunk size. All accumulation is float32.

Numerics of the chunked form. ``G`` is the within-chunk inclusive cumulative sum of ``g`` (so the
reference point of every chunk is its start). The decay from position ``j`` to ``i >= j`` is
``exp(G_i - G_j)``; factoring it as ``exp(G_i) * exp(-G_j)`` overflows for strong decays
(``g = -20`` per step gives ``G = -1280`` after 64 steps). So no exponent is ever positive:

* a query in sub-chunk ``I`` and a key in an earlier sub-chunk use the last position ``r`` before
  sub-chunk ``I`` as the reference: ``q_i exp(G_i - G_r)`` and ``k_j exp(G_r - G_j)``, both
  factors <= 1 because ``j <= r < i``;
* pairs inside one sub-chunk form a ``[c, c, K]`` tensor ``exp(min(G_i - G_j, 0))`` directly;
* chunk-to-chunk terms use ``q_i exp(G_i)``, ``k_j exp(G_last - G_j)`` and ``exp(G_last)``.

Packed sequences. ``segment_ids`` become a document index ``R_t`` (number of segment changes in
``1..t``). Two positions interact iff ``R_i == R_j``: this is a finite 0/1 mask multiplied into the
same factors as the decays (``R`` is monotone, so ``R_i == R_ref == R_j`` iff ``R_i == R_j`` for
``j <= ref <= i``). No ``-inf`` appears anywhere, so gradients stay finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["document_index", "expand_decay", "gla_chunked", "gla_recurrent", "gla_step", "pad_time",
           "sub_chunk_size"]

# Sub-chunk size of the chunked form: pairs inside one sub-chunk cost a [c, c, K] tensor.
SUB_CHUNK = 16


def expand_decay(g: jax.Array, like: jax.Array) -> jax.Array:
    """Returns the log-decay in float32 with the same shape as ``like`` (q or k).

    Args:
      g: ``like.shape`` per-key log-decay, or ``like.shape[:-1]`` scalar-per-head log-decay
        (Mamba-2/SSD style), which is broadcast over the key axis.
      like: the query or key array, ``[..., K]``.

    Returns:
      ``[..., K]`` float32 log-decay.
    """
    g = g.astype(jnp.float32)
    if g.ndim == like.ndim:
        return g
    return jnp.broadcast_to(g[..., None], like.shape)  # [..., K]


def document_index(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Maps ``segment_ids`` to a monotone document index.

    ``R[b, t]`` counts the positions ``1..t`` where ``segment_ids[b]`` differs from the previous
    position, so ``R[b, 0] == 0`` and two positions belong to the same document iff their ``R`` is
    equal. A row whose ids go ``[3, 3, 5, 5, 3]`` has three documents.

    Args:
      segment_ids: ``[B, T]`` integers, or ``None`` (one document per row).
      batch: ``B``.
      length: ``T``.

    Returns:
      ``[B, T]`` int32.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    seg = segment_ids.astype(jnp.int32)
    change = jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.int32), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)],
        axis=1)  # [B, T]
    return jnp.cumsum(change, axis=1)  # [B, T]


def gla_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, state: jax.Array,
             *, scale: float) -> tuple[jax.Array, jax.Array]:
    """One recurrent GLA step (decoding).

    Args:
      q_t: ``[B, H, K]`` query.
      k_t: ``[B, H, K]`` key.
      v_t: ``[B, H, V]`` value.
      g_t: ``[B, H, K]`` log-decay, or ``[B, H]`` scalar log-decay per head.
      state: ``[B, H, K, V]`` float32 state ``S_{t-1}``.
      scale: output scale.

    Returns:
      ``(o_t, new_state)``: ``[B, H, V]`` in ``q_t.dtype`` and ``[B, H, K, V]`` float32.
    """
    decay = jnp.exp(expand_decay(g_t, q_t))  # [B, H, K]
    k32 = k_t.astype(jnp.float32)
    v32 = v_t.astype(jnp.float32)
    new_state = (decay[..., None] * state.astype(jnp.float32)
                 + k32[..., :, None] * v32[..., None, :])  # [B, H, K, V]
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t.astype(jnp.float32) * scale, new_state,
                     precision=jax.lax.Precision.HIGHEST)  # [B, H, V]
    return o_t.astype(q_t.dtype), new_state


def gla_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float,
                  initial_state: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """GLA as a per-token ``lax.scan`` (the exact reference).

    Args:
      q: ``[B, T, H, K]``.
      k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` or ``[B, T, H]`` log-decay (<= 0).
      scale: output scale.
      initial_state: ``[B, H, K, V]`` state before the first token of each row's first segment;
        ``None`` means zeros.
      segment_ids: ``[B, T]`` ints; the state is zeroed at every position where the id changes.

    Returns:
      ``(o, final_state)``: ``[B, T, H, V]`` in ``q.dtype``, ``[B, H, K, V]`` float32.
    """
    batch, length, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    g = expand_decay(g, q)  # [B, T, H, K]
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, k_dim, v_dim), jnp.float32)
    reset = document_index(segment_ids, batch, length)
    reset = jnp.concatenate([jnp.zeros((batch, 1), bool), reset[:, 1:] != reset[:, :-1]],
                            axis=1)  # [B, T]

    def body(state, xs):
        q_t, k_t, v_t, g_t, r_t = xs
        state = jnp.where(r_t[:, None, None, None], 0.0, state)  # [B, H, K, V]
        o_t, state = gla_step(q_t, k_t, v_t, g_t, state, scale=scale)
        return state, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, reset))  # time-major
    final_state, o = jax.lax.scan(body, initial_state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), final_state  # [B, T, H, V]


def _to_chunks(x: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
    """``[B, T_pad, H, D]`` -> ``[B, H, N, C, D]``."""
    batch, _, heads, dim = x.shape
    x = jnp.transpose(x, (0, 2, 1, 3))  # [B, H, T_pad, D]
    return x.reshape(batch, heads, num_chunks, chunk, dim)  # [B, H, N, C, D]


def pad_time(x: jax.Array, length: int, mode: str = "constant") -> jax.Array:
    """Pads axis 1 of ``x`` to ``length`` (zeros, or the edge value with ``mode="edge"``)."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def sub_chunk_size(chunk_size: int) -> int:
    """Sub-chunk size used inside a chunk: ``SUB_CHUNK`` when it divides ``chunk_size``."""
    return SUB_CHUNK if chunk_size % SUB_CHUNK == 0 else chunk_size


def gla_chunked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float,
                initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """GLA in chunked parallel form (pure jnp, float32 throughout).

    ``T`` is padded up to a multiple of ``chunk_size`` with zero ``q/k/v`` and zero log-decay
    (decay 1), which leaves outputs and the final state unchanged.

    Args:
      q: ``[B, T, H, K]``.
      k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` or ``[B, T, H]`` log-decay (<= 0).
      scale: output scale.
      initial_state: ``[B, H, K, V]`` or ``None`` (zeros); applies to each row's first segment.
      segment_ids: ``[B, T]`` ints or ``None``; the state resets where the id changes.
      chunk_size: chunk length ``C``.

    Returns:
      ``(o, final_state)``: ``[B, T, H, V]`` in ``q.dtype``, ``[B, H, K, V]`` float32.
    """
    batch, length, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    out_dtype = q.dtype
    hi = jax.lax.Precision.HIGHEST
    chunk = int(chunk_size)
    sub = sub_chunk_size(chunk)
    n_sub = chunk // sub
    num_chunks = -(-length // chunk)
    t_pad = num_chunks * chunk

    g = expand_decay(g, q)  # [B, T, H, K]
    doc = pad_time(document_index(segment_ids, batch, length), t_pad, mode="edge")  # [B, T_pad]
    q, k, v, g = (pad_time(x.astype(jnp.float32), t_pad) for x in (q, k, v, g))
    q = q * scale

    q_c, k_c, v_c, g_c = (_to_chunks(x, num_chunks, chunk) for x in (q, k, v, g))  # [B,H,N,C,D]
    cum = jnp.cumsum(g_c, axis=3)  # [B, H, N, C, K]  inclusive, relative to the chunk start
    doc_c = doc.reshape(batch, 1, num_chunks, chunk)  # [B, 1, N, C]

    # ---- intra-chunk, same sub-chunk: direct [c, c, K] decays ------------------------------------
    sub_shape = (batch, heads, num_chunks, n_sub, sub)
    q_s = q_c.reshape(sub_shape + (k_dim,))  # [B, H, N, n, c, K]
    k_s = k_c.reshape(sub_shape + (k_dim,))  # [B, H, N, n, c, K]
    v_s = v_c.reshape(sub_shape + (v_dim,))  # [B, H, N, n, c, V]
    cum_s = cum.reshape(sub_shape + (k_dim,))  # [B, H, N, n, c, K]
    doc_s = doc_c.reshape((batch, 1, num_chunks, n_sub, sub))  # [B, 1, N, n, c]
    causal = jnp.tril(jnp.ones((sub, sub), bool))  # [c, c]
    diag_mask = causal & (doc_s[..., :, None] == doc_s[..., None, :])  # [B, 1, N, n, c, c]
    diff = cum_s[..., :, None, :] - cum_s[..., None, :, :]  # [B, H, N, n, c, c, K]
    decay = jnp.exp(jnp.where(diag_mask[..., None], jnp.minimum(diff, 0.0), 0.0))
    a_diag = jnp.einsum("...ik,...jk,...ijk->...ij", q_s, k_s, decay,
                        precision=hi)  # [B, H, N, n, c, c]
    a_diag = jnp.where(diag_mask, a_diag, 0.0)
    o_intra = jnp.einsum("...ij,...jv->...iv", a_diag, v_s, precision=hi)  # [B, H, N, n, c, V]

    # ---- intra-chunk, sub-chunk I against earlier sub-chunks: reference = last row before I ----
    if n_sub > 1:
        # Reference of sub-chunk I >= 1 is position r_I = I*c - 1, so j <= r_I <= i for every pair.
        cum_ref = cum_s[:, :, :, :-1, -1]  # [B, H, N, n-1, K]  (sub-chunks 1..n-1)
        doc_ref = doc_s[:, :, :, :-1, -1]  # [B, 1, N, n-1]
        q_off = jnp.where((doc_s[:, :, :, 1:] == doc_ref[..., None])[..., None],
                          q_s[:, :, :, 1:] * jnp.exp(cum_s[:, :, :, 1:] - cum_ref[..., None, :]),
                          0.0)  # [B, H, N, n-1, c, K]
        before = (jnp.arange(chunk)[None, :]
                  < sub * jnp.arange(1, n_sub)[:, None])  # [n-1, C]  j < I*c
        k_mask = before & (doc_c[:, :, :, None, :] == doc_ref[..., None])  # [B, 1, N, n-1, C]
        k_rel = jnp.where(before[:, :, None], cum_ref[..., None, :] - cum[:, :, :, None],
                          0.0)  # [B, H, N, n-1, C, K]
        k_off = jnp.where(k_mask[..., None], k_c[:, :, :, None] * jnp.exp(k_rel), 0.0)
        a_off = jnp.einsum("...ik,...jk->...ij", q_off, k_off, precision=hi)  # [B,H,N,n-1,c,C]
        o_off = jnp.einsum("...Iij,...jv->...Iiv", a_off, v_c, precision=hi)  # [B,H,N,n-1,c,V]
        o_intra = o_intra.at[:, :, :, 1:].add(o_off)
    o_intra = o_intra.reshape(batch, heads, num_chunks, chunk, v_dim)  # [B, H, N, C, V]

    # ---- inter-chunk: states at chunk boundaries via lax.scan ------------------------------------
    doc_last = doc_c[..., -1]  # [B, 1, N]
    doc_prev = jnp.concatenate([jnp.zeros_like(doc_last[..., :1]), doc_last[..., :-1]],
                               axis=-1)  # [B, 1, N]
    cum_last = cum[..., -1, :]  # [B, H, N, K]
    q_in = jnp.where((doc_c == doc_prev[..., None])[..., None], q_c * jnp.exp(cum), 0.0)
    k_up = jnp.where((doc_c == doc_last[..., None])[..., None],
                     k_c * jnp.exp(cum_last[..., None, :] - cum), 0.0)  # [B, H, N, C, K]
    update = jnp.einsum("...ck,...cv->...kv", k_up, v_c, precision=hi)  # [B, H, N, K, V]
    carry = jnp.where((doc_last == doc_prev)[..., None], jnp.exp(cum_last), 0.0)  # [B, H, N, K]

    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, k_dim, v_dim), jnp.float32)

    def body(state, xs):
        carry_n, update_n = xs
        return carry_n[..., None] * state + update_n, state  # [B, H, K, V]

    final_state, prev_states = jax.lax.scan(
        body, initial_state.astype(jnp.float32),
        (jnp.moveaxis(carry, 2, 0), jnp.moveaxis(update, 2, 0)))  # prev: [N, B, H, K, V]
    prev_states = jnp.moveaxis(prev_states, 0, 2)  # [B, H, N, K, V]
    o_inter = jnp.einsum("...ck,...kv->...cv", q_in, prev_states, precision=hi)  # [B,H,N,C,V]

    o = (o_intra + o_inter).reshape(batch, heads, t_pad, v_dim)  # [B, H, T_pad, V]
    o = jnp.transpose(o, (0, 2, 1, 3))[:, :length]  # [B, T, H, V]
    return o.astype(out_dtype), final_state
