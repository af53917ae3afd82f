"""Varlen causal core attention over a fused batch of CA-tasks: what an attention server computes.

Every query and key row carries its document id and its position within the document; query row ``i`` sees
key row ``j`` iff ``k_doc[j] == q_doc[i]`` and ``k_pos[j] <= q_pos[i]`` (document mask, causal by absolute
position — so head/tail shards of a split document need no offsets). Padding: query doc ``-1`` and key doc
``< -1`` (or any id no query has) match nothing. Masked logits take a finite value, so a fully masked (padding)
row gives a uniform softmax, never NaN.

The forward returns ``O`` and the f32 log-sum-exp; the backward (a ``custom_vjp``) recomputes probabilities
from the LSE block by block (FlashAttention-style), so only ``q, k, v, o, lse`` are kept as residuals. Queries
are processed in blocks of ``q_block`` rows against all keys (a dense masked reference; on GPU/TPU a varlen
flash kernel with segment ids would replace the block body).

Shapes: q [Nq, h, d], k/v [Nk, g, d] (h % g == 0, r = h // g); docs / positions [Nq] and [Nk] int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASK = -1e30  # finite: fully masked rows stay finite (same value as sqattn.mixers.attention)


def segment_causal_mask(q_doc: jax.Array, q_pos: jax.Array, k_doc: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Boolean [Nq, Nk]: same document and key position <= query position."""
    return (q_doc[:, None] == k_doc[None, :]) & (k_pos[None, :] <= q_pos[:, None]) & (q_doc[:, None] >= 0)


