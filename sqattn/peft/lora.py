"""LoRA (Hu et al. 2021) for ``sqattn.layers.Dense``: ``y = x W + (x A) B * alpha / rank``.

``apply_lora`` wraps the named ``Dense`` layers of any nnx model in place; the adapter weights are
``LoRAParam`` variables, so ``nnx.state(model, LoRAParam)`` / ``nnx.DiffState(0, LoRAParam)`` /
``nnx.Optimizer(model, tx, wrt=LoRAParam)`` select only them and the base weights stay frozen. ``B`` starts
at zero, so wrapping leaves the model's outputs unchanged. ``merge_lora`` folds ``A B * alpha / rank`` into
the base kernels and puts plain ``Dense`` layers back.

Shapes: i in_features, o out_features, r rank.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sqattn.layers import Dense

__all__ = ["LoRADense", "LoRAParam", "apply_lora", "count_params", "merge_lora", "trainable"]


class LoRAParam(nnx.Param):
    """A LoRA adapter weight (a ``nnx.Param`` subtype, so filters can pick adapters alone)."""


class LoRADense(nnx.Module):
    """A frozen ``Dense`` plus a low-rank update.

    Attributes:
      base: the wrapped ``Dense`` (kept as is).
      lora_a: [i, r] ``LoRAParam``, normal with std 1/sqrt(i).
      lora_b: [r, o] ``LoRAParam``, zeros.
      scale: alpha / rank.
    """

    def __init__(self, base: Dense, *, rank: int = 8, alpha: float = 8.0, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        in_features, out_features = base.kernel.shape
        axes = base.kernel.get_metadata().get("axes", (None, None))
        self.base = base
        self.lora_a = LoRAParam(jax.nn.initializers.normal(in_features ** -0.5)(
            rngs.params(), (in_features, rank), jnp.float32), axes=(axes[0], "lowrank"))
        self.lora_b = LoRAParam(jnp.zeros((rank, out_features), jnp.float32), axes=("lowrank", axes[1]))
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.base.dtype
        y = self.base(x)                                                                   # [..., o]
        xa = jnp.dot(x.astype(dtype), self.lora_a[...].astype(dtype),
                     preferred_element_type=jnp.float32).astype(dtype)                     # [..., r]
        delta = jnp.dot(xa, self.lora_b[...].astype(dtype), preferred_element_type=jnp.float32)   # [..., o]
        return y + (delta * self.scale).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """``W + A B * alpha / rank`` in float32, [i, o]."""
        ab = jnp.dot(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST)   # [i, o]
        return self.base.kernel[...] + ab * self.scale


def _modules(model: nnx.Module, cls: type) -> list[tuple[tuple, Any]]:
    """(path, node) for every node of type ``cls`` in the graph of ``model`` (each shared node once)."""
    return [(tuple(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, cls) and len(path) > 0]


def _parent(model: nnx.Module, path: tuple) -> Any:
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _replace(model: nnx.Module, path: tuple, new: Any) -> None:
    parent, key = _parent(model, path), path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def apply_lora(model: nnx.Module, targets: Sequence[str], *, rank: int = 8, alpha: float = 8.0,
               rngs: nnx.Rngs) -> list[str]:
    """Wraps every ``Dense`` whose attribute name is in ``targets`` in a ``LoRADense``, in place.

    Args:
      model: any nnx module (layers inside ``nnx.List`` are found too).
      targets: attribute names of the layers to adapt, e.g. ``("q", "k", "v")``.
      rank, alpha: LoRA rank r and scale numerator (update scale alpha / r).
      rngs: for the ``A`` initialisation.

    Returns:
      The wrapped paths, e.g. ``["blocks/0/mixer/q", ...]``.

    Raises:
      ValueError: no ``Dense`` layer (not already wrapped) is named one of ``targets``.
    """
    targets = tuple(targets)
    found = []
    for path, node in _modules(model, Dense):
        if path[-1] in targets and not isinstance(_parent(model, path), LoRADense):
            found.append((path, node))
    if not found:
        names = sorted({str(p[-1]) for p, _ in _modules(model, Dense)})
        raise ValueError(f"apply_lora: no Dense layer named any of {targets}; Dense layer names in the model: "
                         f"{names}")
    for path, node in found:
        _replace(model, path, LoRADense(node, rank=rank, alpha=alpha, rngs=rngs))
    return [_path_str(p) for p, _ in found]


def from_config(model: nnx.Module, peft, rngs: nnx.Rngs) -> nnx.Module:
    """``config.peft`` entry point (``sqattn.peft.METHODS["lora"]``): ``targets`` (comma-separated), ``rank``,
    ``alpha``."""
    targets = [t.strip() for t in str(peft.get("targets", "")).split(",") if t.strip()]
    apply_lora(model, targets, rank=int(peft.get("rank", 8)), alpha=float(peft.get("alpha", 8.0)), rngs=rngs)
    return model


def merge_lora(model: nnx.Module) -> list[str]:
    """Replaces every ``LoRADense`` by its base ``Dense`` with kernel ``W + A B * alpha / rank``, in place.

    Returns:
      The merged paths.
    """
    found = _modules(model, LoRADense)
    for path, node in found:
        base = node.base
        base.kernel[...] = node.merged_kernel()
        _replace(model, path, base)
    return [_path_str(p) for p, _ in found]


def trainable(model: nnx.Module | None = None):
    """The filter of the trainable (adapter) variables: ``LoRAParam``.

    Use as ``nnx.DiffState(0, trainable())``, ``nnx.state(model, trainable())`` or
    ``nnx.Optimizer(model, tx, wrt=trainable())``.
    """
    del model  # one filter for every model; the argument keeps call sites explicit
    return LoRAParam


def count_params(model: nnx.Module, filter=nnx.Param) -> int:
    """Number of scalar parameters of ``model`` selected by ``filter`` (default: all ``nnx.Param``)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, filter)))
