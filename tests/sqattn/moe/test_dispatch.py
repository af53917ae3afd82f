"""Dispatch paths agree: dense one-hot reference == sort + grouped matmul (tiled and ragged_dot) == fused Pallas
kernel (interpreter), forward, ``keep`` and gradients w.r.t. tokens, router and expert weights -- with skewed
routing that drops at capacity factor 1, and dropless."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqattn.moe import dispatch, router
from tests.testing import assert_close

G, S, H, I, E, K = 3, 21, 16, 24, 6, 2  # odd group size; S*K not a multiple of any tile
PATHS = {
    "dense": functools.partial(dispatch.dense_dispatch),
    "sorted_tiled": functools.partial(dispatch.sorted_dispatch, gmm="tiled", block_m=8),
    "sorted_ragged": functools.partial(dispatch.sorted_dispatch, gmm="ragged"),
    "fused": functools.partial(dispatch.fused_dispatch, impl="interpret"),
}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    x = normal(G, S, H)
    router_w = normal(H, E, scale=H ** -0.5)
    params = dispatch.ExpertParams(normal(E, H, I, scale=H ** -0.5), normal(E, H, I, scale=H ** -0.5),
                                   normal(E, I, H, scale=I ** -0.5))
    return x, router_w, params, normal(G, S, H)


SKEW = jnp.asarray(-1.5 * np.log(np.arange(1, E + 1)), jnp.float32)  # expert 0 is favoured


@functools.partial(jax.jit, static_argnames=("path", "capacity"))
def _run(x, router_w, params, ct, path, capacity):
    def loss(x, router_w, params):
        r = router.route(router.router_logits(x, router_w) + SKEW, K)
        out, keep = PATHS[path](x, r.expert_ids, r.weights, params, capacity=capacity)
        return jnp.sum(out * ct), (out, keep)
    (_, (out, keep)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, router_w, params)
    return out, keep, grads


@pytest.fixture(scope="module")
def data():
    return _inputs()


@pytest.fixture(scope="module")
def reference(data):
    cap = router.capacity(S, E, K, 1.0)
    return cap, _run(*data, path="dense", capacity=cap)


def _check(got, expected, label):
    out, keep, grads = got
    e_out, e_keep, e_grads = expected
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(e_keep), err_msg=f"{label}: keep differs")
    assert_close(out, e_out, name=f"{label} out")
    for name, g, r in zip(("dx", "drouter", "dw_gate", "dw_up", "dw_down"), jax.tree.leaves(grads),
                          jax.tree.leaves(e_grads)):
        assert_close(g, r, name=f"{label} {name}")


def test_reference_drops_and_matches_a_loop(data, reference):
    """The dense reference itself, at capacity factor 1 with skewed routing, against a per-token loop."""
    cap, (out, keep, _) = reference
    assert 0.05 < 1.0 - float(jnp.mean(keep)) < 0.6  # this case does drop
    x, router_w, params, _ = data
    r = router.route(router.router_logits(x, router_w) + SKEW, K)
    ids, w, kp = (np.asarray(a) for a in (r.expert_ids, r.weights, keep))
    xn, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, *params))
    expected = np.zeros(xn.shape)
    for gi, t, j in zip(*np.nonzero(kp)):
        e = ids[gi, t, j]
        a, b = xn[gi, t] @ wg[e], xn[gi, t] @ wu[e]
        expected[gi, t] += w[gi, t, j] * ((a / (1 + np.exp(-a)) * b) @ wd[e])
    assert_close(out, expected, name="dense vs loop")


@pytest.mark.parametrize("path", ["sorted_tiled", "sorted_ragged", "fused"])
def test_paths_match_reference_with_drops(data, reference, path):
    cap, expected = reference
    _check(_run(*data, path=path, capacity=cap), expected, path)


def test_dropless(data):
    cap = router.capacity(S, E, K, 0.0)
    assert cap == S
    expected = _run(*data, path="dense", capacity=cap)
    assert bool(jnp.all(expected[1]))
    _check(_run(*data, path="sorted_tiled", capacity=cap), expected, "dropless sorted_tiled")


def test_resolve_gmm():
    assert dispatch.resolve_gmm("auto", "cpu") == "tiled"
    assert dispatch.resolve_gmm("auto", "gpu") == "ragged"
    assert dispatch.resolve_gmm("ragged", "cpu") == "ragged"
    with pytest.raises(ValueError, match="unknown gmm 'fast'"):
        dispatch.resolve_gmm("fast")
