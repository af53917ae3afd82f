"""Adiabatic parcel with super-droplets growing by vapour diffusion (float64 JAX).

The model of ``../shared/papers/cloud_diffusional_growth.md`` ("Small-scale reproduction"): a parcel rises at a
constant updraft ``W``; ``N_sd`` super-droplets (radius ``r_i``, dry radius ``r_d,i``, multiplicity ``xi_i`` real
droplets per kg of dry air) grow by ``r dr/dt = G(T, p) (S + s'_i - S_eq(r_i))`` with linearised kappa-Koehler
``S_eq``; condensate is taken from the vapour and its latent heat warms the parcel; ``S`` is diagnosed from
``(q_v, T, p)`` every step. Turbulence is a stochastic surrogate: per droplet an Ornstein-Uhlenbeck updraft
fluctuation ``w'_i`` (std ``sigma_w``, time scale ``T_L``) drives a supersaturation fluctuation
``ds'_i/dt = A1 w'_i - s'_i / tau_p`` (``tau_p`` the parcel's phase-relaxation time).

One step of length ``dt`` (state at the start of the step ``(z, p, T, q_v, r)``):

1. ``w' <- a w' + sigma_w sqrt(1 - a^2) N(0, 1)``, ``a = exp(-dt/T_L)`` (exact OU update);
   ``s' <- b s' + A1 w' tau_p (1 - b)``, ``b = exp(-dt/tau_p)``.
2. Backward Euler in ``r^2``: ``x^2 = r^2 + 2 G dt (S + s' - A/x + kappa r_d^3/x^3)``, solved per droplet with a
   bracketed (safeguarded) Newton iteration on ``y = x^2``, never below ``x = 1.05 r_d``. Stable for haze, whose
   relaxation time ``r^2/G ~ 1e-3 s`` is far below ``dt``.
3. ``dq_l = (4 pi rho_w / 3) sum_i xi_i (x_i^3 - r_i^3)``; ``q_v -= dq_l``; ``T += -g W dt / c_p + L dq_l / c_p``;
   ``p -= rho_a g W dt``; ``z += W dt``. So ``c_p dT + g dz - L dq_l = 0`` and ``q_v + q_l`` is constant per step.

The vapour coupling is explicit (``S`` is held over the step), which is stable while ``dt < tau_p``: checked before
the run on the initial state and after it on the whole trajectory.

Beyond the note (options of ``Experiment``): a broader initial spectrum (``r_wet_std``) and entrainment of
environmental air at ``entrainment`` (fraction of parcel mass per metre of ascent) with relative humidity ``rh_env``
(isothermal, droplet-free, at the parcel's temperature and pressure), mixed homogeneously (``mixing=0``: droplets are
diluted and all of them feel the drier air) or extreme-inhomogeneously (``mixing=1``: the entrained air is saturated
at once by evaporating a matching fraction of every size class completely, the survivors keep their size).

Layout: ``simulate(experiments, config)`` samples spectra, ``vmap``s one parcel per experiment and ``lax.scan``s
over time (records every ``config.record_every`` s); the scan runs under ``jax.enable_x64(True)`` locally (the
global x64 flag is left alone) and returns NumPy float64 arrays in a ``ParcelResult``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.science.cloud import thermo

RH0_MIN, RH0_MAX = 0.5, 1.02
"""Supported initial relative humidity. Above ~1.02 the explicit vapour coupling of the first steps is no longer
small (a real parcel never gets there: activation caps S at ~1 %); below 0.5 the linearised Koehler curve is far from
the full one (the haze radius would sit near ``r_d``)."""

DRY_FLOOR = 1.05
"""No droplet shrinks below ``DRY_FLOOR * r_d`` (the note's floor of the implicit solve)."""


class Experiment(NamedTuple):
    """Knobs of one parcel run; every field may differ between experiments run together (they are ``vmap``ped).

    Attributes:
      n_c: droplet (super-droplet population) number concentration at the start, per cm^3.
      rh0: initial relative humidity ``e / e_s`` (1.0 = saturated); within [RH0_MIN, RH0_MAX].
      sigma_w: std of the Ornstein-Uhlenbeck updraft fluctuation w', m/s (0 = no turbulence surrogate).
      t_l: Lagrangian time scale of w', s.
      w: mean updraft, m/s (>= 0).
      t0, p0: initial temperature (K) and pressure (Pa).
      kappa: hygroscopicity of the dry aerosol.
      r_wet_mean, r_wet_std, r_wet_min: initial wet radii ~ N(mean, std) clipped at min, m.
      rd_median, rd_sigma_g: dry radii lognormal (median, geometric std).
      entrainment: entrained fraction of parcel mass per metre of ascent, 1/m (0 = adiabatic).
      rh_env: relative humidity of the entrained air.
      mixing: 0 homogeneous, 1 extreme inhomogeneous (only read when entrainment > 0).
      seed: sampling and fluctuation seed.
    """
    n_c: float = 100.0
    rh0: float = 1.0
    sigma_w: float = 0.0
    t_l: float = 1.0
    w: float = 1.0
    t0: float = 293.0
    p0: float = 95000.0
    kappa: float = 0.6
    r_wet_mean: float = 5e-6
    r_wet_std: float = 1e-6
    r_wet_min: float = 1e-6
    rd_median: float = 5e-8
    rd_sigma_g: float = 1.5
    entrainment: float = 0.0
    rh_env: float = 0.8
    mixing: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ParcelConfig:
    """What is shared by all experiments of one run (shapes and the integrator).

    Attributes:
      n_sd: super-droplets per parcel.
      dt: time step, s (must stay below the phase-relaxation time tau_p).
      duration: simulated time, s (height = w * duration).
      record_every: diagnostics (and the radii) are recorded every this many seconds, and at t = 0.
      newton_iters: iterations of the bracketed Newton solve of the implicit r^2 update.
      r_act: radius threshold of "activated" droplets for epsilon, mean radius and c_m, m.
    """
    n_sd: int = 4096
    dt: float = 0.02
    duration: float = 300.0
    record_every: float = 10.0
    newton_iters: int = 12
    r_act: float = 1e-6

    @property
    def steps_per_record(self) -> int:
        return int(round(self.record_every / self.dt))

    @property
    def n_records(self) -> int:
        return int(round(self.duration / self.record_every))

    def validate(self) -> None:
        """Raises ``ValueError`` for an inconsistent configuration."""
        if self.n_sd < 1:
            raise ValueError(f"n_sd must be >= 1, got {self.n_sd}")
        for name in ("dt", "duration", "record_every", "r_act"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ParcelConfig.{name} must be positive and finite, got {value}")
        if self.newton_iters < 1:
            raise ValueError(f"newton_iters must be >= 1, got {self.newton_iters}")
        if abs(self.steps_per_record * self.dt - self.record_every) > 1e-9 * self.record_every:
            raise ValueError(f"record_every={self.record_every} s is not a whole number of steps dt={self.dt} s")
        if abs(self.n_records * self.record_every - self.duration) > 1e-9 * self.duration or self.n_records < 1:
            raise ValueError(f"duration={self.duration} s is not a whole number of records of {self.record_every} s")


@dataclasses.dataclass
class ParcelResult:
    """Outputs of ``simulate`` (NumPy float64; leading axis = experiment, then record).

    Attributes:
      experiments: the inputs, in order.
      config: the shared configuration.
      records: name -> ``[E, R]`` with R = n_records + 1 (t = 0 included): t, z, p, T, qv, ql, S (parcel mean
        supersaturation), S_max (running max of S since t = 0), eps (relative dispersion of activated droplets,
        multiplicity-weighted), r_mean (m), c_m (G <1/r> over activated droplets, cm/s), n_act (activated droplets
        per cm^3), tau_p (s), water_err (max over the record's steps of |q_v + q_l - q_t| with q_t the budgeted
        total water, kg/kg), newton_resid (max relative residual of the implicit solve), dt_over_tau (max over the
        record's steps of dt / tau_p).
      radii: ``[E, R, n_sd]`` wet radii at the records, m.
      xi: ``[E, R, n_sd]`` multiplicities at the records (per kg of dry air).
      dry_radii: ``[E, n_sd]``.
    """
    experiments: list[Experiment]
    config: ParcelConfig
    records: dict[str, np.ndarray]
    radii: np.ndarray
    xi: np.ndarray
    dry_radii: np.ndarray

    def record_index(self, height: float, experiment: int = 0) -> int:
        """The record at ``height`` (m); raises if no record lies within 1e-6 m of it."""
        z = self.records["z"][experiment]
        i = int(np.argmin(np.abs(z - height)))
        if abs(z[i] - height) > 1e-6:
            raise ValueError(f"no record at z = {height} m (records at {z[0]:.1f} .. {z[-1]:.1f} m every "
                             f"{z[1] - z[0] if len(z) > 1 else 0:.1f} m)")
        return i

    def spectrum(self, experiment: int, height: float, bins: np.ndarray) -> np.ndarray:
        """Number concentration per cm^3 in each radius bin (edges in m) at ``height``: the spectrum n(r) dr."""
        i = self.record_index(height, experiment)
        rho = thermo.air_density(self.records["T"][experiment, i], self.records["p"][experiment, i])
        hist, _ = np.histogram(self.radii[experiment, i], bins=bins, weights=self.xi[experiment, i] * rho / 1e6)
        return hist


# ----------------------------------------------------------------------------------------------------------------
# Validation of inputs (host side, before anything compiles).


def validate_experiment(exp: Experiment, config: ParcelConfig, index: int = 0) -> None:
    """Raises ``ValueError`` naming the experiment and the field for a physically impossible or unsupported input."""
    where = f"experiment {index}"
    values = exp._asdict()
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"{where}: {name} must be finite, got {value}")
    positive = ("n_c", "t_l", "t0", "p0", "r_wet_mean", "r_wet_min", "rd_median")
    for name in positive:
        if values[name] <= 0:
            raise ValueError(f"{where}: {name} must be positive, got {values[name]}")
    for name in ("sigma_w", "w", "kappa", "r_wet_std", "entrainment"):
        if values[name] < 0:
            raise ValueError(f"{where}: {name} must be >= 0, got {values[name]}")
    if exp.rd_sigma_g < 1:
        raise ValueError(f"{where}: rd_sigma_g is a geometric std and must be >= 1, got {exp.rd_sigma_g}")
    if not RH0_MIN <= exp.rh0 <= RH0_MAX:
        raise ValueError(f"{where}: rh0={exp.rh0} is outside what the scheme supports [{RH0_MIN}, {RH0_MAX}] "
                         "(explicit vapour coupling above, linearised Koehler curve below)")
    if not 0 <= exp.rh_env <= 1:
        raise ValueError(f"{where}: rh_env={exp.rh_env} must be in [0, 1] (entrained air is not supersaturated)")
    if exp.mixing not in (0, 1):
        raise ValueError(f"{where}: mixing must be 0 (homogeneous) or 1 (extreme inhomogeneous), got {exp.mixing}")
    if not 180.0 <= exp.t0 <= 330.0:
        raise ValueError(f"{where}: t0={exp.t0} K is outside the liquid-cloud range [180, 330] K")
    if not 1e4 <= exp.p0 <= 1.1e5:
        raise ValueError(f"{where}: p0={exp.p0} Pa is outside [1e4, 1.1e5] Pa")
    if exp.entrainment * exp.w * config.dt >= 0.5:
        raise ValueError(f"{where}: entrainment * w * dt = {exp.entrainment * exp.w * config.dt} replaces half the "
                         "parcel in one step; lower dt or the entrainment rate")
    if not 0 <= exp.seed < 2 ** 31:
        raise ValueError(f"{where}: seed must be in [0, 2^31), got {exp.seed}")
    t_top = exp.t0 - thermo.GRAVITY / thermo.C_P * exp.w * config.duration
    if t_top < 180.0:
        raise ValueError(f"{where}: the parcel would cool below 180 K (dry adiabat to z = {exp.w * config.duration} m)")


def validate_spectra(radii: np.ndarray, dry_radii: np.ndarray, xi: np.ndarray) -> None:
    """Raises ``ValueError`` for impossible droplet populations (shapes ``[E, n_sd]``)."""
    if not (radii.shape == dry_radii.shape == xi.shape) or radii.ndim != 2:
        raise ValueError(f"radii, dry_radii and xi must all be [E, n_sd], got {radii.shape}, {dry_radii.shape}, "
                         f"{xi.shape}")
    for name, a in (("radii", radii), ("dry_radii", dry_radii), ("xi", xi)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite")
    if np.any(dry_radii <= 0):
        raise ValueError(f"dry radii must be positive (min {dry_radii.min():.3g} m)")
    if np.any(radii <= 0):
        raise ValueError(f"radii must be positive (min {radii.min():.3g} m)")
    if np.any(xi < 0):
        raise ValueError(f"multiplicities (concentrations) must be >= 0 (min {xi.min():.3g})")
    if np.any(radii < DRY_FLOOR * dry_radii):
        i = np.unravel_index(np.argmin(radii / dry_radii), radii.shape)
        raise ValueError(f"wet radius {radii[i]:.3g} m is below {DRY_FLOOR} x its dry radius {dry_radii[i]:.3g} m "
                         f"at {i}")


def phase_relaxation_time(temperature, pressure, radii, xi):
    """``tau_p = 1 / (A2 4 pi rho_w G sum_i xi_i r_i)`` in s (NumPy or JAX; sums over the last axis; inf without
    droplets)."""
    xp = thermo._xp(radii)
    g = thermo.growth_coefficient(temperature, pressure)
    a2 = thermo.condensation_coefficient(temperature, pressure)
    return 1.0 / (a2 * 4.0 * math.pi * thermo.RHO_W * g * xp.sum(xi * radii, axis=-1))


# ----------------------------------------------------------------------------------------------------------------
# The implicit growth step (pure jnp; call under jax.enable_x64).


def implicit_growth(r, dry_radius, kappa, saturation, g, a, dt, iterations: int, k3_pow=None):
    """Backward-Euler radius update ``x`` of ``x^2 = r^2 + 2 G dt (S - A/x + kappa r_d^3 / x^3)``, ``x >= 1.05 r_d``.

    With ``y = x^2``, ``b = r^2 + 2 G dt S``, ``c = G dt`` and ``k3 = kappa r_d^3`` the update is the root of
    ``H(y) = y^(3/2) (y - b) + 2 c A y - 2 c k3`` (the equation times ``y^(3/2)``). ``H`` is increasing and convex
    wherever ``y > max(b, 0) / 5``, which holds at the root, so Newton's method converges from either side (a step
    from the left lands right of the root, then it descends monotonically). It starts from
    ``min(r^2, max(b, 0) + (2 c k3)^(2/5), (2 c k3 / -b)^(2/3) if b < 0)``: ``r^2`` for growing droplets and the
    other two (upper bounds of the root) for evaporating ones, so a droplet drying to haze starts within a small
    factor of its root. The bracket ``[lo, hi]`` is tracked from the signs of ``H``: a step past ``hi`` restarts from
    ``hi``, a step below ``lo`` (or with ``H' <= 0``, outside the convex region) bisects it geometrically (a droplet
    that evaporates back through its Koehler maximum in one step can land decades below ``r^2``).
    A root below the floor ``(1.05 r_d)^2`` returns ``1.05 r_d``. All arguments broadcast.

    Returns:
      ``(x, residual)``: new radii and the relative residual ``|F(y)| / max(y, |b|)`` of the returned solution,
      ``F = H / y^(3/2)`` the update equation itself (0 where the floor is active).

    ``k3_pow``: optional precomputed ``(kappa r_d^3)^(2/5)`` (the parcel passes it; it is constant per droplet).
    """
    c = g * dt
    k3 = kappa * dry_radius ** 3
    r2 = r * r
    b = r2 + 2.0 * c * saturation
    ck3 = 2.0 * c * k3
    ca = 2.0 * c * a

    def h_and_hp(y):
        sy = jnp.sqrt(y)
        h = y * sy * (y - b) + ca * y - ck3
        hp = sy * (2.5 * y - 1.5 * b) + ca
        return h, hp

    floor = (DRY_FLOOR * dry_radius) ** 2 + 0.0 * r2
    bplus = jnp.maximum(b, 0.0)
    # Upper bounds of the root (cube roots are cheaper than general powers).
    if k3_pow is None:
        k3_pow = k3 ** 0.4
    upper = bplus + (2.0 * c) ** 0.4 * k3_pow
    cb = jnp.cbrt(ck3 / jnp.maximum(-b, 1e-300))
    upper = jnp.where(b < 0, jnp.minimum(upper, cb * cb), upper)
    hi = jnp.maximum(jnp.maximum(upper, floor), r2)
    y = jnp.maximum(jnp.minimum(r2, upper), floor)
    lo = floor

    def body(_, carry):
        y, lo, hi = carry
        h, hp = h_and_hp(y)
        lo = jnp.where(h < 0, y, lo)
        hi = jnp.where(h > 0, y, hi)
        newton = jnp.minimum(y - h / hp, hi)  # past hi (an upper bound): restart the monotone descent from hi
        ok = (hp > 0) & (newton >= lo)
        return jnp.where(ok, newton, jnp.sqrt(lo * hi)), lo, hi  # geometric bisection: the bracket spans decades

    y, _, _ = jax.lax.fori_loop(0, iterations, body, (y, lo, hi))
    y = jnp.maximum(y, floor)
    h, _ = h_and_hp(y)
    floored = (y <= floor) & (h >= 0)
    residual = jnp.where(floored, 0.0, jnp.abs(h) / (y * jnp.sqrt(y) * jnp.maximum(y, jnp.abs(b))))
    return jnp.sqrt(y), residual


def grow(radii, dry_radii, kappa, saturation, temperature, pressure, dt, steps: int, iterations: int = 8):
    """``steps`` implicit growth steps at constant ``S``, ``T``, ``p`` (no parcel feedback); NumPy float64 in and out.

    The single-droplet limit of the model (tests: ``r^2 = r0^2 + 2 G S t`` when the Koehler terms vanish; relaxation
    to the haze equilibrium radius below saturation).
    """
    with jax.enable_x64(True):
        f64 = functools.partial(jnp.asarray, dtype=jnp.float64)
        r, rd, kap, s = f64(radii), f64(dry_radii), f64(kappa), f64(saturation)
        g = thermo.growth_coefficient(f64(temperature), f64(pressure))
        a = thermo.kelvin_coefficient(f64(temperature))

        @jax.jit
        def run(r):
            def body(r, _):
                x, _ = implicit_growth(r, rd, kap, s, g, a, dt, iterations)
                return x, None

            return jax.lax.scan(body, r, None, length=steps)[0]

        return np.asarray(run(r))


# ----------------------------------------------------------------------------------------------------------------
# Initial spectra.


def initial_spectra(experiments: Sequence[Experiment], config: ParcelConfig):
    """Samples ``(radii, dry_radii, xi)``, each ``[E, n_sd]`` float64 NumPy, from the experiments' distributions.

    Wet radii ~ N(r_wet_mean, r_wet_std) clipped at ``max(r_wet_min, 1.05 r_d)``; dry radii lognormal; all
    super-droplets carry the same multiplicity ``n_c * 1e6 / rho_a(t0, p0) / n_sd`` per kg of dry air. A pure
    function of each experiment's seed.
    """
    radii, dry, xi = [], [], []
    for exp in experiments:
        rng = np.random.default_rng([exp.seed, 0])
        rd = exp.rd_median * np.exp(np.log(exp.rd_sigma_g) * rng.standard_normal(config.n_sd))
        r = exp.r_wet_mean + exp.r_wet_std * rng.standard_normal(config.n_sd)
        r = np.maximum(r, np.maximum(exp.r_wet_min, DRY_FLOOR * rd))
        rho = thermo.air_density(exp.t0, exp.p0)
        radii.append(r)
        dry.append(rd)
        xi.append(np.full(config.n_sd, exp.n_c * 1e6 / rho / config.n_sd))
    return np.stack(radii), np.stack(dry), np.stack(xi)


# ----------------------------------------------------------------------------------------------------------------
# The parcel (pure jnp inside; one experiment, vmapped by the caller).

PARAM_FIELDS = tuple(f for f in Experiment._fields if f != "seed")


class _State(NamedTuple):
    t: Any
    z: Any
    p: Any
    T: Any
    qv: Any
    qt: Any  # budgeted total water (changes only by entrainment)
    r: Any
    xi: Any
    wp: Any  # w' per droplet
    sp: Any  # s' per droplet
    key: Any


def _moments(r, xi, r_act):
    """Multiplicity-weighted mean radius, relative dispersion and <1/r> of droplets with r > r_act, and their count."""
    w = jnp.where(r > r_act, xi, 0.0)
    n = jnp.sum(w)
    safe = jnp.maximum(n, 1e-300)
    mean = jnp.sum(w * r) / safe
    var = jnp.sum(w * (r - mean) ** 2) / safe
    inv = jnp.sum(w / r) / safe
    valid = n > 0
    nan = jnp.nan
    return (jnp.where(valid, mean, nan), jnp.where(valid, jnp.sqrt(var) / mean, nan), jnp.where(valid, inv, nan), n)


def _liquid(r, rd, xi):
    """Liquid water mixing ratio ``(4 pi rho_w / 3) sum xi (r^3 - r_d^3)`` (kg/kg)."""
    return thermo.FOUR_PI_RHO_W_3 * jnp.sum(xi * (r ** 3 - rd ** 3))


def _diagnostics(st: _State, rd, cfg: ParcelConfig):
    mean, eps, inv, n = _moments(st.r, st.xi, cfg.r_act)
    g = thermo.growth_coefficient(st.T, st.p)
    rho = thermo.air_density(st.T, st.p)
    return {
        "t": st.t, "z": st.z, "p": st.p, "T": st.T, "qv": st.qv, "ql": _liquid(st.r, rd, st.xi),
        "S": thermo.supersaturation(st.qv, st.T, st.p), "eps": eps, "r_mean": mean,
        "c_m": g * inv * 100.0, "n_act": n * rho / 1e6,
        "tau_p": phase_relaxation_time(st.T, st.p, st.r, st.xi),
    }


def _step(st: _State, prm: Mapping[str, Any], rd, k3_pow, cfg: ParcelConfig, mix: bool):
    """One time step; returns the new state and (S, |water error|, newton residual, dt/tau_p) of this step.

    ``k3_pow = (kappa r_d^3)^(2/5)`` per droplet; ``mix``: whether the entrainment block is traced at all.
    """
    dt = cfg.dt
    key, k_w = jax.random.split(st.key)
    s_mean = thermo.supersaturation(st.qv, st.T, st.p)
    g = thermo.growth_coefficient(st.T, st.p)
    a = thermo.kelvin_coefficient(st.T)
    a1 = thermo.updraft_coefficient(st.T)
    relax = 1.0 / phase_relaxation_time(st.T, st.p, st.r, st.xi)  # 1 / tau_p (0 once every droplet is gone)

    # 1. Turbulence surrogate: OU updraft fluctuation and the supersaturation fluctuation it drives.
    decay_w = jnp.exp(-dt / prm["t_l"])
    noise = jax.random.normal(k_w, st.r.shape, jnp.float32).astype(jnp.float64)  # float32 draws: half the cost
    wp = decay_w * st.wp + prm["sigma_w"] * jnp.sqrt(1.0 - decay_w ** 2) * noise
    x_s = dt * relax
    phi = jnp.where(x_s > 1e-8, -jnp.expm1(-x_s) / jnp.maximum(x_s, 1e-300), 1.0 - 0.5 * x_s)  # (1 - e^-x) / x
    sp = jnp.exp(-x_s) * st.sp + a1 * wp * dt * phi

    # 2. Implicit growth of every droplet at its local supersaturation.
    x, resid = implicit_growth(st.r, rd, prm["kappa"], s_mean + sp, g, a, dt, cfg.newton_iters, k3_pow)
    dv = (x - st.r) * (x * x + x * st.r + st.r * st.r)  # x^3 - r^3 without cancellation
    dql = thermo.FOUR_PI_RHO_W_3 * jnp.sum(st.xi * dv)

    # 3. Vapour and latent-heat feedback, adiabatic ascent.
    rho = thermo.air_density(st.T, st.p)
    qv = st.qv - dql
    temp = st.T - thermo.GRAVITY * prm["w"] * dt / thermo.C_P + thermo.L_V * dql / thermo.C_P
    p = st.p - rho * thermo.GRAVITY * prm["w"] * dt
    z = st.z + prm["w"] * dt
    xi, qt = st.xi, st.qt

    # 4. Optional entrainment of droplet-free air at the parcel's T and p (fraction f of the parcel's mass).
    if mix:
        f = prm["entrainment"] * prm["w"] * dt
        qv_env = thermo.mixing_ratio_at(prm["rh_env"], temp, p)
        ql_now = _liquid(x, rd, xi)
        qv = (1.0 - f) * qv + f * qv_env
        xi = (1.0 - f) * xi
        qt = (1.0 - f) * qt + f * qv_env
        # Extreme inhomogeneous: evaporate whole droplets (every size class alike) until the entrained air is saturated;
        # the saturation deficit is shared between vapour gained and cooling (the usual saturation-adjustment factor).
        qvs = thermo.saturation_mixing_ratio(temp, p)
        gamma = 1.0 + thermo.L_V ** 2 * qvs / (thermo.C_P * thermo.R_V * temp ** 2)
        need = jnp.maximum(f * (qvs - qv_env) / gamma, 0.0)
        evap = jnp.where(prm["mixing"] > 0.5, jnp.minimum(need, (1.0 - f) * ql_now), 0.0)
        fraction_left = 1.0 - evap / jnp.maximum((1.0 - f) * ql_now, 1e-300)
        xi = xi * fraction_left
        qv = qv + evap
        temp = temp - thermo.L_V * evap / thermo.C_P

    new = _State(st.t + dt, z, p, temp, qv, qt, x, xi, wp, sp, key)
    water_err = jnp.abs(qv + _liquid(x, rd, xi) - qt)
    return new, (s_mean, water_err, jnp.max(resid), x_s)


def _simulate_one(prm: Mapping[str, Any], key, r0, rd, xi0, cfg: ParcelConfig, mix: bool):
    """One parcel: returns (records dict [R], radii [R, n_sd], xi [R, n_sd])."""
    qv0 = thermo.mixing_ratio_at(prm["rh0"], prm["t0"], prm["p0"])
    zero = jnp.zeros((), jnp.float64)
    st = _State(zero, zero, prm["p0"], prm["t0"], qv0, qv0 + _liquid(r0, rd, xi0), r0, xi0,
                jnp.zeros_like(r0), jnp.zeros_like(r0), key)
    # Start w' in its stationary distribution (s' starts at 0 and spins up within tau_p).
    key, k0 = jax.random.split(key)
    st = st._replace(key=key, wp=prm["sigma_w"] * jax.random.normal(k0, r0.shape, jnp.float64))
    first = _diagnostics(st, rd, cfg)
    k3_pow = (prm["kappa"] * rd ** 3) ** 0.4
    first.update(S_max=first["S"], water_err=jnp.abs(st.qv + first["ql"] - st.qt), newton_resid=zero,
                 dt_over_tau=cfg.dt / first["tau_p"])

    def record(carry, _):
        st, s_max = carry

        def inner(c, _):
            st, s_max, werr, resid, ratio = c
            st, (s, e, res, rat) = _step(st, prm, rd, k3_pow, cfg, mix)
            return (st, jnp.maximum(s_max, s), jnp.maximum(werr, e), jnp.maximum(resid, res),
                    jnp.maximum(ratio, rat)), None

        (st, s_max, werr, resid, ratio), _ = jax.lax.scan(inner, (st, s_max, zero, zero, zero), None,
                                                          length=cfg.steps_per_record)
        s_max = jnp.maximum(s_max, thermo.supersaturation(st.qv, st.T, st.p))
        d = _diagnostics(st, rd, cfg)
        d.update(S_max=s_max, water_err=werr, newton_resid=resid, dt_over_tau=ratio)
        return (st, s_max), (d, st.r, st.xi)

    _, (recs, radii, xis) = jax.lax.scan(record, (st, first["S"]), None, length=cfg.n_records)
    recs = {k: jnp.concatenate([first[k][None], v]) for k, v in recs.items()}
    return recs, jnp.concatenate([r0[None], radii]), jnp.concatenate([xi0[None], xis])


@functools.partial(jax.jit, static_argnames=("cfg", "mix"))
def _simulate_batch(prm, seeds, r0, rd, xi0, cfg: ParcelConfig, mix: bool):

    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(seeds)
    return jax.vmap(lambda p, k, a, b, c: _simulate_one(p, k, a, b, c, cfg, mix))(prm, keys, r0, rd, xi0)


def simulate(experiments: Sequence[Experiment] | Experiment, config: ParcelConfig = ParcelConfig(),
             spectra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
             check_stability: bool = True) -> ParcelResult:
    """Runs every experiment as one ``vmap``ped, ``jit``ted parcel simulation (float64).

    Args:
      experiments: one ``Experiment`` or a sequence (run together; all share ``config``).
      config: shapes and integrator settings.
      spectra: optional explicit initial ``(radii, dry_radii, xi)``, each ``[E, n_sd]`` (m, m, per kg of dry air);
        default: ``initial_spectra(experiments, config)``. With explicit spectra, ``n_c`` and the radius
        distribution fields of the experiments are not used.
      check_stability: raise ``ValueError`` after the run if any step had ``dt >= tau_p``, negative vapour or a
        non-finite state (the explicit vapour coupling went unstable).

    Raises:
      ValueError: physically impossible or unsupported inputs (named), a time step not below the initial
        phase-relaxation time, or (``check_stability``) an unstable trajectory.
    """
    if isinstance(experiments, Experiment):
        experiments = [experiments]
    experiments = list(experiments)
    if not experiments:
        raise ValueError("no experiments given")
    config.validate()
    for i, exp in enumerate(experiments):
        validate_experiment(exp, config, i)
    r0, rd, xi0 = initial_spectra(experiments, config) if spectra is None else (
        np.asarray(a, np.float64) for a in spectra)
    validate_spectra(r0, rd, xi0)
    if r0.shape != (len(experiments), config.n_sd):
        raise ValueError(f"spectra must be [E={len(experiments)}, n_sd={config.n_sd}], got {r0.shape}")
    for i, exp in enumerate(experiments):
        tau0 = phase_relaxation_time(exp.t0, exp.p0, r0[i], xi0[i])
        if not config.dt < tau0:
            raise ValueError(f"experiment {i}: dt={config.dt} s is not below the initial phase-relaxation time "
                             f"tau_p={tau0:.3g} s; the explicit vapour coupling would be unstable; lower dt")

    prm = {f: np.array([float(getattr(e, f)) for e in experiments], np.float64) for f in PARAM_FIELDS}
    seeds = np.array([e.seed for e in experiments], np.uint32)
    with jax.enable_x64(True):
        f64 = functools.partial(jnp.asarray, dtype=jnp.float64)
        out = _simulate_batch({k: f64(v) for k, v in prm.items()}, jnp.asarray(seeds), f64(r0), f64(rd), f64(xi0),
                              config, any(e.entrainment > 0 for e in experiments))
        recs, radii, xis = jax.tree.map(np.asarray, out)
    result = ParcelResult(experiments, config, recs, radii, xis, rd)
    if check_stability:
        check_trajectory(result)
    return result


def check_trajectory(result: ParcelResult) -> None:
    """Raises ``ValueError`` naming the experiments whose run was unstable or left the physical range."""
    rec = result.records
    bad = []
    for i in range(len(result.experiments)):
        state = np.concatenate([rec[k][i] for k in ("z", "p", "T", "qv", "ql")] + [result.radii[i].ravel()])
        if not np.all(np.isfinite(state)):
            bad.append(f"experiment {i}: non-finite state")
        elif np.max(rec["dt_over_tau"][i]) >= 1.0:
            bad.append(f"experiment {i}: dt / tau_p reached {np.max(rec['dt_over_tau'][i]):.3g} >= 1 "
                       "(explicit vapour coupling unstable; lower dt)")
        elif np.min(rec["qv"][i]) < 0:
            bad.append(f"experiment {i}: vapour mixing ratio became negative")
    if bad:
        raise ValueError("unstable parcel run: " + "; ".join(bad))