def _logits(q, k, qd, qp, kd, kp, scale):
    nq, h, hd = q.shape
    g = k.shape[1]
    qg = q.reshape(nq, g, h // g, hd)                                                  # [q,g,r,d]
    s = jnp.einsum("qgrd,kgd->grqk", qg, k, preferred_element_type=jnp.float32) * scale  # [g,r,q,k]
    ok = segment_causal_mask(qd, qp, kd, kp)                                           # [q,k]
    return jnp.where(ok[None, None], s, _MASK), ok, qg


def _block_fwd(q, k, v, qd, qp, kd, kp, scale):
    nq, h, hd = q.shape
    s, _, _ = _logits(q, k, qd, qp, kd, kp, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    lse = (m + jnp.log(l))[..., 0]                                                    # [g,r,q]
    probs = (p / l).astype(v.dtype)
    o = jnp.einsum("grqk,kgd->qgrd", probs, v, preferred_element_type=jnp.float32)    # [q,g,r,d]
    return o.reshape(nq, h, hd).astype(q.dtype), jnp.moveaxis(lse, -1, 0).reshape(nq, h)


def _block_bwd(q, k, v, o, lse, do, dlse, qd, qp, kd, kp, scale):
    nq, h, hd = q.shape
    g = k.shape[1]
    r = h // g
    s, ok, qg = _logits(q, k, qd, qp, kd, kp, scale)
    lse_g = jnp.moveaxis(lse.reshape(nq, g, r), 0, -1)                                # [g,r,q]
    p = jnp.exp(s - lse_g[..., None])                                                 # [g,r,q,k]
    do_g = do.astype(jnp.float32).reshape(nq, g, r, hd)                               # [q,g,r,d]
    dv = jnp.einsum("grqk,qgrd->kgd", p, do_g)
    dp = jnp.einsum("qgrd,kgd->grqk", do_g, v.astype(jnp.float32))
    delta = jnp.einsum("qgrd,qgrd->grq", do_g, o.astype(jnp.float32).reshape(nq, g, r, hd))
    dlse_g = jnp.moveaxis(dlse.astype(jnp.float32).reshape(nq, g, r), 0, -1)          # [g,r,q]
    ds = jnp.where(ok[None, None], p * (dp - delta[..., None] + dlse_g[..., None]), 0.0)
    dq = jnp.einsum("grqk,kgd->qgrd", ds, k.astype(jnp.float32)) * scale
    dk = jnp.einsum("grqk,qgrd->kgd", ds, qg.astype(jnp.float32)) * scale
    return dq.reshape(nq, h, hd), dk, dv


def _blocks(x, nb, block, fill):
    """Pads dim 0 to nb * block with ``fill`` and reshapes to [nb, block, ...]."""
    pad = nb * block - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(nb, block, *x.shape[1:])


def _num_blocks(nq: int, block: int) -> tuple[int, int]:
    block = min(block, max(nq, 1))
    return -(-nq // block), block


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _varlen(q, k, v, qd, qp, kd, kp, scale, q_block):
    return _varlen_fwd(q, k, v, qd, qp, kd, kp, scale, q_block)[0]


def _varlen_fwd(q, k, v, qd, qp, kd, kp, scale, q_block):
    nq = q.shape[0]
    nb, block = _num_blocks(nq, q_block)
    qb, qdb, qpb = _blocks(q, nb, block, 0), _blocks(qd, nb, block, -1), _blocks(qp, nb, block, 0)
    o, lse = jax.lax.map(lambda xs: _block_fwd(xs[0], k, v, xs[1], xs[2], kd, kp, scale), (qb, qdb, qpb))
    o, lse = o.reshape(nb * block, *q.shape[1:])[:nq], lse.reshape(nb * block, -1)[:nq]
    return (o, lse), (q, k, v, o, lse, qd, qp, kd, kp)


def _varlen_bwd(scale, q_block, res, cts):
    q, k, v, o, lse, qd, qp, kd, kp = res
    do, dlse = cts
    nq = q.shape[0]
    nb, block = _num_blocks(nq, q_block)
    xs = (_blocks(q, nb, block, 0), _blocks(o, nb, block, 0), _blocks(lse, nb, block, 0.0),
          _blocks(do, nb, block, 0), _blocks(dlse, nb, block, 0.0), _blocks(qd, nb, block, -1),
          _blocks(qp, nb, block, 0))

    def body(carry, x):
        qb, ob, lb, dob, dlb, qdb, qpb = x
        dq, dk, dv = _block_bwd(qb, k, v, ob, lb, dob, dlb, qdb, qpb, kd, kp, scale)
        return (carry[0] + dk, carry[1] + dv), dq

    zeros = (jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))   # same (manual) axis types
    (dk, dv), dq = jax.lax.scan(body, zeros, xs)
    dq = dq.reshape(nb * block, *q.shape[1:])[:nq]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_varlen.defvjp(_varlen_fwd, _varlen_bwd)


def varlen_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_doc: jax.Array, q_pos: jax.Array,
                     k_doc: jax.Array, k_pos: jax.Array, *, scale: float | None = None,
                     q_block: int = 512) -> tuple[jax.Array, jax.Array]:
    """Document-masked causal attention of a fused varlen batch.

    Args:
      q: [Nq, h, d] queries.  k, v: [Nk, g, d] keys / values (GQA: h % g == 0).
      q_doc, q_pos: [Nq] document id (``-1``: padding) and position within the document of each query.
      k_doc, k_pos: [Nk] the same for each key (padding: an id no query has, e.g. ``-2``).
      scale: logit scale (default ``d ** -0.5``).
      q_block: query rows per block (memory is O(q_block * Nk) per block).

    Returns:
      ``(o [Nq, h, d] in q.dtype, lse [Nq, h] float32)``; differentiable in q, k, v (and through lse).
    """
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"varlen_attention: bad shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: {q.shape[1]} query heads not divisible by {k.shape[1]} kv heads")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _varlen(q, k, v, q_doc.astype(jnp.int32), q_pos.astype(jnp.int32), k_doc.astype(jnp.int32),
                   k_pos.astype(jnp.int32), scale, int(q_block))


def count_pairs(q_doc: jax.Array, q_pos: jax.Array, k_doc: jax.Array, k_pos: jax.Array, *,
                q_block: int = 512) -> jax.Array:
    """Number of unmasked (query, key) pairs, int32, computed block by block."""
    nb, block = _num_blocks(q_doc.shape[0], q_block)
    qdb, qpb = _blocks(q_doc, nb, block, -1), _blocks(q_pos, nb, block, 0)
    per = jax.lax.map(lambda xs: jnp.sum(segment_causal_mask(xs[0], xs[1], k_doc, k_pos), dtype=jnp.int32),
                      (qdb, qpb))
    return jnp.sum(per)
