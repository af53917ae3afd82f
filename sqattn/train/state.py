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


def build_model(config, seed: int | None = None) -> nnx.Module:
    return models.build(config.model_name, config.model, nnx.Rngs(params=config.seed if seed is None else seed))


def abstract_model(config):
    """(graphdef, abstract Param state) without allocating anything."""
    model = nnx.eval_shape(lambda: build_model(config))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def _is_tree_like(ref_def):
    def check(x):
        try:
            return jax.tree.structure(x) == ref_def
        except Exception:  # noqa: BLE001 - non-pytree leaves
            return False
    return check


def make_setup(config, mesh: jax.sharding.Mesh | None = None) -> Setup:
    mesh = mesh or sharding.make_mesh(config.mesh)
    rules = sharding.mesh_rules(config.mesh.rules)
    graphdef, aparams = abstract_model(config)
    param_sh = sharding.param_shardings(aparams, mesh, rules)
    pure = nnx.to_pure_dict(aparams)
    tx, schedule = optim.make_optimizer(config.optim, config.num_steps)
    aopt = jax.eval_shape(tx.init, pure)
    # Optimizer moments mirror the params tree and take its shardings; everything else is replicated.
    is_params = _is_tree_like(jax.tree.structure(pure))
    replicated = NamedSharding(mesh, P())
    opt_sh = jax.tree.map(lambda x: param_sh if is_params(x) else replicated, aopt, is_leaf=is_params)
    astate = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": pure, "opt_state": aopt}
    state_sh = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
    return Setup(graphdef, aparams, astate, state_sh, mesh, rules, tx, schedule)


def init_state(config, setup: Setup) -> dict:
    """Initialises params and optimizer state directly into their shardings."""
    def init():
        model = build_model(config)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": setup.tx.init(params)}
    return jax.jit(init, out_shardings=setup.state_shardings)()


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
    """Training FLOPs per token: 6 * active matmul params + 3 * each mixer's parameter-free forward FLOPs."""
    extra = 0.0
    for blk in getattr(model, "blocks", []):
        fn = getattr(blk.mixer, "extra_flops_per_token", None)
        if fn is not None:
            extra += fn(seq_len)
    return 6.0 * active_param_count(model, abstract_params) + 3.0 * extra
