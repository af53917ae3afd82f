"""SPM adapters (sqattn/peft/spm.py): zero init, multiplier forms, combination, facilitated transport,
latent-anchoring anchors and the erasing loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn.diffusion import cosine_schedule, ddim_sample
from sqattn.layers import Dense
from sqattn.peft import spm
from tests.sqattn.diffusion.test_sampler import _tiny_dit
from tests.testing import assert_close


def _layer_with_spms(k, seed=0):
    base = Dense(5, 7, axes=(None, None), rngs=nnx.Rngs(seed), use_bias=True)
    layer = spm.SPMDense(base, num=k, rngs=nnx.Rngs(seed + 1))
    layer.spm_up.value = jax.random.normal(jax.random.key(seed + 2), layer.spm_up.value.shape)
    return layer


def test_multiplier_forms_match_the_merged_weights():
    # Given two rank-1 SPMs on one layer and per-example permeabilities g [b, 2]
    layer = _layer_with_spms(2)
    x = jax.random.normal(jax.random.key(0), (3, 4, 5))                    # [b, t, in]
    g = jnp.array([[1.0, 0.0], [0.3, 0.8], [0.0, 0.0]])
    w, bias = layer.base.kernel.value, layer.base.bias.value
    d, u = layer.spm_down.value, layer.spm_up.value                      # [K, in], [K, out]
    for i in range(3):
        paper = w + jnp.einsum("k,ki,ko->io", g[i], d, u)                   # W + sum_k g_k D_k^T U_k
        code = w + jnp.outer(g[i] @ d, g[i] @ u)                            # W + (sum g D)^T (sum g U)
        with spm.multiplier(g, form="paper"):
            assert_close(layer(x)[i], x[i] @ paper + bias, name="paper form")
        with spm.multiplier(g, form="factor_sum"):
            assert_close(layer(x)[i], x[i] @ code + bias, name="factor-sum form")
    # multiplier 0 is the base layer exactly; no context means m = 1 for every SPM
    with spm.multiplier(0.0):
        assert np.array_equal(np.asarray(layer(x)), np.asarray(layer.base(x)))
    assert_close(layer(x), x @ (w + d.T @ u) + bias, name="m = 1")
    with pytest.raises(ValueError, match="does not fit batch 3 and 2 adapters"):
        with spm.multiplier(jnp.ones((3, 5))):
            layer(x)
    with pytest.raises(ValueError, match="SPM form 'nope' unknown"):
        with spm.multiplier(1.0, form="nope"):
            pass


def test_zero_initialised_adapter_leaves_samples_bit_identical():
    m = _tiny_dit()
    sched = cosine_schedule(1000)
    tok = jnp.array([[1, 2, 8, 0, 0, 0], [1, 3, 5, 0, 0, 0]], jnp.int32)
    noise = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

    def sample(model):
        return jax.jit(lambda z: ddim_sample(lambda x, t, c: model(x, t, c), sched, z, tok, jnp.zeros_like(tok),
                                             num_steps=3))(noise)
    before = np.asarray(sample(m))
    spm.apply_spm(m, rngs=nnx.Rngs(5))
    wrapped = [p for p, n in nnx.iter_graph(m) if isinstance(n, spm.SPMDense)]
    assert len(wrapped) == 10                                            # q k v o, cross q k v o, fc1 fc2
    assert not any("text" in map(str, p) or "ada" in map(str, p) for p in wrapped)
    assert np.array_equal(before, np.asarray(sample(m)))


def test_combine_stacks_trained_spms():
    a, b = _tiny_dit(), _tiny_dit()
    for mdl, seed in ((a, 1), (b, 2)):
        spm.apply_spm(mdl, rngs=nnx.Rngs(seed))
        for _, node in nnx.iter_graph(mdl):
            if isinstance(node, spm.SPMDense):
                node.spm_up.value = jax.random.normal(jax.random.key(seed), node.spm_up.value.shape) * 0.2
    both = spm.combine(spm.apply_spm(_tiny_dit(), num=2, rngs=nnx.Rngs(9)), [a, b])
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    tok = jnp.array([[1, 2, 8, 0, 0, 0], [1, 3, 5, 0, 0, 0]], jnp.int32)
    t = jnp.array([100, 700])
    with spm.multiplier(jnp.array([[1.0, 0.0], [0.0, 1.0]])):
        mixed = both(x, t, tok)
    assert_close(mixed[0], a(x, t, tok)[0], name="SPM a alone")
    assert_close(mixed[1], b(x, t, tok)[1], name="SPM b alone")
    with pytest.raises(ValueError, match="wrap the model with apply_spm"):
        spm.combine(spm.apply_spm(_tiny_dit(), num=1, rngs=nnx.Rngs(9)), [a, b])


def test_permeability_in_unit_interval_and_zero_without_shared_content():
    vocab = 9
    onehot = lambda tok: jax.nn.one_hot(tok, vocab) * (tok != 0)[..., None]   # noqa: E731 pad -> 0 state
    prompts = jnp.array([[1, 2, 8, 0, 0, 0],     # a red star
                         [1, 3, 5, 0, 0, 0],     # a green circle
                         [0, 0, 0, 0, 0, 0],     # ""
                         [8, 8, 0, 0, 0, 0]])    # star star
    concepts = jnp.array([[8, 0, 0, 0, 0, 0],    # star
                          [4, 8, 0, 0, 0, 0]])   # blue star (two tokens)
    for cosine in ("flat", "mean", "none"):
        g = np.asarray(spm.permeability(onehot, prompts, concepts, cosine=cosine))
        assert g.shape == (4, 2) and np.all((g >= 0) & (g <= 1))
        assert g[0, 0] == 1.0 and g[3, 0] == 1.0                         # the prompt names the concept
        assert g[1, 0] == 0.0 and g[2, 0] == 0.0 and g[1, 1] == 0.0      # nothing shared: zero
        assert abs(g[0, 1] - 0.5) < 1e-6 or cosine == "flat"             # "star" of "blue star": overlap 1/2
    # a real (random) encoder: padded positions share states, so the flat cosine is large for every prompt
    m = _tiny_dit()
    g_flat = np.asarray(spm.permeability(m.encode_text, prompts, concepts, cosine="flat"))
    assert np.all((g_flat >= 0) & (g_flat <= 1))
    with pytest.raises(ValueError, match="FT cosine 'x' unknown"):
        spm.permeability(onehot, prompts, concepts, cosine="x")


def test_anchors_have_target_norm_and_shape():
    c = jax.random.normal(jax.random.key(0), (3, 6, 16)) * 2.0
    a = spm.sample_anchors(jax.random.key(1), c, 4)
    assert a.shape == (12, 6, 16)
    ratio = jnp.linalg.norm(a.reshape(3, 4, -1), axis=-1) / jnp.linalg.norm(c.reshape(3, 1, -1), axis=-1)
    assert float(ratio.min()) >= 0.8 - 1e-5 and float(ratio.max()) <= 1.2 + 1e-5
    cos = jnp.einsum("bnf,bf->bn", a.reshape(3, 4, -1), c.reshape(3, -1)) / (
        jnp.linalg.norm(a.reshape(3, 4, -1), axis=-1) * jnp.linalg.norm(c.reshape(3, -1), axis=-1)[:, None])
    assert float(jnp.max(jnp.abs(cos))) < 0.6                              # random directions, not the target


def test_erase_loss_at_zero_init_and_gradients_reach_only_the_up_factors():
    m = spm.apply_spm(_tiny_dit(), rngs=nnx.Rngs(1))
    sched = cosine_schedule(1000)
    tar = jnp.array([[1, 2, 8, 0, 0, 0], [1, 8, 0, 0, 0, 0]], jnp.int32)
    sur = jnp.zeros_like(tar)
    kw = dict(schedule=sched, image_shape=(8, 8, 3), rollout_steps=3, num_anchors=2)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss_of(p):
        mdl = nnx.merge(graphdef, p, rest)
        return spm.erase_loss(mdl, tar, sur, jax.random.key(0), **kw)
    (loss, met), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(params)
    # U = 0: the adapted prediction is the frozen one, so L_anc = 0 and
    # L_era = mean((e_tar - (e_sur - (e_tar - e_sur)))^2) = 4 mean((e_tar - e_sur)^2) > 0
    assert float(met["loss_anchor"]) == 0.0 and float(met["loss_erase"]) > 0
    assert 1 <= float(met["rollout_n"]) <= 2
    g = nnx.to_pure_dict(grads)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(g)}
    ups = [v for k, v in flat.items() if "spm_up" in k]
    assert len(ups) == 10 and sum(float(jnp.sum(jnp.abs(v))) for v in ups) > 0
    assert all(float(jnp.max(jnp.abs(v))) == 0.0 for k, v in flat.items() if "spm_down" in k)  # U = 0
    loss0, met0 = jax.jit(lambda p: spm.erase_loss(nnx.merge(graphdef, p, rest), tar, sur, jax.random.key(0),
                                                   **dict(kw, la_strength=0.0)))(params)
    assert "loss_anchor" not in met0 and float(loss0) == float(met["loss_erase"])
