"""experiments/grt.py at a tiny size: the tables, the merge check, timing shapes, the probe and the plots."""

import json
import os

import pytest

from experiments import grt as grt_exp


def test_grt_experiment_small(tmp_path):
    workdir = str(tmp_path)
    res = grt_exp.run(workdir, fps_list=(2, 8), duration=2.0, probe_clips=3, repeats=1, taus=(0.9, 0.99))
    main = res["main"]
    for f in ("2.0", "8.0"):
        assert main[f]["dense"]["tokens"] == main[f]["frames"] * 64
        assert main[f]["grt"]["tokens"] < main[f]["dense"]["tokens"]
        assert main[f]["grt_merge"]["tokens"] <= main[f]["grt"]["tokens"]
    assert main["8.0"]["dense"]["recall"] == 1.0                       # a sample in every 0.25-s window
    assert main["8.0"]["dense"]["psnr_db"] > main["2.0"]["dense"]["psnr_db"]
    assert res["token_slopes"]["dense"] == pytest.approx(1.0, abs=1e-6)
    assert res["token_slopes"]["grt"] < 1.0
    assert res["merge"]["hist"]["key_group"] == [0, -1, 0]            # scene 3 merges into scene 1, scene 2 stays
    assert {v["tau"] for v in res["tau_sweep"]} == {0.9, 0.95, 0.99}
    assert len(res["timing"]["compiled_shapes"]) <= 4
    assert all(length in (8, 16, 32, 64) for _, length in res["timing"]["compiled_shapes"])
    for m in grt_exp.METHODS:
        assert 0.0 <= res["probe"]["per_fps"]["8.0"][m]["accuracy"] <= 1.0
    for name in ("results.json", "tokens_vs_fps.png", "quality_vs_fps.png", "time_vs_fps.png", "tau_sweep.png",
                 "probe.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    with open(os.path.join(workdir, "results.json")) as fh:
        assert json.load(fh)["main"] == json.loads(json.dumps(main))
    with pytest.raises(ValueError, match="probe_clips"):
        grt_exp.run(workdir, probe_clips=2)
