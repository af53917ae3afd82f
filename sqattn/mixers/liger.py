"""Liger attention (Lan et al. 2025, arXiv 2503.01496; papers/liger.md): a linearised softmax-attention layer.

Liger reuses a pretrained attention layer's ``q, k, v, o`` projections unchanged (no new parameters) and mixes
two branches over the same projections (liger.md §3.3-3.4)::

    GRM:  phi = softmax over the head dim (f32), un-rotated q, k, scale 1
          S_t = diag(alpha_t) S_{t-1} + phi(k_t)^T v_t,    GRM_t = phi(q_t) S_t
          log alpha_t from the key projection (``gate``):
            "gla":    logsigmoid(k_t) / gate_temperature          vector over the key dim (pooling = identity)
            "mamba2": -softplus(mean_c k_t)                       scalar per head
            "fresh":  logsigmoid(x_t W_gate) / gate_temperature   a new trainable projection (ablation)
            "none":   0                                           pure linear attention
    SWA:  the teacher's softmax attention (RoPE, 1/sqrt(k) scale) over the last ``window`` tokens
          (the current one included; same semantics as ``Attention(window=W)``)
    y_t = W_o (mix * GRM_t + (1 - mix) * SWA_t)

``window=0`` drops the SWA branch (GRM only, weight 1); ``recurrent=False`` drops the GRM (SWA only,
weight 1). ``segment_ids`` reset both branches at document boundaries. Decoding keeps the recurrent state
``[b,h,c,d]`` in f32 plus a rolling ring buffer of the last ``window`` post-RoPE keys/values, so ``step``
equals the parallel form (the public code's decode bugs, liger.md §6, are not reproduced).

Shapes: b batch, t time, s key time, h query heads, g kv heads (h % g == 0), r = h // g, c = d = head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.gla import gla, gla_step
from sqattn import mixers
from sqattn.layers import Dense, RMSNorm, apply_rope, positions_from_segments
from sqattn.mixers.attention import attention_mask, dot_product_attention, init_qkvo, local_attention
from sqattn.parallel.sharding import constrain

GATES = ("gla", "mamba2", "fresh", "none")


def gate_log_decay(gate: str, k_raw: jax.Array, fresh: jax.Array | None, temperature: float) -> jax.Array:
    """Log-decay of the recurrent branch in f32.

    Args:
      gate: one of ``GATES``.
      k_raw: ``[..., g, c]`` key projection (pre-RoPE, pre-feature-map).
      fresh: ``[..., g, c]`` output of the fresh gate projection (``gate == "fresh"``), else None.
      temperature: divides the log-sigmoid of the "gla" and "fresh" gates.

    Returns:
      ``[..., g, c]`` per-key log-decay ("gla", "fresh") or ``[..., g]`` scalar per head ("mamba2", "none").
    """
    kf = k_raw.astype(jnp.float32)
    if gate == "gla":
        return jax.nn.log_sigmoid(kf) / temperature                           # [..., g, c]
    if gate == "mamba2":
        return -jax.nn.softplus(jnp.mean(kf, axis=-1))                        # [..., g]
    if gate == "fresh":
        return jax.nn.log_sigmoid(fresh.astype(jnp.float32)) / temperature    # [..., g, c]
    if gate == "none":
        return jnp.zeros(kf.shape[:-1], jnp.float32)                          # [..., g]
    raise ValueError(f"liger: unknown gate {gate!r}; expected one of {GATES}")


@mixers.register("L", "liger", "Liger attention: gated recurrence from the key projection + SWA")
class LigerAttention(nnx.Module):
    """Liger attention over an ``Attention`` layer's weights (same parameter names, shapes and axes).

    Attributes:
      num_heads, num_kv_heads, head_dim, rope_theta, qk_norm: as in ``sqattn.mixers.attention.Attention``.
      window: SWA window W (tokens, current included); 0 = no SWA branch.
      gate: "gla" | "mamba2" | "fresh" | "none" (see the module docstring).  gate_temperature: GLA's 1/16.
      recurrent: False = no GRM branch.  mix: GRM weight (SWA gets 1 - mix) when both branches run.
      chunk_size, impl: passed to ``kernels.gla``.

    With ``qk_norm`` the feature maps and the SWA branch see the normalised q/k (what the teacher attends
    with) and the gate sees the raw key projection ``x W_K`` (liger.md §3.2: ``G_t = f(x_t W_K)``).
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32, num_heads: int = 4,
                 num_kv_heads: int | None = None, head_dim: int | None = None, rope_theta: float = 10000.0,
                 qk_norm: bool = False, window: int = 64, gate: str = "gla", gate_temperature: float = 16.0,
                 recurrent: bool = True, mix: float = 0.5, chunk_size: int = 64, impl: str = "auto",
                 out_scale: float = 1.0):
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or d_model // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"liger: num_heads={num_heads} not divisible by num_kv_heads={num_kv_heads}")
        if window < 0:
            raise ValueError(f"liger: window must be >= 0, got {window}")
        if not recurrent and window == 0:
            raise ValueError("liger: recurrent=False and window=0 leave no branch; enable one of them")
        if gate not in GATES:
            raise ValueError(f"liger: unknown gate {gate!r}; expected one of {GATES}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"liger: mix must be in [0, 1], got {mix}")
        if gate_temperature <= 0:
            raise ValueError(f"liger: gate_temperature must be > 0, got {gate_temperature}")
        self.h, self.g, self.hd, self.theta = num_heads, num_kv_heads, head_dim, rope_theta
        self.window, self.gate_kind, self.temperature = window, gate, gate_temperature
        self.recurrent, self.mix, self.chunk_size, self.impl = recurrent, mix, chunk_size, impl
        self.dtype = dtype
        # Same names, shapes, axes and creation order as Attention: its state loads 1:1.
        init_qkvo(self, d_model, num_heads, num_kv_heads, head_dim, rngs=rngs, dtype=dtype, out_scale=out_scale)
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None
        self.gate = (Dense(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), rngs=rngs, dtype=dtype)
                     if gate == "fresh" and recurrent else None)

    # ---- branch weights (static)
    def _weights(self) -> tuple[float, float]:
        """(GRM weight, SWA weight)."""
        if not self.recurrent:
            return 0.0, 1.0
        if self.window == 0:
            return 1.0, 0.0
        return self.mix, 1.0 - self.mix

    # ---- projections shared by the parallel and the step form (x: [b, t, d_model])
    def _project(self, x: jax.Array):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.h, self.hd)                   # [b,t,h,k]
        k_raw = self.k(x).reshape(b, t, self.g, self.hd)               # [b,t,g,k]
        v = self.v(x).reshape(b, t, self.g, self.hd)                   # [b,t,g,k]
        k = k_raw
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, k_raw, v

    def _grm_inputs(self, x, q, k, k_raw, v):
        """Feature-mapped q/k, values and log-decay, with kv heads repeated to the query heads (f32)."""
        b, t, _ = x.shape
        r = self.h // self.g
        fresh = self.gate(x).reshape(b, t, self.g, self.hd) if self.gate is not None else None   # [b,t,g,k]
        log_a = gate_log_decay(self.gate_kind, k_raw, fresh, self.temperature)                 # [b,t,g(,k)]
        log_a = jnp.repeat(log_a, r, axis=2)                                                   # [b,t,h(,k)]
        phi_q = jax.nn.softmax(q.astype(jnp.float32), axis=-1)                                 # [b,t,h,k]
        phi_k = jnp.repeat(jax.nn.softmax(k.astype(jnp.float32), axis=-1), r, axis=2)           # [b,t,h,k]
        v_rep = jnp.repeat(v.astype(jnp.float32), r, axis=2)                                   # [b,t,h,k]
        return phi_q, phi_k, v_rep, log_a

    def _combine(self, grm: jax.Array | None, swa: jax.Array | None) -> jax.Array:
        """``mix * grm + (1 - mix) * swa`` (a lone branch passes through unscaled), in ``dtype``."""
        w_grm, w_swa = self._weights()
        if swa is None:
            return grm.astype(self.dtype)
        if grm is None:
            return swa.astype(self.dtype)
        return (w_grm * grm.astype(jnp.float32) + w_swa * swa.astype(jnp.float32)).astype(self.dtype)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """``positions [b,t]``: RoPE positions of the SWA branch (default: index within each segment)."""
        b, t, _ = x.shape
        q, k, k_raw, v = self._project(x)
        grm = swa = None
        if self.recurrent:
            phi_q, phi_k, v_rep, log_a = self._grm_inputs(x, q, k, k_raw, v)
            grm, _ = gla(phi_q, phi_k, v_rep, log_a, scale=1.0, segment_ids=segment_ids,
                         chunk_size=self.chunk_size, impl=self.impl)                  # [b,t,h,k] f32
        if self.window > 0:
            pos = positions_from_segments(segment_ids, b, t) if positions is None else positions
            q_rot = constrain(apply_rope(q, pos, self.theta), ("act_batch", "act_seq", "act_heads", None))
            k_rot = apply_rope(k, pos, self.theta)
            if 2 * self.window < t:   # the banded O(T W) path of the attention mixer
                swa = local_attention(q_rot, k_rot, v, self.window, segment_ids)       # [b,t,h,k]
            else:
                idx = jnp.broadcast_to(jnp.arange(t), (b, t))
                mask = attention_mask(idx, idx, window=self.window, q_seg=segment_ids, k_seg=segment_ids)
                swa = dot_product_attention(q_rot, k_rot, v, mask)                     # [b,t,h,k]
        o = self._combine(grm, swa)
        return self.o(o.reshape(b, t, self.h * self.hd))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """Recurrent state (f32, constant size) and a ring buffer of the last ``window`` post-RoPE k/v."""
        cache = {"pos": jnp.zeros((), jnp.int32)}                      # position of the next token
        if self.recurrent:
            cache["state"] = jnp.zeros((batch, self.h, self.hd, self.hd), jnp.float32)
        if self.window > 0:
            slots = min(self.window, max_len)
            cache["k"] = jnp.zeros((batch, slots, self.g, self.hd), dtype)
            cache["v"] = jnp.zeros((batch, slots, self.g, self.hd), dtype)
            cache["slot_pos"] = jnp.full((slots,), -1, jnp.int32)     # absolute position held by each slot
        return cache

    def step(self, x_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        b = x_t.shape[0]
        pos = cache["pos"]
        x = x_t[:, None]                                               # [b,1,d_model]
        q, k, k_raw, v = self._project(x)
        new = {"pos": pos + 1}
        grm = swa = None
        if self.recurrent:
            phi_q, phi_k, v_rep, log_a = self._grm_inputs(x, q, k, k_raw, v)
            o_t, new["state"] = gla_step(phi_q[:, 0], phi_k[:, 0], v_rep[:, 0], log_a[:, 0], cache["state"],
                                         scale=1.0)                    # o_t [b,h,k]
            grm = o_t[:, None]                                         # [b,1,h,k]
        if self.window > 0:
            p = jnp.full((b, 1), pos)
            q_rot, k_rot = apply_rope(q, p, self.theta), apply_rope(k, p, self.theta)
            slots = cache["k"].shape[1]
            slot = pos % slots
            kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_rot.astype(cache["k"].dtype), slot, axis=1)
            vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), slot, axis=1)
            slot_pos = cache["slot_pos"].at[slot].set(pos)
            k_pos = jnp.where(slot_pos >= 0, slot_pos, jnp.iinfo(jnp.int32).max)   # empty slots never visible
            mask = attention_mask(p, jnp.broadcast_to(k_pos, (b, slots)), window=self.window)
            swa = dot_product_attention(q_rot, kc.astype(q.dtype), vc.astype(q.dtype), mask)   # [b,1,h,k]
            new.update(k=kc, v=vc, slot_pos=slot_pos)
        o = self._combine(grm, swa)
        y = self.o(o.reshape(b, 1, self.h * self.hd))[:, 0]
        return y, new

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Parameter-free forward FLOPs per token: chunked GRM (state update, readout, intra-chunk) + SWA."""
        flops = 0.0
        if self.recurrent:
            c = min(self.chunk_size, seq_len)
            flops += 4.0 * self.h * self.hd * self.hd + 4.0 * self.h * 2 * self.hd * c / 2
        if self.window > 0:
            t = np.arange(1, seq_len + 1)
            flops += 4.0 * self.h * self.hd * float(np.minimum(t, self.window).mean())
        return flops
