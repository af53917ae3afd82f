"""Mesh construction and the one logical-axis rules table.

Parameters carry logical axis names in their ``axes`` metadata (see ``sqattn.layers.param``); activations are
constrained with ``constrain(x, ("act_batch", "act_seq", "act_embed"))``. Weights and activations use different
names so each can be resharded on its own (MaxText). One table maps names to mesh axes; a config can swap the
whole table by name (``config.mesh.rules``).

Mesh axes (size 1 when unused):
  data    pure data parallelism (params replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor (model) parallelism over heads / MLP hidden / vocab
  expert  expert parallelism for MoE layers
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kernels import dispatch as kernel_dispatch

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, dict[str, Any]] = {
    "default": {
        # --- weights: embedding / vocab
        "vocab": "tensor",
        "embed": "fsdp",
        # --- weights: attention and recurrent mixers
        "heads": "tensor",          # fused (heads * head_dim) projection axis
        "kv_heads": "tensor",
        "head_dim": None,
        "state": None,              # recurrent state / SSM size
        "conv": None,               # short-conv taps
        "lowrank": None,
        # --- weights: MLP and MoE
        "mlp": "tensor",
        "exp": "expert",
        "norm": None,
        # --- activations
        "act_batch": ("data", "fsdp"),
        "act_seq": None,
        "act_embed": None,
        "act_heads": "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
        # --- weights that no rule above shards over these mesh axes (low-rank factors such as SSE's
        # [rank, heads*dim] deltas and gates when tensor == 1, norm scales) are sharded over them on their
        # largest dimension they divide (``param_shardings``), so FSDP really stores 1/N of every weight.
        "param_fallback": "fsdp",
    },
}
# Pure data parallel: every weight replicated, batch over all axes that exist.
LOGICAL_AXIS_RULES["dp"] = {k: (("data", "fsdp") if k == "act_batch" else None)
                            for k in LOGICAL_AXIS_RULES["default"]}


def mesh_rules(name: str) -> dict[str, Any]:
    if name not in LOGICAL_AXIS_RULES:
        raise ValueError(f"unknown sharding rules {name!r}; known: {sorted(LOGICAL_AXIS_RULES)}")
    return LOGICAL_AXIS_RULES[name]


def mesh_shape(mesh_cfg) -> dict[str, int]:
    """Axis sizes from ``config.mesh`` (``-1`` in one axis means "all remaining devices")."""
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    n = jax.device_count()
    auto = [a for a, s in sizes.items() if s == -1]
    if len(auto) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {auto}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {sizes}")
    if fixed > n:
        raise ValueError(f"config.mesh {sizes} needs {fixed} devices but only {n} are present "
                         f"({jax.default_backend()}); shrink the mesh or set one axis to -1")
    if auto:
        if n % fixed:
            raise ValueError(f"config.mesh: {n} devices are not divisible by the fixed axes {sizes}")
        sizes[auto[0]] = n // fixed
    total = math.prod(sizes.values())
    if total > n:
        raise ValueError(f"config.mesh {sizes} needs {total} devices but only {n} are present "
                         f"({jax.default_backend()}); shrink the mesh or set one axis to -1")
    return sizes


def make_mesh(mesh_cfg) -> jax.sharding.Mesh:
    """Builds the device mesh described by ``config.mesh`` over the first prod(sizes) devices."""
    sizes = mesh_shape(mesh_cfg)
    total = math.prod(sizes.values())
    devices = np.asarray(jax.devices()[:total]).reshape(tuple(sizes[a] for a in MESH_AXES))
    return jax.sharding.Mesh(devices, MESH_AXES)


def spec_for(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: jax.sharding.Mesh,
             rules: dict[str, Any]) -> P:
    """PartitionSpec for an array with logical ``axes``.

    A mesh axis is used at most once per array and only where it divides the dimension; otherwise that
    dimension stays replicated (e.g. 2 kv-heads on a tensor axis of 4).
    """
    if axes is None:
        return P()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        cand = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        size = 1
        for ax in cand:
            if ax in used or mesh.shape.get(ax, 1) == 1:
                continue
            if dim % (size * mesh.shape[ax]) == 0:
                chosen.append(ax)
                size *= mesh.shape[ax]
        used.update(chosen)
        out.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
    return P(*out)


def with_fallback(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh, rules: dict[str, Any]) -> P:
    """``spec`` plus the mesh axes of ``rules["param_fallback"]`` that it leaves unused, each put on the
    largest still-unsharded dimension it divides (ties: the first). A weight whose logical axes all map to
    absent or size-1 mesh axes would otherwise be copied on every device of the FSDP axis."""
    target = rules.get("param_fallback")
    cand = (target,) if isinstance(target, str) else tuple(target or ())
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries if e is not None for a in ((e,) if isinstance(e, str) else e)}
    for ax in cand:
        size = mesh.shape.get(ax, 1)
        if ax in used or size == 1:
            continue
        free = [i for i, e in enumerate(entries) if e is None and shape[i] % size == 0]
        if free:
            i = max(free, key=lambda j: (shape[j], -j))
            entries[i] = ax
            used.add(ax)
    return P(*entries)


def param_shardings(abstract_state, mesh, rules):
    """NamedShardings for an (abstract) ``nnx.State`` of Params, as a pure dict tree (``spec_for`` by the
    logical axes, then ``with_fallback``)."""
    def one(var):
        axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
        shape = var.value.shape
        spec = spec_for(axes, shape, mesh, rules)
        return NamedSharding(mesh, with_fallback(spec, shape, mesh, rules) if shape else spec)
    tree = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


# ---- activation constraints: active only inside `activation_sharding(mesh, rules)`.
_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh, rules, *, target: str | None = None, device_kind: str | None = None):
    """Activation constraints by logical names, and the kernel context of the program being built.

    Inside, ``constrain`` applies ``rules`` on ``mesh``, and every ``kernels`` op resolves ``impl="auto"`` from
    the mesh's devices (not the host's default backend) and runs its Pallas kernel inside ``shard_map`` over
    the ``act_batch`` / ``act_heads`` mesh axes (``kernels.dispatch.kernel_context``).

    Args:
      mesh: the device mesh.
      rules: a logical-axis rules table (``mesh_rules``).
      target: compile for this platform instead of the mesh's (``"cuda"``/``"gpu"``, ``"tpu"``, ``"cpu"``),
        e.g. to ``jax.export`` a train step for TPU from a CPU host (``kernels.dispatch.lowering_target``).
      device_kind: with ``target="tpu"``, the chip to lower Mosaic kernels for (default: v5e).
    """
    prev = getattr(_ACTIVE, "ctx", None)
    _ACTIVE.ctx = (mesh, rules)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(kernel_dispatch.kernel_context(
                mesh, batch_axes=rules.get("act_batch"), head_axes=rules.get("act_heads")))
            if target is not None:
                stack.enter_context(kernel_dispatch.lowering_target(target, device_kind=device_kind))
            yield
    finally:
        _ACTIVE.ctx = prev


def active_sharding() -> tuple | None:
    """``(mesh, rules)`` of the innermost enclosing ``activation_sharding`` context, or ``None`` outside one."""
    return getattr(_ACTIVE, "ctx", None)


def constrain(x, axes: Sequence[str | None]):
    """``with_sharding_constraint`` by logical names; a no-op outside ``activation_sharding``."""
    ctx = getattr(_ACTIVE, "ctx", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    if math.prod(mesh.shape.values()) == 1:
        return x
    spec = spec_for(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


logging.getLogger(__name__).addHandler(logging.NullHandler())
