"""The bearing experiment end to end on a tiny budget: JSON + PNG, the forest paths, the latency tables (the MLP's
training through the trainer and its resume are tested in tests/sqattn/science/bearing/test_task.py; here it is
left out to keep the test cheap)."""

import json
import os

import pytest

from experiments import bearing


def test_tiny_run_writes_every_table(tmp_path):
    pytest.importorskip("sklearn", reason="pip install scikit-learn")
    out = bearing.run(str(tmp_path), noises=[0.05], splits=["record"], envelopes=[True], records=2, seconds=0.35,
                      trees=5, mlp=False, batch_sizes=[1, 3], repeats=6, stream_windows=3)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert os.path.exists(out["plot"]) and saved["settings"]["batch_sizes"] == [1, 3]
    rows = saved["accuracy"]
    assert [r["classifier"] for r in rows] == ["rf"]
    for r in rows:
        assert r["n_test"] == 32 and sum(map(sum, r["confusion"])) == 32 and 0 <= r["macro_f1"] <= 1
    lat = saved["latency"]
    for b in ("1", "3"):
        assert lat["batches"][b]["rf_max_abs_diff"] <= 1e-6          # compiled forest == scikit-learn
        assert {"features", "sklearn_rf", "jax_rf", "sklearn_rf_classify", "jax_rf_classify"} == set(
            lat["batches"][b]) - {"rf_max_abs_diff"}
        assert lat["batches"][b]["jax_rf"]["n"] == (6 if b == "1" else 5)
    assert set(lat["alpha"]) == set(lat["links"]) == {"sklearn_rf", "jax_rf"}
    six_g = lat["links"]["jax_rf"]["6G"]["p50"]
    assert six_g["proc"] == lat["batches"]["1"]["jax_rf"]["p50_ms"]
    assert six_g["total"] == pytest.approx(six_g["proc"] + 0.3 + 0.00066, abs=1e-4)
    assert lat["stream"]["jax_rf"]["twin"]["windows"] == 3
    assert lat["links_stream"]["jax_rf"]["5G"]["p99"]["proc"] == lat["stream"]["jax_rf"]["stages"]["total"]["p99_ms"]
    assert "sklearn_rf" in bearing.link_table(lat, "links_stream")
    assert "| 0.05 | record | 18 | rf |" in bearing.accuracy_table(rows)
    assert f"| 0.05 | record | {rows[0]['accuracy']:.3f} / " in bearing.accuracy_pivot(rows)
    assert bearing.latency_table(lat).count("\n") == 3 and "6G" in bearing.link_table(lat)
