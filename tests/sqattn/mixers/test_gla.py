"""GLA mixer: decode == parallel, impls agree, packed segments isolated, registered in the LM."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sqattn.mixers.gla import GLA
from tests.sqattn.mixers.common import apply, decode, loss_and_grads
from tests.testing import assert_close


@pytest.mark.parametrize("key_map,short_conv,t", [("softmax", False, 23), ("silu", True, 9)])
def test_step_decode_equals_parallel(key_map, short_conv, t):
    mixer = GLA(32, rngs=nnx.Rngs(0), num_heads=2, key_map=key_map, short_conv=short_conv, chunk_size=8)
    x = jax.random.normal(jax.random.key(1), (2, t, 32))
    assert_close(decode(mixer, x), apply(mixer, x), jnp.float32, "decode vs parallel")


def test_impls_agree_forward_and_grad():
    x = jax.random.normal(jax.random.key(2), (2, 19, 32))
    outs = {}
    for impl in ("ref", "chunked", "interpret"):
        mixer = GLA(32, rngs=nnx.Rngs(0), num_heads=2, chunk_size=8, impl=impl)
        y, grads = loss_and_grads(mixer, x)
        outs[impl] = (y, jax.tree.leaves(nnx.to_pure_dict(grads)))
    for impl in ("chunked", "interpret"):
        assert_close(outs[impl][0], outs["ref"][0], jnp.float32, f"{impl} loss")
        for a, b in zip(outs[impl][1], outs["ref"][1]):
            assert_close(a, b, jnp.float32, f"{impl} grad")


def test_packed_segments_are_isolated():
    mixer = GLA(16, rngs=nnx.Rngs(0), num_heads=2, short_conv=True, chunk_size=4)
    a = jax.random.normal(jax.random.key(3), (1, 6, 16))
    b = jax.random.normal(jax.random.key(4), (1, 9, 16))
    y = apply(mixer, jnp.concatenate([a, b], 1), jnp.array([[0] * 6 + [1] * 9]))
    assert_close(y[:, :6], apply(mixer, a), jnp.float32, "segment 0")
    assert_close(y[:, 6:], apply(mixer, b), jnp.float32, "segment 1")


def test_unknown_feature_map():
    with pytest.raises(ValueError, match="unknown feature map 'relu'"):
        GLA(16, rngs=nnx.Rngs(0), key_map="relu")
