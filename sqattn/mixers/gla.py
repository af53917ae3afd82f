"""Gated linear attention (GLA) mixer (Yang et al. 2024; the base of SSE, papers/sse.md §3.1, §3.4).

Per head h with key dim c and value dim d:
    S_t = diag(alpha_t) S_{t-1} + phi(k_t)^T v_t,    o_t = phi(q_t) S_t * c^-1/2
    log alpha_t = logsigmoid(x_t G1 G2 + b) / gate_norm            (low-rank gate, decays near 1 at init)
then a per-head RMSNorm and output gate ``RMSNorm(o) * silu(x W_g)`` and ``W_o``.

Feature maps: ``key_map`` "softmax" (over c, in f32: a soft assignment of the token to state rows) or
"silu"; ``query_map`` "silu" or "identity". The op is ``kernels.gla`` (impl: auto|ref|chunked|interpret|pallas).
Shapes: b batch, t time, h heads, c key dim, d value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.gla import gla, gla_step
from sqattn import mixers
from sqattn.layers import Dense, RMSNorm, ShortConv

FEATURE_MAPS = {
    "softmax": lambda x: jax.nn.softmax(x.astype(jnp.float32), axis=-1),
    "silu": jax.nn.silu,
    "identity": lambda x: x,
}


def feature_map(name: str):
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; expected one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


class LowRankGate(nnx.Module):
    """``logsigmoid(x A B + bias) / norm``: per-(head, key) log-decays in f32, [b,t,h*c]."""

    def __init__(self, d_model: int, out: int, *, rank: int, norm: float, rngs: nnx.Rngs, dtype):
        self.a = Dense(d_model, rank, axes=("embed", "lowrank"), rngs=rngs, dtype=dtype)
        self.b = Dense(rank, out, axes=("lowrank", "heads"), rngs=rngs, dtype=dtype, use_bias=True)
        self.norm = norm

    def __call__(self, x):
        return jax.nn.log_sigmoid(self.b(self.a(x)).astype(jnp.float32)) / self.norm


@mixers.register("G", "gla", "gated linear attention (chunked; kernels.gla)")
class GLA(nnx.Module):
    """Gated linear attention.

    Attributes:
      num_heads: h.  head_k_dim: c (default d_model // h).  head_v_dim: d (default d_model // h).
      key_map / query_map: feature maps.  gate_rank / gate_norm: low-rank gate and its 1/norm scale.
      short_conv: depthwise causal conv (width 4) on q and k.  chunk_size, impl: passed to the op.
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32, num_heads: int = 4,
                 head_k_dim: int | None = None, head_v_dim: int | None = None, key_map: str = "softmax",
                 query_map: str = "silu", gate_rank: int = 16, gate_norm: float = 16.0,
                 short_conv: bool = False, chunk_size: int = 64, impl: str = "auto", out_scale: float = 1.0):
        c = head_k_dim or d_model // num_heads
        d = head_v_dim or d_model // num_heads
        self.h, self.c, self.d = num_heads, c, d
        self.key_map, self.query_map = feature_map(key_map), feature_map(query_map)
        self.chunk_size, self.impl, self.dtype = chunk_size, impl, dtype
        self.q = Dense(d_model, num_heads * c, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.k = Dense(d_model, num_heads * c, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v = Dense(d_model, num_heads * d, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.g = Dense(d_model, num_heads * d, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.gate = LowRankGate(d_model, num_heads * c, rank=gate_rank, norm=gate_norm, rngs=rngs, dtype=dtype)
        self.o_norm = RMSNorm(d)
        self.o = Dense(num_heads * d, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                       init_scale=out_scale)
        self.conv_q = ShortConv(num_heads * c, rngs=rngs, dtype=dtype) if short_conv else None
        self.conv_k = ShortConv(num_heads * c, rngs=rngs, dtype=dtype) if short_conv else None

    # ---- projections shared by the parallel and the step form (x: [..., d_model])
    def _features(self, q, k, v, log_a):
        shape = q.shape[:-1]
        q = self.query_map(q).reshape(*shape, self.h, self.c).astype(self.dtype)        # [..., h, c]
        k = self.key_map(k).reshape(*shape, self.h, self.c).astype(self.dtype)          # [..., h, c]
        v = v.reshape(*shape, self.h, self.d)                                           # [..., h, d]
        return q, k, v, log_a.reshape(*shape, self.h, self.c)                           # log_a f32

    def _output(self, o, x):
        shape = o.shape[:-2]
        o = self.o_norm(o) * jax.nn.silu(self.g(x)).reshape(*shape, self.h, self.d)     # [..., h, d]
        return self.o(o.reshape(*shape, self.h * self.d))

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        q, k = self.q(x), self.k(x)
        if self.conv_q is not None:
            q, k = self.conv_q(q, segment_ids), self.conv_k(k, segment_ids)
        q, k, v, log_a = self._features(q, k, self.v(x), self.gate(x))
        o, _ = gla(q, k, v, log_a, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
        return self._output(o, x)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        del max_len  # constant-size state
        cache = {"state": jnp.zeros((batch, self.h, self.c, self.d), jnp.float32)}
        if self.conv_q is not None:
            cache["conv_q"] = self.conv_q.init_cache(batch, dtype)
            cache["conv_k"] = self.conv_k.init_cache(batch, dtype)
        return cache

    def step(self, x_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        q, k = self.q(x_t), self.k(x_t)                                                 # [b, h*c]
        new = dict(cache)
        if self.conv_q is not None:
            q, new["conv_q"] = self.conv_q.step(q, cache["conv_q"])
            k, new["conv_k"] = self.conv_k.step(k, cache["conv_k"])
        q, k, v, log_a = self._features(q, k, self.v(x_t), self.gate(x_t))
        o, new["state"] = gla_step(q, k, v, log_a, cache["state"])                       # o: [b, h, d]
        return self._output(o, x_t), new

    def extra_flops_per_token(self, seq_len: int) -> float:
        """State update and readout per token (chunked form: ~ 4*h*c*d + intra-chunk attention)."""
        return 4.0 * self.h * self.c * self.d + 4.0 * self.h * (self.c + self.d) * min(self.chunk_size, seq_len) / 2
