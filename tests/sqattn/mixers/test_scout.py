"""SCOUT mixer: decode == parallel, L=1 == attention, packed documents, impls agree, checkpoint-only cache,
and SCOUT-SWA ("AC") / SCOUT-Mamba ("MC") LMs decode == parallel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn import mixers
from sqattn.mixers.attention import Attention
from sqattn.mixers.scout import ScoutAttention
from sqattn.models.lm import LM
from tests.sqattn.mixers.common import apply, decode, loss_and_grads
from tests.testing import assert_close

D = 32


@pytest.mark.parametrize("heads,kv,segment_len,t", [(4, 2, 4, 13), (2, 2, 3, 8)])
def test_step_decode_equals_parallel(heads, kv, segment_len, t):
    """T not a multiple of L: the tail segment has no checkpoint; every token still sees itself."""
    mixer = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=heads, num_kv_heads=kv, segment_len=segment_len)
    x = jax.random.normal(jax.random.key(1), (2, t, D))
    assert_close(decode(mixer, x), apply(mixer, x), jnp.float32, "decode vs parallel")


def test_bf16_decode_matches_parallel():
    mixer = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, segment_len=4, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(5), (2, 13, D)).astype(jnp.bfloat16)
    assert_close(decode(mixer, x), apply(mixer, x), jnp.bfloat16, "bf16 decode vs parallel")


def test_segment_len_one_equals_attention_with_copied_weights():
    attn = Attention(D, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2)
    scout = ScoutAttention(D, rngs=nnx.Rngs(7), num_heads=4, num_kv_heads=2, segment_len=1)
    nnx.update(scout, nnx.state(attn, nnx.Param))
    x = jax.random.normal(jax.random.key(2), (2, 11, D))
    seg = jnp.array([[0] * 4 + [1] * 7, [3] * 11])
    assert_close(apply(scout, x), apply(attn, x), jnp.float32, "L=1 vs attention")
    assert_close(apply(scout, x, seg), apply(attn, x, seg), jnp.float32, "L=1 vs attention, packed")


def test_packed_documents_equal_documents_alone():
    """Document boundaries at multiples of L: each document sees exactly its own checkpoints."""
    mixer = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=2, num_kv_heads=1, segment_len=4)
    a = jax.random.normal(jax.random.key(3), (1, 8, D))
    b = jax.random.normal(jax.random.key(4), (1, 11, D))
    seg = jnp.array([[0] * 8 + [1] * 11])
    y = apply(mixer, jnp.concatenate([a, b], axis=1), seg)
    assert_close(y[:, :8], apply(mixer, a), jnp.float32, "document 0")
    assert_close(y[:, 8:], apply(mixer, b), jnp.float32, "document 1 (positions restart)")


def test_packed_documents_do_not_leak():
    """Boundary inside a segment: changing document 0 leaves document 1 unchanged (and vice versa)."""
    mixer = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=2, segment_len=4)
    x = jax.random.normal(jax.random.key(6), (1, 19, D))
    seg = jnp.array([[0] * 6 + [1] * 13])
    x2 = x.at[:, :6].set(jax.random.normal(jax.random.key(7), (1, 6, D)))
    y, y2 = apply(mixer, x, seg), apply(mixer, x2, seg)
    np.testing.assert_allclose(np.asarray(y[:, 6:]), np.asarray(y2[:, 6:]), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(y[:, :6] - y2[:, :6]))) > 1e-3


def test_interpret_matches_ref_forward_and_grads():
    x = jax.random.normal(jax.random.key(8), (2, 21, D))
    outs = {}
    for impl in ("ref", "interpret"):
        mixer = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, segment_len=3, impl=impl)
        value, grads = loss_and_grads(mixer, x)
        outs[impl] = (value, jax.tree.leaves(nnx.to_pure_dict(grads)))
    assert_close(outs["interpret"][0], outs["ref"][0], jnp.float32, "interpret loss")
    assert len(outs["ref"][1]) == 4
    for a, b in zip(outs["interpret"][1], outs["ref"][1]):
        assert_close(a, b, jnp.float32, "interpret grad")


def test_cache_holds_only_checkpoints():
    """max_len // L slots; after decoding they hold the RoPE'd K/V of rows L-1, 2L-1, ..."""
    L, t = 4, 13
    mixer = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, segment_len=L)
    cache = mixer.init_cache(2, t)
    assert cache["k"].shape == (2, t // L, 2, D // 4) and cache["v"].shape == cache["k"].shape
    assert mixer.cache_entries(t) == t // L == 3 and mixer.cache_entries(3) == 0
    x = jax.random.normal(jax.random.key(9), (2, t, D))

    @nnx.jit
    def run(m, x, cache):
        def body(c, xt):
            return m.step(xt, c)[1], None
        return jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))[0]

    cache = run(mixer, x, cache)
    _, k, v = mixer._qkv(x, jnp.broadcast_to(jnp.arange(t), (2, t)))
    assert_close(cache["k"], k[:, L - 1::L], jnp.float32, "cached keys")
    assert_close(cache["v"], v[:, L - 1::L], jnp.float32, "cached values")
    assert int(cache["pos"]) == t
    short = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=2, segment_len=8)
    assert_close(decode(short, x[:, :5]), apply(short, x[:, :5]), jnp.float32, "max_len < L: empty cache")


def test_flops_registry_and_errors():
    assert mixers.get("C").factory is ScoutAttention and mixers.get("C").name == "scout"
    full = Attention(D, rngs=nnx.Rngs(0), num_heads=4)
    one = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=4, segment_len=1)
    ten = ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=4, segment_len=10)
    assert one.extra_flops_per_token(64) == full.extra_flops_per_token(64)
    t = np.arange(1000)
    assert ten.extra_flops_per_token(1000) == pytest.approx(4 * 4 * 8 * (t // 10 + 1).mean())
    with pytest.raises(ValueError, match="num_kv_heads"):
        ScoutAttention(D, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="segment_len"):
        ScoutAttention(D, rngs=nnx.Rngs(0), segment_len=0)


@pytest.mark.parametrize("pattern", ["AC", "MC"])
def test_lm_decode_equals_parallel(pattern):
    """SCOUT-SWA ("AC", window 4) and SCOUT-Mamba ("MC"): LM.step logits == LM.__call__ logits."""
    lm = LM(vocab_size=32, d_model=D, num_layers=2, block_pattern=pattern, mlp_dim=48,
            mixers={"attention": dict(num_heads=2, window=4), "scout": dict(num_heads=2, segment_len=3),
                    "mamba": dict(d_state=4, expand=2, chunk_size=4)},
            rngs=nnx.Rngs(0))
    assert isinstance(lm.blocks[1].mixer, ScoutAttention)
    tokens = jax.random.randint(jax.random.key(10), (2, 11), 0, 32)

    @nnx.jit
    def both(model, tokens):
        logits, _ = model(tokens)
        cache = model.init_cache(tokens.shape[0], tokens.shape[1])

        def body(c, tok):
            out, c = model.step(tok, c)
            return c, out
        _, steps = jax.lax.scan(body, cache, tokens.T)
        return logits, jnp.swapaxes(steps, 0, 1)

    logits, stepped = both(lm, tokens)
    assert logits.shape == (2, 11, 32) and bool(jnp.all(jnp.isfinite(logits)))
    assert_close(stepped, logits, jnp.float32, f"{pattern} decode vs parallel logits")
