"""The CTR task through the trainer: 8 simulated devices give the 1-device losses with the embedding table
sharded, and the eval AUC / logloss cover the whole eval split (checked against sklearn on the saved model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sqattn import configs, sample
from sqattn.data import ctr as ctr_data
from sqattn.train import train_and_evaluate
from sqattn.train import metrics as metrics_lib
from sqattn.train import state as state_lib


def _cfg(tmp_path, mesh, **over):
    cfg = configs.get(f"fcn_synth:runlocal,data_dir={tmp_path / 'data'}")
    cfg.num_steps, cfg.checkpoint_every, cfg.eval_batches = 3, 3, 3
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    cfg.model.num_exp_layers = cfg.model.num_lin_layers = 1     # both branches, Tri-BCE; compiles faster
    for k, v in over.items():
        cfg[k] = v
    return cfg


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir) if "loss" in r}


def test_eight_devices_match_one_and_eval_covers_the_split(tmp_path):
    assert jax.device_count() == 8
    one, eight = _cfg(tmp_path, (1, 1, 1)), _cfg(tmp_path, (2, 2, 2))
    spec = state_lib.make_setup(eight).state_shardings["params"]["embed"]["table"].spec
    assert spec == P("tensor", "fsdp")                       # rows over tensor, columns over fsdp
    r1 = train_and_evaluate(one, str(tmp_path / "one"), progress=False)
    r8 = train_and_evaluate(eight, str(tmp_path / "eight"), progress=False)
    l1, l8 = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "eight"))
    assert sorted(l1) == sorted(l8) == [1, 2, 3]
    for step in l1:
        assert abs(l1[step] - l8[step]) <= 1e-5 * abs(l1[step]), (step, l1[step], l8[step])
    assert abs(r1["eval_auc"] - r8["eval_auc"]) < 1e-4
    assert abs(r1["eval_logloss"] - r8["eval_logloss"]) <= 1e-5 * r1["eval_logloss"]

    # the eval metrics are over the whole valid split: recompute them with sklearn from the saved model
    from sklearn.metrics import log_loss, roc_auc_score
    valid = ctr_data.load_splits(one.data)["valid"]
    assert r8["eval_rows"] == len(valid["label"]) == 200      # 3 batches of 72 rows, 16 of them padding
    model, _ = sample.load_model(str(tmp_path / "eight"))
    logit = np.asarray(jax.jit(lambda i: model(i)["logit"])(jnp.asarray(valid["ids"])), np.float64)
    y = valid["label"]
    exact = roc_auc_score(y, logit)
    assert abs(r8["eval_auc"] - exact) <= r8["eval_auc_tie_bound"] + 1e-9
    assert abs(r8["eval_logloss"] - log_loss(y, 1 / (1 + np.exp(-logit)))) <= 1e-5 * r8["eval_logloss"]


def test_model_vocabulary_must_match_the_data(tmp_path):
    cfg = _cfg(tmp_path, (1, 1, 1))
    cfg.model.vocab_sizes = [3] * len(cfg.model.vocab_sizes)
    with pytest.raises(ValueError, match="do not match the data's field vocabularies"):
        train_and_evaluate(cfg, str(tmp_path / "bad"), progress=False)
