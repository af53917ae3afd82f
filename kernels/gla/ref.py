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

* a per-head scalar decay (``g`` of shape ``[B, T, H]``) needs no factoring: its decays form a
  ``[C, C]`` matrix ``exp(min(G_i - G_j, 0))`` per chunk and head, so the intra-chunk part is
  ``((q k^T) * decay) v``;
* a per-key decay splits the chunk recursively in halves down to leaf blocks of ``c <= LEAF``
  rows. A pair ``j < i`` in different halves of its smallest common block uses the last row ``r``
  of the first half as reference: ``q_i exp(G_i - G_r)`` and ``k_j exp(G_r - G_j)``, both factors
  <= 1 because ``j <= r < i``. Pairs inside one leaf block take ``exp(G_i - G_j)`` directly, one
  diagonal ``i - j = d`` at a time (``[c - d, K]`` elementwise), never as a ``[c, c, K]`` tensor;
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

# Default sub-chunk of the Pallas kernels (kernels/gla/pallas.py, kernels/sse/pallas.py): pairs
# inside one sub-chunk cost a [c, c, K] tensor there.
SUB_CHUNK = 16
# Largest leaf block of gla_chunked's recursive split (per-key decay). 2, 4 and 8 time within
# noise of each other on CPU (experiments/bench_gla.py); 16 is slower and smaller leaves add levels.
LEAF = 4


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
    """Pallas sub-chunk size inside a chunk: ``SUB_CHUNK`` when it divides ``chunk_size``."""
    return SUB_CHUNK if chunk_size % SUB_CHUNK == 0 else chunk_size


def _leaf_size(chunk: int) -> int:
    """Leaf block of ``gla_chunked``'s split: ``chunk`` halved while it is even and > ``LEAF``."""
    leaf = chunk
    while leaf > LEAF and leaf % 2 == 0:
        leaf //= 2
    return leaf


def _diag_bands(q_s: jax.Array, k_s: jax.Array, cum_s: jax.Array) -> jax.Array:
    """Scores of pairs inside one leaf block, by diagonal: ``X[..., i, d] = A[..., i, i - d]``.

    ``A[i, j] = sum_k q[i, k] k[j, k] exp(G[i, k] - G[j, k])`` for ``j <= i`` (exponent <= 0 up to
    rounding of the cumsum); one ``[c - d, K]`` elementwise pass per offset ``d``, so only the
    causal half is computed and no ``[c, c, K]`` tensor is formed.

    Args:
      q_s: ``[..., c, K]``.
      k_s: ``[..., c, K]``.
      cum_s: ``[..., c, K]`` cumulative log-decay (any common reference).

    Returns:
      ``[..., c, c]``; ``X[..., i, d] = 0`` for ``d > i``.
    """
    sub = q_s.shape[-2]
    lead = [(0, 0)] * (q_s.ndim - 2)
    bands = []
    for d in range(sub):
        band = jnp.sum(q_s[..., d:, :] * k_s[..., :sub - d, :]
                       * jnp.exp(cum_s[..., d:, :] - cum_s[..., :sub - d, :]),
                       axis=-1)  # [..., c - d]
        bands.append(jnp.pad(band, lead + [(d, 0)]))  # [..., c]
    return jnp.stack(bands, axis=-1)  # [..., c, c]


def _skew(x: jax.Array) -> jax.Array:
    """``X[..., i, d]`` -> ``A[..., i, j] = X[..., i, i - j]`` (``0`` for ``j > i``) by reshapes.

    With ``Y`` = ``X`` reversed along ``d`` and zero-padded to width ``2c - 1``,
    ``A[i, j] = Y[i, j + c - 1 - i]``, which in the flattened ``Y`` sits at
    ``i (2c - 2) + j + c - 1``: one slice, then rows of width ``2c - 2``.
    """
    sub = x.shape[-1]
    if sub == 1:
        return x
    lead = x.shape[:-2]
    y = jnp.pad(x[..., ::-1], [(0, 0)] * (x.ndim - 1) + [(0, sub - 1)])  # [..., c, 2c-1]
    flat = y.reshape(lead + (sub * (2 * sub - 1),))  # [..., c (2c-1)]
    flat = flat[..., sub - 1:sub - 1 + sub * (2 * sub - 2)]  # [..., c (2c-2)]
    return flat.reshape(lead + (sub, 2 * sub - 2))[..., :sub]  # [..., c, c]


