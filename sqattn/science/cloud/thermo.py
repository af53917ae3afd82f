"""Thermodynamics of diffusional droplet growth (SI units throughout).

Constants and closures of ``../shared/papers/cloud_diffusional_growth.md``: constant latent heat, Bolton (1980)
saturation vapour pressure over water, ``K_a = 1e-3 (4.39 + 0.071 T)``, ``D_v = 2.11e-5 (T/273.15)^1.94 (101325/p)``,
Maxwell-Mason growth coefficient ``G = 1 / (F_k + F_d)`` and linearised kappa-Koehler equilibrium
``S_eq(r) = A/r - kappa r_d^3 / r^3`` with ``A = 2 sigma_w / (rho_w R_v T)``. Supersaturation ``S`` is a fraction
(0.003 = 0.3 %); ``q_v`` is the vapour mixing ratio in kg per kg of dry air.

Every function takes NumPy or JAX arrays (inside ``jit`` too) and returns the same kind; call the JAX path under
``jax.enable_x64(True)`` (float32 is not accurate enough for ``r^3`` budgets, see the note's pitfalls).
"""

from __future__ import annotations

import math

import numpy as np

L_V = 2.5e6  # latent heat of vaporisation, J/kg (constant)
R_V = 461.5  # gas constant of water vapour, J/kg/K
R_D = 287.04  # gas constant of dry air, J/kg/K
C_P = 1005.0  # specific heat of dry air at constant pressure, J/kg/K
RHO_W = 1000.0  # density of liquid water, kg/m^3
EPS = R_D / R_V  # ~0.622
GRAVITY = 9.81  # m/s^2
SIGMA_W = 0.072  # surface tension of water, N/m
FOUR_PI_RHO_W_3 = 4.0 * math.pi * RHO_W / 3.0  # liquid mass per r^3, kg/m^3


def _xp(*arrays):
    """``jax.numpy`` if any argument is a JAX array (or tracer), else NumPy."""
    for a in arrays:
        if type(a).__module__.startswith("jax"):
            import jax.numpy as jnp

            return jnp
    return np


def saturation_vapour_pressure(temperature):
    """``e_s(T)`` over liquid water in Pa (Bolton 1980)."""
    xp = _xp(temperature)
    return 611.2 * xp.exp(17.67 * (temperature - 273.15) / (temperature - 29.65))


def saturation_mixing_ratio(temperature, pressure):
    """``q_vs = eps e_s / (p - e_s)`` in kg/kg."""
    es = saturation_vapour_pressure(temperature)
    return EPS * es / (pressure - es)


def vapour_pressure(q_v, pressure):
    """Vapour pressure ``e = q_v p / (eps + q_v)`` in Pa from the mixing ratio."""
    return q_v * pressure / (EPS + q_v)


def supersaturation(q_v, temperature, pressure):
    """``S = e / e_s(T) - 1`` (a fraction)."""
    return vapour_pressure(q_v, pressure) / saturation_vapour_pressure(temperature) - 1.0


def mixing_ratio_at(relative_humidity, temperature, pressure):
    """The mixing ratio at a relative humidity ``e / e_s`` (1.0 = saturated)."""
    e = relative_humidity * saturation_vapour_pressure(temperature)
    return EPS * e / (pressure - e)


def air_density(temperature, pressure):
    """Dry-air density ``p / (R_d T)`` in kg/m^3 (the parcel's hydrostatic and number-concentration density)."""
    return pressure / (R_D * temperature)


def thermal_conductivity(temperature):
    """``K_a`` of air in W/m/K."""
    return 1e-3 * (4.39 + 0.071 * temperature)


def vapour_diffusivity(temperature, pressure):
    """``D_v`` of water vapour in air in m^2/s."""
    return 2.11e-5 * (temperature / 273.15) ** 1.94 * (101325.0 / pressure)


