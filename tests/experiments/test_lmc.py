"""experiments/lmc.py at a tiny size: a parent, two children, the measured pair, the table, plot and reuse."""

import json
import os

from experiments import lmc as exp
from sqattn import configs


def test_spawn_protocol_table_plot_and_reuse(tmp_path, capsys):
    cfg = configs.get("teacher_lmc:runlocal,seed=0,data_seed=100")
    args = ("teacher", str(tmp_path), {0: cfg}, [2], 0, 2, 2, 5, False)
    rec = exp.run_part(*args)
    assert [(p["kind"], p["k"]) for p in rec["pairs"]] == [("spawn", 2)]
    pair = rec["pairs"][0]
    assert pair["distance"] > 0 and 0 < pair["angle"] < 180
    assert set(pair["layers"]) == {"layers/0", "layers/1", "out"}
    assert {"B_H", "B_g", "B_q"} <= set(pair["predictors"]) and "parent_loss_at_k" in pair
    summary = exp.summarise(rec["pairs"])
    assert summary["table"][0]["k"] == 2 and "layer:out" in summary["table"][0]
    path = exp.plot("teacher", rec["pairs"], summary, os.path.join(tmp_path, "p.png"))
    assert os.path.getsize(path) > 0
    exp.print_table("teacher", summary)
    assert "| spawn | 2 |" in capsys.readouterr().out
    json.dumps(rec, default=float)
    again = exp.run_part(*args)                               # finished runs are reused: only measuring
    assert all(r.get("status", "reused") == "reused" for r in again["runs"])
    assert again["pairs"][0]["train"]["loss"] == rec["pairs"][0]["train"]["loss"]
