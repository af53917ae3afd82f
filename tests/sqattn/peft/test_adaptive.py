"""Adaptive-rank adapters: no-op wrapping, merged == unmerged, masks, adapter-only gradients, bad settings,
schedule math, and each allocator run over a whole schedule on a state (budget exact, max rank respected)."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from sqattn.layers import Dense
from sqattn.models.lm import LM
from sqattn.peft import adaptive, allocator, lora
from sqattn.peft.adaptive import AdaptiveDense, AdaptParam, RankMask
from sqattn.peft.rank_task import RankMLP, RankSynthTask, layer_names
from tests.testing import assert_close

SIZES = (8, 16, 16, 16, 4)
TARGETS = ",".join(layer_names(4))


def _mlp() -> RankMLP:
    return RankMLP(SIZES, teacher_seed=0, rngs=nnx.Rngs(0))


def _x(n=5):
    return jax.random.normal(jax.random.key(1), (n, SIZES[0]))


@nnx.jit
def _fwd(model, x):
    return model(x)


def _randomize(model, which=AdaptParam, seed=2, scale=0.3):
    state = nnx.state(model, which)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                                                   for k, x in zip(keys, leaves)]))


@pytest.mark.parametrize("method", adaptive.ADAPTIVE_METHODS)
def test_wrap_is_noop_then_merged_equals_unmerged(method):
    model, x = _mlp(), _x()
    before = _fwd(model, x)
    paths = adaptive.apply_adapters(model, method, TARGETS, rank=2, rngs=nnx.Rngs(1))
    assert paths == layer_names(4) and isinstance(model.fc2, AdaptiveDense)
    np.testing.assert_array_equal(np.asarray(_fwd(model, x)), np.asarray(before))
    _randomize(model)
    unmerged = _fwd(model, x)
    assert float(jnp.max(jnp.abs(unmerged - before))) > 1e-2            # the adapters do something
    assert adaptive.merge_adapters(model) == layer_names(4)
    assert type(model.fc1) is Dense and not adaptive.adapter_modules(model)
    assert_close(_fwd(model, x), unmerged, jnp.float32, f"{method} merged vs unmerged")


def test_merge_on_an_lm_with_partial_masks():
    lm = LM(vocab_size=32, d_model=16, num_layers=2, block_pattern="A", mlp_dim=32, rngs=nnx.Rngs(0),
            mixers={"attention": {"num_heads": 4, "num_kv_heads": 2}})
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 32)
    paths = adaptive.apply_adapters(lm, "triadapt", "q,v", rank=4, rngs=nnx.Rngs(1))
    assert sorted(paths) == sorted(f"blocks/{i}/mixer/{n}" for i in range(2) for n in "qv")
    _randomize(lm)
    lm.blocks[0].mixer.q.ada_mask[...] = (jnp.arange(8) < 3).astype(jnp.float32)     # 3 of 8 active
    unmerged = nnx.jit(lambda m, t: m(t)[0])(lm, tokens)
    adaptive.merge_adapters(lm)
    assert_close(nnx.jit(lambda m, t: m(t)[0])(lm, tokens), unmerged, jnp.float32, "LM merged vs unmerged")


@pytest.mark.parametrize("method", adaptive.ADAPTIVE_METHODS)
def test_inactive_components_have_no_effect(method):
    model, x = _mlp(), _x()
    adaptive.apply_adapters(model, method, TARGETS, rank=2, max_rank=6, init_rank=6, budget=24,
                           rngs=nnx.Rngs(1))
    _randomize(model)
    mask = (jnp.arange(6) % 2 == 0).astype(jnp.float32)                            # components 0, 2, 4
    for _, mod in adaptive.adapter_modules(model):
        mod.ada_mask[...] = mask
    out = _fwd(model, x)
    for _, mod in adaptive.adapter_modules(model):     # rewrite every inactive entry
        dead = mask == 0
        mod.ada_a[...] = jnp.where(dead[None, :], 7.0, mod.ada_a[...])
        mod.ada_b[...] = jnp.where(dead[:, None], -3.0, mod.ada_b[...])
        if method == "triadapt":
            both = dead[:, None] | dead[None, :]
            mod.ada_core_low[...] = jnp.where(both, 5.0, mod.ada_core_low[...])
            mod.ada_core_up[...] = jnp.where(both, 5.0, mod.ada_core_up[...])
        else:
            mod.ada_e[...] = jnp.where(dead, 9.0, mod.ada_e[...])
    np.testing.assert_array_equal(np.asarray(_fwd(model, x)), np.asarray(out))
    mod = model.fc2                                             # masked dW == dW of the active components
    keep = np.flatnonzero(np.asarray(mask))
    a, b = np.asarray(mod.ada_a[...])[:, keep], np.asarray(mod.ada_b[...])[keep]
    core = np.asarray(mod.core())
    mid = core[np.ix_(keep, keep)] if method == "triadapt" else np.diag(core[keep])
    scale = mod.alpha / (len(keep) if method == "triadapt" else mod.rank)
    assert_close(mod.delta_kernel(), a @ mid @ b * scale, jnp.float32, "dW of the active components")


def test_triangular_split_blocks():
    ids = adaptive.block_ids(7, 1, 2)
    np.testing.assert_array_equal(ids, [0, 1, 1, 2, 2, 3, 3])
    mod = AdaptiveDense(Dense(4, 5, axes=(None, None), rngs=nnx.Rngs(0)), kind="triadapt", max_rank=7, init_rank=1,
                        grow_rank=2, rngs=nnx.Rngs(1))
    low, up = (np.asarray(t) for t in mod.triangles())
    assert low[2, 1] == 1 and low[1, 2] == 1 and low[1, 3] == 0 and low[3, 1] == 1     # block (1,1) shared
    assert up[1, 3] == 1 and up[3, 1] == 0
    np.testing.assert_array_equal(low + up >= 1, np.ones((7, 7), bool))               # L + U covers C
    # growth from rank 3 to 5 switches on only the L-shaped border (rows/cols 3, 4) of C
    old = np.zeros((7, 7), bool)
    old[:3, :3] = True
    new = np.zeros((7, 7), bool)
    new[:5, :5] = True
    border = new & ~old
    assert border[3:5, :5].all() and border[:5, 3:5].all() and border.sum() == 5 * 5 - 9


def test_only_adapters_get_gradients_and_the_base_stays_bit_identical():
    model, x = _mlp(), _x()
    adaptive.apply_adapters(model, "triadapt", TARGETS, rank=2, max_rank=4, rngs=nnx.Rngs(1))
    _randomize(model, scale=0.1)
    y = jax.random.normal(jax.random.key(5), (5, SIZES[-1]))
    frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(AdaptParam)))

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2) + adaptive.regularizer(m)

    all_grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
    for path, g in nnx.to_flat_state(nnx.state(all_grads, RankMask)):
        assert not np.any(np.asarray(g[...])), f"mask {path} got a gradient"
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=adaptive.trainable())

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, adaptive.trainable()))(model)
        opt.update(model, grads)
        return grads

    grads = step(model, opt)
    flat = dict(nnx.to_flat_state(grads))
    assert {p[-1] for p in flat} == {"ada_a", "ada_b", "ada_core_low", "ada_core_up"}
    ga = np.asarray(flat[("fc1", "ada_a")][...])
    assert np.all(ga[:, 1:] == 0) and np.any(ga[:, :1] != 0)      # rank 1 active: inactive columns get 0
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(nnx.state(model, nnx.Not(AdaptParam)))):
        np.testing.assert_array_equal(np.asarray(b), a)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown adapter method 'dora'"):
        adaptive.apply_adapters(_mlp(), "dora", TARGETS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"no Dense layer named any of \('query',\)"):
        adaptive.apply_adapters(_mlp(), "triadapt", "query", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="budget 40 .* above the maximum 4 layers x max_rank 8 = 32"):
        adaptive.apply_adapters(_mlp(), "increlora", TARGETS, rank=4, budget=40, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="adalora: budget 25 .* above the maximum 4 layers x max_rank 6"):
        adaptive.apply_adapters(_mlp(), "adalora", TARGETS, rank=4, budget=25, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="below the starting total rank"):
        adaptive.apply_adapters(_mlp(), "triadapt", TARGETS, rank=4, budget=2, init_rank=1, rngs=nnx.Rngs(0))


def test_bad_peft_config_errors_through_the_config_path():
    from sqattn import configs
    from sqattn.configs.validate import ConfigError, validate
    from sqattn.train import state as state_lib
    c = configs.get("rank_synth:method=triadapt,runlocal")
    c.peft.method = "dora"
    with pytest.raises((ConfigError, ValueError), match="dora"):
        validate(c)
    c = configs.get("rank_synth:method=triadapt,runlocal")
    c.peft.targets = "nope"
    with pytest.raises(ValueError, match="no Dense layer named any of"):
        state_lib.build_model(c)
    c = configs.get("rank_synth:method=triadapt,runlocal")
    c.peft.budget = 1000
    with pytest.raises(ValueError, match="above the maximum"):
        state_lib.build_model(c)
    c = configs.get("rank_synth:method=triadapt,runlocal")
    c.optim.trainable = ""
    with pytest.raises(ValueError, match="optim.trainable"):
        adaptive.make_hook(c)
    c = configs.get("rank_synth:method=increlora,runlocal")
    c.peft.update(interval=3, sens_every=2)
    with pytest.raises(ValueError, match="multiple of peft.sens_every"):
        adaptive.make_hook(c)


def test_schedule_math():
    assert allocator.num_to_grow(12, 0.01, "linear", 4) == 1            # floor(0.12) -> forced to 1
    assert allocator.num_to_grow(12, 0.5, "linear", 8) == 6
    assert allocator.num_to_grow(12, 1.0, "linear", 4) == 4             # clipped to M
    assert allocator.num_to_grow(12, 0.0, "exp", 8) == 1 and allocator.num_to_grow(12, 1.0, "exp", 20) == 12
    assert allocator.num_to_grow(16, 0.5, "exp", 8) == 4                 # 16^0.5
    kw = dict(total=100, init_budget=24, target=16, warmup=10, final=20)
    assert allocator.cubic_budget(5, **kw) == (24, False)
    assert allocator.cubic_budget(45, **kw) == (int(8 * 0.5 ** 3 + 16), False)
    assert allocator.cubic_budget(80, **kw) == (16, True)
    b = [allocator.cubic_budget(t, **kw)[0] for t in range(101)]
    assert all(x >= y for x, y in zip(b, b[1:]))                         # non-increasing
    r = allocator.grow_ranks(np.array([1, 1, 1]), np.array([0.1, 0.5, 0.5]), 2, 2, 4, 3)
    np.testing.assert_array_equal(r, [1, 3, 2])                          # tie by order; last quantum cut
    r = allocator.grow_ranks(np.array([1, 4, 1]), np.array([0.0, 9.0, 1.0]), 1, 2, 4, 100, fill=True)
    np.testing.assert_array_equal(r, [4, 4, 4])                          # fill stops at max_rank


# ------------------------------------------------------------------------------------------ allocators on a state
def _alloc_config(method, steps=30, **peft):
    from sqattn import configs
    c = configs.get(f"rank_synth:method={method},runlocal")
    c.num_steps = steps
    c.peft.update(dict(warmup=3, final=6, interval=3, sens_every=1), **peft)
    return c


def _ctx_and_state(c):
    from sqattn.train import state as state_lib
    model = state_lib.build_model(c)
    _randomize(model, scale=0.2)
    graphdef, params = nnx.split(model, nnx.Param)
    task = RankSynthTask()
    train, _ = task.make_datasets(c)
    ctx = types.SimpleNamespace(config=c, graphdef=graphdef, task=task,
                                train_batch=lambda s: jax.tree.map(jnp.asarray, train.batch(s)))
    return ctx, {"step": 0, "params": nnx.to_pure_dict(params), "opt_state": None}


@pytest.mark.parametrize("method,extra", [("triadapt", {}), ("triadapt", {"schedule": "exp", "rescale": True}),
                                          ("increlora", {}), ("adalora", {})])
def test_allocator_schedule_meets_the_budget_exactly(method, extra):
    c = _alloc_config(method, **extra)
    hook = adaptive.make_hook(c)
    ctx, state = _ctx_and_state(c)
    s = allocator.settings(c)
    budget = hook.budget(4)
    totals = []
    for step in range(1, c.num_steps + 1):
        if step % hook.every == 0:
            new = hook(step, state, ctx)
            state = new if new is not None else state
        ranks = allocator.RankAllocator.masks(allocator._find(state["params"])).sum(1)
        assert ranks.max() <= s["max_rank"]
        totals.append(int(ranks.sum()))
        if method != "adalora":
            assert totals[-1] <= budget
        if step >= c.num_steps - s["final"]:
            assert totals[-1] == budget, (step, totals)
    assert hook.events and hook.events[-1]["total_rank"] == budget
    if method == "adalora":
        assert totals[0] == 4 * s["init_rank"] and all(x >= y for x, y in zip(totals, totals[1:]))
    else:
        assert all(x <= y for x, y in zip(totals, totals[1:]))
    ev = hook.events[-1]
    assert set(ev["ranks"]) == set(layer_names(4)) and sum(ev["ranks"].values()) == budget
    if method != "triadapt":
        assert ev["score_compile_s"] > 0 and sum(e["score_calls"] for e in hook.events) > 0


def test_triadapt_rescale_keeps_delta_w_at_growth():
    c = _alloc_config("triadapt", rescale=True, measure_jump=True)
    hook = adaptive.make_hook(c)
    ctx, state = _ctx_and_state(c)
    model_before = nnx.merge(ctx.graphdef, state["params"])
    for _, m in adaptive.adapter_modules(model_before):       # inactive core entries are zero, as in training
        on = m.ada_mask[...][:, None] * m.ada_mask[...][None, :]
        m.ada_core_low[...] = m.ada_core_low[...] * on
        m.ada_core_up[...] = m.ada_core_up[...] * on
    state["params"] = nnx.to_pure_dict(nnx.state(model_before, nnx.Param))
    dw = [np.asarray(m.delta_kernel()) for _, m in adaptive.adapter_modules(model_before)]
    new = hook(c.peft.warmup + c.peft.interval - (c.peft.warmup % c.peft.interval), state, ctx)
    assert new is not None and hook.events[-1]["changed"]
    model_after = nnx.merge(ctx.graphdef, new["params"])
    for d0, (_, m) in zip(dw, adaptive.adapter_modules(model_after)):
        assert_close(m.delta_kernel(), d0, jnp.float32, "dW across a rescaled growth")
    ev = hook.events[-1]
    assert abs(ev["loss_after"] - ev["loss_before"]) <= 1e-5 * ev["loss_before"]    # continuous: no jump
    hook2 = adaptive.make_hook(c)
    hook2.load_state_dict(hook.state_dict())
    assert hook2.prev == hook.prev


@pytest.mark.parametrize("method", ["adalora", "increlora"])
def test_sensitivity_allocator_resumes_from_its_state_dict(method):
    """A hook stopped mid-schedule and rebuilt from its JSON state allocates exactly like an uninterrupted one."""
    import json
    c = _alloc_config(method, steps=20, warmup=2, final=4, interval=2)
    ctx, state0 = _ctx_and_state(c)

    def run(hook, state, steps):
        for step in steps:
            new = hook(step, state, ctx)
            state = new if new is not None else state
        return state

    full_hook = adaptive.make_hook(c)
    full = run(full_hook, state0, range(1, 21))
    first = adaptive.make_hook(c)
    mid = run(first, state0, range(1, 8))
    second = adaptive.make_hook(c)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    end = run(second, mid, range(8, 21))
    strip = lambda evs: [(e["ranks"], e["total_rank"]) for e in evs]              # noqa: E731
    assert strip(first.events + second.events) == strip(full_hook.events)
    assert any(e["changed"] for e in second.events)                                 # allocations after the cut
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(end["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
