"""The MoE layer: a drop-in replacement for the SwiGLU MLP of a block (``sqattn.models.lm``).

``MoE(d_model, num_experts=E, mlp_dim=I, top_k=k, ...)`` maps ``x [b, t, d] -> [b, t, d]``: router (float32
logits, renormalised top-k; ``sqattn.moe.router``), capacity per group of ``group_size`` consecutive tokens of a
row (default: the whole row), gated-MLP experts, weighted combine. The load-balance and z-losses are sown as
``aux_loss`` (the LM sums every sown ``aux_loss`` into ``aux["aux_loss"]``), with the per-expert assignment
counts (``expert_load``) and the dropped fraction (``drop_fraction``) beside them for probing.

Dispatch (``dispatch=``): ``"dense"`` (one-hot reference), ``"sorted"`` (sort + grouped matmul),
``"fused"`` (Pallas kernel), ``"expert_parallel"`` (shard_map all-to-all over the ``expert`` mesh axis of the
enclosing ``sharding.activation_sharding`` context) or ``"auto"``: expert parallel when that context has an
``expert`` axis larger than 1, else fused where the Pallas kernels run on the target (GPU/TPU) and their tiles
fit (``kernels.moe.kernel_unsupported``; with ``kernel_impl="auto"``), else sorted. ``"auto"`` is resolved when
the model is traced, so jit it inside the context (as the trainer does); a function jitted outside keeps its
choice. Decoding (``x [b, d]``) treats every token as its own group, where nothing can be dropped, so it matches
the parallel form exactly only when the parallel form drops nothing (dropless, or a capacity factor large
enough).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.moe import kernel_unsupported
from sqattn.layers.core import param
from sqattn.moe import dispatch as dispatch_lib
from sqattn.moe import expert_parallel
from sqattn.moe import router as router_lib
from sqattn.moe.dispatch import ExpertParams

DISPATCHES = ("auto", "dense", "sorted", "fused", "expert_parallel")
SELECTION_KEYS = ("every", "layers")  # keys of the LM's ``moe`` config that pick layers, not layer kwargs


class MoE(nnx.Module):
    """Top-k routed mixture of gated-MLP experts.

    Attributes:
      router: ``[d, E]`` float32 router weights (logical axes ``("embed", None)``).
      w_gate, w_up: ``[E, d, I]`` (``("exp", "embed", "mlp")``).  w_down: ``[E, I, d]``.
      top_k, capacity_factor, group_size, dispatch: routing and dispatch settings (see ``__init__``).
    """

    def __init__(self, d_model: int, *, num_experts: int, mlp_dim: int, top_k: int = 2,
                 capacity_factor: float = 1.25, group_size: int = 0, dispatch: str = "auto",
                 gmm: str = "auto", kernel_impl: str = "auto", block_m: int = 128, exchange: str = "auto",
                 aux_loss_coef: float = 1e-2, z_loss_coef: float = 1e-3, rngs: nnx.Rngs,
                 dtype=jnp.float32, out_scale: float = 1.0):
        """Builds the layer.

        Args:
          d_model: model width ``d``.
          num_experts: ``E``.
          mlp_dim: expert hidden width ``I`` (active MLP FLOPs per token = ``k`` experts of width ``I``).
          top_k: experts per token ``k``.
          capacity_factor: ``cf`` in ``C = ceil(cf * S * k / E)``; ``<= 0`` means dropless.
          group_size: tokens per capacity group ``S`` (consecutive tokens of a row); 0 = the whole row.
          dispatch: one of ``DISPATCHES``.
          gmm: grouped matmul of the sorted path, ``"auto" | "ragged" | "tiled"`` (``dispatch.resolve_gmm``).
          kernel_impl: ``impl`` of ``kernels.moe.moe_ffn`` for ``dispatch="fused"``.
          block_m: tile height of the tiled grouped matmul.
          exchange: all-to-all of the expert-parallel program (``expert_parallel.resolve_exchange``).
          aux_loss_coef: weight of the load-balance loss.
          z_loss_coef: weight of the router z-loss.
          rngs: parameter RNGs.
          dtype: compute dtype; parameters stay float32, router logits are float32.
          out_scale: init scale of ``w_down`` (the LM's residual-branch scaling).
        """
        if num_experts < 1 or mlp_dim < 1:
            raise ValueError(f"MoE: num_experts and mlp_dim must be >= 1, got {num_experts}, {mlp_dim}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"MoE: unknown dispatch {dispatch!r}; expected one of {DISPATCHES}")
        if group_size < 0:
            raise ValueError(f"MoE: group_size must be >= 0 (0 = whole row), got {group_size}")
        dispatch_lib.resolve_gmm(gmm)
        if exchange not in expert_parallel.EXCHANGES:
            raise ValueError(f"MoE: unknown exchange {exchange!r}; expected one of {expert_parallel.EXCHANGES}")
        init = jax.nn.initializers.normal
        self.router = param(rngs, init(d_model ** -0.5), (d_model, num_experts), ("embed", None))
        self.w_gate = param(rngs, init(d_model ** -0.5), (num_experts, d_model, mlp_dim), ("exp", "embed", "mlp"))
        self.w_up = param(rngs, init(d_model ** -0.5), (num_experts, d_model, mlp_dim), ("exp", "embed", "mlp"))
        self.w_down = param(rngs, init(out_scale * mlp_dim ** -0.5), (num_experts, mlp_dim, d_model),
                            ("exp", "mlp", "embed"))
        self.num_experts, self.mlp_dim, self.top_k = num_experts, mlp_dim, top_k
        self.capacity_factor, self.group_size, self.dispatch = float(capacity_factor), group_size, dispatch
        self.gmm, self.kernel_impl, self.block_m, self.exchange = gmm, kernel_impl, block_m, exchange
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.dtype = dtype

    # ---- accounting
    def inactive_params_per_token(self) -> int:
        """Expert parameters a token does not use: ``(E - k)`` experts' gated MLPs."""
        return (self.num_experts - self.top_k) * 3 * self.w_gate.shape[1] * self.mlp_dim

    def _params(self) -> ExpertParams:
        return ExpertParams(self.w_gate[...], self.w_up[...], self.w_down[...])

    def _sow(self, name: str, value) -> None:
        with warnings.catch_warnings():  # sow outside nnx.capture is deprecated, still supported
            warnings.simplefilter("ignore", DeprecationWarning)
            self.sow(nnx.Intermediate, name, value)

    def resolved_dispatch(self) -> str:
        """The strategy ``__call__`` uses in the current context (``"auto"`` resolved)."""
        if self.dispatch != "auto":
            return self.dispatch
        mesh, _ = expert_parallel.active_mesh()
        if mesh is not None and mesh.shape.get("expert", 1) > 1:
            return "expert_parallel"
        if self.kernel_impl == "auto" and kernel_unsupported(self.w_gate.shape[1], self.mlp_dim, self.dtype) is None:
            return "fused"  # the Pallas kernels run on this target (GPU/TPU) and their tiles fit
        return "sorted"

    def _dispatch(self, x, routing: router_lib.Routing, capacity: int, strategy: str):
        params = self._params()
        ids, w = routing.expert_ids, routing.weights
        if strategy == "dense":
            return dispatch_lib.dense_dispatch(x, ids, w, params, capacity=capacity)
        if strategy == "sorted":
            return dispatch_lib.sorted_dispatch(x, ids, w, params, capacity=capacity, gmm=self.gmm,
                                                block_m=self.block_m)
        if strategy == "fused":
            return dispatch_lib.fused_dispatch(x, ids, w, params, capacity=capacity, impl=self.kernel_impl)
        mesh, rules = expert_parallel.active_mesh()
        if mesh is None:
            raise ValueError("MoE: dispatch='expert_parallel' needs a device mesh: call the model inside "
                             "sqattn.parallel.sharding.activation_sharding(mesh, rules)")
        batch = expert_parallel.token_axes(mesh, rules)[:-1]
        return expert_parallel.expert_parallel_dispatch(
            x, ids, w, params, capacity=capacity, mesh=mesh, batch_axes=batch, exchange=self.exchange,
            gmm=self.gmm, block_m=self.block_m)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [b, t, d]`` -> ``[b, t, d]`` (or one decoding step ``x [b, d]`` -> ``[b, d]``)."""
        if x.ndim == 2:  # decode: every token its own group (nothing drops); no aux losses
            out, _ = self.route_and_dispatch(x[:, None, :], group_size=1, strategy="sorted", sow=False)
            return out[:, 0]
        b, t, d = x.shape
        gs = self.group_size or t
        if t % gs:
            raise ValueError(f"MoE: sequence length {t} is not a multiple of group_size={gs}")
        out, _ = self.route_and_dispatch(x.reshape(b * t // gs, gs, d), group_size=gs,
                                         strategy=self.resolved_dispatch())
        return out.reshape(b, t, d)

    def route_and_dispatch(self, xg: jax.Array, *, group_size: int, strategy: str, sow: bool = True):
        """Routes groups ``xg [G, S, d]``, dispatches them with ``strategy`` and (if ``sow``) sows the aux
        losses and load statistics. Returns ``(out [G, S, d] in the compute dtype, routing)``."""
        logits = router_lib.router_logits(xg, self.router[...])  # [G, S, E] float32
        routing = router_lib.route(logits, self.top_k)
        cap = router_lib.capacity(group_size, self.num_experts, self.top_k, self.capacity_factor)
        out, keep = self._dispatch(xg.astype(self.dtype), routing, cap, strategy)
        if sow:
            lb = router_lib.load_balance_loss(routing.probs, routing.expert_ids)
            z = router_lib.z_loss(logits)
            self._sow("aux_loss", self.aux_loss_coef * lb + self.z_loss_coef * z)
            self._sow("expert_load", router_lib.expert_counts(routing.expert_ids, self.num_experts))
            self._sow("drop_fraction", 1.0 - jnp.mean(keep.astype(jnp.float32)))
        return out.astype(self.dtype), routing


# ----------------------------------------------------------------------------------------------- LM helpers
def moe_layer_indices(num_layers: int, moe_cfg: dict[str, Any]) -> tuple[int, ...]:
    """Which blocks use MoE: ``layers`` (explicit indices) if given, else every ``every``-th block counting from
    the second (``every=2``: blocks 1, 3, 5, ...; ``every=1``: all)."""
    layers = moe_cfg.get("layers") or ()
    if layers:
        bad = [i for i in layers if not 0 <= int(i) < num_layers]
        if bad:
            raise ValueError(f"moe.layers {tuple(layers)}: indices {bad} outside [0, {num_layers})")
        return tuple(sorted({int(i) for i in layers}))
    every = int(moe_cfg.get("every", 1))
    if every < 1:
        raise ValueError(f"moe.every must be >= 1, got {every}")
    return tuple(i for i in range(num_layers) if (i + 1) % every == 0)


def layer_kwargs(moe_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``MoE`` constructor kwargs of an LM ``moe`` config (layer-selection keys removed)."""
    return {k: v for k, v in dict(moe_cfg).items() if k not in SELECTION_KEYS}


def expert_load(model: nnx.Module, tokens: jax.Array) -> list[jax.Array]:
    """Per MoE layer of an LM, the fraction of routed assignments each expert received on ``tokens [b, t]``.

    Runs the LM's embedding and blocks and reads the ``expert_load`` each MoE layer sows; jit it with ``nnx.jit``.
    """
    x = model.embed(tokens)
    loads = []
    for block in model.blocks:
        x = block(x)
        if isinstance(getattr(block, "mlp", None), MoE):
            sown = nnx.to_pure_dict(nnx.pop(block.mlp, nnx.Intermediate))
            counts = sown["expert_load"][0].astype(jnp.float32)
            loads.append(counts / jnp.maximum(jnp.sum(counts), 1.0))
    nnx.pop(model, nnx.Intermediate)  # discard everything else that was sown
    return loads


def inactive_params(model: nnx.Module) -> int:
    """Parameters of ``model`` a token does not use: for every ``MoE`` submodule, the ``E - k`` experts it is not
    routed to. Works on an abstract model (``nnx.eval_shape``); 0 for a model without MoE."""
    return int(sum(node.inactive_params_per_token() for _, node in nnx.iter_graph(model)
                   if isinstance(node, MoE)))
