"""Attention mixer: decode == parallel (full, sliding window, GQA), packed-sequence isolation, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn.mixers.attention import Attention, attention_mask
from tests.sqattn.mixers.common import apply, decode
from tests.testing import assert_close


@pytest.mark.parametrize("window,heads,kv,t", [(0, 4, 4, 13), (0, 4, 2, 9), (5, 4, 1, 17), (1, 2, 2, 6)])
def test_step_decode_equals_parallel(window, heads, kv, t):
    mixer = Attention(32, rngs=nnx.Rngs(0), num_heads=heads, num_kv_heads=kv, window=window)
    x = jax.random.normal(jax.random.key(1), (2, t, 32))
    assert_close(decode(mixer, x), apply(mixer, x), jnp.float32, "decode vs parallel")


def test_sliding_window_differs_from_full_beyond_window():
    full = Attention(16, rngs=nnx.Rngs(0), num_heads=2, window=0)
    swa = Attention(16, rngs=nnx.Rngs(0), num_heads=2, window=3)
    x = jax.random.normal(jax.random.key(2), (1, 8, 16))
    yf, ys = apply(full, x), apply(swa, x)
    assert_close(ys[:, :3], yf[:, :3], jnp.float32, "within window")   # first W positions see the same keys
    assert float(jnp.max(jnp.abs(ys[:, 3:] - yf[:, 3:]))) > 1e-3


def test_packed_segments_are_isolated():
    mixer = Attention(16, rngs=nnx.Rngs(0), num_heads=2, num_kv_heads=1)
    a = jax.random.normal(jax.random.key(3), (1, 5, 16))
    b = jax.random.normal(jax.random.key(4), (1, 7, 16))
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[0] * 5 + [1] * 7])
    y = apply(mixer, packed, seg)
    assert_close(y[:, :5], apply(mixer, a), jnp.float32, "segment 0")
    assert_close(y[:, 5:], apply(mixer, b), jnp.float32, "segment 1 (positions restart)")


def test_mask_semantics():
    pos = jnp.arange(6)[None]
    m = np.asarray(attention_mask(pos, pos, window=2))[0]
    expected = np.array([[s <= t and s > t - 2 for s in range(6)] for t in range(6)])
    np.testing.assert_array_equal(m, expected)


def test_bad_heads_error():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(16, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=3)


def test_bf16_decode_matches_parallel():
    mixer = Attention(32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(5), (2, 11, 32)).astype(jnp.bfloat16)
    assert_close(decode(mixer, x), apply(mixer, x), jnp.bfloat16, "bf16 decode vs parallel")


@pytest.mark.parametrize("t,w,h,g,segmented", [(37, 5, 4, 2, False), (16, 4, 2, 2, True), (9, 2, 2, 1, True),
                                                (23, 7, 2, 2, False)])
def test_banded_local_attention_equals_dense_reference(t, w, h, g, segmented):
    """The O(T W) sliding-window path == the dense masked reference, forward and gradients, odd T."""
    from sqattn.mixers.attention import dot_product_attention, local_attention
    ks = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(ks[0], (2, t, h, 8))
    k = jax.random.normal(ks[1], (2, t, g, 8))
    v = jax.random.normal(ks[2], (2, t, g, 8))
    seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.15, (2, t)), axis=1).astype(jnp.int32) if segmented else None
    idx = jnp.broadcast_to(jnp.arange(t), (2, t))

    def dense(q, k, v):
        return dot_product_attention(q, k, v, attention_mask(idx, idx, window=w, q_seg=seg, k_seg=seg))

    def banded(q, k, v):
        return local_attention(q, k, v, w, seg)

    assert_close(jax.jit(banded)(q, k, v), jax.jit(dense)(q, k, v), jnp.float32, "local attention")
    cot = jax.random.normal(jax.random.key(7), q.shape)
    gd = jax.jit(jax.grad(lambda *a: jnp.sum(dense(*a) * cot), argnums=(0, 1, 2)))(q, k, v)
    gb = jax.jit(jax.grad(lambda *a: jnp.sum(banded(*a) * cot), argnums=(0, 1, 2)))(q, k, v)
    for name, a, e in zip("qkv", gb, gd):
        assert_close(a, e, jnp.float32, f"d{name}")


def test_sliding_window_mixer_uses_banded_path_and_matches_decode():
    mixer = Attention(32, rngs=nnx.Rngs(3), num_heads=4, num_kv_heads=2, window=4)
    x = jax.random.normal(jax.random.key(4), (2, 19, 32))          # 19 > 2W: the banded path
    assert_close(decode(mixer, x), apply(mixer, x), jnp.float32, "decode vs banded parallel")
