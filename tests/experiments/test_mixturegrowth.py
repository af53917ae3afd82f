"""experiments/mixturegrowth.py: FLOP accounting and the table (the full reproduction runs ~30 min)."""

from experiments import mixturegrowth


def test_member_costs_about_a_quarter_of_the_grown_net_per_step():
    member, full = mixturegrowth.params_of(128), mixturegrowth.params_of(256)
    assert member == 32 * 128 + 128 * 128 + 128 * 20 and full == 32 * 256 + 256 * 256 + 256 * 20
    assert 0.25 < member / full < 0.35


def test_table_lists_before_and_after_growth():
    table = {"grown_zero": {"accuracy_mean": 0.5, "accuracy_std": 0.01, "n": 2, "before_mean": 0.4,
                            "after_mean": 0.45, "flops": 1e9},
             "scratch": {"accuracy_mean": 0.6, "accuracy_std": 0.0, "n": 2, "before_mean": None,
                         "after_mean": None, "flops": 2e9}}
    text = mixturegrowth.format_table(table)
    assert "| grown_zero | 0.5000 ± 0.0100 (2) | 0.4000 | 0.4500 | 1e+09 |" in text
    assert "| scratch | 0.6000 ± 0.0000 (2) | - | - | 2e+09 |" in text
