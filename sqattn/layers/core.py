"""Shared layers. Parameters are float32 ``nnx.Param`` with an ``axes`` tuple of logical names (see
``sqattn.parallel.sharding``); computation runs in ``dtype`` (e.g. bfloat16) with float32 accumulation where it
matters (norms, softmax, recurrent state).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    """A parameter with logical axis names, e.g. ``param(rngs, normal(0.02), (d, f), ("embed", "mlp"))``."""
    if len(axes) != len(shape):
        raise ValueError(f"param: axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


class Dense(nnx.Module):
    """``y = x @ W (+ b)`` over the last axis; W: [in, out] with logical axes ``axes``.

    Attributes:
      kernel: [in_features, out_features] float32.
      bias: [out_features] or None.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 rngs: nnx.Rngs, use_bias: bool = False, dtype=jnp.float32, init_scale: float = 1.0):
        std = init_scale / (in_features ** 0.5)
        self.kernel = param(rngs, jax.nn.initializers.normal(std), (in_features, out_features), axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32), axes=(axes[1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                    preferred_element_type=jnp.float32).astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding [V, d]; ``attend`` gives tied-output logits."""

    def __init__(self, vocab_size: int, features: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedding = param(rngs, jax.nn.initializers.normal(features ** -0.5), (vocab_size, features),
                               ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)  # [b, t, d]

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T,
                       preferred_element_type=jnp.float32)  # [b, t, V] f32


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in float32, returned in the input dtype."""

    def __init__(self, features: int, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None):
        del rngs
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    """``W_down(silu(W_gate x) * W_up x)``."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 out_scale: float = 1.0):
        self.gate = Dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.up = Dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = Dense(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                          init_scale=out_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class ShortConv(nnx.Module):
    """Depthwise causal conv over time (kernel ``width``), with an O(width) decode cache.

    ``__call__(x[b,t,c], segment_ids)`` -> [b,t,c]; ``step(x_t[b,c], window[b,width-1,c])`` -> (y_t, window).
    """

    def __init__(self, channels: int, width: int = 4, *, rngs: nnx.Rngs, use_bias: bool = True,
                 dtype=jnp.float32):
        self.kernel = param(rngs, jax.nn.initializers.normal(1.0 / width ** 0.5), (width, channels),
                            ("conv", "heads"))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), axes=("heads",)) if use_bias else None
        self.width = width
        self.dtype = dtype

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        b, t, c = x.shape
        w = self.kernel[...].astype(jnp.float32)                          # [W, c]
        xf = x.astype(jnp.float32)
        y = xf * w[-1]
        for lag in range(1, self.width):
            shifted = jnp.pad(xf, ((0, 0), (lag, 0), (0, 0)))[:, :t]     # x_{t-lag}
            if segment_ids is not None:
                prev = jnp.pad(segment_ids, ((0, 0), (lag, 0)), constant_values=-1)[:, :t]
                shifted = jnp.where((prev == segment_ids)[..., None], shifted, 0.0)
            y = y + shifted * w[-1 - lag]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)

    def init_cache(self, batch: int, dtype=jnp.float32) -> jax.Array:
        return jnp.zeros((batch, self.width - 1, self.kernel.shape[1]), dtype)

    def step(self, x_t: jax.Array, window: jax.Array) -> tuple[jax.Array, jax.Array]:
        full = jnp.concatenate([window, x_t[:, None].astype(window.dtype)], axis=1)  # [b, W, c]
        y = jnp.einsum("bwc,wc->bc", full.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype), full[:, 1:]


def positions_from_segments(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Token positions [b, t] that restart at 0 at every segment start (packed sequences)."""
    t = jnp.arange(length, dtype=jnp.int32)
    if segment_ids is None:
        return jnp.broadcast_to(t, (batch, length))
    start = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    last_start = jax.lax.cummax(jnp.where(start, t, 0), axis=1)  # index of the current segment's start
    return t - last_start


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [hd/2]


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding (half-split convention). x: [b, t, h, hd]; positions: [b, t].

    ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` written as ``x * cos + swap(x) * (-sin, +sin)`` over a
    ``[..., 2, hd/2]`` view, where ``swap`` exchanges the halves (a reverse of the size-2 axis): one elementwise
    fusion in float32, no concatenate or split copies, cast back once.
    """
    b, t, h, hd = x.shape
    ang = positions[..., None].astype(jnp.float32) * rope_frequencies(hd, theta)  # [b, t, hd/2]
    sin, cos = jnp.sin(ang)[:, :, None, None], jnp.cos(ang)[:, :, None, None]  # [b, t, 1, 1, hd/2]
    sign = jnp.array([-1.0, 1.0], jnp.float32)[:, None]                          # [2, 1]
    xr = x.astype(jnp.float32).reshape(b, t, h, 2, hd // 2)                      # [b, t, h, 2, hd/2]
    out = xr * cos + xr[..., ::-1, :] * (sign * sin)
    return out.reshape(b, t, h, hd).astype(x.dtype)
