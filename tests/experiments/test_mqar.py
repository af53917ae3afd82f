"""experiments/mqar.py and sqattn/configs/mqar.py: every config validates and its data fits 4P tokens, the
task's eval_accuracy is query accuracy, and the binary's grid writes its JSON/PNG and resumes."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import mqar
from sqattn import configs, data, mixers
from sqattn.configs import mqar as mqar_configs
from sqattn.configs.validate import validate
from sqattn.train import state as state_lib
from sqattn.train import tasks


def _available(model):
    return mqar_configs.MIXERS[model][0] in mixers.mixers()


@pytest.mark.parametrize("model", sorted(mqar_configs.MIXERS))
def test_every_mqar_config_validates_and_its_data_fits(model):
    if not _available(model):
        pytest.skip(f"{model}: mixer module missing")
    for pairs in (16, 32, 64):
        cfg = configs.get(f"mqar:mixer={model},pairs={pairs}")
        validate(cfg, check_devices=False)
        assert cfg.data.seq_len == 4 * pairs and cfg.model.d_model == 64 and cfg.model.num_layers == 2
        assert cfg.model.mlp_dim == 128 and cfg.model.tie_embeddings
        assert cfg.eval_batches * cfg.batch_size >= 1000
        sub = cfg.model.mixers[mqar_configs.MIXERS[model][1]]
        assert sub.num_heads == 2 and sub.get("head_dim", sub.get("head_k_dim")) == 32
        batch = data.make_dataset(cfg.data, batch_size=2, split="eval").batch(0)
        assert batch["inputs"].shape == (2, 4 * pairs)
        np.testing.assert_array_equal(batch["weights"].sum(axis=1), [pairs, pairs])   # one weight per query
    validate(configs.get(f"mqar:mixer={model},runlocal"), check_devices=False)


def test_eval_accuracy_is_accuracy_at_the_query_keys():
    cfg = configs.get("mqar_attention:pairs=8,runlocal")
    task = tasks.get_task(cfg.task)
    _, eval_ds = task.make_datasets(cfg)
    batch = eval_ds.batch(0)
    w = batch["weights"] > 0
    p = cfg.data.num_kv_pairs
    k_vocab = cfg.data.key_vocab_size
    # weighted positions: a query key as input (it appears among the P stated keys) and its bound value as target
    assert np.all((batch["inputs"][w] >= 1) & (batch["inputs"][w] <= k_vocab)) and np.all(batch["targets"][w] > k_vocab)
    for row in range(w.shape[0]):
        kv = dict(zip(batch["inputs"][row, 0:2 * p:2], batch["inputs"][row, 1:2 * p:2]))
        for t in np.flatnonzero(w[row]):
            assert kv[batch["inputs"][row, t]] == batch["targets"][row, t]
    model = state_lib.build_model(cfg)

    @nnx.jit
    def metrics_and_logits(model, batch):
        _, m = task.loss_fn(model, batch, jax.random.key(0))
        return m, model(batch["inputs"])[0]

    m, logits = metrics_and_logits(model, jax.tree.map(jax.numpy.asarray, batch))
    sums = {k: (np.asarray(v) * np.asarray(m["weight"]) if k != "weight" else np.asarray(v)) for k, v in m.items()}
    got = task.eval_metrics(sums)["eval_accuracy"]       # how the trainer's evaluate() reduces eval_step sums
    pred = np.asarray(logits).argmax(-1)
    assert got == pytest.approx(np.mean(pred[w] == batch["targets"][w]), abs=1e-6)


def test_binary_grid_writes_results_and_resumes(tmp_path):
    wd = str(tmp_path)
    models = ("attention", "gla_softmax")
    rec = mqar.run(wd, models=models, pairs=(4,), steps=3, seeds=1, runlocal=True, progress=False)
    with open(os.path.join(wd, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk["table"] == rec["table"] and os.path.getsize(os.path.join(wd, "mqar.png")) > 0
    assert set(rec["table"]) == set(models) and not rec["skipped"]
    assert rec["settings"]["batch_size"] == {"4": 8} and rec["settings"]["pairs"] == [4]
    for model in models:
        row = rec["table"][model]
        assert row["params"] > 0 and set(row["by_pairs"]) == {"4"}
        cell = row["by_pairs"]["4"]
        assert len(cell["seeds"]) == 1 and 0.0 <= cell["mean"] <= 1.0
    assert rec["table"]["attention"]["params"] != rec["table"]["gla_softmax"]["params"]
    for r in rec["runs"]:
        assert r["seq_len"] == 16 and r["num_kv_pairs"] == 4 and not r["reused"]
        assert r["config_name"] == mqar.config_name(r["model"], 4, 3, 0, runlocal=True)
        assert os.path.exists(os.path.join(r["run_dir"], "result.json"))
        assert r["command"].startswith("python -m experiments.train --config=mqar:mixer=")
    again = mqar.run(wd, models=models, pairs=(4,), steps=3, seeds=1, runlocal=True, progress=False)
    assert all(r["reused"] for r in again["runs"]) and again["table"] == rec["table"]
    collected = mqar.run(wd, models=models, pairs=(4, 8), steps=3, seeds=1, runlocal=True, progress=False,
                         collect_only=True)                        # trains nothing: P=8 is pending
    assert collected["table"] == rec["table"]
    assert sorted((s["model"], s["pairs"]) for s in collected["skipped"]) == [("attention", 8), ("gla_softmax", 8)]
    assert all(s["reason"].startswith("pending") for s in collected["skipped"])
    assert "attention" in mqar.format_table(rec["table"], (4,))
    # the curriculum: P=8 starts from the finished P=4 run (its FLOPs are counted on top of the source's)
    chained = mqar.run(wd, models=("attention",), pairs=(8, 4), steps=(2, 3), seeds=1, runlocal=True,
                       progress=False)
    by_p = {r["pairs"]: r for r in chained["runs"]}
    assert by_p[4]["reused"] and not by_p[8]["reused"]          # (runlocal trains 4 steps whatever steps says)
    assert by_p[8]["init"] == by_p[4]["run_dir"] and by_p[8]["after"] == "P4x3"
    assert f"init={by_p[4]['run_dir']}" in by_p[8]["command"] and by_p[8]["run_dir"].endswith("_after-P4x3_runlocal")
    src_flops = max(r["train_flops"] for r in _metrics(by_p[4]["run_dir"]) if "train_flops" in r)
    first = min((r for r in _metrics(by_p[8]["run_dir"]) if "train_flops" in r), key=lambda r: r["step"])
    assert first["step"] == 1 and first["train_flops"] > src_flops
    assert chained["settings"]["steps"] == {"4": 3, "8": 2} and chained["settings"]["chain"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_steps_per_pairs_and_curriculum_names():
    assert mqar.steps_by_pairs((16, 4), 7) == {16: 7, 4: 7}
    assert mqar.steps_by_pairs((16, 4), (5, 9)) == {16: 5, 4: 9}
    with pytest.raises(ValueError, match="one per P"):
        mqar.steps_by_pairs((4, 16, 32), (1, 2))
    plan = mqar.curriculum((32, 4, 16), {4: 10, 16: 20, 32: 30}, chain=True)
    assert plan == {4: (None, ""), 16: (4, "P4x10"), 32: (16, "P4x10-P16x20")}
    assert mqar.curriculum((32, 4), {4: 1, 32: 2}, chain=False) == {4: (None, ""), 32: (None, "")}
    with pytest.raises(ValueError, match="must not contain"):
        mqar.config_name("attention", 4, 10, 0, init="/a,b")


def test_unknown_model_and_missing_mixer_are_reported(monkeypatch):
    with pytest.raises(ValueError, match="unknown model"):
        mqar.model_unavailable("transformer")
    monkeypatch.setitem(mqar_configs.MIXERS, "ghost", ("~", "ghost", {}))
    assert "not registered" in mqar.model_unavailable("ghost")


def test_recipe_defaults_and_overrides():
    fresh = configs.get("mqar:mixer=attention,pairs=4")
    assert fresh.batch_size == 128 and fresh.optim.lr == mqar_configs.LR_FRESH and fresh.init.workdir == ""
    assert fresh.optim.warmup_steps == mqar_configs.WARMUP_FRESH
    stage = configs.get("mqar:mixer=attention,pairs=64,init=/runs/p32")
    assert stage.batch_size == 32 and stage.init.workdir == "/runs/p32"
    assert (stage.optim.lr, stage.optim.warmup_steps) == (mqar_configs.LR_STAGE, mqar_configs.WARMUP_STAGE)
    assert configs.get("mqar:mixer=attention,pairs=16").batch_size * 4 * 16 == mqar_configs.TOKENS_PER_STEP
    own = configs.get("mqar:mixer=attention,pairs=16,batch=64,lr=1e-3,warmup=7")
    assert (own.batch_size, own.optim.lr, own.optim.warmup_steps) == (64, 1e-3, 7)
    with pytest.raises(ValueError, match="batch and lr must be >= 0"):
        configs.get("mqar:mixer=attention,batch=-1")
