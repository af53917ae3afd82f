"""Helpers shared by mixer tests: jitted parallel and step-by-step application of any mixer."""

import jax
import jax.numpy as jnp
from flax import nnx


@nnx.jit
def apply(mixer, x, segment_ids=None):
    return mixer(x, segment_ids=segment_ids)


@nnx.jit
def decode(mixer, x):
    """Runs ``mixer.step`` over x [b,t,d] from a fresh cache; returns [b,t,d]."""
    b, t, _ = x.shape
    cache = mixer.init_cache(b, t, jnp.float32)

    def body(c, xt):
        y, c = mixer.step(xt, c)
        return c, y
    _, ys = jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


@nnx.jit
def loss_and_grads(mixer, x):
    """A scalar of the output (sum of sin, so every element matters) and its gradients w.r.t. params."""
    return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x))))(mixer)
