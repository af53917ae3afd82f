"""experiments/bench_moe.py on tiny sizes: the layer record (with the all-to-all bytes of the compiled expert-
parallel program checked against the capacity formula), and the payload / drop-rate tables' invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import bench_moe


def test_layer_benchmark_record():
    rec = bench_moe.layer_benchmark(groups=8, group_size=16, d_model=16, num_experts=8, top_k=2, mlp_dim=8,
                                    capacity_factor=1.0, dtype="float32",
                                    paths=["expert_parallel"], block_m=8,
                                    warmup=1, steps=1)
    json.dumps(rec)
    assert rec["capacity"] == 4 and rec["tokens"] == 128
    for mode in ("fwd", "fwd_bwd"):
        assert rec["results"]["expert_parallel"][mode]["tokens_per_s"] > 0
    ep = rec["results"]["expert_parallel"]
    assert ep["devices"] == 8 and ep["all_to_all_rows_per_device"] == 8 * 1 * 4
    # f32 dispatch rows out, f32 result rows back: exactly the capacity-padded buffers, nothing else
    assert ep["all_to_all_bytes_per_device_fwd"] == ep["all_to_all_bytes_per_device_expected"] == 32 * 16 * 8
    assert "target" not in rec  # neither a sorted path nor the dense MLP timed
    with pytest.raises(ValueError, match="unknown layer paths"):
        bench_moe.layer_benchmark(groups=8, group_size=16, d_model=16, num_experts=8, top_k=2, mlp_dim=8,
                                  capacity_factor=1.0, dtype="float32", paths=["nope"], block_m=8, warmup=1,
                                  steps=1)


def test_payload_and_drop_rate_tables():
    rows = bench_moe.payload_table(tokens=256, num_experts=8, devices=4, top_k=2, d_model=4,
                                   skews=["0", "1.0"], cfs=["1.0", "2.0"])
    by = {(r["skew"], r["capacity_factor"]): r for r in rows}
    for r in rows:
        assert r["exact_rows"] + round(r["drop_rate"] * r["routed_rows"]) == r["routed_rows"]
        assert r["padded_rows"] >= r["exact_rows"] and r["padded_bytes"] == r["padded_rows"] * 4 * 2
        assert 0.0 <= r["padding_fraction"] < 1.0
    # cf = 1 with S*k/E whole: the padded buffers hold exactly the routed rows, so padding == drops
    assert by[(0.0, 1.0)]["padded_rows"] == by[(0.0, 1.0)]["routed_rows"]
    assert np.isclose(by[(0.0, 1.0)]["padding_fraction"], by[(0.0, 1.0)]["drop_rate"])
    assert by[(1.0, 1.0)]["max_over_mean_load"] > by[(0.0, 1.0)]["max_over_mean_load"]
    assert by[(1.0, 2.0)]["padding_fraction"] > by[(0.0, 2.0)]["padding_fraction"]
    drops = bench_moe.drop_rate_table(tokens=256, num_experts=8, devices=4, top_k=2, skew=0.5,
                                      cfs=["0.5", "1.0", "2.0", "8.0"])
    for routing in ("uniform", "skewed"):
        rates = [r["drop_rate"] for r in drops if r["routing"] == routing]
        assert all(a >= b for a, b in zip(rates, rates[1:])) and rates[-1] == 0.0 and rates[0] >= 0.5 - 1e-9
    skewed = {r["capacity_factor"]: r["drop_rate"] for r in drops if r["routing"] == "skewed"}
    uniform = {r["capacity_factor"]: r["drop_rate"] for r in drops if r["routing"] == "uniform"}
    assert skewed[1.0] > uniform[1.0]


def test_all_to_all_bytes_parser():
    text = ("  %all-to-all = (f32[1,1,20,64]{3,2,1,0}, /*index=1*/bf16[2,3]{1,0}) all-to-all(%a, %b), dims={0}\n"
            "  %x = f32[4]{0} add(%y, %z)\n  %all-to-all.1 = s32[8]{0} all-to-all(%c), dimensions={0}\n")
    assert bench_moe.all_to_all_bytes(text) == 20 * 64 * 4 + 6 * 2 + 8 * 4
