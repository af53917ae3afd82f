"""The bearing data set, its task under the one trainer (one step, resume after a kill), and the random forest
compiled to arrays against scikit-learn."""

import numpy as np
import pytest

from sqattn import configs
from sqattn.science.bearing import dataset, forest, task
from sqattn.train import metrics as metrics_lib
from sqattn.train import train_and_evaluate


def _data_cfg(**over):
    cfg = configs.get("bearing_mlp:runlocal").data
    cfg.update(over)
    return cfg


def test_dataset_sizes_and_splits():
    cfg = _data_cfg()
    d = dataset.build(cfg)
    assert d.features.shape == (dataset.num_windows(cfg, "train") + dataset.num_windows(cfg, "test"), 15)
    assert d.train.sum() == dataset.num_windows(cfg, "train") == 32
    assert set(np.unique(d.labels)) == {0, 1, 2, 3} and set(np.unique(d.rpm)) == set(cfg.rpms)
    # record split: no record on both sides; window split: windows of one record on both sides
    assert not set(d.record[d.train]) & set(d.record[~d.train])
    w = dataset.build(_data_cfg(split="window", envelope=True))
    assert w.features.shape[1] == 18 and w.names[-1] == "env_two_bsf"
    assert set(w.record[w.train]) & set(w.record[~w.train])
    np.testing.assert_array_equal(w.features[:, :15], d.features)      # same records, same 15 features
    with pytest.raises(ValueError, match="unknown field"):
        dataset.build(_data_cfg(nosie=0.1))
    with pytest.raises(ValueError, match="split must be one of"):
        dataset.build(_data_cfg(split="random"))


def test_batches_are_pure_functions_of_seed_and_step_and_shard_cleanly():
    cfg = configs.get("bearing_mlp:runlocal")
    t = task.BearingTask()
    train, evals = t.make_datasets(cfg)
    a, b = train.batch(3), train.batch(3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(train.batch(4)["features"], a["features"])
    halves = [t.make_datasets(cfg, shard_index=i, shard_count=2)[0].batch(3) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["features"] for h in halves]), a["features"])
    # eval: the configured batches cover every test window exactly once
    assert evals.num_batches == cfg.eval_batches
    rows = [evals.batch(i) for i in range(cfg.eval_batches)]
    assert sum(r["weights"].sum() for r in rows) == dataset.num_windows(cfg.data, "test")
    # standardised with the train split's statistics
    x = np.concatenate([train.batch(s)["features"] for s in range(50)])
    assert np.all(np.abs(x.mean(0)) < 0.5) and np.all(np.abs(x.std(0) - 1) < 0.5)


def test_classification_report_on_a_known_confusion_matrix():
    conf = np.array([[5, 0, 0, 0], [0, 3, 1, 0], [0, 2, 2, 0], [0, 0, 0, 0]], float)
    r = task.classification_report(conf)
    assert r["eval_f1_normal"] == 1.0
    assert r["eval_f1_inner"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert r["eval_f1_outer"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert r["eval_macro_f1"] == pytest.approx((1 + 6 / 9 + 4 / 7) / 3)     # the absent class does not count
    np.testing.assert_array_equal(task.confusion_from_report(r), conf)


def test_bearing_run_resumes_after_a_kill_like_any_run(tmp_path):
    cfg = configs.get("bearing_mlp:runlocal")
    cfg.num_steps, cfg.checkpoint_every = 4, 2
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    done = train_and_evaluate(cfg, full, progress=False)
    first = train_and_evaluate(cfg, cut, stop_after=3, progress=False)
    assert first["stopped_early"] and first["step"] == 3
    second = train_and_evaluate(cfg, cut, progress=False)
    assert second["step"] == 4 and not second["stopped_early"]
    losses = lambda w: {r["step"]: r["loss"] for r in metrics_lib.read_metrics(w) if "loss" in r}  # noqa: E731
    assert losses(full) == losses(cut) and sorted(losses(full)) == [1, 2, 3, 4]
    for k in ("eval_loss", "eval_accuracy", "eval_macro_f1"):
        assert done[k] == second[k], k
    n_test = dataset.num_windows(cfg.data, "test")
    assert sum(v for k, v in second.items() if k.startswith("eval_confusion_")) == pytest.approx(n_test)


# ----------------------------------------------------------------------------------------------- forest
def test_compiled_forest_equals_scikit_learn():
    pytest.importorskip("sklearn", reason="pip install scikit-learn")
    d = dataset.build(_data_cfg(envelope=True))
    (xtr, ytr), (xte, yte) = d.split("train"), d.split("test")
    rf = forest.fit_forest(xtr, ytr, n_estimators=7, seed=0)
    cf = forest.compile_forest(rf)
    assert cf.num_trees == 7 and cf.depth == max(e.tree_.max_depth for e in rf.estimators_)
    for x in (xte, xtr, xte[:1]):
        p = np.asarray(forest.forest_proba(cf, x))
        ref = rf.predict_proba(x)
        assert np.abs(p - ref).max() <= 1e-6 * np.abs(ref).max()
        np.testing.assert_array_equal(p.argmax(1), ref.argmax(1))


def test_compiled_forest_thresholds_round_down_to_float32():
    """Neighbouring float32 values: the midpoint threshold is not a float32; rounding it to nearest would send
    one of the two values down the wrong branch half of the time."""
    pytest.importorskip("sklearn", reason="pip install scikit-learn")
    base = np.float32(1e6)
    vals = base + np.arange(64, dtype=np.float32) * np.float32(0.0625)      # consecutive float32 values
    x = np.stack([vals, vals[::-1]], 1).astype(np.float32)
    y = np.arange(64) % 4
    rf = forest.fit_forest(x, y, n_estimators=5, seed=1, bootstrap=False)
    p = np.asarray(forest.forest_proba(forest.compile_forest(rf), x))
    np.testing.assert_allclose(p, rf.predict_proba(x), rtol=1e-6, atol=0)
    assert (p.argmax(1) == y).mean() == 1.0                                  # the training points, all apart


def test_compile_forest_rejects_unfitted():
    with pytest.raises(ValueError, match="fitted forest"):
        forest.compile_forest(object())
    with pytest.raises(ValueError, match=r"\[batch, features\]"):
        forest.forest_proba(None, np.zeros(3))
