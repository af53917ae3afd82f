"""experiments/bench_mixers.py: record structure, slopes from the recorded data, skips with reasons (no timing
assertions: the machine is shared)."""

import json
import math
import os

import numpy as np
import pytest

from experiments import bench_mixers


@pytest.fixture(scope="module")
def record():
    return bench_mixers.run(mixers=("attention", "gla"), lengths=(64, 128), tokens=256, d_model=32, num_heads=2,
                            warmup=1, repeats=2, max_seconds=60.0, max_memory_gb=1.0, sse_sweep=False,
                            speedup=True, speedup_length=64, speedup_families=("gla",))


def test_record_structure_and_positive_measurements(record):
    st = record["settings"]
    assert st["lengths"] == [64, 128] and st["tokens"] == 256 and st["dtype"] == "bfloat16"
    assert set(record["mixers"]) == {"attention", "gla"}
    assert record["load_avg"]["start"] and record["load_avg"]["end"] and record["elapsed_s"] > 0
    for name, m in record["mixers"].items():
        assert m["available"] and m["params"] > 0 and m["cfg"]["num_heads"] == 2
        assert [p["length"] for p in m["points"]] == [64, 128]
        for p in m["points"]:
            assert "skipped" not in p, p
            assert p["batch"] == 256 // p["length"] and p["tokens"] == 256
            assert p["time_s"] > 0 and len(p["times_s"]) == 2 and p["time_s"] == np.median(p["times_s"])
            mem = p["memory"]
            assert mem["total_bytes"] == mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"] > 0
            # the arguments hold at least x [b, T, d] in bf16 and the parameters in f32
            assert mem["argument_bytes"] >= p["batch"] * p["length"] * 32 * 2 + m["params"] * 4
    json.dumps(record)   # JSON-able


def test_slopes_are_fitted_on_the_recorded_points(record):
    for m in record["mixers"].values():
        # Two points: the log-log slope is (log y2 - log y1) / (log T2 - log T1), by hand, not by a fit.
        (p1, p2) = m["points"]
        def two_point(y1, y2):
            return math.log(y2 / y1) / math.log(p2["length"] / p1["length"])
        assert m["time_slope"] == pytest.approx(two_point(p1["time_s"], p2["time_s"]), rel=1e-9)
        assert m["time_per_seq_slope"] == pytest.approx(
            two_point(p1["time_s"] / p1["batch"], p2["time_s"] / p2["batch"]), rel=1e-9)
        # At fixed tokens, a per-sequence time is the total time times T / tokens: slope + 1 exactly.
        assert m["time_per_seq_slope"] == pytest.approx(m["time_slope"] + 1.0, rel=1e-9)
        assert m["memory_slope"] == pytest.approx(
            two_point(p1["memory"]["total_bytes"], p2["memory"]["total_bytes"]), rel=1e-9)
    # attention's scores grow with T at fixed tokens (b T^2 = tokens T): its memory must grow, GLA's much less
    assert record["mixers"]["attention"]["memory_slope"] > record["mixers"]["gla"]["memory_slope"]


def test_recurrent_speedup_section_reuses_the_chunked_point(record):
    fam = record["recurrent_speedup"]["families"]["gla"]
    assert fam["chunked"]["mixer"] == "gla" and fam["recurrent"]["mixer"] == "gla_recurrent"
    main_64 = record["mixers"]["gla"]["points"][0]
    assert fam["chunked"]["time_s"] == main_64["time_s"]           # same cached measurement
    assert fam["speedup"] == pytest.approx(fam["recurrent"]["time_s"] / fam["chunked"]["time_s"])


def test_write_json_and_png(record, tmp_path):
    path, png = bench_mixers.write(record, str(tmp_path))
    assert os.path.getsize(png) > 0
    with open(path) as f:
        assert json.load(f)["mixers"]["gla"]["points"][1]["length"] == 128
    assert "attention" in bench_mixers.summary_table(record)


