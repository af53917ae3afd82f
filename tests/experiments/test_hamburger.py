"""HAMburger experiment: the whole pipeline on a tiny budget writes results.json (expected keys, sane values)
and the plot; the base checkpoint is then reused instead of trained again."""

import json
import os

import numpy as np
import pytest

from experiments import common
from experiments import hamburger as exp

TINY = dict(base_steps=3, base_d_model=32, base_layers=1, seq_len=32, batch_size=4, steps=2, train_prompt_len=8,
            s_max=2, confidences=(0.0, 1.0), num_prompts=2, prompt_len=8, new_tokens=6, eval_batches=1,
            progress=False)


def test_helpers():
    np.testing.assert_array_equal(exp.micro_index([2, 1, 3]), [0, 1, 0, 0, 1, 2])
    assert exp._common_prefix(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
    assert exp._common_prefix(np.array([1, 2]), np.array([1, 2])) == 2
    lens = exp.segment_rows(np.array([[9.0, 2.0, 0.01, 0.01, 3.0, 0.0]]), 2, 4)
    assert [x.tolist() for x in lens] == [[3, 1]]        # entropies of tokens 2..5 are H[1..4]


@pytest.mark.slow
def test_run_end_to_end(tmp_path):
    out = exp.run(str(tmp_path), **TINY)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    for key in exp.RESULT_KEYS:
        assert key in saved, key
    assert os.path.exists(saved["plot"]) and saved["base"]["trained_here"]
    assert saved["base"]["d_model"] == 32 and saved["base"]["steps"] == 3
    assert 1.0 <= saved["oracle_compression"]["train"] <= 2.0
    tf = saved["teacher_forced"]
    assert len(tf["ham_step_accuracy"]) == 2 and np.isfinite(tf["ham_nll"]) and np.isfinite(tf["base_nll"])
    rows = {r["confidence"]: r for r in saved["generation"]}
    # c = 0 never stops early: 6 tokens in 3 macro steps; c = 1 stops after every token: the fine-tuned base
    assert rows[0.0]["kv_compression"] == 2.0 and rows[0.0]["base_forwards_per_token"] == 0.5
    assert rows[1.0]["kv_compression"] == 1.0
    for key in ("agreement", "prefix_agreement", "base_argmax_rate", "base_nll", "samples"):
        assert rows[1.0][key] == saved["reference"]["finetuned_base"][key], key
    assert saved["reference"]["frozen_base"]["agreement"] == 1.0
    assert len(rows[0.0]["samples"]) == 2 and all(isinstance(t, str) for t in rows[0.0]["samples"])
    reading = saved["reading"]
    assert reading["tokens"] == 2 * 6
    by_c = {r["confidence"]: r for r in reading["rows"]}
    assert by_c[0.0]["kv_compression"] == 2.0 and by_c[1.0]["kv_compression"] == 1.0   # s_max 2, 6 tokens
    assert by_c[1.0]["accuracy"] == reading["finetuned_base_accuracy"]               # c = 1 is the base
    assert 0.0 <= reading["frozen_base_accuracy"] <= 1.0
    table = exp.format_table(out)
    assert "| fine-tuned base | 1.00 | 1.00 |" in table and "Reading 12 held-out tokens" in table
    assert out["finetune"]["curve"][-1]["step"] == 2 and out["finetune"]["compile_s"] > 0
    assert os.path.isdir(os.path.join(out["finetune"]["run_dir"], "checkpoints"))      # a trainer run
    # the base checkpoint is found and loaded, not trained again
    cfg = common.small_lm_config(steps=99, d_model=32, layers=1, seq_len=32, batch_size=4)
    _, config, info = common.train_or_load(str(tmp_path / "base"), cfg, progress=False)
    assert not info["trained_here"] and config.num_steps == 3


@pytest.mark.slow
def test_finetune_is_a_trainer_run_that_resumes(tmp_path):
    """Killed mid-way, the fine-tune resumes to the uninterrupted run's losses."""
    from sqattn.configs import hamburger as ham_configs
    from sqattn.train import metrics as metrics_lib
    from sqattn.train import train_and_evaluate
    base = common.small_lm_config(steps=2, d_model=32, layers=1, seq_len=32, batch_size=4)
    train_and_evaluate(base, str(tmp_path / "base"), progress=False)
    cfg = ham_configs.config_for(str(tmp_path / "base"), steps=4, batch_size=4, s_max=2, prompt_len=8)
    cfg.checkpoint_every, cfg.log_every = 2, 1
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train_and_evaluate(cfg, full, progress=False)
    assert train_and_evaluate(cfg, cut, progress=False, stop_after=2)["stopped_early"]
    train_and_evaluate(cfg, cut, progress=False)
    losses = [{r["step"]: r["loss"] for r in metrics_lib.read_metrics(d) if "loss" in r} for d in (full, cut)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="not a trainer run"):
        ham_configs.config_for(str(tmp_path / "nothing"))
