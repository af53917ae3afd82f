"""experiments/cloud_growth.py at a tiny size: the grid's table, fits, plots and run cache; bench helpers."""

import json
import os

import numpy as np

from experiments import bench_cloud_pysdm, cloud_growth
from sqattn.science.cloud import ParcelConfig


def test_grid_tables_plots_and_cache(tmp_path):
    # The config and batch of tests/sqattn/science/cloud's COARSE runs: no extra compile when run in one session.
    cfg = ParcelConfig(n_sd=256, dt=0.1, duration=60.0, record_every=20.0)
    workdir = str(tmp_path)
    args = (cfg, 1, [100.0, 400.0, 1200.0], [1.0], [0.0], 3, workdir, [0.0, 20.0, 60.0])
    out = cloud_growth.grid(*args)
    assert out["runs_simulated_now"] == 3 and len(out["rows"]) == 3
    eps = [out["eps_table"][f"N_c={n}"]["RH0=1"][0] for n in (100, 400, 1200)]
    assert eps[0] < eps[1] < eps[2]
    assert out["fits_eps_vs_nc"]["RH0=1,sigma_w=0"]["b_per_cm3"] > 0
    assert out["conservation"]["water_err_max_kg_kg"] < 1e-15
    for name in ("eps_vs_nc.png", "spectra.png", "eps_vs_height.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    json.dumps(out)
    again = cloud_growth.grid(*args)
    assert again["runs_simulated_now"] == 0 and again["rows"] == out["rows"]


def test_linear_fit_and_moments():
    fit = cloud_growth.linear_fit([100, 200, 400], [0.05, 0.07, 0.11])
    assert abs(fit["a"] - 0.03) < 1e-12 and abs(fit["b_per_cm3"] - 2e-4) < 1e-15 and abs(fit["r2"] - 1) < 1e-12
    r = np.array([0.5e-6, 4e-6, 6e-6])
    mean, eps = bench_cloud_pysdm.moments(r, np.array([10.0, 1.0, 1.0]))  # the haze droplet is not counted
    assert abs(mean - 5e-6) < 1e-18 and abs(eps - 0.2) < 1e-12
