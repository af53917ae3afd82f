"""G_learn (LiGO depth maps): starts as G_stack, trains only the maps through the trainer, folds exactly into a
plain LM, mixes only layers of one kind, and its two runs resume like any run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn import configs, growth
from sqattn.configs import growth as growth_configs
from sqattn.growth import learn, paths
from sqattn.train import metrics as metrics_lib
from sqattn.train import state as state_lib
from sqattn.train import train_and_evaluate
from tests.sqattn.growth.test_grow_run import _target, base_run  # noqa: F401 (the same tiny base run)

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params):
    return nnx.merge(graphdef, params)(TOKENS)[0]


def _logits(model):
    return np.asarray(_forward(*nnx.split(model)), np.float64)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cfg(name, layers, pattern=None):
    c = configs.get(f"{name}:runlocal")
    c.model.dtype = "float32"
    c.model.num_layers = layers
    if pattern:
        c.model.block_pattern = pattern
    return c


def _ligo_config(target, src_cfg):
    c = target.copy_and_resolve_references()
    with c.unlocked():
        c.model_name = learn.MODEL
        pattern = src_cfg.model.block_pattern
        c.model.ligo = dict(source_layers=src_cfg.model.num_layers,
                            source_pattern="" if pattern == target.model.block_pattern else pattern)
    return c


# (target config, base depth, base pattern, G_stack order that puts the same layers where they belong)
CASES = {
    "attention": (("lm_tiny", 4, None), (2, None), "stack"),
    "sse_h": (("sse_h_tiny", 4, None), (2, "SA"), "by_kind"),      # "SA" -> "SSSA": S,S,S <- S and A <- A
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_starts_as_gstack_and_folds_to_the_same_function(case):
    (name, lt, tpat), (ls, spat), order = CASES[case]
    target = _cfg(name, lt, tpat)
    src_cfg = _cfg(name, ls, spat)
    src = state_lib.build_base_model(src_cfg, seed=1)
    stacked = growth.grow_model(src, state_lib.build_base_model(target), op="direct", order=order)
    lcfg = _ligo_config(target, src_cfg)
    model = learn.start(src, src_cfg, lcfg)
    # the maps: one [targets of a kind, bases of that kind] per block parameter, stacked identities
    maps = paths.flatten(nnx.to_pure_dict(nnx.state(model.maps, nnx.Param)))
    kinds = sorted({(p[0], np.shape(w)) for p, w in maps.items()})
    assert kinds == ([("k0", (4, 2))] if case == "attention" else [("k0", (3, 1)), ("k1", (1, 1))])
    assert ("k0", "mixer", "q", "kernel") in maps and ("k0", "norm1", "scale") in maps
    # at the start the grown weights are G_stack's, bit for bit, and so are the logits
    want = paths.flatten(paths.pure_params(stacked))
    got = paths.flatten(jax.device_get(model.target_params()))
    assert sorted(want, key=str) == sorted(got, key=str)
    for p, x in want.items():
        np.testing.assert_array_equal(got[p], x, err_msg=str(p))
    np.testing.assert_array_equal(_logits(model), _logits(stacked))
    # trained maps (here: perturbed) mix layers; the fold is the same function as a plain LM
    rng = np.random.default_rng(2)
    st = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(st)
    pure["maps"] = jax.tree.map(lambda w: w + 0.3 * rng.standard_normal(w.shape).astype(np.float32), pure["maps"])
    nnx.replace_by_pure_dict(st, pure)
    nnx.update(model, st)
    folded = learn.fold(model, lcfg, target)
    assert type(folded).__name__ == "LM" and paths.num_layers(paths.pure_params(folded)) == lt
    ref = _logits(model)
    assert _rel(ref, _logits(stacked)) > 1e-2                 # the perturbation changed the function
    assert _rel(_logits(folded), ref) < 1e-5


def test_flops_are_the_target_lms():
    target = _cfg("sse_h_tiny", 4)
    src_cfg = _cfg("sse_h_tiny", 2, "SA")
    lcfg = _ligo_config(target, src_cfg)
    gd, ap = state_lib.abstract_model(lcfg)
    tgd, tap = state_lib.abstract_model(target)
    for seq in (64, 256):
        want = state_lib.flops_per_token(nnx.merge(tgd, tap), tap, seq)
        assert state_lib.flops_per_token(nnx.merge(gd, ap), ap, seq) == pytest.approx(want, rel=1e-12)
    # the LiGO model holds the base (2 layers) and the maps, not the target's 4 layers
    assert state_lib.param_count(ap) < state_lib.param_count(tap)


def test_bad_bases_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of the base's"):          # 4 layers from 3
        state_lib.build_base_model(_ligo_config(_cfg("lm_tiny", 4), _cfg("lm_tiny", 3)))
    with pytest.raises(ValueError, match="no base layer has"):               # "SSSA" from an all-S base
        state_lib.build_base_model(_ligo_config(_cfg("sse_h_tiny", 4), _cfg("sse_h_tiny", 1, "S")))
    with pytest.raises(ValueError, match="kind the target has no layer of"):  # "AAAA" from "SA"
        state_lib.build_base_model(_ligo_config(_cfg("sse_h_tiny", 4, "A"), _cfg("sse_h_tiny", 2, "SA")))
    src_cfg = _cfg("lm_tiny", 1)
    src = state_lib.build_base_model(src_cfg)
    with pytest.raises(ValueError, match="the base run has 1 with"):
        learn.start(src, src_cfg, _ligo_config(_cfg("lm_tiny", 4), _cfg("lm_tiny", 2)))
    with pytest.raises(ValueError, match="folds a 'ligo_lm' run"):
        learn.fold(src, src_cfg, _cfg("lm_tiny", 2))


# -- through the trainer ----------------------------------------------------------------------------------------
def _records(wd):
    return {r["step"]: r for r in metrics_lib.read_metrics(wd) if "loss" in r}


def _params(wd):
    from sqattn import sample
    model, cfg = sample.load_model(wd)
    return model, cfg


def test_learn_then_fold_through_the_trainer_resumes_after_a_kill(base_run, tmp_path):
    lcfg = growth_configs.grown_config(_target(), base_run, op="learn", g=2, learn_steps=3)
    assert lcfg.model_name == "ligo_lm" and lcfg.num_steps == 3 and lcfg.data_offset == 2
    runs = {k: str(tmp_path / k) for k in ("learn", "learn_split", "fold", "fold_split")}
    train_and_evaluate(lcfg, runs["learn"], progress=False)
    assert train_and_evaluate(lcfg, runs["learn_split"], progress=False, stop_after=2)["stopped_early"]
    train_and_evaluate(lcfg, runs["learn_split"], progress=False)
    fcfgs = {}
    for learn_wd, fold_wd in (("learn", "fold"), ("learn_split", "fold_split")):
        fcfgs[fold_wd] = growth_configs.grown_config(_target(), runs[learn_wd], op="fold", num_steps=2,
                                                     warmup_steps=1)
    assert fcfgs["fold"].data_offset == 2 + 3 and fcfgs["fold"].init.transform == learn.FOLD
    train_and_evaluate(fcfgs["fold"], runs["fold"], progress=False)
    assert train_and_evaluate(fcfgs["fold_split"], runs["fold_split"], progress=False,
                              stop_after=1)["stopped_early"]
    train_and_evaluate(fcfgs["fold_split"], runs["fold_split"], progress=False)
    for a, b in (("learn", "learn_split"), ("fold", "fold_split")):
        ra, rb = _records(runs[a]), _records(runs[b])
        assert sorted(ra) == sorted(rb) and ra
        for s in ra:
            assert ra[s]["loss"] == rb[s]["loss"], (a, s)

    # only the maps moved: the base is the base run's, bit for bit
    base_model, base_cfg = _params(base_run)
    ligo, _ = _params(runs["learn"])
    assert isinstance(ligo, learn.LiGOLM)
    for p, x in paths.flatten(paths.pure_params(base_model)).items():
        np.testing.assert_array_equal(paths.flatten(paths.pure_params(ligo.base))[p], x, err_msg=str(p))
    start = learn.start(base_model, base_cfg, lcfg)
    maps = lambda m: jax.tree.leaves(nnx.to_pure_dict(nnx.state(m.maps, nnx.Param)))  # noqa: E731
    assert all(np.all(np.asarray(w) != np.asarray(w0)) for w, w0 in zip(maps(ligo), maps(start)))

    # the fold run starts from exactly the function the learn run ended with
    folded = learn.fold(ligo, lcfg, _target())
    assert _rel(_logits(folded), _logits(ligo)) < 1e-5

    # cumulative FLOPs: base, then the learn phase at the target's rate, then the fold run
    base_f = max(r["train_flops"] for r in _records(base_run).values())
    lr, fr = _records(runs["learn"]), _records(runs["fold"])
    step_f = fr[2]["train_flops"] - fr[1]["train_flops"]           # one step of the 2-layer target
    assert lr[1]["train_flops"] == pytest.approx(base_f + step_f, rel=1e-9)
    assert fr[1]["train_flops"] == pytest.approx(lr[3]["train_flops"] + step_f, rel=1e-9)

    # bad sources of either run are clear errors
    with pytest.raises(ValueError, match="learn_steps >= 1"):
        growth_configs.grown_config(_target(), base_run, op="learn")
    with pytest.raises(ValueError, match="continues a G_learn phase run"):
        growth_configs.grown_config(_target(), base_run, op="fold")
    with pytest.raises(ValueError, match="g=4 but the base run has 1 layers"):
        growth_configs.grown_config(_target(), base_run, op="learn", g=4, learn_steps=2)
