"""Lagrangian droplet diffusional growth: an adiabatic super-droplet parcel in float64 JAX.

``thermo``: constants and closures (G, A, A1, A2, e_s, Koehler); ``parcel``: the model (``Experiment``,
``ParcelConfig``, ``simulate``). Specification: ``../shared/papers/cloud_diffusional_growth.md``; the grid and the
PySDM side by side are ``experiments/cloud_growth.py`` and ``experiments/bench_cloud_pysdm.py``.
"""

from sqattn.science.cloud import thermo
from sqattn.science.cloud.parcel import (Experiment, ParcelConfig, ParcelResult, grow, implicit_growth,
                                         initial_spectra, simulate)

__all__ = ["Experiment", "ParcelConfig", "ParcelResult", "grow", "implicit_growth", "initial_spectra", "simulate",
           "thermo"]
