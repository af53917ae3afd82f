"""Causal softmax attention: full or sliding-window, grouped-query (GQA), RoPE, packed-sequence masks.

Shapes: b batch, t query time, s key time, h query heads, g kv heads (h % g == 0), r = h // g, k head dim.
Sliding window ``window = W > 0``: query t sees keys s with ``t - W < s <= t`` (W tokens including itself).
Decoding keeps a cache of all keys (full) or a ring buffer of the last W keys (sliding window).

A whole sequence goes through ``kernels.causal_attention.causal_attention`` (``impl="auto"``: the
flash-attention Pallas kernel on GPU/TPU, the blocked online-softmax path on CPU; masked blocks skipped, no
T x T buffer); ``attention_mask`` / ``dot_product_attention`` (the dense reference, re-exported from
``kernels.causal_attention.ref``) serve decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.causal_attention import causal_attention
from kernels.causal_attention.ref import MASK_VALUE, attention_mask, dot_product_attention
from sqattn import mixers
from sqattn.layers import Dense, RMSNorm, apply_rope, positions_from_segments
from sqattn.parallel import cad as cad_lib
from sqattn.parallel.sharding import constrain

_MASK = MASK_VALUE  # finite: fully-masked rows give a uniform softmax, never NaN
_IMPLS = ("auto", "chunked", "ref", "pallas", "interpret")  # kernels.causal_attention's impl


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int,
                    segment_ids: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Sliding-window causal attention in O(T * 2W): the banded fast path of ``dot_product_attention`` with
    ``attention_mask(window=W)``.

    The sequence is cut into blocks of W queries; block i attends to the keys of blocks i-1 and i (2W keys),
    masked to ``t - W < s <= t`` (and to the same segment). Equal to the dense reference up to float rounding
    (tests/sqattn/mixers/test_attention.py). q [b,t,h,k], k/v [b,t,g,k] -> [b,t,h,k].
    """
    b, t, h, hd = q.shape
    g = k.shape[2]
    w = window
    n = -(-t // w)                                                     # blocks of w queries
    pad = n * w - t
    scale = hd ** -0.5 if scale is None else scale
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids

    def blocks(x, fill=0):                                             # [b, t, ...] -> [b, n, w, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(b, n, w, *x.shape[2:])

    def with_previous(x):                                              # [b, n, w, ...] -> [b, n, 2w, ...]
        prev = jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1]
        return jnp.concatenate([prev, x], axis=2)

    qb = blocks(q).reshape(b, n, w, g, h // g, hd)                     # [b,n,w,g,r,k]
    kb, vb = with_previous(blocks(k)), with_previous(blocks(v))        # [b,n,2w,g,k]
    qi = jnp.arange(n)[:, None] * w + jnp.arange(w)[None, :]           # [n, w] query index
    ki = jnp.arange(n)[:, None] * w - w + jnp.arange(2 * w)[None, :]   # [n, 2w] key index (< 0: padding)
    ok = (ki[:, None, :] <= qi[:, :, None]) & (ki[:, None, :] > qi[:, :, None] - w) & (ki[:, None, :] >= 0)
    qs = blocks(seg, -1)                                               # [b, n, w]
    ks = with_previous(blocks(seg, -2))                                # [b, n, 2w]
    ok = ok[None] & (qs[..., :, None] == ks[..., None, :])             # [b, n, w, 2w]
    logits = jnp.einsum("bnqgrk,bnsgk->bngrqs", qb, kb, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(ok[:, :, None, None], logits, _MASK)            # [b,n,g,r,w,2w]
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bngrqs,bnsgk->bnqgrk", probs.astype(v.dtype), vb,
                     preferred_element_type=jnp.float32)               # [b,n,w,g,r,k]
    return out.reshape(b, n * w, h, hd)[:, :t].astype(q.dtype)


def init_qkvo(module: nnx.Module, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
              rngs: nnx.Rngs, dtype, out_scale: float = 1.0) -> None:
    """Creates ``module.q/k/v/o``: the projections (names, shapes, axes, creation order) every attention-like
    mixer shares (Attention, ScoutAttention, LigerAttention), so weights move between them 1:1."""
    module.q = Dense(d_model, num_heads * head_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
    module.k = Dense(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), rngs=rngs, dtype=dtype)
    module.v = Dense(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), rngs=rngs, dtype=dtype)
    module.o = Dense(num_heads * head_dim, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                     init_scale=out_scale)


