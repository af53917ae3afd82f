"""A plain multi-layer perceptron: the student of the synthetic teacher tasks (``sqattn.analysis.teacher``).

Registered as ``"mlp"`` in ``sqattn.models.MODELS``; built as ``MLP(**config.model, rngs=rngs)``. No
normalisation layers (no BatchNorm statistics to go stale when weights are interpolated, lmc.md pitfalls).
Parameter paths: ``layers/<i>/kernel``, ``layers/<i>/bias`` (hidden layers) and ``out/kernel``, ``out/bias``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sqattn.layers.core import Dense

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


class MLP(nnx.Module):
    """x [B, in_features] -> [B, out_features]: ``num_layers`` hidden Dense layers of width ``hidden`` with
    ``activation``, then a linear read-out. Weights ~ N(0, init_scale^2 / fan_in), biases 0.

    Attributes:
      layers: the hidden Dense layers (``num_layers`` of them; 0 = a linear model).
      out: the read-out Dense layer.
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 128, num_layers: int = 2,
                 activation: str = "relu", init_scale: float = 1.0, *, rngs: nnx.Rngs):
        if min(in_features, out_features, hidden) < 1 or num_layers < 0:
            raise ValueError(f"MLP needs in_features, out_features, hidden >= 1 and num_layers >= 0, got "
                             f"{in_features}, {out_features}, {hidden}, {num_layers}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP activation {activation!r} unknown; known: {sorted(ACTIVATIONS)}")
        if init_scale <= 0:
            raise ValueError(f"MLP init_scale must be > 0, got {init_scale}")
        widths = [in_features] + [hidden] * num_layers
        self.layers = nnx.List([Dense(a, b, axes=(None, "mlp"), rngs=rngs, use_bias=True, init_scale=init_scale)
                                for a, b in zip(widths[:-1], widths[1:])])
        self.out = Dense(widths[-1], out_features, axes=("mlp", None), rngs=rngs, use_bias=True,
                         init_scale=init_scale if num_layers == 0 else 1.0)
        self.in_features = in_features
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features, got shape {x.shape}")
        act = ACTIVATIONS[self.activation]
        h = x.astype(jnp.float32)
        for layer in self.layers:
            h = act(layer(h))
        return self.out(h)                                                          # [B, out] f32
