"""Power-law fits (sqattn.analysis.scaling): recovery of known parameters within the CI, scipy anchor, helpers."""

import numpy as np
import pytest

from sqattn.analysis import scaling

M = 2.0 ** np.arange(7, 16)          # 9 nested shards, as in scaling_laws.md's reproduction


def _data(alpha, beta, gamma, noise, seed, seeds=1):
    rng = np.random.default_rng(seed)
    m = np.repeat(M, seeds)
    e = (alpha * m ** beta + gamma) * np.exp(noise * rng.standard_normal(m.size))
    return m, e


def test_recovers_known_parameters_without_floor():
    alpha, beta = 3.0, -0.35
    hits, trials = 0, 20
    for s in range(trials):
        m, e = _data(alpha, beta, 0.0, 0.05, s)
        fit = scaling.fit_power_law(m, e)
        lo, hi = fit.ci(0.9)["beta"]
        hits += lo <= beta <= hi
        a_lo, a_hi = fit.ci(0.9)["alpha"]
        assert a_lo < a_hi and lo < hi
    assert hits >= 15, hits               # ~90 % coverage (18 expected); 15 is 2 sd below
    m, e = _data(alpha, beta, 0.0, 0.05, 0)
    fit = scaling.fit_power_law(m, e, bootstrap=200, seed=1)
    ci = fit.ci(0.9)
    assert ci["alpha"][0] <= alpha <= ci["alpha"][1] and ci["beta"][0] <= beta <= ci["beta"][1]


def test_recovers_alpha_beta_gamma_with_floor_and_agrees_with_curve_fit():
    alpha, beta, gamma = 4.0, -0.5, 0.01
    m, e = _data(alpha, beta, gamma, 0.03, 3, seeds=2)
    fit = scaling.fit_power_law(m, e, gamma="fit", bootstrap=200, boot_unit="seed", seed=0)
    ci = fit.ci(0.9)
    for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        assert ci[k][0] <= v <= ci[k][1], (k, v, ci[k])
    assert abs(fit.beta - beta) < 0.1 and abs(fit.gamma - gamma) / gamma < 0.3
    assert fit.gamma_identified()
    flat_m = M[:4]                                   # a flat curve: no floor can be told apart from the power law
    flat_e = 3.3 * flat_m ** -0.006 * np.exp(0.03 * np.random.default_rng(0).standard_normal(4))
    assert not scaling.fit_power_law(flat_m, flat_e, gamma="fit", bootstrap=50).gamma_identified()
    ref = scaling.curve_fit_reference(m, e, gamma="fit")
    # same objective: curve_fit lands on our optimum (relative agreement), and inside our CI
    for k in ("alpha", "beta", "gamma"):
        assert abs(ref["log"][k] - getattr(fit, k)) <= 1e-3 * abs(getattr(fit, k)), (k, ref["log"][k])
    assert all(scaling.agrees_with(fit, ref["log"]).values())
    # without a floor the fit of a floored curve is biased shallow: the floor matters
    flat = scaling.fit_power_law(m, e)
    assert flat.beta > fit.beta + 0.05


def test_predict_holdout_and_inverse():
    m, e = _data(2.0, -0.3, 0.0, 0.02, 5)
    out = scaling.holdout_check(m, e, n_holdout=2)
    assert max(out["rel_err"]) < 0.1 and out["extrapolation"][-1] == pytest.approx(4.0)
    fit = scaling.fit_power_law(m, e)
    target = float(fit(1e5))
    assert scaling.data_needed(fit, target) == pytest.approx(1e5, rel=1e-9)
    mean, lo, hi = scaling.predict(fit, [1e3, 1e6])
    assert np.all(lo < mean) and np.all(mean < hi)
    assert (hi[1] - lo[1]) / mean[1] > (hi[0] - lo[0]) / mean[0]      # wider when extrapolating


def test_local_slopes_and_region():
    # small-data plateau at the best guess 0.9, then a power law of slope -0.5, then a floor
    m = 2.0 ** np.arange(4, 18)
    e = np.minimum(0.9, 20 * m ** -0.5) + 0.002 * (m > 2 ** 14) * np.log2(m / 2 ** 14)
    slopes = scaling.local_slopes(m, e)
    np.testing.assert_allclose(slopes[8], -0.5, rtol=1e-9)
    i0, i1 = scaling.find_power_law_region(m, e, best_guess=0.9)
    assert m[i0] >= 2 ** 9 and i1 - i0 >= 4
    fit = scaling.fit_power_law(m[i0:i1], e[i0:i1])
    assert fit.beta == pytest.approx(-0.5, abs=0.05)


def test_best_per_shard_averages_seeds_before_the_min():
    recs = [dict(m=100, width=8, lr=1, value=v, n_params=10) for v in (0.5, 0.7)]
    recs += [dict(m=100, width=16, lr=1, value=v, n_params=20) for v in (0.3, 1.1)]   # lucky seed, worse mean
    out = scaling.best_per_shard(recs)
    assert out["err"][0] == pytest.approx(0.6) and out["width"][0] == 8 and out["best_params"][0] == 10


def test_bad_input():
    with pytest.raises(ValueError, match="at least 3 points"):
        scaling.fit_power_law([1, 2], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_power_law([1, 2, 3], [1, 0, 2])
