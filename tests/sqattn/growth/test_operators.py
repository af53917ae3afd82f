"""Growth operators on the NNX states of LMs with different block patterns (attention, SSE-H, MoE)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sqattn import configs, growth
from sqattn.growth import depth, fade, paths, width
from sqattn.train import state as state_lib

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def _cfg(name, **model):
    c = configs.get(f"{name}:runlocal")
    c.model.dtype = "float32"          # exactness checks: no bf16 rounding
    c.model.norm_eps = 1e-10           # width growth scales the stream; RMSNorm's eps is its only inexactness
    c.model.update(model)
    if "moe" in c.model and c.model.moe:
        c.model.moe.capacity_factor = 0.0   # dropless: a zeroed copy must not change which tokens drop
        c.model.moe.dispatch = "dense"      # the cheapest program to compile
    return c


def _model(cfg, seed=0, **over):
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.model.update(over)
    return state_lib.build_base_model(c, seed=seed), c


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params):
    return nnx.merge(graphdef, params)(TOKENS)[0]


def _logits(model):
    """Jitted, compiled once per model structure (the grown models of one test share theirs)."""
    return np.asarray(_forward(*nnx.split(model)), np.float64)


def _close(a, b, rel=1e-5):
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert err < rel, err


MODELS = {
    "attention": ("lm_tiny", 2),
    "sse_h": ("sse_h_tiny", 4),    # "SSSA": the source keeps one whole period
    "moe": ("moe_tiny", 2),        # block 1 is MoE
}


_SOURCES = {}


def _source(kind):
    if kind not in _SOURCES:
        name, layers = MODELS[kind]
        cfg = _cfg(name, num_layers=layers)
        _SOURCES[kind] = (kind, cfg, _model(cfg, seed=1)[0])
    return _SOURCES[kind]


@pytest.fixture
def pair(request):
    return _source(request.param)


def test_layer_map_orders():
    a, s = ("A",), ("S",)
    assert depth.layer_map([a, a, a], [a] * 6, "stack") == [0, 1, 2, 0, 1, 2]
    assert depth.layer_map([a, a, a], [a] * 6, "interleave") == [0, 0, 1, 1, 2, 2]
    assert depth.layer_map([s, a], [s, s, s, a], "by_kind") == [0, 0, 0, 1]
    assert depth.repeats([0, 1, 0, 1]) == [False, False, True, True]
    with pytest.raises(ValueError, match="parameter trees differ"):
        depth.layer_map([s, a], [s, s, s, a], "stack")
    with pytest.raises(ValueError, match="target num_layers >= source"):
        depth.layer_map([a, a], [a], "stack")
    with pytest.raises(ValueError, match="unknown depth order"):
        depth.layer_map([a], [a], "spiral")


@pytest.mark.parametrize("pair", sorted(MODELS), indirect=True)
@pytest.mark.parametrize("order", ["stack", "interleave"])
def test_direct_reproduces_layer_order(pair, order):
    kind, cfg, src = pair
    if kind in ("moe", "sse_h") and order == "interleave":   # 1,1,2,2 breaks the pattern's period
        with pytest.raises(ValueError, match="MoE/dense"):
            growth.grow_model(src, _model(cfg, num_layers=2 * MODELS[kind][1])[0], op="direct", order=order)
        return
    ls = paths.num_layers(paths.pure_params(src))
    lt = 2 * ls
    tgt, tcfg = _model(cfg, num_layers=lt)
    growth.grow_model(src, tgt, op="direct", order=order)
    s, t = paths.pure_params(src), paths.pure_params(tgt)
    want = [i % ls for i in range(lt)] if order == "stack" else [i // 2 for i in range(lt)]
    for i, j in enumerate(want):
        for p, x in paths.flatten(s[paths.BLOCKS][j]).items():
            np.testing.assert_array_equal(paths.flatten(t[paths.BLOCKS][i])[p], x)
    np.testing.assert_array_equal(t["embed"]["embedding"], s["embed"]["embedding"])
    # the grown tree is exactly the grown config's
    fresh = paths.flatten(paths.pure_params(state_lib.build_base_model(tcfg)))
    assert {p: np.shape(v) for p, v in paths.flatten(t).items()} == {p: np.shape(v) for p, v in fresh.items()}


@pytest.mark.parametrize("pair", sorted(MODELS), indirect=True)
def test_zero_keeps_logits_and_direct_does_not(pair):
    kind, cfg, src = pair
    ls = paths.num_layers(paths.pure_params(src))
    ref = _logits(src)
    zero = growth.grow_model(src, _model(cfg, num_layers=2 * ls)[0], op="zero", order="stack")
    _close(_logits(zero), ref)
    direct = growth.grow_model(src, _model(cfg, num_layers=2 * ls)[0], op="direct", order="stack")
    assert np.linalg.norm(_logits(direct) - ref) / np.linalg.norm(ref) > 1e-2
    # the zeroed copies are copies: everything but the residual outputs equals the source layer
    z = paths.pure_params(zero)
    axes = paths.param_axes(zero)
    outs = [p for p in paths.flatten(z[paths.BLOCKS][ls]) if paths.is_residual_output(p, axes[(paths.BLOCKS, ls) + p])]
    assert outs and all(not np.any(paths.flatten(z[paths.BLOCKS][ls])[p]) for p in outs)


@pytest.mark.parametrize("pair", ["attention"], indirect=True)
def test_random_fades_in_from_the_source_function(pair):
    kind, cfg, src = pair
    ls = paths.num_layers(paths.pure_params(src))
    tcfg = cfg.copy_and_resolve_references()
    tcfg.model.num_layers = 2 * ls
    build = lambda: fade.FadeLM(**tcfg.model.to_dict(), rngs=nnx.Rngs(params=5))  # noqa: E731
    tgt = growth.grow_model(src, build(), op="random", order="stack")
    np.testing.assert_array_equal(np.asarray(tgt.fade[...]), [1.0] * ls + [0.0] * ls)
    _close(_logits(tgt), _logits(src))
    fresh = paths.pure_params(build())
    got = paths.pure_params(tgt)
    for p, x in paths.flatten(fresh[paths.BLOCKS][ls]).items():   # the new layers are the fresh init
        np.testing.assert_array_equal(paths.flatten(got[paths.BLOCKS][ls])[p], x)
    tgt.fade[...] = jnp.ones(2 * ls)
    assert np.linalg.norm(_logits(tgt) - _logits(src)) / np.linalg.norm(_logits(src)) > 1e-2


WIDTHS = {"attention": dict(d_model=128, mlp_dim=200), "moe": dict(d_model=128, mlp_dim=160, moe_mlp_dim=96)}


@pytest.mark.parametrize("pair,op", [("attention", "net2net"), ("attention", "zero"), ("moe", "net2net")],
                         indirect=["pair"])
def test_width_keeps_logits(pair, op):
    kind, cfg, src = pair
    ls = paths.num_layers(paths.pure_params(src))
    scfg = cfg.copy_and_resolve_references()
    scfg.model.num_layers = ls
    tcfg = width.width_config(scfg, **WIDTHS[kind])
    tgt = growth.grow_model(src, state_lib.build_base_model(tcfg, seed=3), op=op, seed=0)
    # exact but for RMSNorm's eps, which acts as r^2 eps (net2net) or (d_t/d_s) eps (zero)
    _close(_logits(tgt), _logits(src), rel=1e-5)
    t = paths.pure_params(tgt)
    assert t["embed"]["embedding"].shape == (256, 128)


def test_width_errors():
    cfg = _cfg("lm_tiny", num_layers=2)
    src, _ = _model(cfg)
    with pytest.raises(ValueError, match="cannot shrink"):
        growth.grow_model(src, state_lib.build_base_model(width.width_config(cfg, mlp_dim=64)), op="net2net")
    with pytest.raises(ValueError, match="multiple of the source width"):
        growth.grow_model(src, state_lib.build_base_model(width.width_config(cfg, d_model=96)), op="net2net")
    unpinned = cfg.copy_and_resolve_references()
    unpinned.model.d_model = 128                     # head_dim follows d_model: the heads axis changes
    with pytest.raises(ValueError, match="along axis 'kv_heads'"):
        growth.grow_model(src, state_lib.build_base_model(unpinned), op="net2net")
    with pytest.raises(ValueError, match="op must be one of"):
        growth.grow_model(src, state_lib.build_base_model(width.width_config(cfg, mlp_dim=256)), op="direct")


def test_fade_hook_ramps_only_the_faded_layers():
    hook = fade.FadeHook(steps=4)
    state = {"params": {"fade": jnp.asarray([1.0, 1.0, 0.0, 0.0])}}
    for step, want in [(1, 0.25), (2, 0.5), (6, 1.0)]:
        state = hook(step, state, None) or state
        np.testing.assert_allclose(np.asarray(state["params"]["fade"]), [1, 1, want, want])
    again = fade.FadeHook(steps=4)
    again.load_state_dict(hook.state_dict())
    assert again.faded == [2, 3]
    assert hook(7, state, None) is None       # nothing left to change


def test_by_kind_grows_a_half_depth_hybrid_into_sse_h():
    """The half-depth "SA" base of sse_h_tiny's "SSSA": S layers from the S layer, A from the A layer."""
    cfg = _cfg("sse_h_tiny")
    src, _ = _model(cfg, seed=1, num_layers=2, block_pattern="SA")
    tgt = growth.grow_model(src, _model(cfg, num_layers=4)[0], op="direct", order="by_kind")
    s, t = paths.pure_params(src), paths.pure_params(tgt)
    for i, j in enumerate([0, 0, 0, 1]):
        np.testing.assert_array_equal(t["blocks"][i]["mixer"]["o"]["kernel"], s["blocks"][j]["mixer"]["o"]["kernel"])
    with pytest.raises(ValueError, match="parameter trees differ"):
        growth.grow_model(src, _model(cfg, num_layers=4)[0], op="direct", order="stack")
    # The trainer's init.transform: a pattern change is accepted with order="by_kind" only.
    src_cfg = _model(cfg, num_layers=2, block_pattern="SA")[1]
    grown_cfg = cfg.copy_and_resolve_references()
    grown_cfg.init.args = ml_collections.ConfigDict(dict(op="direct", order="by_kind", g=2))
    again = paths.pure_params(growth.grow(src, src_cfg, grown_cfg))
    np.testing.assert_array_equal(again["blocks"][3]["mixer"]["o"]["kernel"], s["blocks"][1]["mixer"]["o"]["kernel"])
    grown_cfg.init.args.order = "stack"
    with pytest.raises(ValueError, match="differ too: \\['block_pattern'\\]"):
        growth.grow(src, src_cfg, grown_cfg)
