"""Train state construction: abstract model, shardings, sharded init, and memory/FLOP accounting.

The train state is a plain dict ``{"step": int32[], "params": pure dict, "opt_state": optax state}`` so that
orbax, optax and jit see ordinary pytrees. The model's structure (``graphdef``) is rebuilt from the config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sqattn import models
from sqattn.parallel import sharding
from sqattn.train import optim


@dataclasses.dataclass
class Setup:
    """Everything derived from a config before any array is allocated."""
    graphdef: Any
    abstract_params: Any          # nnx.State of Params with ShapeDtypeStruct values (keeps "axes" metadata)
    abstract_state: dict          # abstract train state (pure pytrees of ShapeDtypeStruct)
    state_shardings: dict
    mesh: jax.sharding.Mesh
    rules: dict
    tx: Any
    schedule: Any


def build_base_model(config, seed: int | None = None) -> nnx.Module:
    """The model of ``config.model`` as initialised from the seed, before any adapter."""
    return models.build(config.model_name, config.model, nnx.Rngs(params=config.seed if seed is None else seed))


def apply_peft(model: nnx.Module, config, seed: int | None = None) -> nnx.Module:
    """Wraps ``model``'s layers in the adapters of ``config.peft`` (in place; none when ``method`` is "").

    ``config.peft.method`` names an entry of ``sqattn.peft.METHODS``: ``function(model, peft_config, rngs)``.
    """
    peft = config.get("peft") or {}
    method = peft.get("method", "")
    if not method:
        return model
    from sqattn.peft import METHODS
    from sqattn.registry import resolve
    if method not in METHODS:
        raise ValueError(f"peft.method {method!r} unknown; known: {sorted(METHODS)}")
    rngs = nnx.Rngs(params=(config.seed if seed is None else seed) + 7919)
    out = resolve(METHODS[method], f"peft method {method!r}")(model, peft, rngs)
    return model if out is None else out


def make_hooks(config, task) -> list:
    """The host hooks of a run: the task's (``task.make_hooks(config)``) and the peft method's
    (``make_hook(config)`` in the method's module). See ``sqattn.train.trainer`` for the hook protocol."""
    hooks = list(task.make_hooks(config)) if hasattr(task, "make_hooks") else []
    method = (config.get("peft") or {}).get("method", "")
    if method:
        import importlib
        from sqattn.peft import METHODS
        module = importlib.import_module(METHODS[method].partition(":")[0])
        hook = module.make_hook(config) if hasattr(module, "make_hook") else None
        if hook is not None:
            hooks.append(hook)
    return hooks


def build_model(config, seed: int | None = None) -> nnx.Module:
    """The trained model: ``config.model`` built from the seed, with ``config.peft`` adapters applied."""
    return apply_peft(build_base_model(config, seed), config, seed)


def abstract_model(config):
    """(graphdef, abstract Param state) without allocating anything."""
    model = nnx.eval_shape(lambda: build_model(config))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def load_init_model(config) -> nnx.Module:
    """``config.model`` with its parameters taken from ``config.init.workdir``'s checkpoint, then adapted.

    With ``init.transform`` (``"module:function"``), ``function(src_model, src_config, config)`` makes the
    model (growth, expansion: any map from the source run's model to one of this config), and its parameter
    tree must equal ``build_base_model(config)``'s. Otherwise ``init.transfer == "same"`` requires the source
    run's parameter tree (paths and shapes) to equal this model's; ``"transplant"`` copies every parameter both
    share (``sqattn.models.convert.transplant``) and keeps the rest as initialised from ``config.seed``. Runs
    on the host (one device) before sharding.
    """
    from sqattn import sample
    from sqattn.models import convert
    from sqattn.registry import resolve
    init = config.init
    src, src_config = sample.load_model(init.workdir, None if int(init.step) < 0 else int(init.step))
    if init.get("transform"):
        fn = resolve(init.transform, "init.transform")
        dst = fn(src, src_config, config)
        want = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(abstract_base_params(config)))
        got = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(nnx.state(dst, nnx.Param)))
        if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
            diff = _tree_diff(got, want)
            raise ValueError(f"init.transform {init.transform!r} returned a model whose parameters differ from "
                             f"config.model's: {diff}")
        return apply_peft(dst, config)
    dst = build_base_model(config)
    report = convert.transplant(src, dst)
    if init.transfer == "same" and (report["missing_in_src"] or report["unused_in_src"]):
        raise ValueError(
            f"init.workdir {init.workdir!r} holds another parameter tree (init.transfer='same'): only in this "
            f"model: {report['missing_in_src'][:5]}, only in the source: {report['unused_in_src'][:5]}. "
            f"Use init.transfer='transplant' to copy what the two share.")
    if init.transfer not in ("same", "transplant"):
        raise ValueError(f"init.transfer {init.transfer!r} unknown; known: 'same', 'transplant'")
    return apply_peft(dst, config)


