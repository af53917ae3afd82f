"""Blocked causal attention in pure jnp (``impl="chunked"``, what ``"auto"`` runs on CPU): flash attention for XLA.

The sequence is cut into ``n`` blocks of ``B`` tokens. Query block ``i`` only meets key blocks ``i - d``
(block diagonal ``d >= 0``); ``d > i`` is before the sequence, and with a sliding window the diagonals past
the window are skipped, so the fully masked blocks are never computed and no ``[T, T]`` array exists.

**Diagonal 0** (each query block against its own key block: the causal triangle) runs first, batched over all
``n`` blocks: it holds each query's own key, so the running max is finite from the start and masked entries
(finite ``MASK_VALUE``) contribute exactly 0 afterwards.

**Diagonals 1..n_diag-1** run in one ``lax.scan`` whose every step has the same shape (``n`` block pairs), so
XLA compiles the step once whatever ``T`` is (one program per diagonal made compilation grow with ``T``: ~10 s at
``T = 1024``). Step ``d`` takes the ``n - d`` pairs of diagonal ``d`` (``(j + d, j)``, part A) and fills the
other ``d`` slots with the pairs of diagonal ``n - d`` (``(j, j - n + d)``, part B: the folded triangle), so
``n // 2`` steps of ``n`` pairs cover all ``n (n - 1) / 2`` off-diagonal pairs of full attention. A slot whose
pair is not needed (part B under a short window, the middle diagonal counted twice) is computed and dropped.
Pairs are gathered and results put back with block-axis rolls by ``d``.

Inside a pair every position is visible (``t - s >= 1``) except where a sliding window cuts it
(``t - s = delta B + i_q - i_k >= W``) or packed segments differ; those get ``MASK_VALUE``.

Forward: online softmax, each pair's ``(max, sum, p v)`` merged into the running float32 state; returns the
normalised output and ``lse = m + log l``. Backward (``blocked_bwd``): the flash-attention recurrence from
``lse``: ``p = exp(s - lse)``, ``dv += p^T do``, ``dp = do v^T``, ``ds = p (dp - delta)`` with
``delta = rowsum(do * o)``, ``dq += ds k``, ``dk += ds^T q``, over the same steps. Matmul operands are in the
input dtype (bf16 inputs use the CPU's bf16 matmul units); accumulation, softmax and state are float32.

Layout: ``to_blocks`` / ``from_blocks`` move between ``[b, T, h, k]`` and the block layout
``[b, n, g, r*B, k]`` (queries, the ``r = h // g`` heads of a kv head stacked as rows, ordered (r, B)) or
``[b, n, g, B, k]`` (keys and values), so GQA needs no copy of k or v.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from kernels.causal_attention.ref import MASK_VALUE

__all__ = ["blocked_bwd", "blocked_fwd", "diagonals", "from_blocks", "to_blocks"]

_F32 = jnp.float32


def diagonals(n: int, block: int, window: int) -> int:
    """Number of block diagonals with any visible pair: all ``n`` (full attention), or those with
    ``d B - (B - 1) < W`` under a sliding window ``W``."""
    if window <= 0:
        return n
    return min(n, (window + block - 2) // block + 1)


def to_blocks(x: jax.Array, n: int, block: int, groups: int) -> jax.Array:
    """``[b, n*B, heads, k]`` -> ``[b, n, g, (heads // g) * B, k]`` (heads = g * r, rows ordered (r, B))."""
    b, _, heads, dim = x.shape
    r = heads // groups
    x = x.reshape(b, n, block, groups, r, dim)                       # [b, n, B, g, r, k]
    return jnp.transpose(x, (0, 1, 3, 4, 2, 5)).reshape(b, n, groups, r * block, dim)


def from_blocks(x: jax.Array, block: int) -> jax.Array:
    """Inverse of ``to_blocks``: ``[b, n, g, r*B, k]`` -> ``[b, n*B, g*r, k]``."""
    b, n, groups, rows, dim = x.shape
    r = rows // block
    x = x.reshape(b, n, groups, r, block, dim)                       # [b, n, g, r, B, k]
    return jnp.transpose(x, (0, 1, 4, 2, 3, 5)).reshape(b, n * block, groups * r, dim)


def _fold_steps(n: int, n_diag: int) -> int:
    """Scan steps covering diagonals ``1..n_diag-1``: part A alone if they fit in ``n // 2`` steps, else
    ``n // 2`` steps with part B folding in the far diagonals."""
    m = n_diag - 1
    return m if m <= n // 2 else n // 2


def _position_mask(block: int, window: int) -> np.ndarray | None:
    """Static ``[B, B]`` visibility of (query offset, key offset) on diagonal 0; None when all visible."""
    i = np.arange(block)
    delta = i[:, None] - i[None, :]                                  # t - s
    ok = delta >= 0
    if window > 0:
        ok &= delta < window
    return ok


def _mask(s, ok, block):
    """``s`` ``[b, n, g, r*B, B]`` with ``MASK_VALUE`` where ``ok`` (broadcastable to [b, n, g, r, B, B]) is
    False; ``ok`` None: unchanged."""
    if ok is None:
        return s
    b, n, g, rows, _ = s.shape
    s = s.reshape(b, n, g, rows // block, block, block)              # [b, n, g, r, B, B]
    return jnp.where(ok, s, MASK_VALUE).reshape(b, n, g, rows, block)


def _scores(qp, kp, scale):
    return jnp.einsum("bngqk,bngsk->bngqs", qp, kp, preferred_element_type=_F32) * scale


def _diag0_mask(segb, block, window):
    ok = jnp.asarray(_position_mask(block, window))                  # [B, B]
    if segb is not None:
        ok = ok & (segb[:, :, :, None] == segb[:, :, None, :])[:, :, None, None]   # [b, n, 1, 1, B, B]
    return ok


class _Step:
    """The ``n`` block pairs of scan step ``d`` (a traced int): slot ``j`` holds pair ``(j + d, j)`` when
    ``in_a`` (diagonal ``d``) and pair ``(j, j - n + d)`` otherwise (diagonal ``n - d``)."""

    def __init__(self, d, n: int, steps: int, n_diag: int):
        j = jnp.arange(n)
        self.d = d
        self.in_a = j < n - d                                                        # [n]
        far = n - d
        self.valid = self.in_a | ((far > steps) & (far < n_diag))                    # [n]
        self.offset = jnp.where(self.in_a, d, far)                                   # [n] block diagonal

    def _bcast(self, mask, x):
        return mask.reshape((1, -1) + (1,) * (x.ndim - 2))

    def query_side(self, x):   # query block of each slot: (j + d) mod n in part A, j in part B
        return jnp.where(self._bcast(self.in_a, x), jnp.roll(x, -self.d, axis=1), x)

    def key_side(self, x):     # key block of each slot: j in part A, (j + d) mod n in part B
        return jnp.where(self._bcast(self.in_a, x), x, jnp.roll(x, -self.d, axis=1))

    def to_queries(self, x):   # slot values summed into their query blocks (invalid slots must be 0)
        a = self._bcast(self.in_a, x)
        return jnp.roll(jnp.where(a, x, 0), self.d, axis=1) + jnp.where(a, 0, x)

    def to_keys(self, x):      # slot values summed into their key blocks (invalid slots must be 0)
        a = self._bcast(self.in_a, x)
        return jnp.where(a, x, 0) + jnp.roll(jnp.where(a, 0, x), self.d, axis=1)

    def mask(self, segb, block: int, window: int):
        """Visibility inside each slot's pair, broadcastable to ``[b, n, g, r, B, B]`` (None: all visible)."""
        ok = None
        if window > 0:
            i = jnp.arange(block)
            delta = self.offset[:, None, None] * block + i[None, :, None] - i[None, None, :]   # [n, B, B]
            ok = (delta < window)[None, :, None, None]
        if segb is not None:
            same = self.query_side(segb)[:, :, :, None] == self.key_side(segb)[:, :, None, :]  # [b,n,B,B]
            same = same[:, :, None, None]
            ok = same if ok is None else ok & same
        return ok


def blocked_fwd(qb, kb, vb, segb, *, block: int, window: int, scale: float):
    """Forward over block layouts. qb ``[b,n,g,r*B,k]``, kb/vb ``[b,n,g,B,k]``, segb ``[b,n,B]`` or None.

    Returns ``(o, lse)``: ``o`` ``[b,n,g,r*B,k]`` float32 (normalised), ``lse`` ``[b,n,g,r*B]`` float32.
    """
    n = qb.shape[1]
    n_diag = diagonals(n, block, window)
    steps = _fold_steps(n, n_diag)

    def pv(p, v):
        return jnp.einsum("bngqs,bngsk->bngqk", p.astype(vb.dtype), v, preferred_element_type=_F32)

    s = _mask(_scores(qb, kb, scale), _diag0_mask(segb, block, window), block)      # [b,n,g,R,B]
    m = jnp.max(s, axis=-1)                                                          # [b,n,g,R]
    p = jnp.exp(s - m[..., None])
    l, acc = jnp.sum(p, axis=-1), pv(p, vb)

    def body(carry, d):
        m, l, acc = carry
        st = _Step(d, n, steps, n_diag)
        s = _mask(_scores(st.query_side(qb), st.key_side(kb), scale), st.mask(segb, block, window), block)
        m_p = jnp.max(s, axis=-1)                                                    # [b,n,g,R] per slot
        p = jnp.exp(s - m_p[..., None])
        l_p, acc_p = jnp.sum(p, axis=-1), pv(p, st.key_side(vb))
        in_a = st.in_a[None, :, None, None]
        valid_b = (st.valid & ~st.in_a)[None, :, None, None]
        m_a = jnp.roll(jnp.where(in_a, m_p, MASK_VALUE), d, axis=1)                  # slot -> query block
        l_a, acc_a = jnp.roll(l_p, d, axis=1), jnp.roll(acc_p, d, axis=1)
        m_b = jnp.where(valid_b, m_p, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.maximum(m_a, m_b))
        w0, wa, wb = jnp.exp(m - m_new), jnp.exp(m_a - m_new), jnp.exp(m_b - m_new)
        l = w0 * l + wa * l_a + wb * l_p
        acc = w0[..., None] * acc + wa[..., None] * acc_a + wb[..., None] * acc_p
        return (m_new, l, acc), None

    if steps:
        (m, l, acc), _ = jax.lax.scan(body, (m, l, acc), jnp.arange(1, steps + 1))
    return acc / l[..., None], m + jnp.log(l)


def blocked_bwd(qb, kb, vb, segb, o, lse, do, *, block: int, window: int, scale: float):
    """Backward over block layouts (arguments as ``blocked_fwd`` plus its ``o``, ``lse`` and the output
    cotangent ``do`` ``[b,n,g,r*B,k]``). Returns float32 ``(dq, dk, dv)`` in block layout."""
    n = qb.shape[1]
    n_diag = diagonals(n, block, window)
    steps = _fold_steps(n, n_diag)
    dt = qb.dtype
    delta = jnp.sum(do.astype(_F32) * o, axis=-1)                                    # [b,n,g,R]
    do = do.astype(dt)

    def grads(qp, kp, vp, dop, lsep, deltap, ok, valid):
        s = _mask(_scores(qp, kp, scale), ok, block)
        p = jnp.exp(s - lsep[..., None])                                             # [b,n,g,R,B] f32
        if valid is not None:
            p = jnp.where(valid[None, :, None, None, None], p, 0.0)
        dv = jnp.einsum("bngqs,bngqk->bngsk", p.astype(dt), dop, preferred_element_type=_F32)
        dp = jnp.einsum("bngqk,bngsk->bngqs", dop, vp, preferred_element_type=_F32)
        ds = (p * (dp - deltap[..., None]) * scale).astype(dt)
        dq = jnp.einsum("bngqs,bngsk->bngqk", ds, kp, preferred_element_type=_F32)
        dk = jnp.einsum("bngqs,bngqk->bngsk", ds, qp, preferred_element_type=_F32)
        return dq, dk, dv

    dq, dk, dv = grads(qb, kb, vb, do, lse, delta, _diag0_mask(segb, block, window), None)

    def body(carry, d):
        dq, dk, dv = carry
        st = _Step(d, n, steps, n_diag)
        q_side = st.query_side
        dq_p, dk_p, dv_p = grads(q_side(qb), st.key_side(kb), st.key_side(vb), q_side(do), q_side(lse),
                                 q_side(delta), st.mask(segb, block, window), st.valid)
        return (dq + st.to_queries(dq_p), dk + st.to_keys(dk_p), dv + st.to_keys(dv_p)), None

    if steps:
        (dq, dk, dv), _ = jax.lax.scan(body, (dq, dk, dv), jnp.arange(1, steps + 1))
    return dq, dk, dv
