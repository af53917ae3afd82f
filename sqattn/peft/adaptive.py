"""Adaptive-rank adapters: TriAdaptLoRA, AdaLoRA-style and IncreLoRA-style, with static shapes.

Specification: ``shared/papers/triadaptlora.md``. Every adapted ``Dense`` (``y = x W``) becomes an
``AdaptiveDense`` whose adapter is preallocated at ``max_rank`` R and switched on component by component by an
active-rank mask ``m`` (0/1, [R]); the host rank allocator (``sqattn.peft.allocator``) changes only the VALUES of
masks (and of a few adapter entries), never a shape, so a rank change recompiles nothing.

Forms (i in_features, o out_features, R max_rank, r = sum(m) the current rank, s the scale):

- ``triadapt`` (TriAdaptLoRA): ``dW = A diag(m) (L * C_low + U * C_up) diag(m) B * alpha / r``; A [i, R],
  B [R, o], C_low, C_up [R, R]; L/U are the static block-triangular masks ``block(i) >= block(j)`` /
  ``block(i) <= block(j)`` of the growth blocks (block 0 = the first ``init_rank`` components, then blocks of
  ``grow_rank``): the literal triangular split, so a growth step only switches on an L-shaped border (diagonal
  blocks are the sum of the two parameters). The scale uses the CURRENT rank r (the paper code's choice; the
  allocator's ``rescale`` flag multiplies C by r_new / r_old at growth instead, keeping dW continuous).
- ``adalora`` (AdaLoRA-style): ``dW = P diag(lambda * m) Q * alpha / rank``, P = A [i, R], Q = B [R, o],
  lambda = ``ada_e`` [R]; starts with all R = ``init_rank`` components, pruned by sensitivity.
- ``increlora`` (IncreLoRA-style): the same ``A diag(e * m) B * alpha / rank`` form, starting at ``init_rank``
  components and grown by importance.

Initialisation (every method): A with orthonormal columns, B with orthonormal rows (the orthogonality
regulariser's target; orthonormal where R <= the dimension, else normal 1/sqrt(dim)), core (C_low, C_up or e)
zero, so ``dW = 0`` and wrapping leaves outputs unchanged, while C / e get gradient at once (no zero-init
deadlock, pitfall 1 of the note). Inactive components get exactly zero gradient (``x * 0``), so their Adam
moments are still zero when the allocator switches them on (the "fresh param group" of the paper code, except
that Adam's bias correction uses the global step count).

``regularizer(model)``: ``mean over adapted matrices of ||M (A^T A - I) M||_F`` and ``||M (B B^T - I) M||_F``
(M = diag(m)) times each module's ``orth_reg``; tasks add it to the loss (``AdaptiveLMTask``, the synthetic task).

Entry points: ``apply_adapters(model, method, targets, budget=..., ...)`` (also ``method="lora"``),
``merge_adapters(model)``, ``from_config`` (``sqattn.peft.METHODS``), ``make_hook(config)`` (the trainer's host
hook: the rank allocator of ``config.peft.method``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.layers import Dense
from sqattn.peft import lora

__all__ = ["ADAPTIVE_METHODS", "AdaptParam", "AdaptiveDense", "RankMask", "TRAINABLE", "adapter_modules",
           "apply_adapters", "block_ids", "resolve_settings", "from_config", "make_hook", "merge_adapters", "method_defaults",
           "regularizer", "trainable"]

ADAPTIVE_METHODS = ("triadapt", "adalora", "increlora")
METHODS = ("lora",) + ADAPTIVE_METHODS

# The ``optim.trainable`` regex of adapter-only training (LoRA's and ours; never the masks or the base).
TRAINABLE = r"/(lora_a|lora_b|ada_a|ada_b|ada_core_low|ada_core_up|ada_e)$"


class AdaptParam(lora.LoRAParam):
    """A trainable weight of an adaptive adapter (a ``LoRAParam``, so LoRA's filters select it too)."""


class RankMask(nnx.Param):
    """The active-rank mask [R] (0/1 float32) of an ``AdaptiveDense``. A ``Param`` so it lives in the train state
    (the host allocator sets its values); the forward pass stops its gradient, so it is never trained."""


def block_ids(max_rank: int, init_rank: int, grow_rank: int) -> np.ndarray:
    """Growth block of each component: 0 for the first ``init_rank``, then one block per ``grow_rank``."""
    i = np.arange(max_rank)
    return np.where(i < init_rank, 0, 1 + (i - init_rank) // max(grow_rank, 1)).astype(np.int32)


def _orthonormal(key: jax.Array, n: int, r: int) -> jax.Array:
    """[n, r] with orthonormal columns (r <= n), else normal with std 1/sqrt(n)."""
    g = jax.random.normal(key, (n, r), jnp.float32)
    if r > n:
        return g * n ** -0.5
    q, rr = jnp.linalg.qr(g)
    return q * jnp.sign(jnp.diagonal(rr))[None, :]


def _safe_norm(x: jax.Array) -> jax.Array:
    """Frobenius norm with a finite (zero) gradient at 0 (a fully masked module)."""
    ss = jnp.sum(jnp.square(x))
    return jnp.where(ss > 0, jnp.sqrt(jnp.where(ss > 0, ss, 1.0)), 0.0)


class AdaptiveDense(nnx.Module):
    """A frozen ``Dense`` plus a masked adaptive-rank update (see the module docstring for the three forms).

    Attributes:
      base: the wrapped ``Dense``.
      ada_a: [i, R] ``AdaptParam``; ada_b: [R, o] ``AdaptParam``.
      ada_core_low, ada_core_up: [R, R] ``AdaptParam`` (triadapt); ada_e: [R] ``AdaptParam`` (adalora/increlora).
      ada_mask: [R] ``RankMask``.
      kind, max_rank, init_rank, grow_rank, alpha, rank, orth_reg: static settings.
    """

    def __init__(self, base: Dense, *, kind: str, max_rank: int, init_rank: int, grow_rank: int = 1,
                 alpha: float = 8.0, rank: int = 8, orth_reg: float = 0.0, rngs: nnx.Rngs):
        if kind not in ADAPTIVE_METHODS:
            raise ValueError(f"AdaptiveDense kind must be one of {ADAPTIVE_METHODS}, got {kind!r}")
        if not 0 <= init_rank <= max_rank or max_rank < 1:
            raise ValueError(f"need 0 <= init_rank <= max_rank and max_rank >= 1, got init_rank={init_rank}, "
                             f"max_rank={max_rank}")
        i, o = base.kernel.shape
        axes = base.kernel.get_metadata().get("axes", (None, None))
        self.base = base
        self.ada_a = AdaptParam(_orthonormal(rngs.params(), i, max_rank), axes=(axes[0], "lowrank"))
        self.ada_b = AdaptParam(_orthonormal(rngs.params(), o, max_rank).T, axes=("lowrank", axes[1]))
        if kind == "triadapt":
            self.ada_core_low = AdaptParam(jnp.zeros((max_rank, max_rank), jnp.float32), axes=("lowrank", None))
            self.ada_core_up = AdaptParam(jnp.zeros((max_rank, max_rank), jnp.float32), axes=("lowrank", None))
        else:
            self.ada_e = AdaptParam(jnp.zeros((max_rank,), jnp.float32), axes=("lowrank",))
        self.ada_mask = RankMask((jnp.arange(max_rank) < init_rank).astype(jnp.float32), axes=("lowrank",))
        self.kind, self.max_rank, self.init_rank, self.grow_rank = kind, int(max_rank), int(init_rank), int(grow_rank)
        self.alpha, self.rank, self.orth_reg = float(alpha), int(rank), float(orth_reg)

    # --- pieces (all float32)
    def mask(self) -> jax.Array:
        return jax.lax.stop_gradient(self.ada_mask[...])

    def scale(self) -> jax.Array:
        if self.kind == "triadapt":
            return self.alpha / jnp.maximum(jnp.sum(self.mask()), 1.0)
        return jnp.asarray(self.alpha / self.rank, jnp.float32)

    def triangles(self) -> tuple[jax.Array, jax.Array]:
        """The static block-triangular masks (L, U), [R, R] float32."""
        b = jnp.asarray(block_ids(self.max_rank, self.init_rank, self.grow_rank))
        return ((b[:, None] >= b[None, :]).astype(jnp.float32), (b[:, None] <= b[None, :]).astype(jnp.float32))

    def core(self) -> jax.Array:
        """The effective core: [R, R] ``L * C_low + U * C_up`` (triadapt) or the [R] diagonal e, unmasked."""
        if self.kind == "triadapt":
            low, up = self.triangles()
            return low * self.ada_core_low[...] + up * self.ada_core_up[...]
        return self.ada_e[...]

    def delta_kernel(self) -> jax.Array:
        """The active update ``dW`` [i, o] float32 (mask and scale applied)."""
        m, a, b = self.mask(), self.ada_a[...], self.ada_b[...]
        hi = jax.lax.Precision.HIGHEST
        if self.kind == "triadapt":
            mid = m[:, None] * self.core() * m[None, :]                                        # [R, R]
            d = jnp.dot(jnp.dot(a, mid, precision=hi), b, precision=hi)
        else:
            d = jnp.dot(a * (self.core() * m)[None, :], b, precision=hi)
        return d * self.scale()

    def merged_kernel(self) -> jax.Array:
        return self.base.kernel[...] + self.delta_kernel()

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.base.dtype
        y = self.base(x)                                                                       # [..., o]
        m = self.mask().astype(dtype)
        h = jnp.dot(x.astype(dtype), self.ada_a[...].astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype) * m                     # [..., R]
        if self.kind == "triadapt":
            h = jnp.dot(h, self.core().astype(dtype), preferred_element_type=jnp.float32).astype(dtype) * m
        else:
            h = h * self.core().astype(dtype)
        delta = jnp.dot(h, self.ada_b[...].astype(dtype), preferred_element_type=jnp.float32)     # [..., o]
        return y + (delta * self.scale()).astype(y.dtype)

    def orth_terms(self) -> tuple[jax.Array, jax.Array]:
        """``(||M (A^T A - I) M||_F, ||M (B B^T - I) M||_F)`` over the active components."""
        m = self.mask()
        mm = m[:, None] * m[None, :]
        eye = jnp.eye(self.max_rank, dtype=jnp.float32)
        a, b = self.ada_a[...], self.ada_b[...]
        ta = _safe_norm((a.T @ a - eye) * mm)
        tb = _safe_norm((b @ b.T - eye) * mm)
        return ta, tb

    def active_params(self) -> int:
        """Trainable scalars of the active adapter (the note's budget accounting): ``r (i + o)`` plus the active
        core entries (``2 sum_j r_j R_j``-style for triadapt, counting each triangle's entries; ``r`` for the
        diagonal forms). Host-side."""
        m = np.asarray(self.ada_mask[...]) > 0
        r = int(m.sum())
        i, o = self.base.kernel.shape
        if self.kind == "triadapt":
            low, up = (np.asarray(t) > 0 for t in self.triangles())
            mm = m[:, None] & m[None, :]
            return r * (i + o) + int((low & mm).sum() + (up & mm).sum())
        return r * (i + o) + r


# ------------------------------------------------------------------------------------------ model-level
def adapter_modules(model: nnx.Module) -> list[tuple[str, AdaptiveDense]]:
    """("/"-joined path, module) of every ``AdaptiveDense`` in ``model``, in graph order."""
    return [(lora._path_str(p), n) for p, n in lora._modules(model, AdaptiveDense)]


def regularizer(model: nnx.Module) -> jax.Array:
    """The orthogonality regulariser: mean over the adapted matrices (2 per module) of ``orth_reg *
    ||.||_F`` (0.0 when the model has no adaptive adapter)."""
    terms = []
    for _, mod in adapter_modules(model):
        if mod.orth_reg:
            ta, tb = mod.orth_terms()
            terms += [mod.orth_reg * ta, mod.orth_reg * tb]
    if not terms:
        return jnp.zeros((), jnp.float32)
    return sum(terms) / len(terms)


def method_defaults(method: str, rank: int) -> dict:
    """Per-method defaults of the adapter shape settings, from the reference rank ``rank`` (the note's
    ``r_ref``): triadapt grows from 1 by ``rank // 2`` up to ``2 rank``; increlora grows from 1 by 1 up to
    ``2 rank``; adalora prunes from ``ceil(1.5 rank)``. Orthogonality weights: 0.5 (TriAdaptLoRA code), 0.1
    (AdaLoRA, IncreLoRA)."""
    if method == "triadapt":
        return dict(init_rank=1, grow_rank=max(rank // 2, 1), max_rank=2 * rank, orth_reg=0.5)
    if method == "increlora":
        return dict(init_rank=1, grow_rank=1, max_rank=2 * rank, orth_reg=0.1)
    if method == "adalora":
        r0 = int(math.ceil(1.5 * rank))
        return dict(init_rank=r0, grow_rank=1, max_rank=r0, orth_reg=0.1)
    raise ValueError(f"unknown adapter method {method!r}; known: {list(METHODS)}")


def resolve_settings(method: str, rank: int, init_rank: int = -1, max_rank: int = -1, grow_rank: int = -1,
                     orth_reg: float = -1.0) -> dict:
    """``{"init_rank", "max_rank", "grow_rank", "orth_reg"}`` with negative entries replaced by
    ``method_defaults`` (adalora: ``init_rank == max_rank``, every component starts active).

    Raises:
      ValueError: an unknown method or inconsistent ranks.
    """
    d = method_defaults(method, rank)
    if method == "adalora":
        start = init_rank if init_rank >= 0 else max_rank if max_rank >= 0 else d["init_rank"]
        init_rank = max_rank = int(start)
    out = dict(init_rank=d["init_rank"] if init_rank < 0 else int(init_rank),
               max_rank=d["max_rank"] if max_rank < 0 else int(max_rank),
               grow_rank=d["grow_rank"] if grow_rank < 0 else int(grow_rank),
               orth_reg=d["orth_reg"] if orth_reg < 0 else float(orth_reg))
    if out["max_rank"] < 1 or out["init_rank"] > out["max_rank"] or out["grow_rank"] < 1:
        raise ValueError(f"{method}: need max_rank >= 1, init_rank <= max_rank and grow_rank >= 1, got {out}")
    return out


def _find_targets(model: nnx.Module, targets: tuple[str, ...], who: str) -> list[tuple[tuple, Dense]]:
    found = [(p, n) for p, n in lora._modules(model, Dense)
             if p[-1] in targets and not isinstance(lora._parent(model, p), (lora.LoRADense, AdaptiveDense))]
    if not found:
        names = sorted({str(p[-1]) for p, _ in lora._modules(model, Dense)})
        raise ValueError(f"{who}: no Dense layer named any of {targets}; Dense layer names in the model: {names}")
    return found


def apply_adapters(model: nnx.Module, method: str, targets: Sequence[str] | str, *, rank: int = 8,
                   alpha: float = 8.0, budget: int = 0, init_rank: int = -1, max_rank: int = -1,
                   grow_rank: int = -1, orth_reg: float = -1.0, rngs: nnx.Rngs) -> list[str]:
    """Wraps every ``Dense`` named in ``targets`` with the adapter of ``method``, in place.

    Args:
      model: any nnx module.
      method: "lora", "triadapt", "adalora" or "increlora".
      targets: attribute names of the layers to adapt (a sequence or a comma-separated string).
      rank: the reference rank r_ref (LoRA's rank; the adaptive methods' default budget is ``rank * M`` for
        M adapted layers).
      alpha: scale numerator.
      budget: the final total rank over all adapted layers (0: ``rank * M``). For "lora" it must equal
        ``rank * M``.
      init_rank, max_rank, grow_rank, orth_reg: the adaptive settings (negative: ``method_defaults``).
      rngs: for the A/B initialisation.

    Returns:
      The wrapped paths.

    Raises:
      ValueError: unknown method; no layer matches ``targets``; a budget above the maximum (``M * max_rank``;
        for adalora ``M * init_rank``, its starting rank) or below the growth methods' start (``M * init_rank``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; known: {list(METHODS)}")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(targets)
    if rank < 1:
        raise ValueError(f"adapter rank must be >= 1, got {rank}")
    if method == "lora":
        n = len(_find_targets(model, targets, "apply_adapters"))
        if budget and budget != rank * n:
            raise ValueError(f"lora: budget {budget} != rank {rank} x {n} adapted layers; LoRA has a fixed rank")
        return lora.apply_lora(model, targets, rank=rank, alpha=alpha, rngs=rngs)
    init_rank, max_rank, grow_rank, orth_reg = resolve_settings(method, rank, init_rank, max_rank, grow_rank,
                                                                orth_reg).values()
    found = _find_targets(model, targets, "apply_adapters")
    n = len(found)
    budget = int(budget) or rank * n
    if budget > n * max_rank:
        raise ValueError(f"{method}: budget {budget} (total rank) is above the maximum {n} layers x max_rank "
                         f"{max_rank} = {n * max_rank}; raise max_rank or lower the budget")
    if method != "adalora" and budget < n * init_rank:
        raise ValueError(f"{method}: budget {budget} is below the starting total rank {n} x init_rank {init_rank}")
    if budget < 0:
        raise ValueError(f"{method}: budget must be >= 0, got {budget}")
    for path, node in found:
        lora._replace(model, path, AdaptiveDense(node, kind=method, max_rank=max_rank, init_rank=init_rank,
                                                 grow_rank=grow_rank, alpha=alpha, rank=rank,
                                                 orth_reg=orth_reg, rngs=rngs))
    return [lora._path_str(p) for p, _ in found]


def merge_adapters(model: nnx.Module) -> list[str]:
    """Folds every adapter (``AdaptiveDense`` and ``LoRADense``) into its base ``Dense`` kernel, in place.

    Returns:
      The merged paths.
    """
    merged = lora.merge_lora(model)
    for path, node in lora._modules(model, AdaptiveDense):
        base = node.base
        base.kernel[...] = node.merged_kernel()
        lora._replace(model, path, base)
        merged.append(lora._path_str(path))
    return merged


def trainable(model: nnx.Module | None = None):
    """The filter of trainable adapter variables (``LoRAParam``, which ``AdaptParam`` subclasses)."""
    del model
    return lora.LoRAParam


# ------------------------------------------------------------------------------------------ config
PEFT_KEYS = dict(budget=0, init_rank=-1, max_rank=-1, grow_rank=-1, orth_reg=-1.0)


def _get(peft, key, default):
    v = peft.get(key, default) if hasattr(peft, "get") else getattr(peft, key, default)
    return default if v is None else v


def from_config(model: nnx.Module, peft, rngs: nnx.Rngs) -> nnx.Module:
    """``config.peft`` entry point of "triadapt", "adalora", "increlora" (``sqattn.peft.METHODS``): reads
    ``method``, ``targets``, ``rank``, ``alpha`` and ``budget``, ``init_rank``, ``max_rank``, ``grow_rank``,
    ``orth_reg`` (``sqattn.configs.adaptive_rank.peft_config`` adds them; absent keys take the defaults)."""
    method = str(_get(peft, "method", ""))
    apply_adapters(model, method, str(_get(peft, "targets", "")), rank=int(_get(peft, "rank", 8)),
                   alpha=float(_get(peft, "alpha", 8.0)),
                   **{k: type(v)(_get(peft, k, v)) for k, v in PEFT_KEYS.items()}, rngs=rngs)
    return model


def make_hook(config) -> Any:
    """The trainer's host hook for ``config.peft.method``: the rank allocator (``sqattn.peft.allocator``).

    Raises:
      ValueError: ``config.optim.trainable`` is empty (the base weights would train too); set it to
        ``sqattn.peft.adaptive.TRAINABLE``.
    """
    from sqattn.peft import allocator
    method = config.peft.method
    if method not in ADAPTIVE_METHODS:
        return None
    if not (config.get("optim") or {}).get("trainable"):
        raise ValueError(f"peft.method={method!r} trains adapters only: set optim.trainable to "
                         f"{TRAINABLE!r} (sqattn.peft.adaptive.TRAINABLE); it is empty, so the base weights "
                         f"would train too")
    return allocator.make_allocator(config)
