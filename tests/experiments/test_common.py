"""experiments.common: the small base LM recipe and the settings-keyed record cache."""

import json

import pytest

from experiments import common


def test_small_lm_config_shapes_and_errors():
    cfg = common.small_lm_config(steps=50, d_model=96, layers=3, seq_len=64, batch_size=4, seed=7)
    assert (cfg.num_steps, cfg.seed, cfg.batch_size, cfg.data.seq_len) == (50, 7, 4, 64)
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.mlp_dim) == (96, 3, 288)
    att = cfg.model.mixers.attention
    assert (att.num_heads, att.num_kv_heads) == (6, 3)
    assert cfg.checkpoint_every == 50 and cfg.optim.warmup_steps == 5
    with pytest.raises(ValueError, match="multiple of 16"):
        common.small_lm_config(steps=1, d_model=40)
    with pytest.raises(ValueError, match="steps=0"):
        common.small_lm_config(steps=0)


def test_cached_record_reuses_only_matching_settings(tmp_path):
    path = str(tmp_path / "sub" / "rec.json")
    calls = []

    def compute(value):
        def f():
            calls.append(value)
            return {"value": value}
        return f

    assert common.cached_record(path, {"a": (1, 2)}, compute(1)) == ({"value": 1}, False)
    # the same settings (a tuple reads back as a list) -> reused, not recomputed
    assert common.cached_record(path, {"a": (1, 2)}, compute(2)) == ({"value": 1}, True)
    # other settings -> recomputed and overwritten
    assert common.cached_record(path, {"a": (1, 3)}, compute(3)) == ({"value": 3}, False)
    with open(path) as f:
        assert json.load(f) == {"settings": {"a": [1, 3]}, "record": {"value": 3}}
    # a truncated file (killed mid-write by an older version) -> recomputed
    with open(path, "w") as f:
        f.write('{"settings": {"a": [1, ')
    assert common.cached_record(path, {"a": (1, 3)}, compute(4)) == ({"value": 4}, False)
    assert calls == [1, 3, 4]
