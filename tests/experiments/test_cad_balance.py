"""cad_balance reproduction, smoke scale: (A) planner balance, (B) executed program on 8 simulated devices,
(C) LM training with the attention mixer's ``cad`` switch off vs on (same seed) under a data x fsdp x tensor
mesh: identical loss curves and parameters."""

import json
import os

import numpy as np

from experiments import cad_balance


def test_cad_balance_quick(tmp_path):
    out = cad_balance.run(
        str(tmp_path), ["A", "B", "C"], devices=[8, 16], tokens=[32768], eps_list=[0.05, 0.1], trials=2,
        min_rows=128, b_tokens=256, b_trials=1, b_eps=0.1, c_steps=3, c_batch=8, c_seq_len=64, c_capacity=0.5,
        seed=0, c_mesh={"data": 2, "fsdp": 2, "tensor": 2, "expert": 1, "rules": "default"})
    for name in ("results.json", "results.md", "cad_balance.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert json.loads((tmp_path / "results.json").read_text())["A"]["rows"] == out["A"]["rows"]

    rows = out["A"]["rows"]
    assert len(rows) == 4
    for r in rows:                                         # CAD within tolerance; naive is not
        assert r["cad_max_over_mean_worst"] <= 1 + r["eps"] + 1e-9
        assert r["naive_max_over_mean"] >= 2.0
        assert 0 < r["moved_token_frac"] < 0.5 and r["cad_bytes_GB"] < r["cp_allgather_GB"]
    by_eps = {r["eps"]: r for r in rows if r["D"] == 16}
    assert by_eps[0.05]["cad_bytes_GB"] >= by_eps[0.1]["cad_bytes_GB"]     # tighter eps moves more

    for trial in out["B"]["trials"]:
        assert trial["docs_longer_than_shard"] >= 1
        for name in ("naive", "cad"):
            assert trial[name]["counted_equals_planned"]
            assert trial[name]["max_abs_err"] < 1e-5
        assert trial["naive"]["max_over_mean"] >= 2.0 and trial["cad"]["max_over_mean"] <= 1.1
        assert trial["naive"]["q_rows_moved"] == 0 < trial["cad"]["q_rows_moved"]

    c = out["C"]
    assert len(c["loss_on"]) == len(c["loss_off"]) == 3
    np.testing.assert_allclose(c["loss_on"], c["loss_off"], rtol=0, atol=1e-5)
    assert c["max_abs_param_diff"] < 1e-5
    assert c["lm_batches_max_over_mean"]["cad"] < c["lm_batches_max_over_mean"]["naive"]
    assert "| D | T | eps |" in (tmp_path / "results.md").read_text()
