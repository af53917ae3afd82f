"""experiments/scaling.py at a tiny size: a 5-shard sweep of task A through the trainer, fits, holdout, plot."""

import json
import os

from experiments import scaling as exp


def test_part_a_sweep_fits_and_plot(tmp_path, capsys):
    opts = exp.settings(shard_min=5, shard_max=9, widths=["4"], seeds=["0"], min_steps=4, max_steps=4, n_eval=64,
                        bootstrap=20, holdout=2)
    rec = exp.run_part(opts, "A", str(tmp_path))
    assert [r["m"] for r in rec["records"]] == [32, 64, 128, 256, 512] and not rec["failed"]
    assert all(r["steps"] == 4 and r["n_params"] > 0 for r in rec["records"])
    f = rec["fits"]["none"]
    assert f["ours"]["beta_ci"][0] <= f["ours"]["beta"] <= f["ours"]["beta_ci"][1]
    assert abs(f["curve_fit"]["log"]["beta"] - f["ours"]["beta"]) <= 1e-6 * max(1, abs(f["ours"]["beta"]))
    assert len(rec["holdout"]["none"]["rel_err"]) == 2
    assert os.path.getsize(exp.plot("A", rec, os.path.join(tmp_path, "a.png"))) > 0
    exp.print_part("A", rec)
    json.dumps(rec, default=float)
    again = exp.run_part(opts, "A", str(tmp_path))
    assert [r["status"] for r in again["records"]] == ["reused"] * 5
    assert "| 512 |" in capsys.readouterr().out
