"""The judge of the SPM reproduction: a small CNN with a shape head and a colour head (papers/spm.md).

``ShapeJudge(images[b,H,W,3])`` -> ``{"shape": logits [b,4], "colour": logits [b,3], "features": [b,F]}``.
Four 3x3 convolutions (strides 1, 2, 1, 2: a 17-pixel receptive field, enough to see a whole shape), ReLU,
global mean and max pooling concatenated into ``features`` [b, 4 width] (used for the Fréchet distance
between sample sets), then two linear heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sqattn.layers import Dense, param


class Conv(nnx.Module):
    """3x3 convolution (SAME padding) with bias; NHWC."""

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, rngs: nnx.Rngs):
        std = (9 * c_in) ** -0.5 * 2 ** 0.5                                   # He init for ReLU
        self.kernel = param(rngs, jax.nn.initializers.normal(std), (3, 3, c_in, c_out), (None, None, None, None))
        self.bias = nnx.Param(jnp.zeros((c_out,), jnp.float32), axes=(None,))
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...]


class ShapeJudge(nnx.Module):
    def __init__(self, *, channels: int = 3, width: int = 32, num_shapes: int = 4, num_colours: int = 3,
                 rngs: nnx.Rngs):
        self.convs = nnx.List([Conv(channels, width, rngs=rngs), Conv(width, 2 * width, stride=2, rngs=rngs),
                               Conv(2 * width, 2 * width, rngs=rngs),
                               Conv(2 * width, 2 * width, stride=2, rngs=rngs)])
        self.shape_head = Dense(4 * width, num_shapes, axes=(None, None), rngs=rngs, use_bias=True)
        self.colour_head = Dense(4 * width, num_colours, axes=(None, None), rngs=rngs, use_bias=True)

    def __call__(self, images: jax.Array) -> dict:
        h = images
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
        feats = jnp.concatenate([jnp.mean(h, axis=(1, 2)), jnp.max(h, axis=(1, 2))], axis=-1)   # [b, 4 width]
        return {"shape": self.shape_head(feats), "colour": self.colour_head(feats), "features": feats}
