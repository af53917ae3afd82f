"""Trainer end to end: one step per registered config, exact resume, 8-device mesh parity, failure modes."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from sqattn import configs, sample
from sqattn.train import NonFiniteLossError, train_and_evaluate
from sqattn.train import checkpoint as ckpt_lib
from sqattn.train import metrics as metrics_lib
from sqattn.train import state as state_lib


def _cfg(name="lm_tiny:runlocal", **over):
    cfg = configs.get(name)
    for key, val in over.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = val
    return cfg


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir) if "loss" in r}


def _restore_params(workdir, cfg):
    setup = state_lib.make_setup(cfg)
    ck = ckpt_lib.Checkpointer(workdir, 3)
    step = ck.latest_step()
    state = ck.restore(step, setup.abstract_state, setup.state_shardings,
                       json.loads(cfg.to_json_best_effort()))
    ck.close()
    return step, jax.device_get(state["params"])


@pytest.mark.parametrize("name", configs.names())
def test_one_step_every_registered_config(name, tmp_path):
    cfg = _cfg(f"{name}:runlocal", num_steps=1, checkpoint_every=1)
    out = train_and_evaluate(cfg, str(tmp_path), progress=False)
    assert out["step"] == 1 and np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])


def test_kill_and_resume_is_exact(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    cfg = _cfg(num_steps=6, checkpoint_every=3)
    train_and_evaluate(cfg, full, progress=False)
    first = train_and_evaluate(cfg, cut, stop_after=4, progress=False)       # "preempted" after step 4
    assert first["stopped_early"] and first["step"] == 4
    second = train_and_evaluate(cfg, cut, progress=False)                     # resumes from step 4
    assert second["step"] == 6 and not second["stopped_early"]
    assert _losses(full) == _losses(cut)                                      # exactly, every step
    assert sorted(_losses(full)) == [1, 2, 3, 4, 5, 6]
    s1, p1 = _restore_params(full, cfg)
    s2, p2 = _restore_params(cut, cfg)
    assert s1 == s2 == 6
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_eight_device_mesh_matches_single_device(tmp_path):
    assert jax.device_count() == 8
    f32 = {"model.dtype": "float32"}
    single = _cfg(num_steps=2, **f32, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    mesh = _cfg(num_steps=2, **f32, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    train_and_evaluate(single, str(tmp_path / "one"), progress=False)
    train_and_evaluate(mesh, str(tmp_path / "eight"), progress=False)
    l1, l8 = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "eight"))
    assert l1.keys() == l8.keys()
    for step in l1:
        assert abs(l1[step] - l8[step]) < 1e-5, (step, l1[step], l8[step])


def test_grad_accumulation_matches_full_batch(tmp_path):
    a = _cfg(num_steps=2, **{"optim.grad_accum": 1, "mesh.fsdp": 2, "model.dtype": "float32"})
    b = _cfg(num_steps=2, **{"optim.grad_accum": 2, "mesh.fsdp": 2, "model.dtype": "float32"})
    train_and_evaluate(a, str(tmp_path / "a"), progress=False)
    train_and_evaluate(b, str(tmp_path / "b"), progress=False)
    la, lb = _losses(str(tmp_path / "a")), _losses(str(tmp_path / "b"))
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-5, (step, la[step], lb[step])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    bad = _cfg(num_steps=8, checkpoint_every=1, **{"optim.lr": 1e38, "optim.warmup_steps": 0})
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        train_and_evaluate(bad, wd, progress=False, allow_config_change=True)
    ck = ckpt_lib.Checkpointer(wd, 3)
    steps = ck.all_steps()
    ck.close()
    assert 2 in steps and before == ["2"]
    # every checkpoint that exists holds finite parameters
    _, params = _restore_params(wd, bad)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_corrupt_checkpoint_gives_clear_error_and_is_kept(tmp_path):
    wd = str(tmp_path)
    cfg = _cfg(num_steps=2, checkpoint_every=2)
    train_and_evaluate(cfg, wd, progress=False)
    state_dir = os.path.join(wd, "checkpoints", "2", "state")
    for root, _, files in os.walk(state_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(ckpt_lib.CheckpointError, match="could not be restored"):
        train_and_evaluate(_cfg(num_steps=4, checkpoint_every=2), wd, progress=False, allow_config_change=True)
    with pytest.raises(ckpt_lib.CheckpointError, match="could not be restored"):
        sample.load_model(wd)                              # the params-only restore path too
    assert os.path.isdir(state_dir)


def test_resume_with_different_model_is_refused(tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    with pytest.raises(ckpt_lib.CheckpointError, match="different model config"):
        train_and_evaluate(_cfg(num_steps=4, **{"model.d_model": 32}), wd, progress=False)
    assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))