def _intra_scalar(q_c: jax.Array, k_c: jax.Array, v_c: jax.Array, cum: jax.Array,
                  doc_c: jax.Array, hi: jax.lax.Precision) -> jax.Array:
    """Intra-chunk output for a scalar decay per head: a ``[C, C]`` decay and two matmuls.

    Args:
      q_c: ``[B, H, N, C, K]`` scaled queries.
      k_c: ``[B, H, N, C, K]`` keys.
      v_c: ``[B, H, N, C, V]`` values.
      cum: ``[B, H, N, C, 1]`` within-chunk inclusive cumsum of the log-decay.
      doc_c: ``[B, 1, N, C]`` document index.
      hi: matmul precision.

    Returns:
      ``[B, H, N, C, V]``.
    """
    chunk = q_c.shape[3]
    cum = cum[..., 0]  # [B, H, N, C]
    mask = (jnp.tril(jnp.ones((chunk, chunk), bool))
            & (doc_c[..., :, None] == doc_c[..., None, :]))  # [B, 1, N, C, C]
    # Masked pairs (j > i would give exp(positive)) take exp(0) and are then zeroed; a where rather
    # than a clamp, so the gradient of a kept pair with G_i == G_j (g == 0) is not halved.
    diff = jnp.where(mask, cum[..., :, None] - cum[..., None, :], 0.0)  # [B, H, N, C, C]
    decay = jnp.where(mask, jnp.exp(diff), 0.0)  # [B, H, N, C, C]
    scores = jnp.einsum("...ik,...jk->...ij", q_c, k_c, precision=hi)  # [B, H, N, C, C]
    return jnp.einsum("...ij,...jv->...iv", scores * decay, v_c, precision=hi)  # [B, H, N, C, V]


