"""``LM(scan_layers=True)``: identical blocks through ``lax.scan`` compute the loop's function, gradients included."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sqattn.models import lm as lm_lib
from sqattn.models.lm import LM
from tests.testing import assert_close

MIXERS = {"attention": {"num_heads": 2, "num_kv_heads": 1},
          "sse": {"num_heads": 2, "head_k_dim": 8, "head_v_dim": 8, "num_partitions": 2, "chunk_size": 8,
                  "aux_loss_coef": 0.1}}


def _lm(pattern, layers, remat=False):
    return LM(vocab_size=40, d_model=16, num_layers=layers, block_pattern=pattern, mlp_dim=24,
              mixers=MIXERS, remat=remat, rngs=nnx.Rngs(0))


def _loss_and_grads(model, tokens, scan):
    model.scan_layers = scan
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits, aux = nnx.merge(graphdef, p, rest)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + aux["aux_loss"], (logits, aux["aux_loss"])

    (value, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, aux, grads


@pytest.mark.parametrize("pattern,layers,remat", [
    ("AA", 6, False),    # three identical repetitions (outer scan), each an inner run of two A
    ("SSA", 3, True),    # one repetition: an inner run [S S] (sowing aux losses), then A; rematerialised
])
def test_scanned_blocks_equal_the_loop(pattern, layers, remat):
    model = _lm(pattern, layers, remat)
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 40)     # 19: not a multiple of any chunk
    v0, logits0, aux0, g0 = _loss_and_grads(model, tokens, scan=False)
    v1, logits1, aux1, g1 = _loss_and_grads(model, tokens, scan=True)
    assert_close(logits1, logits0, name="logits")
    if "S" in pattern:
        assert float(aux0) > 0  # the SSE layers' balance loss is collected from inside the scan too
        assert_close(aux1, aux0, name="aux_loss")
    else:
        assert float(aux0) == float(aux1) == 0.0
    assert_close(v1, v0, name="loss")
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert_close(a, b, name=f"grad {jax.tree_util.keystr(path[0])}")


def test_every_block_output_is_returned_in_order():
    model = _lm("AA", 6)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=2)
    def hidden(state, x, scan):
        m = nnx.merge(graphdef, state)
        m.scan_layers = scan
        return m.hidden_states(x)

    x = jax.random.normal(jax.random.key(2), (2, 16, 16))
    loop, scanned = hidden(state, x, False), hidden(state, x, True)
    assert len(scanned) == len(loop) == 6
    for i, (a, b) in enumerate(zip(scanned, loop)):
        assert_close(a, b, name=f"block {i} output")


def _count(jaxpr, name: str) -> int:
    """Equations named ``name`` in ``jaxpr`` and every jaxpr nested in it (scan bodies, custom_vjp, pjit)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count(inner, name)
    return n


def test_the_body_is_traced_once_whatever_the_depth():
    """The point of the option: 12 layers trace (and compile) the same matmuls as 6; the loop doubles them."""
    def dots(layers, scan):
        model = _lm("SSA", layers)
        model.scan_layers = scan
        graphdef, state = nnx.split(model)
        tokens = jnp.zeros((1, 8), jnp.int32)
        return _count(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens)[0])(state).jaxpr, "dot_general")

    assert dots(12, True) == dots(6, True)
    assert dots(12, False) > 1.8 * dots(6, False)


def test_runs_groups_equal_consecutive_keys():
    assert lm_lib._runs(list("SSSA")) == [(0, 3), (3, 4)]
    assert lm_lib._runs(list("ASAA")) == [(0, 1), (1, 2), (2, 4)]
    assert lm_lib._runs([]) == []