def abstract_base_params(config):
    """The abstract Param state of ``build_base_model(config)`` (no adapters)."""
    return nnx.state(nnx.eval_shape(lambda: build_base_model(config)), nnx.Param)


def _tree_diff(got, want, limit: int = 4) -> str:
    """A short description of how two pytrees of (shape, dtype) differ (paths only in one, shape changes)."""
    g = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
        got, is_leaf=lambda x: isinstance(x, tuple))}
    w = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
        want, is_leaf=lambda x: isinstance(x, tuple))}
    parts = []
    if sorted(set(g) - set(w))[:limit]:
        parts.append(f"only in the returned model: {sorted(set(g) - set(w))[:limit]}")
    if sorted(set(w) - set(g))[:limit]:
        parts.append(f"missing from it: {sorted(set(w) - set(g))[:limit]}")
    changed = [f"{k}: {g[k][0]} {g[k][1]} vs {w[k][0]} {w[k][1]}" for k in sorted(set(g) & set(w)) if g[k] != w[k]]
    if changed:
        parts.append(f"shape/dtype: {changed[:limit]}")
    return "; ".join(parts) or "tree structure"


def _opt_shardings(aopt, params, param_sh, replicated):
    """Optimizer-state shardings: a leaf whose path ends with a parameter's path and has its shape (Adam's
    moments, also inside ``multi_transform``/``masked`` states) takes that parameter's sharding; the rest
    (counts, scalars) is replicated."""
    keyed = {jax.tree_util.keystr(p): (a.shape, s) for (p, a), s in
             zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_sh))}

    def pick(path, leaf):
        for i in range(len(path)):
            hit = keyed.get(jax.tree_util.keystr(path[i:]))
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return replicated
    return jax.tree_util.tree_map_with_path(pick, aopt)


def make_setup(config, mesh: jax.sharding.Mesh | None = None) -> Setup:
    mesh = mesh or sharding.make_mesh(config.mesh)
    rules = sharding.mesh_rules(config.mesh.rules)
    graphdef, aparams = abstract_model(config)
    param_sh = sharding.param_shardings(aparams, mesh, rules)
    pure = nnx.to_pure_dict(aparams)
    tx, schedule = optim.make_optimizer(config.optim, config.num_steps)
    if config.optim.get("trainable"):
        tx = optim.only_trainable(tx, pure, config.optim.trainable)
    aopt = jax.eval_shape(tx.init, pure)
    opt_sh = _opt_shardings(aopt, pure, param_sh, NamedSharding(mesh, P()))
    replicated = NamedSharding(mesh, P())
    astate = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": pure, "opt_state": aopt}
    state_sh = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
    return Setup(graphdef, aparams, astate, state_sh, mesh, rules, tx, schedule)


def init_state(config, setup: Setup) -> dict:
    """Initialises params and optimizer state directly into their shardings."""
    init_cfg = config.get("init") or {}
    if init_cfg.get("workdir") and init_cfg.get("state", "params") == "full":
        return restore_source_state(config, setup)
    if init_cfg.get("workdir"):
        loaded = nnx.to_pure_dict(nnx.state(load_init_model(config), nnx.Param))
        params = jax.device_put(jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), loaded,
                                             setup.abstract_state["params"]), setup.state_shardings["params"])
        init = lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": setup.tx.init(p)}  # noqa
        return jax.jit(init, out_shardings=setup.state_shardings)(params)

    def init():
        model = build_model(config)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": setup.tx.init(params)}
    return jax.jit(init, out_shardings=setup.state_shardings)()