def _intra_vector(q_c: jax.Array, k_c: jax.Array, v_c: jax.Array, cum: jax.Array,
                  doc_c: jax.Array, hi: jax.lax.Precision) -> jax.Array:
    """Intra-chunk output for a per-key decay, by recursive halving of the chunk.

    A pair ``j < i`` of one chunk is counted once: in the smallest aligned block (sizes
    ``2c, 4c, ..., C``) holding both, where ``j`` is in its first half and ``i`` in its second.
    Its decay is split at ``r``, the last row of the first half: ``q_i exp(G_i - G_r)`` and
    ``k_j exp(G_r - G_j)`` (``j <= r < i``, both exponents <= 0), so each level is one elementwise
    pass over ``q`` and ``k`` plus two small matmuls. Pairs inside one leaf block of size ``c``
    (``_leaf_size``) use the diagonals of ``_diag_bands``.

    Args:
      q_c: ``[B, H, N, C, K]`` scaled queries.
      k_c: ``[B, H, N, C, K]`` keys.
      v_c: ``[B, H, N, C, V]`` values.
      cum: ``[B, H, N, C, K]`` within-chunk inclusive cumsum of the log-decay.
      doc_c: ``[B, 1, N, C]`` document index.
      hi: matmul precision.

    Returns:
      ``[B, H, N, C, V]``.
    """
    batch, heads, num_chunks, chunk, k_dim = q_c.shape
    v_dim = v_c.shape[-1]
    sub = _leaf_size(chunk)
    lead = (batch, heads, num_chunks)

    def blocks(x: jax.Array, size: int) -> jax.Array:
        """``[B, H|1, N, C, ...]`` -> ``[B, H|1, N, C/size, size, ...]``."""
        return x.reshape(x.shape[:3] + (chunk // size, size) + x.shape[4:])

    q_s, k_s, v_s, cum_s = (blocks(x, sub) for x in (q_c, k_c, v_c, cum))  # [B,H,N,n,c,D]
    doc_s = blocks(doc_c, sub)  # [B, 1, N, n, c]
    mask = (jnp.tril(jnp.ones((sub, sub), bool))
            & (doc_s[..., :, None] == doc_s[..., None, :]))  # [B, 1, N, n, c, c]
    a_diag = jnp.where(mask, _skew(_diag_bands(q_s, k_s, cum_s)), 0.0)  # [B, H, N, n, c, c]
    o = jnp.einsum("...ij,...jv->...iv", a_diag, v_s,
                   precision=hi).reshape(lead + (chunk, v_dim))  # [B, H, N, C, V]

    size = 2 * sub
    while size <= chunk:
        half = size // 2
        # [B, H, N, C/size, 2, half, D]: index 0 = first half (keys), 1 = second half (queries)
        q_b, k_b, v_b, cum_b = (blocks(x, size).reshape(
            lead + (chunk // size, 2, half, x.shape[-1])) for x in (q_c, k_c, v_c, cum))
        doc_b = doc_c.reshape(batch, 1, num_chunks, chunk // size, 2, half)
        cum_ref = cum_b[..., 0, -1:, :]  # [B, H, N, C/size, 1, K]  row r
        doc_ref = doc_b[..., 0, -1:]  # [B, 1, N, C/size, 1]
        q_hat = jnp.where((doc_b[..., 1, :] == doc_ref)[..., None],
                          q_b[..., 1, :, :] * jnp.exp(cum_b[..., 1, :, :] - cum_ref),
                          0.0)  # [B, H, N, C/size, half, K]
        k_hat = jnp.where((doc_b[..., 0, :] == doc_ref)[..., None],
                          k_b[..., 0, :, :] * jnp.exp(cum_ref - cum_b[..., 0, :, :]),
                          0.0)  # [B, H, N, C/size, half, K]
        a_off = jnp.einsum("...ik,...jk->...ij", q_hat, k_hat,
                           precision=hi)  # [B, H, N, C/size, half, half]
        o_off = jnp.einsum("...ij,...jv->...iv", a_off, v_b[..., 0, :, :],
                           precision=hi)  # [B, H, N, C/size, half, V]
        o_off = jnp.stack([jnp.zeros_like(o_off), o_off], axis=-3)  # [B,H,N,C/size,2,half,V]
        o = o + o_off.reshape(lead + (chunk, v_dim))  # [B, H, N, C, V]
        size *= 2
    return o


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
    num_chunks = -(-length // chunk)
    t_pad = num_chunks * chunk
    scalar = g.ndim == q.ndim - 1

    g = g.astype(jnp.float32)
    if scalar:
        g = g[..., None]  # [B, T, H, 1]: broadcasts over K below
    doc = pad_time(document_index(segment_ids, batch, length), t_pad, mode="edge")  # [B, T_pad]
    q, k, v, g = (pad_time(x.astype(jnp.float32), t_pad) for x in (q, k, v, g))
    q = q * scale

    q_c, k_c, v_c, g_c = (_to_chunks(x, num_chunks, chunk) for x in (q, k, v, g))  # [B,H,N,C,D]
    # Inclusive cumsum within each chunk (relative to the chunk start), as a matmul with a
    # lower-triangular ones matrix: faster on CPU than the reduce-window XLA emits for cumsum.
    tril = jnp.tril(jnp.ones((chunk, chunk), jnp.float32))  # [C, C]
    cum = jnp.einsum("ij,...jk->...ik", tril, g_c, precision=hi)  # [B, H, N, C, K or 1]
    doc_c = doc.reshape(batch, 1, num_chunks, chunk)  # [B, 1, N, C]

    if scalar:
        o_intra = _intra_scalar(q_c, k_c, v_c, cum, doc_c, hi)  # [B, H, N, C, V]
    else:
        o_intra = _intra_vector(q_c, k_c, v_c, cum, doc_c, hi)  # [B, H, N, C, V]

    # ---- inter-chunk: states at chunk boundaries via lax.scan ------------------------------------
    doc_last = doc_c[..., -1]  # [B, 1, N]
    doc_prev = jnp.concatenate([jnp.zeros_like(doc_last[..., :1]), doc_last[..., :-1]],
                               axis=-1)  # [B, 1, N]
    cum_last = cum[..., -1, :]  # [B, H, N, K or 1]
    q_in = jnp.where((doc_c == doc_prev[..., None])[..., None], q_c * jnp.exp(cum), 0.0)
    k_up = jnp.where((doc_c == doc_last[..., None])[..., None],
                     k_c * jnp.exp(cum_last[..., None, :] - cum), 0.0)  # [B, H, N, C, K]
    update = jnp.einsum("...ck,...cv->...kv", k_up, v_c, precision=hi)  # [B, H, N, K, V]
    carry = jnp.where((doc_last == doc_prev)[..., None], jnp.exp(cum_last), 0.0)  # [B,H,N,K|1]

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
