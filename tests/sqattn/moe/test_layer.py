"""The MoE layer in the LM: block selection, aux losses reach the LM's ``aux_loss``, expert parallelism inside
the model equals the single-device model, decoding equals the parallel form when nothing drops, ``moe=None``
leaves the LM unchanged, and the dry run reports active parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn import configs
from sqattn.models.lm import LM
from sqattn.moe import MoE, expert_load, moe_layer_indices
from sqattn.parallel import sharding
from sqattn.train.dryrun import dry_run
from tests.testing import assert_close


def _lm_kwargs(**moe):
    cfg = configs.get("moe_tiny:runlocal")
    kw = cfg.model.to_dict()
    kw.update(dtype="float32")
    kw["moe"].update(moe)
    return kw


@pytest.mark.parametrize("cfg,expected", [
    (dict(every=2), (1, 3, 5)), (dict(every=1), (0, 1, 2, 3, 4, 5)), (dict(every=3), (2, 5)),
    (dict(every=2, layers=(0, 4)), (0, 4)),
])
def test_moe_layer_indices(cfg, expected):
    assert moe_layer_indices(6, cfg) == expected


def test_layer_selection_errors():
    with pytest.raises(ValueError, match=r"moe.layers \(7,\): indices \[7\] outside \[0, 6\)"):
        moe_layer_indices(6, dict(layers=(7,)))
    with pytest.raises(ValueError, match="top_k must be in"):
        MoE(8, num_experts=2, mlp_dim=4, top_k=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown dispatch 'nope'"):
        MoE(8, num_experts=2, mlp_dim=4, dispatch="nope", rngs=nnx.Rngs(0))


def _forward(model, tokens):
    logits, aux = model(tokens)
    return logits, aux["aux_loss"], model.blocks[1].mlp.resolved_dispatch() == "expert_parallel"


def test_lm_moe_blocks_aux_loss_and_expert_parallel_parity():
    kw = _lm_kwargs(dispatch="auto")
    model = LM(**kw, rngs=nnx.Rngs(params=0))
    assert [type(b.mlp).__name__ for b in model.blocks] == ["SwiGLU", "MoE"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 16)), jnp.int32)
    logits, aux_loss, used_ep = nnx.jit(_forward)(model, tokens)
    assert not used_ep
    m = kw["moe"]
    # load balance >= ~1 and a positive z-loss: the sown sum is at least the balanced value of the one layer
    assert float(aux_loss) > m["aux_loss_coef"] * 0.9
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 4})
    with sharding.activation_sharding(mesh, sharding.mesh_rules("default")):  # traced inside: auto -> EP
        logits_ep, aux_ep, used_ep = nnx.jit(_forward)(model, tokens)
    assert used_ep
    assert_close(logits_ep, logits, name="EP logits")
    assert_close(aux_ep, aux_loss, name="EP aux_loss")
    loads = nnx.jit(expert_load)(model, tokens)
    assert len(loads) == 1 and loads[0].shape == (m["num_experts"],) and abs(float(loads[0].sum()) - 1) < 1e-6


@nnx.jit
def _parallel_and_steps(layer, x):
    b, t, d = x.shape
    steps = layer(x.reshape(b * t, d)).reshape(b, t, d)  # decode form: every token on its own (x_t [b, d])
    return layer(x), steps


def test_decode_matches_parallel_when_dropless():
    layer = MoE(16, num_experts=4, mlp_dim=8, top_k=2, capacity_factor=0.0, dispatch="dense", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 16)), jnp.float32)
    full, steps = _parallel_and_steps(layer, x)
    assert_close(steps, full, name="decode vs parallel")


def test_moe_none_leaves_the_lm_unchanged():
    kw = _lm_kwargs()
    kw.pop("moe")
    a = nnx.state(LM(**kw, rngs=nnx.Rngs(params=0)), nnx.Param)
    b = nnx.state(LM(**kw, moe=None, rngs=nnx.Rngs(params=0)), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(a), nnx.to_pure_dict(b))


def test_dry_run_reports_active_parameters():
    cfg = configs.get("moe_tiny")
    rep = dry_run(cfg, check_devices=False)
    m, d = cfg.model.moe, cfg.model.d_model
    moe_blocks = len(moe_layer_indices(cfg.model.num_layers, m))
    inactive = moe_blocks * (m.num_experts - m.top_k) * 3 * d * m.mlp_dim
    assert rep["active_params"] == rep["params"] - inactive
    assert rep["flops_per_token"] < 6 * rep["matmul_params"]  # FLOPs count active experts only
