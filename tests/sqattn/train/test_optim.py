"""sqattn/train/optim.py: which parameters weight decay touches, and the schedule's shape."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sqattn.mixers.mamba import Mamba, Mamba2
from sqattn.train import optim


def _decayed(module) -> dict[str, bool]:
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    mask = optim.decay_mask(params)
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}


def test_decay_mask_matrices_only_and_never_ssm_dynamics():
    s6 = _decayed(Mamba(16, rngs=nnx.Rngs(0), d_state=4))
    assert s6["in_x/kernel"] and s6["out_proj/kernel"] and s6["dt_proj/kernel"]
    # A_log is a [D_in, N] matrix in S6 but must not be decayed; D and biases are vectors
    assert not s6["A_log"] and not s6["D"] and not s6["dt_proj/bias"] and not s6["conv/bias"]
    ssd = _decayed(Mamba2(16, rngs=nnx.Rngs(0), d_state=4, head_dim=8))
    assert not ssd["A_log"] and not ssd["D"] and not ssd["dt_bias"]


def test_adamw_leaves_undecayed_params_alone_at_zero_gradient():
    o = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0, b1=0.9,
                                       b2=0.95, eps=1e-8, weight_decay=0.5))
    tx, _ = optim.make_optimizer(o, num_steps=10)
    params = {"A_log": jnp.ones((4, 3)), "w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["A_log"], params["A_log"])
    np.testing.assert_array_equal(new["b"], params["b"])
    assert float(new["w"][0, 0]) < 1.0       # decayed
