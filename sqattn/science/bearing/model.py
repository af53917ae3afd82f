"""The JAX classifier of the bearing twin: an MLP on the (standardised) window features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sqattn.layers.core import Dense


class BearingMLP(nnx.Module):
    """features [B, F] -> class logits [B, C]: ``num_layers`` Dense + GELU blocks of width ``hidden``, then a
    linear read-out. Built as ``BearingMLP(**config.model, rngs=rngs)``."""

    def __init__(self, in_features: int, hidden: int = 64, num_layers: int = 2, num_classes: int = 4, *,
                 rngs: nnx.Rngs):
        if min(in_features, hidden, num_layers, num_classes) < 1:
            raise ValueError(f"in_features, hidden, num_layers and num_classes must be >= 1, got {in_features}, "
                             f"{hidden}, {num_layers}, {num_classes}")
        widths = [in_features] + [hidden] * num_layers
        self.layers = nnx.List([Dense(a, b, axes=(None, "mlp"), rngs=rngs, use_bias=True)
                                for a, b in zip(widths[:-1], widths[1:])])
        self.out = Dense(hidden, num_classes, axes=("mlp", None), rngs=rngs, use_bias=True)
        self.in_features = in_features

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BearingMLP expects {self.in_features} features, got shape {x.shape}")
        h = x.astype(jnp.float32)
        for layer in self.layers:
            h = jax.nn.gelu(layer(h))
        return self.out(h)                                                          # [B, C] f32
