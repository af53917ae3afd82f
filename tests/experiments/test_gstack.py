"""experiments/gstack.py: the speedup arithmetic (the full reproduction runs ~30 min; see its docstring)."""

import pytest

from experiments import gstack


def test_flops_to_reach_interpolates_and_reports_not_reached():
    pts = [(1.0, 3.0), (2.0, 2.0), (4.0, 1.0)]
    assert gstack.flops_to_reach(pts, 2.5) == pytest.approx(1.5)
    assert gstack.flops_to_reach(pts, 1.0) == pytest.approx(4.0)
    assert gstack.flops_to_reach(pts, 3.5) == pytest.approx(1.0)
    assert gstack.flops_to_reach(pts, 0.5) is None


def test_curve_prepends_the_base_run_up_to_the_growth_step():
    base = [{"step": s, "train_flops": 10.0 * s} for s in (1, 2, 3)] + [
        {"step": 2, "eval_bits_per_byte": 3.0}, {"step": 3, "eval_bits_per_byte": 2.9}]
    grown = [{"step": 1, "train_flops": 25.0}, {"step": 1, "eval_bits_per_byte": 2.5}]
    assert gstack.curve(grown, base, upto_step=2) == [(20.0, 3.0), (25.0, 2.5)]


def test_speedups_against_the_same_seed_scratch():
    arms = {"scratch": {0: {"curve": [(1.0, 3.0), (4.0, 2.0)], "base_flops": 0.0}},
            "g4": {0: {"curve": [(0.5, 3.0), (2.0, 2.0), (4.0, 1.5)], "base_flops": 1.0}},
            "bad": {0: {"curve": [(1.0, 3.0), (4.0, 2.5)], "base_flops": 1.0}}}
    t = gstack.speedups(arms)
    assert t["scratch"]["speedup_mean"] == pytest.approx(0.0)
    assert t["g4"]["speedup_mean"] == pytest.approx(4.0 / 2.0 - 1)
    assert t["g4"]["speedup_excl_base_mean"] == pytest.approx(4.0 / 1.0 - 1)
    assert t["bad"]["speedup_mean"] is None and t["bad"]["reached"] == "0/1"
    assert "not reached" in gstack.format_table(t)
