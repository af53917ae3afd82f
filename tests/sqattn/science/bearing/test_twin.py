"""The twin loop, the link-latency model, the timing helper and the power-law fit."""

import math

import numpy as np
import pytest

from sqattn.science.bearing import kinematics, twin


def test_links_reproduce_the_note_calibration():
    totals = {link.name: link.budget(0.5) for link in twin.LINKS}
    for name, total in {"6G": 0.80, "5G": 4.20, "WiFi-6": 12.50}.items():             # the note's totals
        assert totals[name]["total"] == pytest.approx(total, abs=0.01)
    assert totals["5G"]["tx"] == pytest.approx(2048 * 16 / 1e9 * 1e3)            # 0.033 ms
    assert totals["6G"]["prop"] == pytest.approx(100 / 299_792_458 * 1e3)        # 0.33 us
    for parts in totals.values():
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert totals["WiFi-6"]["total"] / totals["6G"]["total"] == pytest.approx(15.6, abs=0.05)
    with pytest.raises(ValueError, match="proc_ms and payload_bits must be >= 0"):
        twin.LINKS[0].budget(-1.0)


def test_channel_and_queue_formulas():
    assert twin.shannon_rate(1e9, 0.0) == pytest.approx(1e9)                     # log2(1 + 1)
    assert twin.thz_path_loss_db(300e9, 10.0) == pytest.approx(102.0, abs=0.1)   # the note's FSPL
    assert twin.thz_path_loss_db(300e9, 10.0, 0.1) == pytest.approx(102.0 + 10 * math.log10(math.e), abs=0.1)
    assert twin.mm1_wait_ms(1000.0, 600.0) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="unstable queue"):
        twin.mm1_wait_ms(100.0, 100.0)


def test_power_law_fit_recovers_alpha():
    k = np.array([1, 4, 16, 64, 256, 1024, 4096])
    a, alpha = twin.fit_power_law(k, 0.3 * k ** 0.42)
    assert a == pytest.approx(0.3) and alpha == pytest.approx(0.42)
    with pytest.raises(ValueError, match="two distinct sizes"):
        twin.fit_power_law([8, 8], [1.0, 2.0])


def test_time_interleaved_runs_round_robin():
    calls = []
    out = twin.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                                warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert out["a"]["n"] == 3 and 0 <= out["a"]["min_ms"] <= out["a"]["p50_ms"] <= out["a"]["p99_ms"]


def test_twin_update_and_stream():
    s = twin.TwinState()
    s1 = twin.twin_update(s, [0.1, 0.7, 0.1, 0.1], 0.5)
    assert (s.windows, s.fault) == (0, "normal")                                  # pure: the old state is unchanged
    assert (s1.fault, s1.windows, s1.counts, s1.updated_at) == ("inner", 1, (0, 1, 0, 0), 0.5)
    assert not s1.healthy and s1.confidence == pytest.approx(0.7)
    with pytest.raises(ValueError, match="expected 4 class probabilities"):
        twin.twin_update(s, [1.0, 0.0], 0.0)
    # a toy classifier: the window's sign picks the class
    sig = np.concatenate([np.full(8, 1.0), np.full(8, -1.0), np.full(8, 1.0), np.full(3, 5.0)])
    feats = lambda w: w.mean(1, keepdims=True)                                    # noqa: E731
    clf = lambda f: np.where(f > 0, np.eye(4)[2], np.eye(4)[3])                   # noqa: E731
    state, stages = twin.stream(sig, window=8, fs=8.0, features=feats, classify=clf)
    assert state.windows == 3 and state.counts == (0, 0, 2, 1) and state.updated_at == 3.0
    assert state.fault == kinematics.CLASSES[2]
    assert set(stages) == {"acquire", "features", "classify", "twin", "total"} and stages["total"]["n"] == 3
    with pytest.raises(ValueError, match="holds no window"):
        twin.stream(sig[:4], window=8, fs=8.0, features=feats, classify=clf)
