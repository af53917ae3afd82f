"""LoRA: wrapping is a no-op at init, merged == unmerged, only adapters get gradients and updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sqattn.layers import Dense
from sqattn.models.lm import LM
from sqattn.peft import LoRADense, LoRAParam, apply_lora, count_params, merge_lora, trainable
from tests.testing import assert_close

D, HEADS, KV, RANK = 16, 4, 2, 4


def _lm() -> LM:
    return LM(vocab_size=32, d_model=D, num_layers=2, block_pattern="A", mlp_dim=32, rngs=nnx.Rngs(0),
              mixers={"attention": {"num_heads": HEADS, "num_kv_heads": KV}})


@nnx.jit
def _logits(model, tokens):
    return model(tokens)[0]


def _tokens():
    return jax.random.randint(jax.random.key(1), (2, 9), 0, 32)


def _randomize_adapters(model, seed=2):
    """Nonzero B (and a fresh A) so the adapters change the outputs."""
    state = nnx.state(model, LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def test_wrapping_leaves_logits_unchanged_and_counts():
    model, tokens = _lm(), _tokens()
    before = _logits(model, tokens)
    total = count_params(model)
    paths = apply_lora(model, ("q", "k", "v"), rank=RANK, alpha=8.0, rngs=nnx.Rngs(1))
    assert sorted(paths) == sorted(f"blocks/{i}/mixer/{n}" for i in range(2) for n in "qkv")
    assert isinstance(model.blocks[1].mixer.k, LoRADense)
    # B starts at zero, so every adapter adds exactly nothing; the logits agree to float32 rounding (XLA may
    # fuse the wrapped projections' matmuls differently, so not bit for bit).
    for lora in (model.blocks[i].mixer.__getattribute__(n) for i in range(2) for n in "qkv"):
        assert not np.any(np.asarray(lora.lora_b[...])) and np.any(np.asarray(lora.lora_a[...]))
    assert_close(_logits(model, tokens), before, jnp.float32, "logits after wrapping")
    hd = D // HEADS
    per_layer = RANK * (D + HEADS * hd) + 2 * RANK * (D + KV * hd)        # A [i,r] + B [r,o] for q, k, v
    assert count_params(model, trainable(model)) == 2 * per_layer
    assert count_params(model) == total + 2 * per_layer


def test_merged_equals_unmerged():
    model, tokens = _lm(), _tokens()
    apply_lora(model, ("q", "v"), rank=RANK, alpha=16.0, rngs=nnx.Rngs(1))
    base_logits = _logits(_lm(), tokens)
    _randomize_adapters(model)
    unmerged = _logits(model, tokens)
    assert float(jnp.max(jnp.abs(unmerged - base_logits))) > 1e-2       # the adapters do something
    merged_paths = merge_lora(model)
    assert sorted(merged_paths) == sorted(f"blocks/{i}/mixer/{n}" for i in range(2) for n in "qv")
    assert type(model.blocks[0].mixer.q) is Dense
    assert count_params(model, LoRAParam) == 0
    assert_close(_logits(model, tokens), unmerged, jnp.float32, "merged vs unmerged logits")


def test_only_adapters_get_gradients_and_updates():
    model, tokens = _lm(), _tokens()
    apply_lora(model, ("q", "k", "v"), rank=RANK, rngs=nnx.Rngs(1))
    _randomize_adapters(model)
    frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(LoRAParam)))
    adapters = jax.tree.map(np.asarray, nnx.state(model, LoRAParam))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=trainable(model))

    @nnx.jit
    def train_step(model, opt, tokens):
        def loss_fn(m):
            logits = m(tokens)[0]
            return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
        opt.update(model, grads)
        return grads

    grads = train_step(model, opt, tokens)
    flat = nnx.to_flat_state(grads)
    assert {p[-1] for p, _ in flat} == {"lora_a", "lora_b"}
    assert len(flat) == 12                                              # 2 layers x q,k,v x (A, B)
    for path, g in flat:
        assert float(jnp.max(jnp.abs(g[...]))) > 0, f"zero gradient at {path}"
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(nnx.state(model, nnx.Not(LoRAParam)))):
        np.testing.assert_array_equal(np.asarray(b), a)                  # base weights untouched
    changed = [not np.array_equal(np.asarray(b), a)
               for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(nnx.state(model, LoRAParam)))]
    assert all(changed)


def test_lora_dense_any_leading_dims_and_dtype():
    base = Dense(6, 5, axes=("embed", "heads"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    layer = LoRADense(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    layer.lora_b[...] = jnp.ones((2, 5))
    x = jax.random.normal(jax.random.key(3), (2, 3, 4, 6))
    y = layer(x)
    assert y.shape == (2, 3, 4, 5) and y.dtype == jnp.bfloat16
    xf = x.astype(jnp.bfloat16).astype(jnp.float32)
    expected = xf @ base.kernel[...] + (xf @ layer.lora_a[...]) @ layer.lora_b[...] * 2.0
    assert_close(y, expected, jnp.bfloat16, "LoRADense bf16")
    assert layer.lora_a.get_metadata()["axes"] == ("embed", "lowrank")
    assert layer.lora_b.get_metadata()["axes"] == ("lowrank", "heads")


def test_wrong_targets_raise():
    with pytest.raises(ValueError, match=r"no Dense layer named any of \('query', 'key'\)"):
        apply_lora(_lm(), ("query", "key"), rngs=nnx.Rngs(0))
