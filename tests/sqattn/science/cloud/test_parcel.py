"""The super-droplet parcel: reference constants, the implicit growth step, conservation, limits, vmap, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqattn.science.cloud import parcel, thermo
from sqattn.science.cloud.parcel import Experiment, ParcelConfig, simulate

# One step per record so that budgets can be checked at every step (tiny sizes: the tests' compile time dominates).
STEP_CONFIG = ParcelConfig(n_sd=64, dt=0.02, duration=2.0, record_every=0.02)
STEP_EXPERIMENTS = [
    Experiment(n_c=300.0, rh0=1.0, seed=1),  # adiabatic, saturated start
    Experiment(n_c=100.0, rh0=0.9, sigma_w=0.5, seed=2),  # drying to haze, with fluctuations
    Experiment(n_c=200.0, rh0=1.0, sigma_w=0.5, entrainment=2e-3, rh_env=0.7, mixing=0, seed=3),
    Experiment(n_c=200.0, rh0=1.0, entrainment=2e-3, rh_env=0.7, mixing=1, seed=4),
]


@pytest.fixture(scope="module")
def step_run():
    return simulate(STEP_EXPERIMENTS, STEP_CONFIG)


def rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))


# --- constants at the note's reference states ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature,pressure,expected", [
    (283.0, 80000.0, 9.7e-11), (293.0, 95000.0, 1.22e-10), (288.0, 90000.0, 1.09e-10), (273.0, 70000.0, 7.1e-11),
    (263.0, 60000.0, 4.8e-11)])
def test_growth_coefficient_at_reference_states(temperature, pressure, expected):
    assert rel(thermo.growth_coefficient(temperature, pressure), expected) < 0.01


def test_a1_kelvin_and_growth_speed_at_283k():
    assert rel(thermo.updraft_coefficient(283.0), 5.4e-4) < 0.01
    assert rel(thermo.kelvin_coefficient(283.0), 1.1e-9) < 0.01
    # dr/dt = c S with c = G / r: 1.39e-3, 9.7e-4, 4.9e-4, 2.4e-4 cm/s at 7, 10, 20, 40 um (the note's check).
    g = thermo.growth_coefficient(283.0, 80000.0)
    c = g / np.array([7e-6, 10e-6, 20e-6, 40e-6]) * 100.0
    assert np.all(rel(c, [1.39e-3, 9.7e-4, 4.9e-4, 2.4e-4]) < 0.02)
    a2 = thermo.condensation_coefficient(283.0, 80000.0)
    assert 200 < a2 < 550


def test_haze_equilibrium_radius_solves_koehler():
    rd = np.array([0.02e-6, 0.05e-6, 0.1e-6, 0.1e-6])
    s = np.array([-0.1, -0.01, 0.0, 0.0003])
    r = thermo.equilibrium_radius(s, rd, 0.6, 285.0)
    a = thermo.kelvin_coefficient(285.0)
    solute = 0.6 * rd ** 3 / r ** 3
    assert np.all(np.abs(a / r - solute - s) <= 1e-12 * solute)
    assert np.all(r < thermo.critical_radius(rd, 0.6, 285.0)) and np.all(r > rd)
    with pytest.raises(ValueError, match="critical supersaturation"):
        thermo.equilibrium_radius(0.01, 0.05e-6, 0.6, 285.0)


# --- the implicit growth step -------------------------------------------------------------------------------------


def test_single_droplet_at_constant_supersaturation_follows_r2_law():
    # Without Koehler terms the backward-Euler update in r^2 is exact: r^2(t) = r0^2 + 2 G S t to round-off.
    r0 = np.array([2e-6, 5e-6, 11e-6])
    g, s, dt, steps = 1.1e-10, np.array([0.003, -0.002, 0.01]), 0.02, 500
    with jax.enable_x64(True):
        step = jax.jit(lambda r: parcel.implicit_growth(r, jnp.full(3, 1e-8), 0.0, jnp.asarray(s), g, 0.0, dt, 8)[0])
        r = jax.lax.fori_loop(0, steps, lambda _, r: step(r), jnp.asarray(r0))
        r = np.asarray(r)
    expected = r0 ** 2 + 2 * g * s * dt * steps
    assert np.all(rel(r ** 2, expected) < 1e-12)
    # With Koehler terms (grow() uses A(T), kappa = 0.6) a large droplet deviates only by the curvature term.
    r = parcel.grow(np.array([20e-6]), np.array([0.05e-6]), 0.6, 0.01, 283.0, 80000.0, dt, steps)
    g283 = thermo.growth_coefficient(283.0, 80000.0)
    free = 20e-6 ** 2 + 2 * g283 * 0.01 * dt * steps
    assert 0 < (free - r[0] ** 2) / free < 0.01  # curvature slows growth by ~A/(r S) ~ 0.5 %


def test_implicit_step_relaxes_haze_to_koehler_equilibrium():
    rd = np.array([0.03e-6, 0.05e-6, 0.1e-6])
    r = parcel.grow(np.full(3, 3e-6), rd, 0.6, -0.05, 290.0, 90000.0, 0.02, 3000)
    r_eq = thermo.equilibrium_radius(-0.05, rd, 0.6, 290.0)
    assert np.all(rel(r, r_eq) < 1e-9)


def test_newton_solve_converges_on_hard_inputs():
    # Growing, evaporating and haze droplets, and small ones that evaporate back through their Koehler maximum
    # (tiny r_d, r just above r_c, S < 0: their root lies decades below r^2, outside Newton's convex region).
    rng = np.random.default_rng(0)
    n = 20000
    rd = 5e-8 * np.exp(np.log(1.5) * rng.standard_normal(n))
    r = np.exp(rng.uniform(np.log(rd * 1.06), np.log(np.where(np.arange(n) % 2, 2e-5, 3e-7))))
    s = rng.uniform(-0.1, 0.02, n)
    with jax.enable_x64(True):
        g, a = thermo.growth_coefficient(293.0, 95000.0), thermo.kelvin_coefficient(293.0)
        iters = ParcelConfig().newton_iters  # the default the parcel uses
        solve = jax.jit(lambda r, rd, s: parcel.implicit_growth(r, rd, 0.6, s, g, a, 0.02, iters))
        x, resid = (np.asarray(v) for v in solve(jnp.asarray(r), jnp.asarray(rd), jnp.asarray(s)))
    assert resid.max() < 1e-12
    assert np.all(x >= parcel.DRY_FLOOR * rd * (1 - 1e-15))
    # The solution satisfies the update equation directly (not only the multiplied form).
    y = x ** 2
    f = y - r ** 2 - 2 * g * 0.02 * (s - a / x + 0.6 * rd ** 3 / x ** 3)
    floored = np.isclose(x, parcel.DRY_FLOOR * rd, rtol=1e-14)
    assert np.all(np.abs(f[~floored]) <= 1e-12 * np.maximum(y, np.abs(r ** 2 + 2 * g * 0.02 * s))[~floored])


# --- the parcel ---------------------------------------------------------------------------------------------------


def test_total_water_conserved_every_step(step_run):
    rec = step_run.records
    assert rec["T"].dtype == np.float64 and step_run.radii.dtype == np.float64
    assert jnp.asarray(1.0).dtype == jnp.float32  # x64 was enabled only inside simulate()
    assert rec["t"].shape == (4, 101)
    qt0 = rec["qv"][:, :1] + rec["ql"][:, :1]
    for i in (0, 1):  # adiabatic: q_v + q_l constant to round-off at every step (from radii, not from the budget)
        assert np.max(np.abs(rec["qv"][i] + rec["ql"][i] - qt0[i])) < 1e-15
        assert np.max(np.abs(rec["qv"][i] + rec["ql"][i] - qt0[i])) / qt0[i, 0] < 1e-13
    # In every run (entraining ones included) the budgeted total water matches vapour + liquid at every step.
    assert np.max(rec["water_err"]) < 1e-15
    assert np.all(rec["ql"][:, -1] > 0) and np.all(np.isfinite(rec["eps"]))
    # Entrainment of drier air removes water; the inhomogeneous run loses droplets, the homogeneous one keeps them.
    for i in (2, 3):
        assert rec["qv"][i, -1] + rec["ql"][i, -1] < qt0[i, 0]
    assert step_run.xi[3, -1].sum() < 0.999 * (1 - 2e-3 * 2.0) * step_run.xi[3, 0].sum()


def test_enthalpy_balance_every_step(step_run):
    rec = step_run.records
    for i in (0, 1):  # c_p dT + g dz - L dq_l = 0 per step (adiabatic runs)
        d_t, d_z, d_ql = (np.diff(rec[k][i]) for k in ("T", "z", "ql"))
        balance = thermo.C_P * d_t + thermo.GRAVITY * d_z - thermo.L_V * d_ql
        scale = thermo.GRAVITY * np.abs(d_z) + thermo.L_V * np.abs(d_ql)
        assert np.max(np.abs(balance) / scale) < 1e-9
        assert np.max(np.abs(d_ql)) > 0  # condensation or evaporation happened


def test_vmapped_run_equals_individual_run(step_run):
    one = simulate(STEP_EXPERIMENTS[3], STEP_CONFIG)
    for k in ("T", "qv", "ql", "S", "eps", "r_mean"):
        np.testing.assert_allclose(one.records[k][0], step_run.records[k][3], rtol=1e-12, atol=0)
    np.testing.assert_allclose(one.radii[0], step_run.radii[3], rtol=1e-12, atol=0)


# A short, coarse parcel (dt = 0.1 s < tau_p) shared by the next two tests (one compile: same config and batch size).
COARSE = ParcelConfig(n_sd=256, dt=0.1, duration=60.0, record_every=20.0)


def test_adiabatic_parcel_directions():
    # S_max falls and epsilon rises with N_c, and adiabatic growth narrows the spectrum.
    res = simulate([Experiment(n_c=n) for n in (100.0, 400.0, 1200.0)], COARSE)
    s_max, eps = res.records["S_max"][:, -1], res.records["eps"][:, -1]
    assert s_max[0] > s_max[1] > s_max[2] > 0
    assert rel(s_max[0], 0.0030) < 0.1  # the note's 0.30 % at N_c = 100
    assert eps[0] < eps[1] < eps[2] < res.records["eps"][0, 0]
    tau = res.records["tau_p"][:, -1]
    assert tau[0] > tau[1] > tau[2]
    c_m = res.records["c_m"][:, -1]
    assert np.all((c_m > 2.5e-4) & (c_m < 3e-3))  # cm/s, the paper's range is 0.25e-3 - 1.5e-3
    assert res.spectrum(0, 60.0, np.linspace(0, 20e-6, 41)).sum() == pytest.approx(
        res.records["n_act"][0, -1], rel=1e-9)


def test_unstable_trajectory_is_reported():
    # dt just below the initial tau_p: droplets grow (fast updraft), tau_p falls below dt and the run is rejected.
    r, _, xi = parcel.initial_spectra([Experiment(n_c=1000.0)], COARSE)
    n_c = 1000.0 * parcel.phase_relaxation_time(293.0, 95000.0, r[0], xi[0]) / (1.02 * COARSE.dt)
    exps = [Experiment(n_c=n_c, w=5.0, seed=0)] * 3  # the same batch size as above: no new compile
    with pytest.raises(ValueError, match="dt / tau_p reached"):
        simulate(exps, COARSE)
    assert simulate(exps, COARSE, check_stability=False).records["dt_over_tau"].max() >= 1


# --- clear errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,match", [
    (dict(n_c=-5.0), "n_c must be positive"),
    (dict(rh0=1.1), "rh0=1.1 is outside what the scheme supports"),
    (dict(rh0=0.2), "outside what the scheme supports"),
    (dict(r_wet_mean=-1e-6), "r_wet_mean must be positive"),
    (dict(sigma_w=-0.1), "sigma_w must be >= 0"),
    (dict(t0=400.0), "liquid-cloud range"),
    (dict(kappa=float("nan")), "kappa must be finite"),
])
def test_impossible_experiments_raise(change, match):
    with pytest.raises(ValueError, match=match):
        simulate(Experiment()._replace(**change), STEP_CONFIG)


def test_impossible_spectra_and_configs_raise():
    r, rd, xi = parcel.initial_spectra([Experiment()], STEP_CONFIG)
    for bad, match in (((-r, rd, xi), "radii must be positive"), ((r, rd, -xi), "must be >= 0"),
                       ((r, -rd, xi), "dry radii must be positive"), ((rd, rd, xi), "below 1.05 x its dry radius")):
        with pytest.raises(ValueError, match=match):
            simulate(Experiment(), STEP_CONFIG, spectra=bad)
    with pytest.raises(ValueError, match="not a whole number of steps"):
        simulate(Experiment(), dataclasses.replace(STEP_CONFIG, record_every=0.03))
    with pytest.raises(ValueError, match="phase-relaxation time"):
        simulate(Experiment(n_c=1200.0), dataclasses.replace(STEP_CONFIG, dt=1.0, record_every=1.0, duration=2.0))
