"""Reference causal attention in pure jnp: a dense ``[T, S]`` mask and one float32 softmax.

``attention_mask`` and ``dot_product_attention`` are the definitions every attention path is checked against
(``sqattn.mixers.attention`` re-exports them; decoding uses them with one query). ``causal_attention_dense``
is the op's ``impl="ref"``: they, for a whole sequence.

Shapes: b batch, t query time, s key time, h query heads, g kv heads (h % g == 0), r = h // g, k head dim.
Query head ``h`` reads kv head ``h // r``. Sliding window ``W > 0``: query t sees keys s with
``t - W < s <= t``. Masks are finite (``MASK_VALUE``): a fully masked row gives a uniform softmax, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["MASK_VALUE", "attention_mask", "causal_attention_dense", "dot_product_attention"]

MASK_VALUE = -1e30  # finite: exp(MASK_VALUE - m) == 0 for any finite row max m


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, *, window: int = 0,
                   q_seg: jax.Array | None = None, k_seg: jax.Array | None = None) -> jax.Array:
    """Boolean [b, t, s] mask: causal, optional sliding window and same-segment constraint."""
    ok = k_pos[:, None, :] <= q_pos[:, :, None]
    if window > 0:
        ok &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if q_seg is not None:
        ok &= q_seg[:, :, None] == k_seg[:, None, :]
    return ok


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float | None = None) -> jax.Array:
    """Reference GQA attention. q [b,t,h,k], k/v [b,s,g,k], mask [b,t,s] -> [b,t,h,k]; f32 softmax."""
    b, t, h, hd = q.shape
    g = k.shape[2]
    scale = hd ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, g, h // g, hd)                                           # [b,t,g,r,k]
    logits = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)                  # [b,g,r,t,s]
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)                         # [b,t,g,r,k]
    return out.reshape(b, t, h, hd).astype(q.dtype)


def causal_attention_dense(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int = 0,
                           segment_ids: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Causal (optionally sliding-window, same-segment) attention of a whole sequence through the dense mask.

    q [b,t,h,k], k/v [b,t,g,k], segment_ids [b,t] or None -> [b,t,h,k] in q.dtype. Quadratic memory.
    """
    b, t = q.shape[:2]
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(idx, idx, window=window, q_seg=segment_ids, k_seg=segment_ids)
    return dot_product_attention(q, k, v, mask, scale)
