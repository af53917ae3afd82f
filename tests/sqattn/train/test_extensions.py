"""The trainer's extension points: ``init.transform``, ``data_offset``, cumulative ``train_flops``, host hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn import configs
from sqattn.train import metrics as metrics_lib
from sqattn.train import state as state_lib
from sqattn.train import tasks as tasks_lib
from sqattn.train import train_and_evaluate


def _cfg(**over):
    cfg = configs.get("lm_tiny:runlocal")
    cfg.num_steps, cfg.checkpoint_every = 4, 2
    for k, v in over.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def _train_recs(wd):
    return {r["step"]: r for r in metrics_lib.read_metrics(wd) if "loss" in r}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("base"))
    result = train_and_evaluate(_cfg(), wd, progress=False)
    return wd, result


# --- init.transform: module-level functions, named as "tests.sqattn.train.test_extensions:<name>"
def identity(src, src_config, config):
    return src


def halve_embedding(src, src_config, config):
    src.embed.embedding[...] = src.embed.embedding[...] * 0.5
    return src


def wrong_tree(src, src_config, config):
    return state_lib.build_base_model(_cfg(**{"model.num_layers": 1}))


def _here(name):
    return f"{__name__}:{name}"


def test_transform_is_what_the_run_starts_from(base_run, tmp_path):
    wd, base = base_run
    # num_steps=0: the final eval sees the initial parameters, i.e. what the transform returned.
    same = train_and_evaluate(_cfg(**{"init.workdir": wd, "init.transform": _here("identity"), "num_steps": 0,
                                      "optim.warmup_steps": 0}), str(tmp_path / "a"), progress=False)
    assert same["eval_loss"] == pytest.approx(base["eval_loss"], rel=1e-6)
    halved = train_and_evaluate(_cfg(**{"init.workdir": wd, "init.transform": _here("halve_embedding"),
                                        "num_steps": 0, "optim.warmup_steps": 0}),
                                str(tmp_path / "b"), progress=False)
    assert abs(halved["eval_loss"] - base["eval_loss"]) > 1e-3


def test_transform_returning_another_tree_is_a_clear_error(base_run, tmp_path):
    wd, _ = base_run
    with pytest.raises(ValueError, match="init.transform .* differ from config.model's.*blocks"):
        train_and_evaluate(_cfg(**{"init.workdir": wd, "init.transform": _here("wrong_tree")}),
                           str(tmp_path / "w"), progress=False)
    with pytest.raises(ValueError, match="has no 'nope'"):
        train_and_evaluate(_cfg(**{"init.workdir": wd, "init.transform": _here("nope")}),
                           str(tmp_path / "n"), progress=False)
    from sqattn.configs.validate import ConfigError
    with pytest.raises(ConfigError, match="module.path:function"):
        train_and_evaluate(_cfg(**{"init.workdir": wd, "init.transform": "no_colon"}), str(tmp_path / "c"),
                           progress=False)


def test_data_offset_feeds_later_batches(tmp_path):
    cfg = _cfg(data_offset=3, num_steps=1)
    recs = _train_recs(train_and_evaluate(cfg, str(tmp_path / "o"), progress=False)["metrics"].rsplit("/", 1)[0])
    task = tasks_lib.get_task(cfg.task)
    train_ds, _ = task.make_datasets(cfg)
    model = state_lib.build_model(cfg)
    expect = [float(task.loss_fn(model, {k: jnp.asarray(v) for k, v in train_ds.batch(i).items()},
                                 jax.random.key(0))[0]) for i in (0, 3)]
    assert recs[1]["loss"] == pytest.approx(expect[1], rel=1e-4)      # the loss before step 1 update (bf16)
    assert abs(recs[1]["loss"] - expect[0]) > 1e-4 * abs(expect[0])


def test_train_flops_accumulate_across_runs(base_run, tmp_path):
    wd, _ = base_run
    base = _train_recs(wd)
    per_step = base[1]["train_flops"]
    assert per_step > 0
    assert [base[s]["train_flops"] for s in (2, 4)] == pytest.approx([2 * per_step, 4 * per_step], rel=1e-12)
    child = _cfg(**{"init.workdir": wd, "init.step": 2, "num_steps": 2})
    out = _train_recs(train_and_evaluate(child, str(tmp_path / "c"), progress=False)["metrics"].rsplit("/", 1)[0])
    assert out[1]["train_flops"] == pytest.approx(3 * per_step, rel=1e-12)


# --- host hooks: a task with one hook whose effect depends on its own state
class ScaleHook:
    """Every 2 steps multiplies the final norm's scale by 1 / (1 + calls so far)."""
    every = 2

    def __init__(self):
        self.calls = 0
        self.events = []

    def __call__(self, step, state, ctx):
        assert ctx.config.task == "hooked_lm" and callable(ctx.train_batch)
        self.calls += 1
        params = dict(state["params"])
        params["final_norm"] = jax.tree.map(lambda x: x / (1 + self.calls), params["final_norm"])
        self.events.append({"event": "scaled", "calls": self.calls})
        return dict(state, params=params)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, d):
        self.calls = d["calls"]


