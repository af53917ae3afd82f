"""MixtureGrowth: template layers, member stages, growth with each coefficient init, dense baselines."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sqattn.growth import mixture, paths
from sqattn.train import optim

X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)


def _model(stage, seed=0, hidden=8):
    return mixture.TemplateMLP(5, 3, hidden=hidden, stage=stage, rngs=nnx.Rngs(params=seed))


def _at(stage, params):
    return paths.load(_model(stage), params)


def _trained():
    """A TemplateMLP whose every parameter is non-trivial (as after the two member stages)."""
    params = jax.tree.map(lambda x: np.asarray(x) + 0.3 * np.random.default_rng(x.size).standard_normal(x.shape),
                          paths.pure_params(_model("m1", seed=1)))
    return params


def test_zero_coefficients_grow_into_the_two_members_logit_sum():
    params = mixture.grow_params(_trained(), coef_init="zero")
    grown = np.asarray(_at("grown", params)(X))
    members = np.asarray(_at("m0", params)(X)) + np.asarray(_at("m1", params)(X))
    np.testing.assert_allclose(grown, members, rtol=1e-6, atol=1e-6)
    other = mixture.grow_params(_trained(), coef_init="orthogonal")
    assert np.abs(np.asarray(_at("grown", other)(X)) - members).max() > 1e-3


def test_coefficient_inits():
    src = _trained()
    k = {b: np.asarray(src["layers"][1]["coefs"][b]) for b in range(4)}
    orth = mixture.grow_params(src, coef_init="orthogonal")["layers"][1]["coefs"]
    for b in (2, 3):
        assert abs(orth[b] @ k[b - 2]) < 1e-5 and np.linalg.norm(orth[b]) == pytest.approx(1.0, abs=1e-6)
    copy = mixture.grow_params(src, coef_init="copy")["layers"][1]["coefs"]
    np.testing.assert_allclose(np.linalg.norm(copy[2] - k[0]), 0.01, rtol=1e-5)
    rnd = mixture.grow_params(src, coef_init="random", coef_scale=0.5)["layers"][1]["coefs"]
    assert all(0 <= v < 0.5 for v in rnd[3])
    same = mixture.grow_params(src, coef_init="zero")
    np.testing.assert_array_equal(same["layers"][1]["coefs"][0], k[0])       # members untouched
    assert mixture.grow_params(src, coef_init="zero")["layers"][0]["coefs"].keys() == {0, 1}
    with pytest.raises(ValueError, match="coef_init"):
        mixture.grow_params(src, coef_init="svd")


def test_members_train_apart_and_coefficients_are_not_decayed():
    params = paths.pure_params(_model("m0"))
    names = optim.param_paths(params)
    m0 = [p for p in names if re.search(mixture.member_trainable(0), p)]
    assert m0 == sorted(m0) and set(m0) == {p for p in names if p.endswith(("/0",)) and "/coefs/" in p
                                             or p.endswith("templates/0") or p.endswith("bias/0")}
    assert not any(re.search(mixture.member_trainable(1), p) for p in m0)
    decay = dict(zip(names, jax.tree.leaves(optim.decay_mask(params))))
    assert decay["layers/1/templates/0"] and not decay["layers/1/coefs/2"] and not decay["out/bias/1"]
    # a member's output depends only on its own parameters
    grads = paths.flatten(jax.grad(lambda p: jnp.sum(_at("m0", p)(X)))(params))
    used = {"/".join(map(str, p)) for p, v in grads.items() if np.any(np.asarray(v))}
    assert used <= set(m0) and used


def _cfg(model_name, hidden, **model):
    c = ml_collections.ConfigDict(dict(model_name=model_name, seed=0, init=dict(args=dict(member=1, seed=0)),
                                       model=dict(in_features=5, out_features=3, hidden=hidden, **model)))
    return c


def test_dense_baselines():
    params = mixture.grow_params(_trained(), coef_init="zero")
    src = _at("m1", params)
    src_cfg = _cfg("template_mlp", 8, stage="m1")
    # Net2Net of member 1 keeps its function
    wide = mixture.net2net(src, src_cfg, _cfg("mlp", 12, num_layers=2))
    np.testing.assert_allclose(np.asarray(wide(X)), np.asarray(_at("m1", params)(X)), rtol=1e-5, atol=1e-5)
    # random-weight growth: members on the diagonal, the mlp's own init across
    dense = mixture.grow_dense(src, src_cfg, _cfg("mlp", 8, num_layers=2))
    w = np.asarray(dense.layers[1].kernel[...])
    tl = _at("grown", params).layers[1]
    np.testing.assert_allclose(w[:4, :4], np.asarray(tl.block(0)), rtol=1e-6)
    assert np.abs(w[:4, 4:]).max() > 0
