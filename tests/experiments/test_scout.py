"""experiments/scout.py end to end at tiny sizes, its recall data, and sqattn/configs/scout.py at every size."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import scout

CONFIGS = importlib.import_module("sqattn.configs.scout")


@pytest.mark.slow
def test_run_end_to_end(tmp_path, monkeypatch):
    """All three parts at runlocal size, 2 steps each (also the swa:runlocal LM forward)."""
    out = scout.run(str(tmp_path), models=["swa"], steps=2, runlocal=True, recall_models=["scout_L4"],
                    recall_steps=2, seeds=[0], memory_lengths=(64, 256), repeat_fraction=0.5, progress=False)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert set(saved) >= {"settings", "lm", "recall", "recall_summary", "memory", "plot", "wall_s"}
    assert os.path.isfile(tmp_path / "scout.png")
    (lm,) = saved["lm"]
    assert lm["model"] == "swa" and lm["block_pattern"] == "AC" and lm["steps"] == 2
    # The per-position eval re-reads the trainer's eval rows: same bits/byte over all positions.
    assert lm["bpb"] == pytest.approx(lm["trainer_eval_bpb"], rel=1e-4)
    assert np.isfinite(lm["bpb_long"]) and 0 < lm["eval_bytes_long"] < lm["eval_bytes"]
    # Half the eval rows repeat a span: their second copies are scored apart from the plain rows.
    assert lm["repeat_fraction"] == 0.5 and 0 < lm["eval_bytes_copy"] < lm["eval_bytes_long"]
    assert np.isfinite(lm["bpb_copy"]) and np.isfinite(lm["bpb_text_long"])
    assert saved["lm_summary"]["swa"]["bpb_copy"]["mean"] == lm["bpb_copy"]
    (rec,) = saved["recall"]
    assert rec["model"] == "scout_L4" and rec["eval_queries"] == 640
    # Two steps cannot teach recall: accuracy near chance over the values, loss near the uniform ln(vocab).
    assert 0.0 <= rec["accuracy"] < 0.25 and abs(rec["eval_loss"] - np.log(49)) < 0.6, rec
    assert saved["recall_summary"]["scout_L4"]["seeds"] == 1
    mem = saved["memory"]
    assert mem["entries_match_formula"] and mem["entries"]["mamba"]["256"] == 256 // mem["segment_len"]
    assert mem["entries"]["full"]["256"] == 2 * 256 and mem["entries"]["swa_only"]["256"] == 2 * mem["window"]
    assert "| SCOUT-SWA (AC) |" in scout.format_tables(out) and "repeated span (copy)" in scout.format_tables(out)
    # A finished LM run is reused, not retrained.
    monkeypatch.setattr("sqattn.train.train_and_evaluate",
                        lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = scout.run(str(tmp_path), parts=["lm"], models=["swa"], steps=2, runlocal=True, repeat_fraction=0.5,
                      progress=False)
    assert again["lm"] == saved["lm"]


def test_recall_source_layout():
    """The "recall" data source (what the probe trains on): every query's target is its key's value, stated
    once at the start and beyond the sliding window."""
    from sqattn import data
    from sqattn.configs import scout_recall
    cfg = data.default_config("recall")
    ds = data.make_dataset(cfg, batch_size=32, split="train")
    b = ds.batch(0)
    inputs, targets, weights = b["inputs"], b["targets"], b["weights"]
    assert inputs.shape == targets.shape == weights.shape == (32, 64)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    q_pos = np.flatnonzero(weights[0])
    assert len(q_pos) == cfg.num_pairs and (weights.sum(1) == cfg.num_pairs).all()
    for row in range(32):
        keys = inputs[row, 1:1 + 2 * cfg.num_pairs:2]
        vals = inputs[row, 2:2 + 2 * cfg.num_pairs:2]
        assert len(set(keys.tolist())) == cfg.num_pairs and (keys >= 1).all() and (keys <= cfg.num_keys).all()
        for p in q_pos:
            (i,) = np.flatnonzero(keys == inputs[row, p])  # the queried key was stated once ...
            assert targets[row, p] == vals[i]              # ... and its value is the target
            assert p - (1 + 2 * i) > scout_recall.WINDOW   # beyond the sliding window
    assert targets.max() < ds.vocab_size == 49
    evals = data.make_dataset(cfg, batch_size=32, split="eval").batch(0)["inputs"]
    assert not np.array_equal(evals, inputs)                # held out: another stream
    with pytest.raises(ValueError, match="seq_len"):
        data.make_dataset(_with(cfg, seq_len=63), batch_size=8, split="train")


def _with(cfg, **kw):
    out = cfg.copy_and_resolve_references()
    for k, v in kw.items():
        out[k] = v
    return out


@pytest.mark.parametrize("mixer,size,params", [("swa", "400m", 470e6), ("mamba", "400m", 430e6),
                                               ("full", "tiny", None), ("mamba_only", "tiny", None),
                                               ("swa_only", "tiny", None)])
def test_config_builds_every_size(mixer, size, params):
    """Abstract build (nothing allocated); the 400m shapes give the paper's 470M / 430M parameters."""
    from sqattn.models.lm import expand_pattern
    from sqattn.train.dryrun import dry_run
    cfg = CONFIGS.get_config(f"mixer={mixer},size={size}")
    cfg.name = f"scout:{mixer},{size}"
    pattern = expand_pattern(cfg.model.block_pattern, cfg.model.num_layers)
    assert pattern == CONFIGS.PATTERNS[mixer] * (cfg.model.num_layers // 2)
    rep = dry_run(cfg, check_devices=False)
    if params is not None:
        assert rep["params"] == pytest.approx(params, rel=0.01)
        assert cfg.model.mixers.scout.segment_len == 10 and cfg.data.seq_len == 2048
    else:
        assert rep["params"] < 2e6


def test_runlocal_mamba_lm_forward():
    """SCOUT-Mamba at runlocal size (SCOUT-SWA's runlocal forward runs in ``test_run_end_to_end``)."""
    from flax import nnx

    from sqattn.train import state as state_lib
    cfg = CONFIGS.get_config("mixer=mamba,runlocal")
    assert cfg.model.block_pattern == "MC"
    model = state_lib.build_model(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, cfg.data.seq_len), 0, cfg.model.vocab_size)
    logits, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (2, cfg.data.seq_len, cfg.model.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="unknown mixer"):
        CONFIGS.get_config("mixer=gla")