class HookedLM(tasks_lib.LMTask):
    enabled = True

    def make_hooks(self, config):
        return [ScaleHook()] if self.enabled else []


@pytest.fixture
def hooked_task(monkeypatch):
    monkeypatch.setitem(tasks_lib.TASKS, "hooked_lm", HookedLM)


def test_hooks_change_state_log_events_and_resume_exactly(hooked_task, tmp_path):
    cfg = _cfg(task="hooked_lm", num_steps=6, checkpoint_every=2)
    full = str(tmp_path / "full")
    train_and_evaluate(cfg, full, progress=False)
    events = [r for r in metrics_lib.read_metrics(full) if r.get("event") == "scaled"]
    assert [(e["step"], e["calls"]) for e in events] == [(2, 1), (4, 2), (6, 3)]
    plain = str(tmp_path / "plain")
    train_and_evaluate(_cfg(num_steps=6, checkpoint_every=2), plain, progress=False)
    assert _train_recs(full)[3]["loss"] != _train_recs(plain)[3]["loss"]      # the hook changed training
    assert _train_recs(full)[2]["loss"] == _train_recs(plain)[2]["loss"]

    part = str(tmp_path / "part")
    train_and_evaluate(cfg, part, progress=False, stop_after=4)
    train_and_evaluate(cfg, part, progress=False)
    a, b = _train_recs(full), _train_recs(part)
    assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]
    events = [r for r in metrics_lib.read_metrics(part) if r.get("event") == "scaled"]
    assert [(e["step"], e["calls"]) for e in events] == [(2, 1), (4, 2), (6, 3)]


def test_resume_without_the_hooks_state_is_refused(hooked_task, monkeypatch, tmp_path):
    wd = str(tmp_path / "r")
    monkeypatch.setattr(HookedLM, "enabled", False)
    train_and_evaluate(_cfg(task="hooked_lm", num_steps=4), wd, progress=False, stop_after=2)
    monkeypatch.setattr(HookedLM, "enabled", True)
    from sqattn.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="holds the state of 0 host hook.*ScaleHook"):
        train_and_evaluate(_cfg(task="hooked_lm", num_steps=4), wd, progress=False)


def test_peft_methods_registry_names_unknown_methods():
    from sqattn.configs.validate import ConfigError, validate
    cfg = _cfg(**{"peft.method": "nope"})
    with pytest.raises(ConfigError, match="peft.method must be .*'lora'.*got 'nope'"):
        validate(cfg, check_devices=False)
    model = state_lib.build_model(_cfg(**{"peft.method": "lora", "peft.targets": "q"}))
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert any(p.endswith("q/lora_a") for p in paths)
    assert np.all(["k/lora_a" not in p for p in paths])