def growth_coefficient(temperature, pressure):
    """Maxwell-Mason ``G = 1 / (F_k + F_d)`` in m^2/s, so that ``r dr/dt = G (S - S_eq)``."""
    f_k = (L_V / (R_V * temperature) - 1.0) * L_V * RHO_W / (thermal_conductivity(temperature) * temperature)
    f_d = RHO_W * R_V * temperature / (vapour_diffusivity(temperature, pressure)
                                       * saturation_vapour_pressure(temperature))
    return 1.0 / (f_k + f_d)


def kelvin_coefficient(temperature):
    """Curvature coefficient ``A = 2 sigma_w / (rho_w R_v T)`` in m (~1.1e-9 m at 283 K)."""
    return 2.0 * SIGMA_W / (RHO_W * R_V * temperature)


def updraft_coefficient(temperature):
    """``A1 = g / (R_d T) (L R_d / (c_p R_v T) - 1)`` in 1/m: adiabatic supersaturation production per metre."""
    return GRAVITY / (R_D * temperature) * (L_V * R_D / (C_P * R_V * temperature) - 1.0)


def condensation_coefficient(temperature, pressure):
    """``A2 = 1 / q_vs + L^2 / (c_p R_v T^2)`` (dimensionless): ``dS/dt = A1 W - A2 dq_l/dt``."""
    return 1.0 / saturation_mixing_ratio(temperature, pressure) + L_V ** 2 / (C_P * R_V * temperature ** 2)


def equilibrium_supersaturation(radius, dry_radius, kappa, temperature):
    """Linearised kappa-Koehler ``S_eq(r) = A/r - kappa r_d^3 / r^3``."""
    return kelvin_coefficient(temperature) / radius - kappa * dry_radius ** 3 / radius ** 3


def critical_radius(dry_radius, kappa, temperature):
    """Radius of the Koehler maximum, ``sqrt(3 kappa r_d^3 / A)``."""
    xp = _xp(dry_radius)
    return xp.sqrt(3.0 * kappa * dry_radius ** 3 / kelvin_coefficient(temperature))


def critical_supersaturation(dry_radius, kappa, temperature):
    """The Koehler maximum ``S_c = (2/3) A / r_c`` (a fraction)."""
    return 2.0 * kelvin_coefficient(temperature) / (3.0 * critical_radius(dry_radius, kappa, temperature))


def equilibrium_radius(saturation, dry_radius, kappa, temperature, iterations: int = 200):
    """Haze equilibrium radius: the root of ``S_eq(r) = S`` below the critical radius (NumPy, float64).

    ``S_eq`` increases monotonically on ``(0, r_c)``, so bisection in ``log r`` followed by Newton polishing finds the
    unique root. Raises ``ValueError`` where ``S`` is at or above the critical supersaturation (no haze state).
    """
    s = np.asarray(saturation, np.float64)
    rd = np.asarray(dry_radius, np.float64)
    kappa = np.asarray(kappa, np.float64)
    temperature = np.asarray(temperature, np.float64)
    s, rd, kappa, temperature = np.broadcast_arrays(s, rd, kappa, temperature)
    if np.any(rd <= 0) or np.any(kappa <= 0):
        raise ValueError("equilibrium_radius needs positive dry radii and kappa")
    s_c = critical_supersaturation(rd, kappa, temperature)
    if np.any(s >= s_c):
        raise ValueError(f"supersaturation {np.max(s - s_c) + s_c.min():.3g} is at or above the critical "
                         f"supersaturation ({s_c.min():.3g} for the smallest kappa r_d^3): no haze equilibrium")
    lo = np.log(rd * 1e-3)
    hi = np.log(critical_radius(rd, kappa, temperature))
    for _ in range(iterations):  # S_eq(exp(mid)) - S changes sign once on (lo, hi)
        mid = 0.5 * (lo + hi)
        above = equilibrium_supersaturation(np.exp(mid), rd, kappa, temperature) > s
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    r = np.exp(0.5 * (lo + hi))
    a = kelvin_coefficient(temperature)
    for _ in range(3):
        f = a / r - kappa * rd ** 3 / r ** 3 - s
        fp = -a / r ** 2 + 3 * kappa * rd ** 3 / r ** 4
        r = r - f / fp
    return r
