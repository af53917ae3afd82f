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


# One config per distinct compiled program (task x model/mixer family x transform/peft) runs a real step, unless
# another test already trains that config family through the trainer (COVERED: config -> that test). Every other
# config differs from one of these only in data, sizes or settings, and traces its step abstractly below
# (everything but XLA's compile and the numbers). Compiling all 43 took ~10 CPU-minutes of the suite.
ONE_STEP = ("lm_tiny", "moe_tiny", "mamba_tiny", "mamba2_tiny", "gla_tiny", "sse_h_tiny", "scout_swa_tiny",
            "scout_mamba_tiny", "lm_shards", "dcnv2_synth", "judge_shapes", "spm_shapes", "teacher_cls")
COVERED = {
    "hamburger": "tests/experiments/test_hamburger.py::test_finetune_is_a_trainer_run_that_resumes",
    "liger": "tests/experiments/test_linearize.py::test_run_end_to_end_and_resume",
    "grow": "tests/sqattn/growth/test_grow_run.py::test_grown_run_killed_midway_resumes_to_the_same_losses",
    "sema_digits": "tests/sqattn/models/test_sema.py::test_resumed_stream_equals_an_uninterrupted_one",
    "fcn_synth": "tests/sqattn/train/test_ctr_task.py::test_eight_devices_match_one_and_eval_covers_the_split",
    "rank_synth": "tests/sqattn/peft/test_adaptive_trainer.py::test_resume_mid_schedule_equals_uninterrupted",
    "dit_shapes": "tests/experiments/test_spm.py::test_diffusion_run_resumes_after_a_kill",
    "bearing_mlp": "tests/sqattn/science/bearing/test_task.py::test_bearing_run_resumes_after_a_kill_like_any_run",
    "teacher_lmc": "tests/sqattn/analysis/test_runs.py::test_spawned_child_resumes_after_a_kill",
}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_one_step_set_names_registered_configs_and_covering_tests_exist():
    names = set(configs.names())
    assert set(ONE_STEP) <= names and set(COVERED) <= names, (set(ONE_STEP) | set(COVERED)) - names
    for name, node in COVERED.items():
        path, func = node.split("::")
        with open(os.path.join(ROOT, path)) as f:
            assert f"def {func}(" in f.read(), f"{name}: {node} is gone; put {name} back in ONE_STEP"


@pytest.mark.parametrize("name", ONE_STEP)
def test_one_step_of_each_kind_of_registered_config(name, tmp_path):
    cfg = _cfg(f"{name}:runlocal", num_steps=1, checkpoint_every=1)
    out = train_and_evaluate(cfg, str(tmp_path), progress=False)
    assert out["step"] == 1 and np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])


@pytest.mark.parametrize("name", [n for n in configs.names() if n not in ONE_STEP])  # COVERED too
def test_every_other_registered_config_traces_a_train_and_eval_step(name):
    """Model, optimizer, task and data of the config's runlocal variant, and one train and eval step traced on
    a real batch of its data: shapes and dtypes of the new state equal the old, metrics are scalars."""
    from sqattn.parallel import sharding
    from sqattn.train import tasks as tasks_lib
    from sqattn.train.trainer import make_eval_step, make_train_step
    from sqattn.configs.validate import validate
    cfg = _cfg(f"{name}:runlocal", num_steps=1)
    validate(cfg, check_devices=False)
    setup = state_lib.make_setup(cfg)
    task = tasks_lib.get_task(cfg.task)
    train_ds, eval_ds = task.make_datasets(cfg, shard_index=0, shard_count=1)
    step = make_train_step(setup.graphdef, task, setup.tx, setup.schedule, cfg.optim.grad_accum, cfg.seed)
    with sharding.activation_sharding(setup.mesh, setup.rules):
        new_state, metrics = jax.eval_shape(step, setup.abstract_state, train_ds.batch(0))
        sums = jax.eval_shape(make_eval_step(setup.graphdef, task), setup.abstract_state["params"],
                              eval_ds.batch(0))
    shape = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    assert shape(new_state) == shape(setup.abstract_state)
    assert metrics["loss"].shape == () and sums["weight"].shape == ()


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
