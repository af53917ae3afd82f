"""Parity tests for kernels/moe: numpy loop == ref (sort + ragged_dot) == chunked (tile layout) == the fused
Pallas kernel in the interpreter (GPU and TPU block-spec variants), forward and gradients (custom_vjp), on an
odd token count with skewed routing and skipped (dropped) assignments; plus layout invariants, lowering for
both accelerators and argument errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.moe import moe_ffn, pallas, ref
from tests.testing import assert_close

N, H, I, E, K = 37, 24, 40, 5, 2  # odd N, H and I not powers of two: the kernel wrapper pads them


def _inputs(seed: int = 0, dtype=jnp.float32):
    """Skewed routing (expert 0 takes most first choices), every third token's 2nd choice skipped (-1)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, E)) - 2.0 * np.log(np.arange(1, E + 1))
    ids = np.argsort(-logits, axis=-1)[:, :K].astype(np.int32)
    ids[::3, 1] = -1
    w = np.exp(rng.standard_normal((N, K)))
    w /= w.sum(-1, keepdims=True)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    x = normal(N, H).astype(dtype)
    params = (normal(E, H, I, scale=H ** -0.5), normal(E, H, I, scale=H ** -0.5), normal(E, I, H, scale=I ** -0.5))
    return x, jnp.asarray(ids), jnp.asarray(w, jnp.float32), params, normal(N, H)


def _numpy_moe(x, ids, w, wg, wu, wd):
    """Independent float64 oracle: token by token, assignment by assignment."""
    x, w, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, w, wg, wu, wd))
    out = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            g, u = x[t] @ wg[e], x[t] @ wu[e]
            out[t] += w[t, j] * ((g / (1.0 + np.exp(-g)) * u) @ wd[e])
    return out


@functools.partial(jax.jit, static_argnames=("impl", "target"))
def _fwd_and_grads(x, ids, w, params, ct, impl, target=None):
    def loss(x, w, params):
        out = moe_ffn(x, ids, w, *params, impl=impl, target=target)
        return jnp.sum(out.astype(jnp.float32) * ct), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, params)
    return out, grads


@pytest.fixture(scope="module")
def reference():
    x, ids, w, params, ct = _inputs()
    out, grads = _fwd_and_grads(x, ids, w, params, ct, impl="ref")
    return (x, ids, w, params, ct), out, grads


def test_ref_matches_numpy_loop(reference):
    (x, ids, w, params, _), out, _ = reference
    assert_close(out, _numpy_moe(x, ids, w, *params), name="ref vs numpy")


