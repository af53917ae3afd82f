"""COPY experiment: configs, the summary's checks of the prediction, and the grid on a tiny budget
(JSON + PNG structure, resume skips finished runs)."""

import json
import os

import numpy as np
import pytest

from experiments import copy_task
from sqattn import configs
from sqattn.configs.validate import validate


@pytest.mark.parametrize("name,arg", [
    ("copy_mamba2", "d_state=4,copy_len=64"),
    ("copy_mamba", "d_state=16,copy_len=8"),
    ("copy_transformer", "copy_len=32,steps=200"),
    ("copy_mamba2", "copy_len=64,runlocal"),
])
def test_configs_validate_and_match_the_note(name, arg):
    cfg = configs.get(f"{name}:{arg}")
    validate(cfg, check_devices=False)
    length = cfg.data.copy_len
    assert cfg.data.name == "copy" and cfg.data.seq_len == 2 * length and cfg.data.min_copy_len is None
    assert cfg.model.vocab_size == cfg.data.num_symbols + 2 == 18
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.tie_embeddings) == (32, 2, False)
    assert cfg.optim.weight_decay == 0.0 and cfg.optim.b2 == 0.98 and cfg.optim.min_lr_ratio == 0.0
    if "runlocal" not in arg:
        assert cfg.batch_size * cfg.eval_batches == 512  # 512 fresh eval sequences
    if name == "copy_mamba2":
        m = cfg.model.mixers.mamba2
        assert cfg.model.block_pattern == "2" and cfg.model.mlp_dim == 0
        assert (m.head_dim, m.expand, m.d_conv) == (16, 2, 4) and m.d_state == (4 if "d_state" in arg else 16)
        assert copy_task._state_floats_per_layer(cfg) == 64 * m.d_state
    elif name == "copy_transformer":
        assert cfg.model.block_pattern == "A" and cfg.model.mixers.attention.num_heads == 2
        assert cfg.num_steps == 200 and copy_task._state_floats_per_layer(cfg) is None


def test_config_errors():
    with pytest.raises(ValueError, match="unknown mixer 'rnn'"):
        configs.get("copy_mamba2:mixer=rnn")
    with pytest.raises(ValueError, match="copy_len, d_state and steps must be >= 1"):
        configs.get("copy_mamba2:copy_len=0")


def _rec(model, n, length, acc):
    return dict(model=model, d_state=n, copy_len=length, seed=0, accuracy=acc)


def test_summary_checks_the_prediction():
    # Given the predicted pattern (break point moves out with N; the Transformer copies everywhere),
    good = [_rec("mamba2", 4, 8, 0.95), _rec("mamba2", 4, 32, 0.3), _rec("mamba2", 64, 8, 1.0),
            _rec("mamba2", 64, 32, 0.97), _rec("transformer", None, 8, 1.0), _rec("transformer", None, 32, 1.0)]
    s = copy_task.summarize(good)
    assert s["table"]["mamba2 N=4"] == {"8": 0.95, "32": 0.3}
    assert s["largest_L_ge_90"] == {"mamba2 N=4": 8, "mamba2 N=64": 32, "transformer": 32}
    assert s["prediction_holds"] and len(s["checks"]) == 4, s["checks"]
    assert "| mamba2 N=4 | 95.0% | 30.0% | 8 |" in copy_task.format_table(s)
    # then a Transformer that fails, a bigger state that copies worse, or a small state that copies
    # everything each break it.
    bad = good[:4] + [_rec("transformer", None, 8, 1.0), _rec("transformer", None, 32, 0.5)]
    assert not copy_task.summarize(bad)["checks"]["transformer: >= 90% at every L"]
    worse = [dict(r, accuracy=0.2) if r["d_state"] == 64 else r for r in good]
    checks = copy_task.summarize(worse)["checks"]
    assert not checks["mamba2: largest L >= 90% grows with N"]
    assert not checks["mamba2: accuracy at the longest L grows with N"]
    easy = [dict(r, accuracy=1.0) for r in good]
    checks = copy_task.summarize(easy)["checks"]
    assert not checks["mamba2: smallest N fails at the longest L"] and not copy_task.summarize(easy)[
        "prediction_holds"]


def test_grid_writes_results_and_resumes(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    kw = dict(models=["mamba2", "transformer"], d_states=[4], copy_lens=[2], steps=2, progress=False)
    out = copy_task.run_grid(workdir, **kw)
    # JSON + PNG with one record per cell and the table / checks structure.
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 1000
    assert saved["settings"]["copy_lens"] == [2] and len(saved["runs"]) == 2
    assert set(saved["table"]) == {"mamba2 N=4", "transformer"} and set(saved["table"]["transformer"]) == {"2"}
    assert set(saved["checks"]) >= {"transformer: >= 90% at every L"}
    for r in saved["runs"]:
        assert r["steps"] == 2 and r["eval_sequences"] == 512
        # Two steps cannot teach copying: query accuracy stays near chance (1/16 symbols) and the loss near the
        # uniform ln(18). A metric over the wrong positions (the given prefix, or unweighted) would break this.
        assert 0.0 <= r["accuracy"] < 0.25, r
        assert abs(r["eval_loss"] - np.log(18)) < 0.5, r
        assert r["params"] > 1000 and r["config"].startswith(f"copy_{r['model']}:")
    assert saved["runs"][0]["state_floats_per_layer"] == 64 * 4
    # Resume: finished runs are loaded, not retrained.
    monkeypatch.setattr("sqattn.train.train_and_evaluate",
                        lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = copy_task.run_grid(workdir, **kw)
    assert again["runs"] == out["runs"]