def test_unavailable_and_over_limit_points_are_skipped_with_reasons(monkeypatch):
    monkeypatch.setitem(bench_mixers.MIXERS, "nope", ("~", {}))
    out = bench_mixers.run(mixers=("nope", "attention"), lengths=(32, 64), tokens=64, d_model=16, num_heads=2,
                           warmup=1, repeats=1, max_memory_gb=1e-6, sse_sweep=False, speedup=False)
    nope = out["mixers"]["nope"]
    assert not nope["available"] and "not registered" in nope["reason"] and nope["time_slope"] is None
    first, second = out["mixers"]["attention"]["points"]
    assert "max_memory_gb" in first["skipped"] and first["memory"]["total_bytes"] > 0    # compiled, never run
    assert "time_s" not in first
    assert "shorter point already exceeded --max_memory_gb" in second["skipped"] and "memory" not in second
    assert out["mixers"]["attention"]["time_slope"] is None


def test_prediction_and_slope_helpers():
    assert bench_mixers.fit_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert bench_mixers.fit_slope([8], [1.0]) is None
    pts = [{"length": 512, "time_s": 1.0}, {"length": 1024, "time_s": 2.0}]
    assert bench_mixers.predict_seconds(pts, 4096) == pytest.approx(8.0)               # fitted slope 1
    assert bench_mixers.predict_seconds(pts[:1], 2048) == pytest.approx(2.0)           # prior slope 1/2
    assert bench_mixers.predict_seconds([], 2048) is None
    bench = bench_mixers.Bench(tokens=64, d_model=16, num_heads=2, dtype="bfloat16", warmup=1, repeats=1,
                               max_seconds=3.0, max_memory_gb=1.0)
    rec = bench.point("attention", "A", {}, 4096, history=pts)                         # 8 s > 3 s: not compiled
    assert "predicted 8.0 s" in rec["skipped"] and "memory" not in rec


def test_mambapy_section_same_weights_or_skip_reason():
    sec = bench_mixers.mambapy_section([16], d_model=16, batch=1, reps=1)
    if not sec["available"]:   # torch / mambapy are optional: the reason carries the install hint
        assert "pip install" in sec["reason"] and sec["rows"] == []
        return
    (row,) = sec["rows"]
    assert row["seq_len"] == 16 and row["ours_ms"] > 0 and row["mambapy_ms"] > 0
    assert row["speedup"] == pytest.approx(row["mambapy_ms"] / row["ours_ms"])
    # same weights and inputs on both sides: the outputs agree (f32)
    assert row["max_abs_diff"] <= 1e-4 * max(1.0, row["output_max_abs"])


def test_scout_section_ratios_and_decode_cache():
    pytest.importorskip("sqattn.mixers.scout")
    bench = bench_mixers.Bench(tokens=128, d_model=32, num_heads=2, dtype="bfloat16", warmup=1, repeats=1,
                               max_seconds=60.0, max_memory_gb=1.0)
    sec = bench_mixers.scout_section(bench, [32, 64], segment_len=4, window=8)
    assert sec["available"]
    for row in sec["fixed_l"]:
        assert row["time_ratio"] == pytest.approx(row["attention"]["time_s"] / row["scout"]["time_s"])
        t = row["length"]
        # admissible pairs: t(t+1)/2 for causal attention vs sum_t (#checkpoints before t + 1) for SCOUT
        expect = sum(min(i // 4, t // 4) + 1 for i in range(t))
        assert row["score_entries_ratio"] == pytest.approx(t * (t + 1) / 2 / expect)
    assert [p["segment_len"] for p in sec["sqrt_l"]["points"]] == [6, 8]
    assert sec["decode_cache"] == [
        {"length": 32, "attention": 32, "swa": 8, "scout": 8, "scout_swa": 16},
        {"length": 64, "attention": 64, "swa": 8, "scout": 16, "scout_swa": 24}]