@pytest.mark.parametrize("impl", ["chunked", "interpret"])
def test_impls_match_ref_forward_and_grads(reference, impl):
    (x, ids, w, params, ct), ref_out, ref_grads = reference
    out, grads = _fwd_and_grads(x, ids, w, params, ct, impl=impl)
    assert_close(out, ref_out, name=f"{impl} out")
    names = ("dx", "dweights", "dw_gate", "dw_up", "dw_down")
    for name, g, r in zip(names, jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert_close(g, r, name=f"{impl} {name}")
    assert float(jnp.max(jnp.abs(ref_grads[1][::3, 1]))) == 0.0  # skipped assignments get no weight gradient


def test_tpu_variant_in_the_interpreter(reference):
    """The Mosaic block specs (scalar prefetch, VMEM scratch, row loops) run by the interpreter; the backward
    is shared with the GPU variant."""
    (x, ids, w, params, _), ref_out, _ = reference
    out = jax.jit(functools.partial(moe_ffn, impl="interpret", target="tpu"))(x, ids, w, *params)
    assert_close(out, ref_out, name="interpret-tpu out")


def test_bf16_interpret_matches_f32_reference():
    x, ids, w, params, _ = _inputs(seed=1, dtype=jnp.bfloat16)
    out = jax.jit(functools.partial(moe_ffn, impl="interpret"))(x, ids, w, *params)
    assert out.dtype == jnp.bfloat16
    expected = _numpy_moe(x.astype(jnp.float32), ids, w, *params)
    assert_close(out, expected, dtype=jnp.bfloat16, name="bf16 interpret")


def test_tile_layout_invariants():
    _, ids, w, _, _ = _inputs()
    bm = 8
    lay = jax.jit(ref.tile_layout, static_argnums=(2, 3))(ids, w, E, bm)
    rows, weights, tile_expert = (np.asarray(a) for a in (lay.rows, lay.weights, lay.tile_expert))
    assert tile_expert.shape[0] == ref.num_tiles(N * K, E, bm)
    n_used = int(np.sum(tile_expert >= 0))
    assert np.all(tile_expert[:n_used] >= 0) and np.all(tile_expert[n_used:] == -1)  # unused tiles last
    assert np.all(np.diff(tile_expert[:n_used]) >= 0)  # experts in order
    counts = np.bincount(np.asarray(ids)[np.asarray(ids) >= 0], minlength=E)
    for e in range(E):  # each expert: its tokens in order, then padding up to a whole tile
        tiles = np.nonzero(tile_expert == e)[0]
        assert len(tiles) == -(-counts[e] // bm)
        r = rows[np.concatenate([np.arange(t * bm, (t + 1) * bm) for t in tiles])] if len(tiles) else rows[:0]
        expect = np.nonzero((np.asarray(ids) == e).any(-1))[0]
        np.testing.assert_array_equal(r[:counts[e]], expect)
        assert np.all(r[counts[e]:] == N)
    assert np.all(weights[rows == N] == 0.0)
    np.testing.assert_allclose(np.sort(weights[weights > 0]), np.sort(np.asarray(w)[np.asarray(ids) >= 0]))


@pytest.mark.parametrize("platform, lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernel_lowers_for_accelerators(platform, lowering):
    """No GPU/TPU in CI: check the compiled kernel lowers (Triton IR / Mosaic) in f32 and bf16 on odd sizes."""
    x, ids, w, params, _ = _inputs()
    bs = pallas.BlockSizes.get_default(I, platform)
    lay = ref.tile_layout(ids, w, E, bs.block_m)
    for dtype in (jnp.float32, jnp.bfloat16):
        x_pad = jax.ShapeDtypeStruct((N + 1, H), dtype)
        fwd = functools.partial(pallas.moe_ffn_fwd, block_sizes=bs, interpret=False, platform=platform)
        text = jax.jit(fwd).trace(x_pad, lay, *params).lower(lowering_platforms=(lowering,)).as_text()
        assert "moe_ffn_fwd" in text


@pytest.mark.parametrize("bad, match", [
    (dict(x=jnp.zeros((N, H, 1))), r"x must have shape \[N, H\]"),
    (dict(expert_ids=jnp.zeros((N + 1, K), jnp.int32)), r"expert_ids must have shape \[N, k\] = \(37, k\)"),
    (dict(expert_ids=jnp.zeros((N, K))), r"expert_ids must be an integer dtype"),
    (dict(weights=jnp.zeros((N, K + 1))), r"weights must have shape \[N, k\] = \(37, 2\)"),
    (dict(w_gate=jnp.zeros((E, H + 1, I))), r"w_gate must have shape \[E, H, I\] with H=24"),
    (dict(w_up=jnp.zeros((E, H, I + 1))), r"w_up must have shape \[E, H, I\] = \(5, 24, 40\)"),
    (dict(w_down=jnp.zeros((E, H, I))), r"w_down must have shape \[E, I, H\] = \(5, 40, 24\)"),
])
def test_shape_errors(bad, match):
    kwargs = dict(x=jnp.zeros((N, H)), expert_ids=jnp.zeros((N, K), jnp.int32), weights=jnp.zeros((N, K)),
                  w_gate=jnp.zeros((E, H, I)), w_up=jnp.zeros((E, H, I)), w_down=jnp.zeros((E, I, H)))
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        moe_ffn(**kwargs)


def test_impl_errors():
    x, ids, w, params, _ = _inputs()
    with pytest.raises(ValueError, match="impl='pallas' needs a compiled kernel"):
        moe_ffn(x, ids, w, *params, impl="pallas", target="cpu")
    with pytest.raises(ValueError, match="unknown impl"):
        moe_ffn(x, ids, w, *params, impl="fast")


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_retiled_kernels_with_several_reduction_steps(reference, target):
    """Tiles smaller than H and I (2 model-column and 3 hidden-column steps, 8-row tiles): both variants of the
    two kernels in the interpreter match the reference, forward and (through the custom_vjp) gradients."""
    (x, ids, w, params, ct), ref_out, ref_grads = reference
    bs = pallas.BlockSizes(block_m=8, block_i=16, block_h=16)

    @jax.jit
    def run(x, w, params):
        def loss(x, w, params):
            out = moe_ffn(x, ids, w, *params, impl="interpret", block_sizes=bs, target=target)
            return jnp.sum(out * ct), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, params)

    (_, out), grads = run(x, w, params)
    assert_close(out, ref_out, name=f"{target} retiled out")
    for name, g, r in zip(("dx", "dweights", "dw_gate", "dw_up", "dw_down"), jax.tree.leaves(grads),
                          jax.tree.leaves(ref_grads)):
        assert_close(g, r, name=f"{target} retiled {name}")


def test_auto_picks_the_kernels_where_they_fit():
    """Default tiles fit every target at moe_tiny (H = 128, I = 192) and moe_large (H = I = 2048) shapes, so the
    op's auto and the MoE layer's dispatch='auto' take the kernels on GPU/TPU targets and not on CPU."""
    from kernels import dispatch
    from kernels.moe import kernel_unsupported
    from sqattn.moe.layer import MoE
    for d_model, hidden in ((128, 192), (2048, 2048)):
        for target in ("gpu", "tpu"):
            for dtype in (jnp.bfloat16, jnp.float32):
                assert kernel_unsupported(d_model, hidden, dtype, target=target) is None
        assert "no compiled MoE kernel for 'cpu'" in kernel_unsupported(d_model, hidden, jnp.bfloat16, target="cpu")
    huge = pallas.BlockSizes(block_m=1024, block_i=2048, block_h=2048)
    assert "moe_ffn_fwd_up needs" in kernel_unsupported(2048, 2048, jnp.bfloat16, block_sizes=huge, target="gpu")
    from flax import nnx
    layer = MoE(16, num_experts=4, mlp_dim=24, rngs=nnx.Rngs(0))
    assert layer.resolved_dispatch() == "sorted"
    for platform in ("cuda", "tpu"):
        with dispatch.lowering_target(platform):
            assert layer.resolved_dispatch() == "fused"
    layer.kernel_impl = "ref"  # a kernel impl chosen by hand keeps auto off the kernels
    with dispatch.lowering_target("cuda"):
        assert layer.resolved_dispatch() == "sorted"
