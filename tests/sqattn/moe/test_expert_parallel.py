"""Expert parallelism on the 8 simulated CPU devices: the shard_map all-to-all program equals the single-device
dense reference (output, ``keep`` and gradients), on an 8-way expert mesh and on a 2 (data) x 4 (expert) mesh,
with the padded exchange and with the ragged program (``ragged_all_to_all`` emulated on CPU); the exchange choice,
the argument errors and the row accounting."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqattn.moe import dispatch, expert_parallel, router
from sqattn.parallel import sharding
from tests.testing import assert_close

G, S, H, I, E, K = 8, 20, 16, 24, 8, 2
SKEW = jnp.asarray(-1.5 * np.log(np.arange(1, E + 1)), jnp.float32)
MESHES = {"expert8": {"expert": 8, "fsdp": 1}, "data2_expert4": {"data": 2, "expert": 4, "fsdp": 1}}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    params = dispatch.ExpertParams(normal(E, H, I, scale=H ** -0.5), normal(E, H, I, scale=H ** -0.5),
                                   normal(E, I, H, scale=I ** -0.5))
    return normal(G, S, H), normal(H, E, scale=H ** -0.5), params, normal(G, S, H)


def _path(name):
    if name == "dense":
        return dispatch.dense_dispatch
    mesh_name, exchange = name.split(":")
    return functools.partial(expert_parallel.expert_parallel_dispatch, mesh=sharding.make_mesh(MESHES[mesh_name]),
                             exchange=exchange, batch_axes=("data",), block_m=8)


@functools.partial(jax.jit, static_argnames=("path", "capacity"))
def _run(x, router_w, params, ct, path, capacity):
    def loss(x, router_w, params):
        r = router.route(router.router_logits(x, router_w) + SKEW, K)
        out, keep = _path(path)(x, r.expert_ids, r.weights, params, capacity=capacity)
        return jnp.sum(out * ct), (out, keep)
    (_, (out, keep)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, router_w, params)
    return out, keep, grads


@pytest.fixture(scope="module")
def case():
    data = _inputs()
    cap = router.capacity(S, E, K, 1.0)
    expected = _run(*data, path="dense", capacity=cap)
    assert 0.05 < 1.0 - float(jnp.mean(expected[1])) < 0.6  # the skewed routing drops at cf=1
    return data, cap, expected


@pytest.mark.parametrize("path", ["expert8:padded", "data2_expert4:ragged_emulated"])
def test_expert_parallel_equals_single_device_reference(case, path):
    assert jax.device_count() == 8
    data, cap, (e_out, e_keep, e_grads) = case
    out, keep, grads = _run(*data, path=path, capacity=cap)
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(e_keep), err_msg=f"{path}: keep differs")
    assert_close(out, e_out, name=f"{path} out")
    for name, g, r in zip(("dx", "drouter", "dw_gate", "dw_up", "dw_down"), jax.tree.leaves(grads),
                          jax.tree.leaves(e_grads)):
        assert_close(g, r, name=f"{path} {name}")


def test_ragged_emulation_matches_ragged_all_to_all_docstring_example():
    """The example of ``jax.lax.ragged_all_to_all``'s docstring, on 2 devices, through the emulation."""
    mesh = sharding.make_mesh({"expert": 2, "fsdp": 1})
    operand = jnp.asarray([[1, 2, 2], [3, 4, 0]], jnp.float32)
    args = [jnp.asarray(a, jnp.int32) for a in ([[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]],
                                                 [[1, 1], [2, 1]])]
    spec = jax.sharding.PartitionSpec("expert")

    def body(op, in_off, send, out_off, recv):
        return expert_parallel.ragged_all_to_all_emulated(op[0], jnp.zeros((4,), jnp.float32), in_off[0],
                                                          send[0], out_off[0], recv[0], axis_name="expert",
                                                          max_rows=3)[None]

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))(operand, *args)
    np.testing.assert_array_equal(np.asarray(out), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_exchange_choice_and_errors():
    assert expert_parallel.resolve_exchange("auto", "cpu") == "padded"
    assert expert_parallel.resolve_exchange("auto", "gpu") == "ragged"
    assert expert_parallel.resolve_exchange("auto", "tpu") == "ragged"
    with pytest.raises(ValueError, match="ragged_all_to_all is not implemented on 'cpu'"):
        expert_parallel.resolve_exchange("ragged", "cpu")
    with pytest.raises(ValueError, match="unknown exchange"):
        expert_parallel.resolve_exchange("fast")
    x, router_w, params, _ = _inputs()
    ids, w = jnp.zeros((G, S, K), jnp.int32), jnp.zeros((G, S, K))
    mesh = sharding.make_mesh({"expert": 8, "fsdp": 1})
    small = dispatch.ExpertParams(*(p[:6] for p in params))
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the 'expert' mesh axis"):
        expert_parallel.expert_parallel_dispatch(x, ids, w, small, capacity=4, mesh=mesh)
    with pytest.raises(ValueError, match="4 capacity groups do not split over the mesh axes"):
        expert_parallel.expert_parallel_dispatch(x[:4], ids[:4], w[:4], params, capacity=4, mesh=mesh)


def test_exchange_rows():
    ids = jnp.asarray([[[0, 1], [0, 2], [0, 1]], [[3, 0], [3, 0], [3, 1]]], jnp.int32)  # G=2, S=3, k=2, E=4
    rows = expert_parallel.exchange_rows(ids, 4, capacity=2)
    # group 0: expert 0 gets 3 (1 dropped); group 1: expert 3 gets 3 (1 dropped)
    assert rows == {"padded": 4 * 2 * 2, "exact": 10, "routed": 12, "dropped": 2}
