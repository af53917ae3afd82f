"""experiments/sema.py: tabulation, expansion log and plot from stream summaries; argument errors.

The streams themselves (trainer runs, resume) are tested in tests/sqattn/models/test_sema.py.
"""

import os

import pytest

from experiments import sema as exp


def _stream(method, accs, adapters, z=None, expansions=None):
    tasks = []
    for t, (a, ad) in enumerate(zip(accs, adapters)):
        tasks.append({"task": t, "accuracy": a, "adapters": ad, "expansions": (expansions or {}).get(t, []),
                      "z_scores": None if z is None or t == 0 else z[t], "trainable_params": 100 + t,
                      "adapter_params": 10 * sum(ad)})
    return {"method": method, "tasks": tasks, "average_accuracy": sum(accs) / len(accs),
            "final_accuracy": accs[-1]}


def test_summary_table_log_and_plot(tmp_path):
    z = [None, [0.7, 0.8], [5.0, 4.0]]
    streams = {
        "sema_s0": _stream("sema", [1.0, 0.8, 0.6], [[1, 1], [1, 1], [2, 1]], z, {2: [[0, 1]]}),
        "sema_s1": _stream("sema", [1.0, 0.6, 0.4], [[1, 1], [1, 1], [2, 1]], z, {2: [[0, 1]]}),
        "prototypes_s0": _stream("prototypes", [1.0, 0.9, 0.3], [[0, 0]] * 3),
    }
    s = exp.summarise(streams)
    assert s["sema"]["seeds"] == 2
    assert s["sema"]["abar_mean"] == pytest.approx((0.8 + 2.0 / 3) / 2)
    assert s["sema"]["an_mean"] == pytest.approx(0.5) and s["sema"]["an_std"] == pytest.approx(0.1)
    text = exp.table(s)
    assert "| sema | 2 | 0.733 ± 0.067 | 0.500 ± 0.100 | 11 11 21 | 100 101 102 |" in text
    assert "| prototypes | 1 |" in text
    log = exp.expansion_log(s)
    assert "task 2: z per expandable layer [5.00, 4.00] -> expanded (layer, slot) [[0, 1]]" in log
    assert "task 0: z per expandable layer [-]" in log
    path = exp.plot(streams, 2.0, str(tmp_path / "r.png"))
    assert os.path.getsize(path) > 1000


def test_unknown_method_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['lwf'\]"):
        exp.run(str(tmp_path), methods=["sema", "lwf"])