def restore_source_state(config, setup: Setup) -> dict:
    """``init.state='full'``: the train state (step, parameters, optimizer state) of ``config.init.workdir``'s
    checkpoint ``init.step`` (-1 = latest), restored into this run's shardings.

    The run then continues the source's trajectory (its step counter, learning-rate schedule position and Adam
    moments) in its own workdir, e.g. with another data order (a spawned child, lmc.md). The model must be the
    source's, and the optimizer must have the same state tree (same optimizer and ``optim.trainable``):
    ``CheckpointError`` names what differs. Host hooks (``make_hooks``) start from their initial state.
    """
    import json
    from sqattn.train import checkpoint as ckpt_lib
    init = config.init
    ck = ckpt_lib.Checkpointer(init.workdir)
    try:
        steps = ck.all_steps()
        if not steps:
            raise ckpt_lib.CheckpointError(f"init.workdir {init.workdir!r} has no checkpoint to continue from")
        step = max(steps) if int(init.step) < 0 else int(init.step)
        if step not in steps:
            raise ckpt_lib.CheckpointError(f"init.workdir {init.workdir!r} has no checkpoint at step {step} "
                                           f"(it has {sorted(steps)})")
        try:
            state = ck.restore(step, setup.abstract_state, setup.state_shardings,
                               json.loads(config.to_json_best_effort()))
        except ckpt_lib.CorruptCheckpointError as e:
            raise ckpt_lib.CheckpointError(
                f"{str(e).split(' It was left in place')[0]}\ninit.state='full' needs the source's train state "
                f"tree: the same optimizer and optim.trainable as the run in {init.workdir!r} (the source was not "
                f"changed)") from e
    finally:
        ck.close()
    if int(state["step"]) >= int(config.num_steps):
        raise ValueError(f"init.state='full' continues from step {int(state['step'])} of {init.workdir!r}, but "
                         f"num_steps={config.num_steps} leaves nothing to train (the step counter continues)")
    return state


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds for ``abstract_tree`` under ``shardings`` (the largest shard)."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = s.shard_shape(a.shape) if a.shape else ()
        total += math.prod(shard) * np.dtype(a.dtype).itemsize
    return int(total)


def param_count(abstract_params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(abstract_params))))


def matmul_param_count(abstract_params) -> int:
    """Parameters used in a matmul per token: every array with ndim >= 2, where the embedding table counts
    only when it doubles as the (tied) output head."""
    pure = nnx.to_pure_dict(abstract_params)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(pure) if len(x.shape) >= 2)
    if "head" in pure and "embed" in pure:  # untied: the embedding is a lookup, not a matmul
        n -= sum(math.prod(x.shape) for x in jax.tree.leaves(pure["embed"]))
    return int(n)


def active_param_count(model, abstract_params) -> int:
    """Matmul parameters one token actually uses: ``matmul_param_count`` minus the MoE experts it is not routed
    to (``sqattn.moe.inactive_params``; equal to ``matmul_param_count`` for a dense model)."""
    from sqattn.moe import inactive_params
    return matmul_param_count(abstract_params) - inactive_params(model)


def flops_per_token(model, abstract_params, seq_len: int) -> float:
    """Training FLOPs per token: 6 * active matmul params + 3 * each mixer's parameter-free forward FLOPs.

    A model that computes something other than its own parameters' matmuls (e.g. ``sqattn.growth.learn.LiGOLM``,
    which runs a bigger LM built from its parameters) defines ``flops_per_token(seq_len)``, used instead."""
    own = getattr(type(model), "flops_per_token", None)
    if callable(own):
        return float(model.flops_per_token(seq_len))
    extra = 0.0
    for blk in getattr(model, "blocks", []):
        fn = getattr(blk.mixer, "extra_flops_per_token", None)
        if fn is not None:
            extra += fn(seq_len)
    return 6.0 * active_param_count(model, abstract_params) + 3.0 * extra
