"""Reference SCOUT segment attention (papers/scout.md "SCOUT attention") in pure jnp.

Query ``t`` of a row attends, with one float32 softmax, to the admissible set

    S_t = {t} U {c in C : c < t},        C = {c : (c + 1) % L == 0}   (0-based index in the row)

i.e. to itself and to the *checkpoints* (last token of every complete segment of length ``L``) strictly
before it. With ``segment_ids`` (packed documents) a checkpoint is admissible only if
``segment_ids[c] == segment_ids[t]`` (plain equality, as in ``sqattn.mixers.attention.attention_mask``).
Checkpoints are defined by the index in the row, not by the position inside a document.

Two functions live here:

* ``segment_attention_ref``: gathers the ``T // L`` checkpoint keys/values (``k[:, L-1::L]``), scores every
  query against them (``[B, G, r, T, T // L]``, masked), adds the self score as one more column and takes a
  single softmax. Its work is ``T^2 / L`` per head, so it is also the fast CPU path (``impl="ref"``) and the
  function whose ``jax.vjp`` is the backward of the Pallas path.
* ``segment_attention_dense``: a test oracle that builds the full ``[T, T]`` admissible-set mask and runs
  plain masked softmax attention (quadratic; tests only).

Shape legend: B batch, T length, H query heads, G kv heads (H % G == 0), r = H // G, D head dim,
S = T // L checkpoints. Query head ``h`` reads kv head ``h // r`` (``sqattn.mixers.attention`` order).
Masks are finite (``-1e30``): the self column is always admissible, so no row is ever fully masked and a row
without a visible checkpoint returns exactly ``v_t``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["checkpoint_positions", "num_checkpoints", "score_entries", "segment_attention_dense",
           "segment_attention_ref", "segment_attention_step_ref"]

MASK_VALUE = -1e30  # finite: exp(MASK_VALUE - m) == 0 for any finite row max m


def _precision(dtype) -> jax.lax.Precision | None:
    """Full f32 matmuls for f32 inputs (no TF32 on GPU); default (exact products) for 16-bit inputs."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def num_checkpoints(length: int, segment_len: int) -> int:
    """Number of complete segments of a length-``length`` row, i.e. of checkpoints: ``length // L``."""
    return length // segment_len


def checkpoint_positions(length: int, segment_len: int) -> jax.Array:
    """Row indices ``c = (j + 1) * L - 1`` of the ``length // L`` checkpoints, ``[S]`` int32."""
    n = num_checkpoints(length, segment_len)
    return (jnp.arange(n, dtype=jnp.int32) + 1) * segment_len - 1  # [S]


