"""The analyses on real trainer runs: the teacher task, spawning children (resume after a kill), sweeps."""

import json
import os

import jax
import numpy as np
import pytest

from sqattn import configs
from sqattn.analysis import lmc, sweep, teacher
from sqattn.train import train_and_evaluate


def test_teacher_shards_are_nested_and_batches_pure():
    cfg = teacher.default_config()
    cfg.update(dict(n_train=1500, n_eval=100, in_dim=5, teacher_hidden=7, num_outputs=3))
    small = teacher.default_config()
    small.update(dict(cfg.to_dict(), n_train=700))
    x, y = teacher.examples(cfg, "train")
    xs, ys = teacher.examples(small, "train")
    np.testing.assert_array_equal(x[:700], xs)
    np.testing.assert_array_equal(y[:700], ys)
    xe, _ = teacher.examples(cfg, "eval")
    assert not np.any(np.all(np.isclose(xe[:, None], x[None, :100]), -1))     # eval is another stream
    b = teacher.TeacherBatches(x, y, split="train", global_batch_size=64, seed=3)
    rows = np.concatenate([b.rows(s)[0] for s in range(24)])                    # 1536 rows: epoch 0 + 36
    assert sorted(rows[:1500]) == list(range(1500))                            # each epoch visits all once
    np.testing.assert_array_equal(b.batch(5)["x"], teacher.TeacherBatches(
        x, y, split="train", global_batch_size=64, seed=3).batch(5)["x"])
    other = teacher.TeacherBatches(x, y, split="train", global_batch_size=64, seed=4)
    assert not np.array_equal(b.rows(0)[0], other.rows(0)[0])                  # the data-order seed matters
    with pytest.raises(ValueError, match="kind must be one of"):
        teacher.examples(dict_cfg(kind="ranking"), "train")


def dict_cfg(**kw):
    c = teacher.default_config()
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmc")
    cfg = configs.get("teacher_lmc:runlocal")
    wd = str(root / "parent")
    lmc.train_parent(cfg, wd, [0, 2])
    return root, wd


def _params(workdir):
    return jax.tree.leaves(lmc.load_run(workdir, datasets=False).params)


def test_spawned_child_resumes_after_a_kill(parent):
    root, pwd = parent
    assert lmc.checkpoint_steps(pwd) == [0, 2, 4]
    cc = lmc.child_config(pwd, 2, data_seed=7, extra_steps=4)
    assert (cc.init.workdir, cc.init.step, cc.init.state, cc.data.seed, cc.get("data_offset", 0),
            cc.num_steps) == (pwd, 2, "full", 7, 0, 6)       # the step counter continues the parent's
    killed, whole = str(root / "killed"), str(root / "whole")
    out = train_and_evaluate(cc, killed, stop_after=4, progress=False)    # preempted after 2 of 4 steps
    assert out["stopped_early"] and out["step"] == 4
    out = train_and_evaluate(cc, killed, progress=False)                  # rerun: resumes from its own step 4
    assert not out["stopped_early"] and out["step"] == 6
    train_and_evaluate(cc, whole, progress=False)
    for a, b in zip(_params(killed), _params(whole)):
        np.testing.assert_array_equal(a, b)
    # the child started from the parent's step-2 parameters, not from its own initialisation
    run_k, child = lmc.load_run(pwd, 2, datasets=False), lmc.load_run(killed, datasets=False)
    fresh = lmc.load_run(pwd, 0, datasets=False)
    assert lmc.distance(child.params, run_k.params) < lmc.distance(child.params, fresh.params)
    with pytest.raises(ValueError, match="nothing to train"):
        lmc.child_config(pwd, 4, data_seed=1)


def test_child_copies_the_parents_optimizer_state(parent):
    """A child spawned with the parent's own data order IS the parent from there on (step counter, schedule and
    Adam moments copied: lmc.md); with a restarted optimizer (state='params') it is not."""
    root, pwd = parent
    seed = int(lmc._config_of(pwd).data.seed)
    same = lmc.child_config(pwd, 2, data_seed=seed)
    train_and_evaluate(same, str(root / "same_order"), progress=False)
    for a, b in zip(_params(str(root / "same_order")), jax.tree.leaves(lmc.load_run(pwd, 4, datasets=False).params)):
        np.testing.assert_array_equal(a, b)
    restarted = lmc.child_config(pwd, 2, data_seed=seed, state="params")
    assert (restarted.num_steps, restarted.data_offset, restarted.init.state) == (2, 2, "params")
    train_and_evaluate(restarted, str(root / "restarted"), progress=False)
    gap = lmc.distance(lmc.load_run(str(root / "restarted"), datasets=False).params,
                       lmc.load_run(pwd, 4, datasets=False).params)
    assert gap > 1e-3 * lmc.distance(lmc.load_run(pwd, 4, datasets=False).params,
                                     lmc.load_run(pwd, 2, datasets=False).params)
    with pytest.raises(ValueError, match="state must be 'full' or 'params'"):
        lmc.child_config(pwd, 2, data_seed=1, state="moments")


def test_compare_on_runs(parent):
    _, pwd = parent
    a, k = lmc.load_run(pwd), lmc.load_run(pwd, 2)
    res = lmc.compare(a, a, base=k, num_batches=2, eval_num_batches=2, groups=lmc.default_groups(a.params),
                      alphas=5, with_predictors=False)     # predictors: test_lmc.py (closed forms)
    assert res["distance"] == 0.0 and res["train"]["loss_barrier"]["barrier"] == 0.0
    assert set(res["layers"]) == {"layers/0", "layers/1", "out"}
    assert "error_barrier" in res["eval"]
    # the run's own loss at alpha = 0 is the loss of its parameters on the same batches
    fn = a.loss_fn()
    want = np.mean([float(fn(a.params, b)[0]) for b in a.batches("train", 2)])
    assert res["train"]["loss"][0] == pytest.approx(want, rel=1e-5)


def test_sweep_reports_a_failed_run_and_keeps_the_others(tmp_path):
    ovs = [{"data.n_train": 64}, {"data.n_train": 64, "optim.lr": -1.0}, {"model.no_such_field": 1}]
    res = sweep.run_sweep("teacher_reg:runlocal", ovs, str(tmp_path))
    assert [r.status for r in res] == ["trained", "failed", "failed"]
    assert "optim.lr must be > 0" in res[1].error and "no_such_field" in res[2].error
    assert np.isfinite(res[0].result["eval_loss"])
    with open(os.path.join(res[0].workdir, sweep.RESULT_FILE)) as f:
        assert json.load(f)["status"] == "trained"
    again = sweep.run_sweep("teacher_reg:runlocal", ovs[:1] + [{"data.n_train": 32}], str(tmp_path),
                            train_fn=lambda c, w: {"stopped_early": True, "step": 0})
    assert again[0].status == "reused" and again[0].result == res[0].result     # no trainer call
    assert again[1].status == "failed" and "stopped early" in again[1].error
