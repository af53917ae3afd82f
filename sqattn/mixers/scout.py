"""SCOUT checkpoint attention (papers/scout.md): each token attends to itself and to segment checkpoints.

The sequence is cut into segments of ``segment_len = L`` tokens; the last token of every complete segment
(row index ``c`` with ``(c + 1) % L == 0``) is a *checkpoint*. Query ``t`` attends, with one softmax, to
``{t} U {checkpoints c < t}`` (``kernels.segment_attention``). Tokens of the current, unfinished segment
are invisible here: the local mixer placed before this one has already folded each segment into its last
token, whose K/V therefore summarise the segment ("segment compression"). Attention work drops from
``T^2 / 2`` to ``~T^2 / (2L)`` score entries per head and the decode cache from ``T`` to ``T // L``
entries.

The SCOUT *layer* of the paper (local mixer + MLP, then checkpoint attention + MLP) is built by the LM's
block pattern, since every ``sqattn.models.lm`` block is ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``:

* SCOUT-SWA: ``block_pattern="AC"`` with ``mixers.attention.window = W`` (sliding-window attention);
* SCOUT-Mamba: ``block_pattern="MC"`` with ``mixers.mamba`` (Mamba-1 / S6) and ``mlp_dim > 0``.

One paper "layer" is therefore two pattern letters (``num_layers = 2 * layers``).

Shapes: b batch, t time, h query heads, g kv heads (h % g == 0), k head dim, s checkpoint slots.
Projections, RoPE, GQA and logical axis names are those of ``sqattn.mixers.attention.Attention`` (so
weights can be copied between them). Checkpoints are gathered after RoPE and are defined by the row index
(slot order), also for packed rows: with ``segment_ids`` a checkpoint is visible only to its own document,
and a document that starts at a multiple of ``L`` sees exactly what it would see alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.segment_attention import segment_attention, segment_attention_step
from sqattn import mixers
from sqattn.layers import apply_rope, positions_from_segments
from sqattn.mixers.attention import init_qkvo
from sqattn.parallel.sharding import constrain


def mean_visible_keys(seq_len: int, segment_len: int) -> float:
    """Mean over ``t = 0..T-1`` of the admissible keys of query ``t``: ``t // L`` checkpoints + itself."""
    t = np.arange(seq_len)
    return float((t // segment_len + 1).mean()) if seq_len > 0 else 0.0


@mixers.register("C", "scout", "SCOUT checkpoint attention (self + segment checkpoints)")
class ScoutAttention(nnx.Module):
    """SCOUT checkpoint attention with GQA and RoPE.

    Attributes:
      h: query heads.  g: kv heads (``h % g == 0``).  hd: head dim.  segment_len: L (checkpoint every L
        tokens).  theta: RoPE base.  impl: ``kernels.segment_attention`` implementation
        (``"auto"`` | ``"ref"`` | ``"pallas"`` | ``"interpret"``).
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32, num_heads: int = 4,
                 num_kv_heads: int | None = None, head_dim: int | None = None, segment_len: int = 16,
                 rope_theta: float = 10000.0, impl: str = "auto", out_scale: float = 1.0):
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or d_model // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"scout: num_heads={num_heads} not divisible by num_kv_heads={num_kv_heads}")
        if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
            raise ValueError(f"scout: segment_len must be an int >= 1, got {segment_len!r}")
        self.h, self.g, self.hd, self.theta = num_heads, num_kv_heads, head_dim, rope_theta
        self.segment_len, self.impl = segment_len, impl
        init_qkvo(self, d_model, num_heads, num_kv_heads, head_dim, rngs=rngs, dtype=dtype, out_scale=out_scale)
        self.dtype = dtype

    def _qkv(self, x: jax.Array, pos: jax.Array):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.h, self.hd)                   # [b,t,h,k]
        k = self.k(x).reshape(b, t, self.g, self.hd)                   # [b,t,g,k]
        v = self.v(x).reshape(b, t, self.g, self.hd)                   # [b,t,g,k]
        q = constrain(apply_rope(q, pos, self.theta), ("act_batch", "act_seq", "act_heads", None))
        k = apply_rope(k, pos, self.theta)
        return q, k, v

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """``x [b,t,d] -> [b,t,d]``. ``positions [b,t]``: RoPE positions (default: index within each
        segment); checkpoints and masks use slot order."""
        b, t, _ = x.shape
        pos = positions_from_segments(segment_ids, b, t) if positions is None else positions
        q, k, v = self._qkv(x, pos)
        o = segment_attention(q, k, v, segment_len=self.segment_len, segment_ids=segment_ids,
                              impl=self.impl)                          # [b,t,h,k]
        return self.o(o.reshape(b, t, self.h * self.hd))

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of QK^T and PV: ``4 h k * mean_t (t // L + 1)``."""
        return 4.0 * self.h * self.hd * mean_visible_keys(seq_len, self.segment_len)

    def cache_entries(self, max_len: int) -> int:
        """K/V entries per sequence held by the decode cache: one per complete segment, ``max_len // L``."""
        return max_len // self.segment_len

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """Checkpoint-only K/V cache: ``max_len // L`` slots (memory ``T / L``, not ``T``)."""
        slots = self.cache_entries(max_len)
        return {
            "k": jnp.zeros((batch, slots, self.g, self.hd), dtype),   # [b,s,g,k]
            "v": jnp.zeros((batch, slots, self.g, self.hd), dtype),   # [b,s,g,k]
            "pos": jnp.zeros((), jnp.int32),                          # absolute position of the next token
        }

    def step(self, x_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """One token ``x_t [b,d]`` at absolute position ``cache["pos"]``: attend to the ``pos // L`` cached
        checkpoints and itself; append its K/V iff ``(pos + 1) % L == 0`` (it is a checkpoint)."""
        b = x_t.shape[0]
        pos = cache["pos"]
        q, k, v = self._qkv(x_t[:, None], jnp.full((b, 1), pos))      # [b,1,h,k], [b,1,g,k]
        kc, vc = cache["k"], cache["v"]
        o = segment_attention_step(q[:, 0], k[:, 0], v[:, 0], kc.astype(q.dtype), vc.astype(q.dtype),
                                   pos // self.segment_len)            # [b,h,k]
        slots = kc.shape[1]
        if slots:  # slot pos // L takes this token's K/V iff it closes a segment (a one-slot write)
            slot = jnp.minimum(pos // self.segment_len, slots - 1)
            is_ck = ((pos + 1) % self.segment_len == 0) & (pos // self.segment_len < slots)

            def write(cache_x, x):
                old = jax.lax.dynamic_slice_in_dim(cache_x, slot, 1, axis=1)                  # [b,1,g,k]
                return jax.lax.dynamic_update_slice_in_dim(
                    cache_x, jnp.where(is_ck, x.astype(cache_x.dtype), old), slot, axis=1)
            kc, vc = write(kc, k), write(vc, v)
        y = self.o(o.reshape(b, 1, self.h * self.hd))[:, 0]
        return y, {"k": kc, "v": vc, "pos": pos + 1}
