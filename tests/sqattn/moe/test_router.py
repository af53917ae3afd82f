"""Router conventions: renormalised top-k, capacity formula, the token-order drop rule (two implementations
against a numpy loop), and the auxiliary losses against numpy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqattn.moe import dispatch, router
from tests.testing import assert_close


def _skewed_ids(rng, g, s, e, k, skew=1.5):
    logits = rng.standard_normal((g, s, e)) - skew * np.log(np.arange(1, e + 1))
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k].astype(np.int32)


def _numpy_keep(ids, num_experts, cap):
    """The rule written out: per group, walk tokens in order, serve an expert while it has slots left."""
    g, s, k = ids.shape
    keep = np.zeros(ids.shape, bool)
    for gi in range(g):
        used = np.zeros(num_experts, int)
        for t in range(s):
            for j in range(k):
                e = ids[gi, t, j]
                keep[gi, t, j] = used[e] < cap
                used[e] += 1
    return keep


def test_route_is_renormalised_top_k():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 7, 6)), jnp.float32)
    r = jax.jit(router.route, static_argnums=1)(logits, 2)
    p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    ids = np.argsort(-np.asarray(logits), axis=-1)[..., :2]
    np.testing.assert_array_equal(np.asarray(r.expert_ids), ids)
    sel = np.take_along_axis(p, ids, axis=-1)
    assert_close(r.weights, sel / sel.sum(-1, keepdims=True), name="weights")
    assert_close(r.probs, p, name="probs")
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=6\], got 7"):
        router.route(logits, 7)


@pytest.mark.parametrize("s,e,k,cf,expected", [
    (128, 8, 2, 1.25, 40), (100, 8, 2, 1.0, 25), (5, 16, 1, 1.0, 1), (7, 4, 2, 10.0, 7), (9, 4, 2, 0.0, 9),
    (9, 4, 2, None, 9), (4096, 32, 2, 1.0, 256),
])
def test_capacity(s, e, k, cf, expected):
    assert router.capacity(s, e, k, cf) == expected


def test_drop_rule_cumsum_and_sort_agree_with_numpy():
    rng = np.random.default_rng(1)
    g, s, e, k = 3, 29, 6, 2
    ids = _skewed_ids(rng, g, s, e, k)
    x = jnp.asarray(rng.standard_normal((g, s, 4)), jnp.float32)
    params = dispatch.ExpertParams(jnp.ones((e, 4, 3)), jnp.ones((e, 4, 3)), jnp.ones((e, 3, 4)))
    w = jnp.full((g, s, k), 0.5)
    dense = jax.jit(dispatch.dense_dispatch, static_argnames="capacity")
    layout = jax.jit(dispatch.sorted_layout, static_argnums=(1, 2))
    for cf in (0.5, 1.0):
        cap = router.capacity(s, e, k, cf)
        expected = _numpy_keep(ids, e, cap)
        if cf == 1.0:
            assert 0 < expected.mean() < 1  # the skew makes this case drop
        _, keep_dense = dense(x, jnp.asarray(ids), w, params, capacity=cap)
        lay = layout(jnp.asarray(ids), e, cap)
        np.testing.assert_array_equal(np.asarray(keep_dense), expected)
        np.testing.assert_array_equal(np.asarray(lay.keep).reshape(g, s, k), expected)
        counts = np.array([[np.sum(ids[gi] == ei) for ei in range(e)] for gi in range(g)])
        np.testing.assert_array_equal(np.asarray(lay.group_sizes), np.minimum(counts, cap).sum(0))


@jax.jit
def _aux(logits, uniform, ids_uniform):
    r = router.route(logits, 2)
    grad = jax.grad(lambda lg: router.load_balance_loss(jax.nn.softmax(lg), r.expert_ids))(logits)
    return (r.expert_ids, router.load_balance_loss(r.probs, r.expert_ids), router.z_loss(logits),
            router.load_balance_loss(uniform, ids_uniform), grad)


def test_aux_losses_match_numpy():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(3 * rng.standard_normal((2, 11, 5)), jnp.float32)
    # Perfect balance: uniform probabilities and every expert chosen equally often -> exactly 1.
    uniform = jnp.full((10, 5), 0.2)
    ids_uniform = jnp.asarray(np.arange(20).reshape(10, 2) % 5, jnp.int32)
    ids, lb, z, lb_uniform, grad = _aux(logits, uniform, ids_uniform)
    p = np.asarray(jax.nn.softmax(logits, -1), np.float64).reshape(-1, 5)
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=5)
    assert_close(lb, 5 * np.sum(counts / counts.sum() * p.mean(0)), name="load balance")
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    assert_close(z, np.mean(lse ** 2), name="z-loss")
    assert_close(lb_uniform, 1.0, name="balanced")
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0  # through P only
