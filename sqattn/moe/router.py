"""Top-k router, capacity and the auxiliary losses (papers/flashmoe.md, "MoE layer semantics").

Conventions (every dispatch path in ``sqattn.moe.dispatch`` and ``sqattn.moe.expert_parallel`` follows them):

* **Logits** ``x @ W_r`` are computed in float32 from float32 router weights ``W_r [d, E]`` (no bias).
* **Selection**: the ``k`` largest logits per token (``lax.top_k``; ties go to the lower expert index).
  A token never selects the same expert twice.
* **Combine weights**: softmax over the ``k`` selected logits, i.e. the renormalised top-k probabilities
  ``w_{t,e} = p_{t,e} / sum_{e' in topk(t)} p_{t,e'}`` with ``p = softmax(logits)`` over all experts
  (FlashMoE's and MaxText's convention; not Switch's un-renormalised ``p``).
* **Capacity** (drop mode): tokens are cut into *groups* (by default one sequence). Per group and expert at most
  ``C = capacity(S, E, k, cf) = min(S, max(1, ceil(cf * S * k / E)))`` assignments are served, in token
  order (token ``t`` before ``t+1``; a token's own ``k`` choices go to different experts, so their order does
  not matter). The rest are dropped: they contribute zero, and the kept weights are *not* renormalised (the
  residual stream carries the token). ``cf <= 0`` means dropless (``C = S``: no assignment can be dropped).
  Unlike FlashMoE's atomics this order is deterministic, and because groups never straddle devices it is the
  same on one device and under expert parallelism.
* **Auxiliary losses** (computed from the routing decision before drops, over every token of the call):
  load balance ``E * sum_e f_e * P_e`` (Switch; ``f_e`` the fraction of the ``N*k`` assignments that chose
  ``e``, ``P_e`` the mean router probability of ``e``; 1.0 when perfectly balanced, gradient through ``P``
  only) and the router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    """A routing decision for tokens ``[..., d]``.

    Attributes:
      expert_ids: ``[..., k]`` int32 chosen experts, in descending logit order.
      weights: ``[..., k]`` float32 combine weights (renormalised top-k; sum to 1 over ``k``).
      probs: ``[..., E]`` float32 softmax over all experts.
      logits: ``[..., E]`` float32 router logits.
    """
    expert_ids: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array


def router_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x [..., d] @ kernel [d, E]`` in float32 (inputs upcast, full precision)."""
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), kernel.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)  # [..., E]


def route(logits: jax.Array, top_k: int) -> Routing:
    """Top-k selection and renormalised combine weights from float32 logits ``[..., E]``."""
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"route: top_k must be in [1, num_experts={num_experts}], got {top_k}")
    logits = logits.astype(jnp.float32)
    top_logits, expert_ids = jax.lax.top_k(logits, top_k)  # [..., k]
    weights = jax.nn.softmax(top_logits, axis=-1)  # == p_sel / sum(p_sel)
    return Routing(expert_ids.astype(jnp.int32), weights, jax.nn.softmax(logits, axis=-1), logits)


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Slots per (group, expert): ``min(S, max(1, ceil(cf * S * k / E)))``; ``cf`` None or <= 0: ``S``."""
    if group_size < 1:
        raise ValueError(f"capacity: group_size must be >= 1, got {group_size}")
    if capacity_factor is None or capacity_factor <= 0:
        return int(group_size)
    c = math.ceil(capacity_factor * group_size * top_k / num_experts - 1e-9)
    return int(min(group_size, max(1, c)))


def expert_counts(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """``[E]`` int32: how many assignments chose each expert (before drops)."""
    one_hot = jax.nn.one_hot(expert_ids.reshape(-1), num_experts, dtype=jnp.int32)  # [A, E]
    return jnp.sum(one_hot, axis=0)


def load_balance_loss(probs: jax.Array, expert_ids: jax.Array) -> jax.Array:
    """Switch load-balance loss ``E * sum_e f_e * P_e`` over all tokens (1.0 at perfect balance)."""
    num_experts = probs.shape[-1]
    counts = jax.lax.stop_gradient(expert_counts(expert_ids, num_experts)).astype(jnp.float32)
    frac = counts / jnp.maximum(jnp.sum(counts), 1.0)  # f_e, [E]
    mean_prob = jnp.mean(probs.reshape(-1, num_experts).astype(jnp.float32), axis=0)  # P_e, [E]
    return num_experts * jnp.sum(frac * mean_prob)


def z_loss(logits: jax.Array) -> jax.Array:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` (keeps logits small; ST-MoE)."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(lse))
