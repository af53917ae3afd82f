"""Mixture of experts (papers/flashmoe.md): router, dispatch strategies, expert-parallel program, the layer.

* ``router``: float32 logits, renormalised top-k, capacity per group (token-order drop rule), aux losses.
* ``dispatch``: ``dense_dispatch`` (one-hot reference), ``sorted_dispatch`` (sort + grouped matmul),
  ``fused_dispatch`` (Pallas kernel ``kernels.moe``).
* ``expert_parallel``: ``shard_map`` all-to-all program over the ``expert`` mesh axis.
* ``layer``: the ``MoE`` module the LM puts in place of the MLP of chosen blocks.
"""

from sqattn.moe.dispatch import ExpertParams, dense_dispatch, fused_dispatch, sorted_dispatch
from sqattn.moe.expert_parallel import expert_parallel_dispatch
from sqattn.moe.layer import MoE, expert_load, inactive_params, layer_kwargs, moe_layer_indices
from sqattn.moe.router import Routing, capacity, route

__all__ = ["ExpertParams", "MoE", "Routing", "capacity", "dense_dispatch", "expert_load",
           "expert_parallel_dispatch", "fused_dispatch", "inactive_params", "layer_kwargs",
           "moe_layer_indices", "route", "sorted_dispatch"]
