"""A grown run through the trainer: starts from the base run grown, fresh optimizer, continues the data
stream, counts the base's FLOPs, and resumes exactly (G_random's fade-in ramp included)."""

import jax
import numpy as np
import pytest

from sqattn import configs
from sqattn.configs import growth as growth_configs
from sqattn.train import metrics as metrics_lib
from sqattn.train import state as state_lib
from sqattn.train import train_and_evaluate


def _target():
    c = configs.get("lm_tiny:runlocal")
    c.model.num_layers = 2
    c.num_steps, c.checkpoint_every, c.log_every = 4, 2, 1
    return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("base"))
    base = growth_configs.depth_config(_target(), 1)
    base.num_steps = 2
    train_and_evaluate(base, wd, progress=False)
    return wd


def _losses(wd):
    return {r["step"]: r for r in metrics_lib.read_metrics(wd) if "loss" in r}


def test_grown_run_starts_fresh_continues_data_and_counts_base_flops(base_run):
    cfg = growth_configs.grown_config(_target(), base_run, op="zero", g=2, warmup_steps=1)
    assert cfg.data_offset == 2 and cfg.init.transform == "sqattn.growth:grow"
    setup = state_lib.make_setup(cfg)
    state = state_lib.init_state(cfg, setup)
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) >= 1]
    assert moments and all(not np.any(np.asarray(x)) for x in moments)        # fresh AdamW: zero moments
    params = jax.device_get(state["params"])
    assert len(params["blocks"]) == 2 and not np.any(params["blocks"][1]["mlp"]["down"]["kernel"])


def test_grown_run_killed_midway_resumes_to_the_same_losses(base_run, tmp_path):
    cfg = growth_configs.grown_config(_target(), base_run, op="random", g=2, fade_steps=3, warmup_steps=1)
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train_and_evaluate(cfg, whole, progress=False)
    out = train_and_evaluate(cfg, split, progress=False, stop_after=2)
    assert out["stopped_early"]
    train_and_evaluate(cfg, split, progress=False)
    a, b = _losses(whole), _losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s]["loss"] == b[s]["loss"], (s, a[s]["loss"], b[s]["loss"])
    base_flops = max(r["train_flops"] for r in _losses(base_run).values())
    assert a[1]["train_flops"] > base_flops
    assert a[4]["train_flops"] - a[2]["train_flops"] == pytest.approx(2 * (a[2]["train_flops"] - a[1]["train_flops"]))
    events = [r for r in metrics_lib.read_metrics(whole) if r.get("event", "").startswith("fade")]
    assert [e["event"] for e in events] == ["fade_layers", "fade_done"] and events[0]["layers"] == [1]
    assert events[1]["step"] == 3


def test_bad_sources_are_clear_errors(base_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        growth_configs.grown_config(_target(), str(empty))
    cfg = growth_configs.grown_config(_target(), str(empty), data_offset=0)
    with pytest.raises(FileNotFoundError):
        state_lib.load_init_model(cfg)
    shrink = growth_configs.depth_config(_target(), 1)
    shrink.model.mlp_dim = 64
    with pytest.raises(ValueError, match="cannot shrink"):
        state_lib.load_init_model(growth_configs.grown_config(shrink, base_run, op="net2net"))