def score_entries(length: int, segment_len: int) -> int:
    """Admissible (query, key) pairs of one head: ``sum_t (#checkpoints < t + 1)``, ``t = 0..T-1``.

    ``#checkpoints < t`` is ``t // L``, so this is ``~T^2 / (2L)`` against ``T (T + 1) / 2`` for causal
    attention. Pure Python (exact integers), for cost tables.
    """
    if segment_len < 1:
        raise ValueError(f"score_entries: segment_len must be >= 1, got {segment_len}")
    return sum(t // segment_len + 1 for t in range(length))


def segment_attention_ref(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_len: int,
                          segment_ids: jax.Array | None = None, scale: float) -> jax.Array:
    """SCOUT attention by gathered checkpoints: ``T^2 / L`` work, float32 softmax.

    Args:
      q: ``[B, T, H, D]`` queries (RoPE already applied).
      k: ``[B, T, G, D]`` keys (RoPE already applied).
      v: ``[B, T, G, D]`` values.
      segment_len: ``L >= 1``.
      segment_ids: ``[B, T]`` integer document ids, or ``None`` (one document per row).
      scale: score scale (usually ``D ** -0.5``).

    Returns:
      ``[B, T, H, D]`` in ``q.dtype``.
    """
    batch, length, heads, dim = q.shape
    groups = k.shape[2]
    rep = heads // groups
    n_ck = num_checkpoints(length, segment_len)
    hi = _precision(q.dtype)
    qg = q.reshape(batch, length, groups, rep, dim)  # [B, T, G, r, D]
    ck = k[:, segment_len - 1::segment_len]  # [B, S, G, D]
    cv = v[:, segment_len - 1::segment_len]  # [B, S, G, D]

    s_self = jnp.einsum("btgrd,btgd->bgrt", qg, k, precision=hi,
                        preferred_element_type=jnp.float32) * scale  # [B, G, r, T]
    s_ck = jnp.einsum("btgrd,bsgd->bgrts", qg, ck, precision=hi,
                      preferred_element_type=jnp.float32) * scale  # [B, G, r, T, S]
    c_pos = checkpoint_positions(length, segment_len)  # [S]
    t_pos = jnp.arange(length, dtype=jnp.int32)  # [T]
    visible = jnp.broadcast_to(c_pos[None, :] < t_pos[:, None], (batch, length, n_ck))  # [B, T, S]
    if segment_ids is not None:
        c_seg = segment_ids[:, segment_len - 1::segment_len]  # [B, S]
        visible = visible & (segment_ids[:, :, None] == c_seg[:, None, :])  # [B, T, S]
    s_ck = jnp.where(visible[:, None, None], s_ck, MASK_VALUE)  # [B, G, r, T, S]

    logits = jnp.concatenate([s_self[..., None], s_ck], axis=-1)  # [B, G, r, T, 1 + S]
    probs = jax.nn.softmax(logits, axis=-1)  # [B, G, r, T, 1 + S]  f32
    o = probs[..., 0, None] * jnp.moveaxis(v, 1, 2).astype(jnp.float32)[:, :, None]  # [B, G, r, T, D]
    o = o + jnp.einsum("bgrts,bsgd->bgrtd", probs[..., 1:], cv.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)  # [B, G, r, T, D]
    o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(batch, length, heads, dim)  # [B, T, H, D]
    return o.astype(q.dtype)


def segment_attention_step_ref(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, ck: jax.Array,
                               cv: jax.Array, n_valid: jax.Array, *, scale: float) -> jax.Array:
    """One decoding step: softmax over the first ``n_valid`` cached checkpoints plus the token itself.

    Args:
      q_t: ``[B, H, D]``.
      k_t: ``[B, G, D]``.
      v_t: ``[B, G, D]``.
      ck: ``[B, S, G, D]`` cached checkpoint keys (slots ``>= n_valid`` are ignored).
      cv: ``[B, S, G, D]`` cached checkpoint values.
      n_valid: ``[]`` int, number of valid leading slots.
      scale: score scale.

    Returns:
      ``[B, H, D]`` in ``q_t.dtype``.
    """
    batch, heads, dim = q_t.shape
    groups = k_t.shape[1]
    slots = ck.shape[1]
    hi = _precision(q_t.dtype)
    qg = q_t.reshape(batch, groups, heads // groups, dim)  # [B, G, r, D]
    s_self = jnp.einsum("bgrd,bgd->bgr", qg, k_t.astype(q_t.dtype), precision=hi,
                        preferred_element_type=jnp.float32) * scale  # [B, G, r]
    s_ck = jnp.einsum("bgrd,bsgd->bgrs", qg, ck.astype(q_t.dtype), precision=hi,
                      preferred_element_type=jnp.float32) * scale  # [B, G, r, S]
    s_ck = jnp.where(jnp.arange(slots) < n_valid, s_ck, MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([s_self[..., None], s_ck], axis=-1), axis=-1)  # [B,G,r,1+S]
    o = probs[..., 0, None] * v_t.astype(jnp.float32)[:, :, None]  # [B, G, r, D]
    o = o + jnp.einsum("bgrs,bsgd->bgrd", probs[..., 1:], cv.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)  # [B, G, r, D]
    return o.reshape(batch, heads, dim).astype(q_t.dtype)  # [B, H, D]


def segment_attention_dense(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_len: int,
                            segment_ids: jax.Array | None = None,
                            scale: float | None = None) -> jax.Array:
    """Test oracle: full ``[T, T]`` softmax attention under the admissible-set mask (quadratic).

    Key ``s`` is admissible for query ``t`` iff ``s == t``, or ``(s + 1) % L == 0`` and ``s < t`` (and,
    with ``segment_ids``, ``segment_ids[s] == segment_ids[t]``). Everything in float32.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, G, D]``.
      v: ``[B, T, G, D]``.
      segment_len: ``L >= 1``.
      segment_ids: ``[B, T]`` ints or ``None``.
      scale: defaults to ``D ** -0.5``.

    Returns:
      ``[B, T, H, D]`` in ``q.dtype``.
    """
    batch, length, heads, dim = q.shape
    groups = k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    idx = jnp.arange(length)
    is_ck = (idx + 1) % segment_len == 0  # [T]
    mask = (idx[None, :] == idx[:, None]) | (is_ck[None, :] & (idx[None, :] < idx[:, None]))  # [T, T]
    mask = jnp.broadcast_to(mask, (batch, length, length))  # [B, T, T]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    qg = q.astype(jnp.float32).reshape(batch, length, groups, heads // groups, dim)  # [B, T, G, r, D]
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k.astype(jnp.float32), precision=hi) * scale
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)  # [B, G, r, T, T]
    probs = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bgrts,bsgd->btgrd", probs, v.astype(jnp.float32), precision=hi)  # [B,T,G,r,D]
    return o.reshape(batch, length, heads, dim).astype(q.dtype)  # [B, T, H, D]
