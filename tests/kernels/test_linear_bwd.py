"""The Pallas backward kernels of GLA and SSE (``kernels/gla/pallas_bwd.py``): the TPU block-spec variant's
gradients in the interpreter against the per-token reference (test_gla.py and test_sse.py check the GPU variant,
which the interpreter runs by default, in f32 and bf16; SSE's backward is these kernels on partitions folded into
heads, so its TPU variant is this one), the segmented reverse sum behind ``dg``, and the lowering of the whole
backward for Triton and Mosaic at default tiles and ``sse_h_2b`` shapes in bf16 with footprints that fit.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import dispatch, tiles
from kernels.gla import gla, pallas, pallas_bwd
from kernels.sse import sse
from tests.kernels.test_kernel_contract import lower_fwd_bwd
from tests.testing import assert_close, assert_grads_close

S = jax.ShapeDtypeStruct
F32, BF16 = jnp.float32, jnp.bfloat16


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), F32)


def _log_decay(rng, *shape):
    return jnp.asarray(-np.logaddexp(0.0, -(2.0 * rng.standard_normal(shape) + 1.0)), F32)


def _pallas_names(fn, *args) -> str:
    return " ".join(str(e.params.get("name", "")) for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr)
                    if e.primitive.name == "pallas_call")


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def test_segment_reverse_cumsum():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 3))
    doc = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 3, 3]])
    expected = np.zeros_like(x)
    for b in range(2):
        for t in range(9):
            same = (np.arange(9) >= t) & (doc[b] == doc[b, t])
            expected[b, t] = x[b, same].sum(0)
    out = jax.jit(pallas_bwd.segment_reverse_cumsum)(jnp.asarray(x, F32), jnp.asarray(doc, jnp.int32))
    assert_close(out, expected, F32, "segment_reverse_cumsum")


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_gla_gradients_over_value_blocks_match_the_recurrence(target):
    """Both variants with two value and two key blocks per head (``block_v`` = 16 of the padded K = V = 32: on
    TPU ``dq``, ``dk`` summed over the value blocks' partials, on GPU ``gla_bwd`` over key blocks and
    ``gla_bwd_dv`` over value blocks), on T = 37 with chunk 32 (two sub-chunks, a padded last chunk), per-key decay,
    packed documents (boundaries inside and on sub-chunk starts) and an initial state, against the VJP of the
    per-token scan. TPU: chunks visited in reverse by the index maps, dS in VMEM scratch."""
    rng = np.random.default_rng(1)
    b, t, h, k, v = 2, 37, 2, 20, 20
    q, kk, vv = _normal(rng, b, t, h, k), _normal(rng, b, t, h, k), _normal(rng, b, t, h, v)
    g, h0 = _log_decay(rng, b, t, h, k), _normal(rng, b, h, k, v)
    seg = jnp.asarray((np.arange(t)[None] >= np.array([[10], [16]])) + (np.arange(t)[None] >= 30), jnp.int32)
    cts = (_normal(rng, b, t, h, v), _normal(rng, b, h, k, v))

    def grads(impl):
        def f(*xs):
            return gla(*xs[:4], initial_state=xs[4], segment_ids=seg, return_final_state=True, chunk_size=32,
                       scale=0.3, impl=impl, target=target if impl == "interpret" else None,
                       block_sizes=pallas.BlockSizes(block_v=16))
        return jax.jit(lambda *xs: jax.vjp(f, *xs)[1](cts))

    args = (q, kk, vv, g, h0)
    names = _pallas_names(grads("interpret"), *args).split()
    expected = ["gla_fwd", "gla_states", "gla_bwd"] + (["gla_bwd_dv"] if target == "gpu" else [])
    assert sorted(names) == sorted(expected), names
    assert_grads_close(grads("interpret")(*args), grads("ref")(*args), ("dq", "dk", "dv", "dg", "dh0"), F32,
                       target)


def _gla_op(b, t, h, k, v, dtype, chunk):
    return (functools.partial(gla, chunk_size=chunk),
            [S((b, t, h, k), dtype)] * 2 + [S((b, t, h, v), dtype), S((b, t, h, k), F32)])


def _sse_op(b, t, h, k, v, dtype, chunk, n=4):
    return (functools.partial(sse, chunk_size=chunk),
            [S((b, t, h, k), dtype)] * 2 + [S((b, t, h, v), dtype), S((b, t, h, k), F32), S((b, t, n), F32)])


SHAPES = {
    "tiny-f32": dict(b=1, t=37, h=1, k=8, v=12, dtype=F32, chunk=32),  # default tiles, padded K/V and T
    "sse_h_2b-bf16": dict(b=1, t=4096, h=8, k=256, v=256, dtype=BF16, chunk=64),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", ["gla", "sse"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_backward_lowers_and_fits(platform, op, shape):
    """``jax.value_and_grad`` through the op with ``impl="pallas"`` lowers the backward kernels for the target (Triton on
    cuda, Mosaic on tpu), and their footprints fit H100/H200 shared memory and v5e/v5p VMEM."""
    fn, args = (_gla_op if op == "gla" else _sse_op)(**SHAPES[shape])
    with tiles.record() as fps:
        text = lower_fwd_bwd(fn, args, platform)
    for name in ("gla_states", "gla_bwd") + (("gla_bwd_dv",) if platform == "cuda" else ()):
        assert name in text
        mine = [fp for fp in fps if fp.kernel == name]
        assert mine and all(fp.platform == ("gpu" if platform == "cuda" else "tpu") for fp in mine)
        for fp in mine:
            assert fp.fits, fp.reason()
            if fp.platform == "tpu":
                assert fp.bytes < fp.vmem_limit_bytes <= min(tiles.TPU_VMEM.values())
                assert f"{fp.vmem_limit_bytes}}}]}}" in text
    assert ("__gpu$xla.gpu.triton" in text) == (platform == "cuda")
    assert ("tpu_custom_call" in text) == (platform == "tpu")


def test_backward_footprints_at_sse_h_2b():
    """K = V = 256, chunk 64, bf16 at default tiles: both backward kernels fit every target."""
    for platform, limit in (("gpu", min(tiles.GPU_SMEM.values())), ("tpu", min(tiles.TPU_VMEM.values()))):
        bs = pallas.BlockSizes.get_default(256, platform)
        fps = pallas_bwd.footprints(platform, 256, 256, BF16, 64, bs)
        assert [fp.kernel for fp in fps] == ["gla_states", "gla_bwd"] + (["gla_bwd_dv"] if platform == "gpu" else [])
        assert all(fp.fits and fp.bytes <= limit for fp in fps)
        assert fps[1].bytes > fps[0].bytes
    # A value block too wide for one program's shared memory is refused with the figures, and auto falls back.
    wide = pallas.BlockSizes(block_v=256)
    bwd = pallas_bwd.footprints("gpu", 256, 256, F32, 64, wide)[1]
    assert not bwd.fits and "gla_bwd needs" in bwd.reason()
    q = jnp.zeros((1, 64, 1, 256))
    with dispatch.lowering_target("cuda"):
        jaxpr = str(jax.make_jaxpr(functools.partial(gla, chunk_size=64, block_sizes=wide))(q, q, q, q))
    assert "pallas_call" not in jaxpr