@mixers.register("A", "attention", "causal softmax attention (full, or sliding window if window > 0)")
class Attention(nnx.Module):
    """Multi-head causal attention with GQA and RoPE.

    Attributes:
      num_heads: query heads h.  num_kv_heads: kv heads g (h % g == 0; default h).
      head_dim: per-head width (default d_model // h).  window: 0 = full, W > 0 = sliding window.
      cad: core attention disaggregation (sqattn.parallel.cad): True or a dict of ``CADConfig`` fields. Under
        an ``activation_sharding`` mesh whose data-parallel axes shard the batch, core attention runs as the
        balanced shard_map program (same result); otherwise it is ignored. Full attention only.
      impl: ``kernels.causal_attention`` implementation: "auto" (the flash-attention Pallas kernel on a GPU/TPU
        target, the blocked jnp path on CPU), "pallas" (the kernel, GPU/TPU), "interpret" (the kernel in the
        Pallas interpreter), "chunked" (blocked jnp) or "ref" (dense).
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32, num_heads: int = 4,
                 num_kv_heads: int | None = None, head_dim: int | None = None, window: int = 0,
                 rope_theta: float = 10000.0, qk_norm: bool = False, out_scale: float = 1.0,
                 cad: bool | dict = False, impl: str = "auto"):
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or d_model // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"attention: num_heads={num_heads} not divisible by num_kv_heads={num_kv_heads}")
        if window < 0:
            raise ValueError(f"attention: window must be >= 0, got {window}")
        if impl not in _IMPLS:
            raise ValueError(f"attention: impl must be one of {_IMPLS}, got {impl!r}")
        self.cad = cad_lib.CADConfig.from_arg(cad)
        if self.cad is not None and window > 0:
            raise ValueError(f"attention: cad needs full attention (window=0), got window={window}")
        self.h, self.g, self.hd, self.window, self.theta = num_heads, num_kv_heads, head_dim, window, rope_theta
        init_qkvo(self, d_model, num_heads, num_kv_heads, head_dim, rngs=rngs, dtype=dtype, out_scale=out_scale)
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None
        self.dtype = dtype
        self.impl = impl

    def _qkv(self, x: jax.Array, pos: jax.Array):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.h, self.hd)                   # [b,t,h,k]
        k = self.k(x).reshape(b, t, self.g, self.hd)                   # [b,t,g,k]
        v = self.v(x).reshape(b, t, self.g, self.hd)                   # [b,t,g,k]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, pos, self.theta), ("act_batch", "act_seq", "act_heads", None))
        k = apply_rope(k, pos, self.theta)
        return q, k, v

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """``positions [b,t]``: RoPE positions (default: index within each segment); masks use slot order."""
        b, t, _ = x.shape
        pos = positions_from_segments(segment_ids, b, t) if positions is None else positions
        q, k, v = self._qkv(x, pos)
        o = cad_lib.core_attention(q, k, v, segment_ids, self.cad) if self.cad is not None else None
        if o is None:                                                  # [b,t,h,k]; O(T W) with a window
            o = causal_attention(q, k, v, window=self.window, segment_ids=segment_ids, impl=self.impl)
        return self.o(o.reshape(b, t, self.h * self.hd))

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of QK^T and PV (parameter-free), averaged over causal positions."""
        t = np.arange(1, seq_len + 1)
        ctx = np.minimum(t, self.window).mean() if self.window > 0 else t.mean()
        return 4.0 * self.h * self.hd * float(ctx)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        slots = min(self.window, max_len) if self.window > 0 else max_len
        return {
            "k": jnp.zeros((batch, slots, self.g, self.hd), dtype),
            "v": jnp.zeros((batch, slots, self.g, self.hd), dtype),
            "slot_pos": jnp.full((slots,), -1, jnp.int32),  # absolute position held by each slot
            "pos": jnp.zeros((), jnp.int32),                # position of the next token
        }

    def step(self, x_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        b = x_t.shape[0]
        pos = cache["pos"]
        q, k, v = self._qkv(x_t[:, None], jnp.full((b, 1), pos))      # [b,1,h,k], [b,1,g,k]
        slots = cache["k"].shape[1]
        slot = pos % slots                                            # full cache: slots >= max_len
        kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), slot, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), slot, axis=1)
        slot_pos = cache["slot_pos"].at[slot].set(pos)
        q_pos = jnp.full((b, 1), pos)
        k_pos = jnp.where(slot_pos >= 0, slot_pos, jnp.iinfo(jnp.int32).max)   # empty slots never visible
        mask = attention_mask(q_pos, jnp.broadcast_to(k_pos, (b, slots)), window=self.window)
        o = dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask)   # [b,1,h,k]
        y = self.o(o.reshape(b, 1, self.h * self.hd))[:, 0]
        return y, {"k": kc, "v": vc, "slot_pos": slot_pos, "pos": pos + 1}
