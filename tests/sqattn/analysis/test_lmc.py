"""Interpolation, barriers and their predictors (sqattn.analysis.lmc) on closed-form landscapes and a real run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqattn.analysis import lmc

BATCHES = [{"w": jnp.ones(())}, {"w": jnp.ones(())}]


def _quadratic(q, c):
    """L(theta) = 1/2 (theta - c)^T Q (theta - c) on params {"v": [n]} (batches only carry the weight)."""
    q, c = jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32)

    def fn(params, batch):
        d = params["v"] - c
        return 0.5 * d @ q @ d, {"weight": batch["w"]}
    return fn


def _ridge(params, batch):     # lmc.md's toy: (x y - 1)^2, two branches separated by a ridge through 0
    return (params["x"] * params["y"] - 1.0) ** 2, {"weight": batch["w"], "error": (params["x"] * params["y"] < 0)
                                                    .astype(jnp.float32)}


def test_identical_endpoints_have_zero_barrier():
    fn = _quadratic(np.diag([1.0, -2.0, 0.5]), np.zeros(3))
    p = {"v": jnp.array([0.3, -0.2, 1.0])}
    curve = lmc.interpolation_curve(fn, p, p, BATCHES, alphas=21)
    b = lmc.barrier(curve["alpha"], curve["loss"])
    assert b["barrier"] == 0.0 and b["barrier_mean"] == 0.0
    pred = lmc.predictors(fn, p, p, BATCHES)
    assert pred["B_H"] == 0.0 and pred["B_q"] == 0.0 and pred["B_g"] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_barrier_matches_closed_form(seed):
    # phi(a) - chord = -(1/2) a (1 - a) Delta^T Q Delta  =>  barrier = -Delta^T Q Delta / 8 at a* = 1/2 when the
    # curvature along Delta is negative, 0 when it is positive.
    rng = np.random.default_rng(seed)
    n = 6
    u = np.linalg.qr(rng.standard_normal((n, n)))[0]
    q = u @ np.diag([3.0, 1.0, 0.5, -0.7, -1.5, -2.0]) @ u.T          # indefinite (a saddle)
    fn = _quadratic(q, rng.standard_normal(n))
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    delta = b - a
    curv = float(delta @ q @ delta)
    if curv > 0:                                                      # pick the negative-curvature case
        b = a + u[:, -1] * 2.0 + u[:, 0] * 0.3
        delta = b - a
        curv = float(delta @ q @ delta)
    assert curv < 0
    pa, pb = {"v": jnp.asarray(a, jnp.float32)}, {"v": jnp.asarray(b, jnp.float32)}
    curve = lmc.interpolation_curve(fn, pa, pb, BATCHES, alphas=21)
    got = lmc.barrier(curve["alpha"], curve["loss"])
    want = -curv / 8
    assert abs(got["barrier"] - want) <= 1e-5 * max(1.0, abs(want)) + 1e-4 * abs(want)
    assert got["a_star"] == pytest.approx(0.5)
    pred = lmc.predictors(fn, pa, pb, BATCHES)
    for k in ("B_H", "B_q"):                       # exact for a quadratic (phi'' constant)
        assert abs(pred[k] - want) <= 1e-4 * abs(want), (k, pred[k], want)
    # B_g = (g_A - g_B)^T Delta / 8 = -Delta^T Q Delta / 8 for a quadratic
    assert abs(pred["B_g"] - want) <= 1e-4 * abs(want)
    # a convex direction has no barrier
    b2 = a + u[:, 0] * 2.0
    curve2 = lmc.interpolation_curve(fn, pa, {"v": jnp.asarray(b2, jnp.float32)}, BATCHES, alphas=21)
    assert lmc.barrier(curve2["alpha"], curve2["loss"])["barrier"] <= 1e-5


def test_ridge_toy_values_of_the_note():
    # (1, 1) -> (-1, -1): barrier 1 at a = 0.5, B_H = 2, B_g = 0, B_q = 1 (lmc.md, toy example)
    pa = {"x": jnp.float32(1.0), "y": jnp.float32(1.0)}
    pb = {"x": jnp.float32(-1.0), "y": jnp.float32(-1.0)}
    curve = lmc.interpolation_curve(_ridge, pa, pb, BATCHES, alphas=21)
    b = lmc.barrier(curve["alpha"], curve["loss"])
    assert b["barrier"] == pytest.approx(1.0, rel=1e-6) and b["a_star"] == pytest.approx(0.5)
    pred = lmc.predictors(_ridge, pa, pb, BATCHES)
    assert pred["B_H"] == pytest.approx(2.0, rel=1e-5)
    assert pred["B_q"] == pytest.approx(1.0, rel=1e-5)
    assert abs(pred["B_g"]) < 1e-6
    # same branch, curved valley: (2, .5) -> (.5, 2): barrier 0.316 measured on a 21-point grid (the note),
    # B_H = 0.633, B_q = 0.316
    pa, pb = {"x": jnp.float32(2.0), "y": jnp.float32(0.5)}, {"x": jnp.float32(0.5), "y": jnp.float32(2.0)}
    curve = lmc.interpolation_curve(_ridge, pa, pb, BATCHES, alphas=21)
    assert lmc.barrier(curve["alpha"], curve["loss"])["barrier"] == pytest.approx(0.3164, abs=1e-3)
    pred = lmc.predictors(_ridge, pa, pb, BATCHES)
    assert pred["B_H"] == pytest.approx(0.6328, abs=1e-3) and pred["B_q"] == pytest.approx(0.3164, abs=1e-3)


def test_layerwise_interpolation_changes_only_the_chosen_layers():
    rng = np.random.default_rng(0)
    shapes = {"layers": {"0": {"kernel": (3, 4), "bias": (4,)}, "1": {"kernel": (4, 4), "bias": (4,)}},
              "out": {"kernel": (4, 2), "bias": (2,)}}
    mk = lambda: jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,  # noqa: E731
                              is_leaf=lambda x: isinstance(x, tuple))
    pa, pb = mk(), mk()
    groups = lmc.default_groups(pa)
    assert set(groups) == {"layers/0", "layers/1", "out"}
    mask = lmc.group_mask(pa, groups["layers/1"])
    mid = jax.jit(lmc.interpolate)(pa, pb, 0.3, mask)
    for path, leaf in zip(lmc.leaf_paths(pa), jax.tree.leaves(mid)):
        a = jax.tree.leaves(pa)[lmc.leaf_paths(pa).index(path)]
        b = jax.tree.leaves(pb)[lmc.leaf_paths(pb).index(path)]
        if path.startswith("layers/1/"):
            np.testing.assert_allclose(leaf, 0.7 * a + 0.3 * b, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(leaf, a)
    with pytest.raises(ValueError, match="matches no parameter"):
        lmc.group_mask(pa, "^blocks/")


def test_distance_and_angle():
    k = {"v": np.zeros(3)}
    a = {"v": np.array([1.0, 0.0, 0.0])}
    b = {"v": np.array([0.0, 2.0, 0.0])}
    assert lmc.displacement_angle(k, a, b) == pytest.approx(90.0)
    assert lmc.displacement_angle(k, a, a) == pytest.approx(0.0, abs=1e-3)
    assert lmc.distance(a, b) == pytest.approx(np.sqrt(5.0))


def test_barrier_forms_and_bad_grid():
    a = np.linspace(0, 1, 5)
    v = np.array([1.0, 2.5, 3.0, 2.5, 0.0])   # endpoints differ: chord vs mean vs max forms differ
    b = lmc.barrier(a, v)
    assert b["barrier"] == pytest.approx(3.0 - 0.5)       # gap at a = .5: 3 - (0.5 * 1 + 0.5 * 0)
    assert b["barrier_mean"] == pytest.approx(2.5) and b["barrier_max"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="increase from 0 to 1"):
        lmc.barrier(a[::-1], v)
