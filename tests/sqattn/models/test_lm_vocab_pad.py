"""LM vocabulary padding (``vocab_multiple``) and the FSDP fallback sharding of weights no rule shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sqattn import sample
from sqattn.models.lm import LM, PAD_LOGIT, padded_vocab_size
from sqattn.parallel import sharding
from sqattn.train.tasks import LMTask

KW = dict(d_model=16, num_layers=2, block_pattern="A", mlp_dim=32, mixers={"attention": {"num_heads": 2}})


def _lm(vocab, multiple=1, tie=False, seed=0):
    return LM(vocab_size=vocab, vocab_multiple=multiple, tie_embeddings=tie, rngs=nnx.Rngs(seed), **KW)


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 128) == 50304
    assert padded_vocab_size(151936, 128) == 151936
    assert padded_vocab_size(7, 1) == 7
    with pytest.raises(ValueError, match="vocab_multiple"):
        padded_vocab_size(10, 0)


def test_no_padding_when_the_multiple_divides():
    """A multiple that already divides the vocabulary builds the very same parameters (old checkpoints load)."""
    a, b = nnx.to_pure_dict(nnx.state(_lm(64), nnx.Param)), nnx.to_pure_dict(nnx.state(_lm(64, 16), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_model_equals_unpadded_on_the_real_vocabulary(tie):
    v, m = 50, 16
    padded, plain = _lm(v, m, tie), _lm(v, 1, tie)
    assert padded.embed.embedding.shape == (64, 16)
    if not tie:
        assert padded.head.kernel.shape == (16, 64)
    # Give the plain model the padded model's weights on the real rows.
    pp = nnx.to_pure_dict(nnx.state(padded, nnx.Param))
    sliced = jax.tree.map(lambda x: x, pp)
    sliced["embed"]["embedding"] = pp["embed"]["embedding"][:v]
    if not tie:
        sliced["head"]["kernel"] = pp["head"]["kernel"][:, :v]
    nnx.replace_by_pure_dict(st := nnx.state(plain, nnx.Param), sliced)
    nnx.update(plain, st)

    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, v)
    logits = nnx.jit(lambda model, t: model(t)[0])     # jitted: op-by-op eager dispatch costs ~30 s here
    lp, lu = logits(padded, tokens), logits(plain, tokens)
    assert lp.shape == (2, 9, 64)
    np.testing.assert_allclose(lp[..., :v], lu, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(lp[..., v:]) == PAD_LOGIT)

    # The loss is the unpadded one, and the padding rows/columns get no gradient.
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "weights": jnp.ones((2, 9))}
    task = LMTask()
    loss = nnx.jit(lambda model: task.loss_fn(model, batch, None)[0])
    np.testing.assert_allclose(loss(padded), loss(plain), rtol=1e-5)
    graphdef, params = nnx.split(padded, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(nnx.merge(graphdef, p), batch, None)[0]))(params)
    g = nnx.to_pure_dict(grads)
    assert np.all(np.asarray(g["embed"]["embedding"][v:]) == 0)
    if not tie:
        assert np.all(np.asarray(g["head"]["kernel"][:, v:]) == 0)
        assert np.any(np.asarray(g["head"]["kernel"][:, :v]) != 0)

    # Decoding masks too: step logits and samples stay in the real vocabulary, even at a high temperature.
    cache = padded.init_cache(2, 4)
    step_logits, _ = nnx.jit(lambda model, t, c: model.step(t, c))(padded, tokens[:, 0], cache)
    assert np.all(np.asarray(step_logits[:, v:]) == PAD_LOGIT)
    np.testing.assert_allclose(step_logits[:, :v], lp[:, 0, :v], rtol=1e-4, atol=1e-5)
    toks = sample.generate(padded, tokens[:, :3], max_new_tokens=6, temperature=50.0, seed=0)
    assert int(np.max(np.asarray(toks))) < v


def test_padding_lets_the_vocabulary_shard():
    """50 rows cannot shard over tensor=8; the padded 64 can (the reason to pad)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(1, 1, 8, 1), sharding.MESH_AXES)
    rules = sharding.mesh_rules("default")
    for multiple, want in ((1, P(None, None)), (8, P("tensor", None))):
        _, params = nnx.split(nnx.eval_shape(lambda: _lm(50, multiple)), nnx.Param)
        sh = sharding.param_shardings(params, mesh, rules)
        assert sh["embed"]["embedding"].spec == want


def test_fsdp_fallback_shards_weights_no_rule_shards():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(1, 8, 1, 1), sharding.MESH_AXES)
    rules = sharding.mesh_rules("default")
    # A low-rank factor [rank, heads*dim] ("lowrank", "heads"): heads -> tensor (size 1) leaves it replicated.
    spec = sharding.spec_for(("lowrank", "heads"), (16, 256), mesh, rules)
    assert spec == P(None, None)
    assert sharding.with_fallback(spec, (16, 256), mesh, rules) == P(None, "fsdp")        # largest dim
    assert sharding.with_fallback(P(None, None), (256, 12), mesh, rules) == P("fsdp", None)
    assert sharding.with_fallback(P(None, None), (3, 5), mesh, rules) == P(None, None)    # nothing divides
    assert sharding.with_fallback(P("fsdp", None), (16, 256), mesh, rules) == P("fsdp", None)  # already used
    assert sharding.with_fallback(P(None, None), (16, 256), mesh, sharding.mesh_rules("dp")) == P(None, None)
