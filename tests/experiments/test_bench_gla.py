"""bench_gla: the record a run prints (structure and argument checks; no timing assertions)."""

import pytest

from experiments import bench_gla


def test_run_benchmark_record():
    shape = bench_gla.parse_shape("2x9x2x4x4")
    rec = bench_gla.run_benchmark([shape, bench_gla.parse_shape("1x5x1x4x4")], ["vector", "scalar"], ["seg"],
                                  ["chunked", "ref"], ref_shapes=1, warmup=1, repeats=1)
    timed = {k: v for k, v in rec.items() if k != "_meta"}
    assert set(timed) == {"chunked B2_T9_H2_K4_C4 vector seg", "chunked B2_T9_H2_K4_C4 scalar seg",
                          "chunked B1_T5_H1_K4_C4 vector seg", "chunked B1_T5_H1_K4_C4 scalar seg",
                          "ref B2_T9_H2_K4_C4 vector seg", "ref B2_T9_H2_K4_C4 scalar seg"}   # ref: 1st shape only
    assert all(v > 0 for v in timed.values())
    assert rec["_meta"]["repeats"] == 1 and rec["_meta"]["backend"] == "cpu"


def test_bad_arguments():
    with pytest.raises(ValueError):
        bench_gla.parse_shape("2x9x2")
    with pytest.raises(ValueError, match="warmup >= 1"):
        bench_gla.run_benchmark([(1, 4, 1, 4, 4)], ["vector"], ["none"], ["chunked"], ref_shapes=0, warmup=0,
                                repeats=1)
