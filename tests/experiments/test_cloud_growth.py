"""experiments/cloud_growth.py at a tiny size: the grid's table, fits, plots and run cache; bench helpers."""

import json
import os

import numpy as np

from experiments import bench_cloud_pysdm, cloud_growth
from sqattn.science.cloud import ParcelConfig


def test_grid_tables_plots_and_cache(tmp_path):
    cfg = ParcelConfig(n_sd=16, dt=0.1, duration=1.0, record_every=0.5)
    workdir = str(tmp_path)
    out = cloud_growth.grid(cfg, 1, [100.0, 400.0], [1.0], [0.0, 0.5], 4, workdir, [0.0, 0.5, 1.0])
    assert out["runs_simulated_now"] == 4 and len(out["rows"]) == 4
    assert set(out["eps_table"]) == {"N_c=100", "N_c=400"} and len(out["eps_table"]["N_c=100"]["RH0=1"]) == 2
    assert out["conservation"]["water_err_max_kg_kg"] < 1e-15
    for name in ("eps_vs_nc.png", "spectra.png", "eps_vs_height.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    json.dumps(out)
    again = cloud_growth.grid(cfg, 1, [100.0, 400.0], [1.0], [0.0, 0.5], 4, workdir, [0.0, 0.5, 1.0])
    assert again["runs_simulated_now"] == 0 and again["rows"] == out["rows"]


def test_linear_fit_and_moments():
    fit = cloud_growth.linear_fit([100, 200, 400], [0.05, 0.07, 0.11])
    assert abs(fit["a"] - 0.03) < 1e-12 and abs(fit["b_per_cm3"] - 2e-4) < 1e-15 and abs(fit["r2"] - 1) < 1e-12
    r = np.array([0.5e-6, 4e-6, 6e-6])
    mean, eps = bench_cloud_pysdm.moments(r, np.array([10.0, 1.0, 1.0]))  # the haze droplet is not counted
    assert abs(mean - 5e-6) < 1e-18 and abs(eps - 0.2) < 1e-12
