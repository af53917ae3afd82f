"""Liger mixer: decode == parallel (every gate, short and long windows, GQA, bf16), the SWA-only and GRM-only
branches against Attention and a hand-written recurrence, the 0.5/0.5 mix, packed-document isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn import mixers
from sqattn.mixers.attention import Attention
from sqattn.mixers.liger import LigerAttention
from tests.sqattn.mixers.common import apply, decode
from tests.testing import assert_close


def _x(seed, b, t, d, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (b, t, d)).astype(dtype)


@pytest.mark.parametrize("gate,window,heads,kv,t", [
    ("gla", 4, 4, 2, 11),      # window < T, GQA, T not a multiple of the chunk (4)
    ("mamba2", 32, 2, 2, 9),   # window > T
    ("fresh", 3, 4, 1, 10),    # MQA
    ("none", 5, 2, 2, 7),
])
def test_step_decode_equals_parallel(gate, window, heads, kv, t):
    mixer = LigerAttention(32, rngs=nnx.Rngs(0), num_heads=heads, num_kv_heads=kv, window=window, gate=gate,
                           chunk_size=4)
    x = _x(1, 2, t, 32)
    assert_close(decode(mixer, x), apply(mixer, x), jnp.float32, f"{gate} decode vs parallel")


def test_bf16_decode_matches_parallel():
    mixer = LigerAttention(32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, window=4, chunk_size=4,
                           dtype=jnp.bfloat16)
    x = _x(2, 2, 10, 32, jnp.bfloat16)
    y = apply(mixer, x)
    assert y.dtype == jnp.bfloat16
    assert_close(decode(mixer, x), y, jnp.bfloat16, "bf16 decode vs parallel")


@pytest.mark.parametrize("window,t", [(3, 9), (16, 9)])
def test_swa_only_equals_sliding_window_attention(window, t):
    att = Attention(32, rngs=nnx.Rngs(5), num_heads=4, num_kv_heads=2, window=window)
    liger = LigerAttention(32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, window=window, recurrent=False)
    nnx.update(liger, nnx.state(att))
    x = _x(3, 2, t, 32)
    assert_close(apply(liger, x), apply(att, x), jnp.float32, "SWA-only vs Attention(window)")
    assert liger.extra_flops_per_token(t) == att.extra_flops_per_token(t)


def _grm_by_hand(mixer: LigerAttention, x: np.ndarray) -> np.ndarray:
    """Per-token GRM recurrence written from liger.md §3.3 (gla gate), then the o-projection; float64."""
    wq, wk, wv, wo = (np.asarray(getattr(mixer, n).kernel[...], np.float64) for n in "qkvo")
    h, g, c = mixer.h, mixer.g, mixer.hd
    b, t, _ = x.shape

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    out = np.zeros((b, t, h * c))
    for bi in range(b):
        state = np.zeros((h, c, c))
        for ti in range(t):
            q = (x[bi, ti] @ wq).reshape(h, c)
            k = (x[bi, ti] @ wk).reshape(g, c)
            v = (x[bi, ti] @ wv).reshape(g, c)
            for hi in range(h):
                kv_head = hi // (h // g)
                alpha = (1.0 / (1.0 + np.exp(-k[kv_head]))) ** (1.0 / mixer.temperature)   # sigma(k)^(1/16)
                state[hi] = alpha[:, None] * state[hi] + np.outer(softmax(k[kv_head]), v[kv_head])
                out[bi, ti, hi * c:(hi + 1) * c] = softmax(q[hi]) @ state[hi]
    return out @ wo


def test_grm_only_equals_hand_written_recurrence():
    mixer = LigerAttention(16, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, window=0, chunk_size=4)
    x = _x(4, 2, 7, 16)
    expected = _grm_by_hand(mixer, np.asarray(x, np.float64))
    assert_close(apply(mixer, x), expected, jnp.float32, "GRM vs hand-written recurrence")


def test_output_is_the_fixed_mix_of_the_two_branches():
    kw = dict(num_heads=2, chunk_size=4)
    both = LigerAttention(16, rngs=nnx.Rngs(0), window=3, mix=0.3, **kw)
    grm = LigerAttention(16, rngs=nnx.Rngs(0), window=0, **kw)
    swa = LigerAttention(16, rngs=nnx.Rngs(0), window=3, recurrent=False, **kw)
    x = _x(5, 1, 9, 16)
    # The o-projection is linear without bias, so the output mixes exactly like the branch outputs.
    assert_close(apply(both, x), 0.3 * apply(grm, x) + 0.7 * apply(swa, x), jnp.float32, "mix")


def test_packed_segments_are_isolated():
    mixer = LigerAttention(16, rngs=nnx.Rngs(0), num_heads=2, num_kv_heads=1, window=4, chunk_size=4)
    a, b = _x(6, 1, 6, 16), _x(7, 1, 9, 16)
    y = apply(mixer, jnp.concatenate([a, b], 1), jnp.array([[0] * 6 + [1] * 9]))
    assert_close(y[:, :6], apply(mixer, a), jnp.float32, "segment 0")
    assert_close(y[:, 6:], apply(mixer, b), jnp.float32, "segment 1 (state and positions restart)")


def test_parameters_match_attention():
    def shapes(m):
        return {p: v.shape for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    att = Attention(32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, qk_norm=True)
    liger = LigerAttention(32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, qk_norm=True)
    assert shapes(liger) == shapes(att)
    fresh = shapes(LigerAttention(32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, gate="fresh"))
    assert set(fresh) - set(shapes(Attention(32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2))) == {
        ("gate", "kernel")}
    assert mixers.get("L").factory is LigerAttention


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown gate 'rwkv'"):
        LigerAttention(16, rngs=nnx.Rngs(0), gate="rwkv")
    with pytest.raises(ValueError, match="no branch"):
        LigerAttention(16, rngs=nnx.Rngs(0), window=0, recurrent=False)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LigerAttention(16, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=3)
