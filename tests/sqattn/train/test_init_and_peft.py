"""Runs that start from another run: ``config.init`` (load), ``config.peft`` (adapters), ``optim.trainable``."""

import jax
import numpy as np
import pytest
from flax import nnx

from sqattn import configs, sample
from sqattn.train import metrics as metrics_lib
from sqattn.train import state as state_lib
from sqattn.train import train_and_evaluate


def _flat(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("base"))
    cfg = configs.get("lm_tiny:runlocal")
    cfg.num_steps = 2
    train_and_evaluate(cfg, wd, progress=False)
    return wd


def _lora_cfg(base_wd, **over):
    cfg = configs.get("lm_tiny:runlocal")
    cfg.num_steps, cfg.checkpoint_every = 4, 2
    cfg.init.workdir = base_wd
    cfg.peft.method = "lora"
    cfg.optim.trainable = "lora_"
    for k, v in over.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def test_lora_finetune_trains_only_adapters_from_the_base_weights(base_run, tmp_path):
    out = train_and_evaluate(_lora_cfg(base_run), str(tmp_path), progress=False)
    assert out["step"] == 4 and np.isfinite(out["loss"])
    base, tuned = _flat(sample.load_model(base_run)[0]), _flat(sample.load_model(str(tmp_path))[0])
    frozen = 0
    for path, value in tuned.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        src = path[:-2] + path[-1:] if "base" in path else path      # LoRADense keeps the Dense as .base
        np.testing.assert_array_equal(value, base[src], err_msg=str(path))
        frozen += 1
    assert frozen == len(base)                                        # every base weight, bit for bit
    assert all(np.abs(v).max() > 0 for p, v in tuned.items() if p[-1] == "lora_b")   # adapters moved off 0


def test_frozen_parameters_get_no_optimizer_state_and_moments_keep_param_shardings(base_run):
    cfg = _lora_cfg(base_run, **{"mesh.fsdp": 2, "mesh.tensor": 2, "mesh.data": 2})
    setup = state_lib.make_setup(cfg)
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state["params"]))
    n_lora = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(setup.abstract_state["params"])
                 if "lora_" in jax.tree_util.keystr(p))
    n_opt = sum(x.size for x in jax.tree.leaves(setup.abstract_state["opt_state"]))
    assert 0 < n_lora < n_params and 2 * n_lora <= n_opt < 2 * n_lora + 16     # mu, nu of adapters + counts
    # every moment shares its parameter's sharding (not replicated)
    params_sh = {jax.tree_util.keystr(p): s for p, s in
                 jax.tree_util.tree_leaves_with_path(setup.state_shardings["params"])}
    opt = jax.tree_util.tree_leaves_with_path(setup.state_shardings["opt_state"])
    sharded = [s for p, s in opt if any(jax.tree_util.keystr(p).endswith(k) for k in params_sh)]
    assert sharded and all(s == params_sh[next(k for k in params_sh if jax.tree_util.keystr(p).endswith(k))]
                           for p, s in opt if any(jax.tree_util.keystr(p).endswith(k) for k in params_sh))


def test_finetune_resumes_from_its_own_checkpoint_exactly(base_run, tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train_and_evaluate(_lora_cfg(base_run), full, progress=False)
    train_and_evaluate(_lora_cfg(base_run), cut, stop_after=3, progress=False)
    train_and_evaluate(_lora_cfg(base_run), cut, progress=False)
    losses = lambda wd: {r["step"]: r["loss"] for r in metrics_lib.read_metrics(wd) if "loss" in r}  # noqa
    assert losses(full) == losses(cut) and sorted(losses(full)) == [1, 2, 3, 4]


def test_bad_init_and_trainable_settings_are_clear_errors(base_run, tmp_path):
    with pytest.raises(ValueError, match="matches no parameter"):
        state_lib.make_setup(_lora_cfg(base_run, **{"optim.trainable": "nothing_is_called_this"}))
    with pytest.raises(ValueError, match="not a regular expression"):
        state_lib.make_setup(_lora_cfg(base_run, **{"optim.trainable": "lora_("}))
    other = _lora_cfg(base_run, **{"model.d_model": 32, "peft.method": "", "optim.trainable": ""})
    with pytest.raises(ValueError, match="shape mismatch|another parameter tree"):
        train_and_evaluate(other, str(tmp_path / "x"), progress=False)
    from sqattn.configs.validate import ConfigError
    with pytest.raises(ConfigError, match="init.workdir"):
        train_and_evaluate(_lora_cfg(str(tmp_path / "missing")), str(tmp_path / "y"), progress=False)
    # init.state='full' (continue the source's whole train state): only for the same tree, at a step it has,
    # with the same optimizer state tree, and with steps left to train
    bad_state = _lora_cfg(base_run, **{"init.state": "moments"})
    with pytest.raises(ConfigError, match="init.state must be 'params' or 'full'"):
        train_and_evaluate(bad_state, str(tmp_path / "z"), progress=False)
    with pytest.raises(ConfigError, match="needs init.transfer='same'"):
        train_and_evaluate(_lora_cfg(base_run, **{"init.state": "full", "init.transfer": "transplant"}),
                           str(tmp_path / "z"), progress=False)
    full = dict(**{"init.state": "full", "peft.method": "", "optim.trainable": ""})
    from sqattn.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="no checkpoint at step 7 .*it has \\[2\\]"):
        train_and_evaluate(_lora_cfg(base_run, **full, **{"init.step": 7}), str(tmp_path / "z"), progress=False)
    with pytest.raises(CheckpointError, match="same optimizer and optim.trainable"):
        train_and_evaluate(_lora_cfg(base_run, **{**full, "optim.trainable": "embed"}), str(tmp_path / "z"),
                           progress=False)
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train_and_evaluate(_lora_cfg(base_run, **full, **{"num_steps": 2}), str(tmp_path / "z"), progress=False)
