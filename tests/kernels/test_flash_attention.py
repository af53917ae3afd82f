"""kernels/causal_attention/pallas.py: the flash-attention kernels (forward, dq, dk/dv) and the segment-attention
backward built on them.

* interpret-mode parity with the dense reference, forward and (q, k, v) gradients, on odd lengths (37, 70: padded,
  several 16-row blocks), causal / sliding window / GQA / packed segments, float32 and bfloat16, for both lowerings'
  kernel variants (Triton: block ranges walked by ``fori_loop``; Mosaic: a sequential grid axis with VMEM scratch);
* the loop bounds skip fully masked blocks (NaN planted where no visible pair reads it stays out of the result);
* fwd + bwd lower for ``cuda`` (Triton) and ``tpu`` (Mosaic) at the bf16 attention shapes of ``sse_h_2b`` and
  ``scout_swa_400m`` (and SCOUT segment attention's backward there), fitting H100/H200 shared memory and v5e/v5p VMEM
  with ``vmem_limit_bytes`` set;
* ``impl="auto"`` takes the kernel for a GPU/TPU target and falls back (with the reason) where it does not fit;
* the attention mixer (full and SWA) with the kernel equals ``impl="ref"``; under an 8-device mesh == 1 device.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import dispatch, tiles
from kernels.causal_attention import causal_attention, ops, pallas
from kernels.segment_attention import segment_attention
from tests.kernels.test_causal_attention import _largest_intermediate
from tests.kernels.test_kernel_contract import lower_fwd_bwd
from tests.testing import assert_close

B, H, G, D = 2, 4, 2, 8  # GQA: two query heads per kv head; D padded to 16 by the wrapper
S = jax.ShapeDtypeStruct
BF16, F32 = jnp.bfloat16, jnp.float32


def _inputs(length, dtype, seed=0, segments=False):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, length, H, D), dtype)
    k = jax.random.normal(ks[1], (B, length, G, D), dtype)
    v = jax.random.normal(ks[2], (B, length, G, D), dtype)
    do = jax.random.normal(ks[3], (B, length, H, D), dtype)
    seg = None
    if segments:  # row 0: documents [0, 10), [10, 30), [30, T); row 1: [0, T - 7), [T - 7, T)
        t = np.arange(length)
        seg = jnp.asarray(np.stack([(t >= 10).astype(int) + (t >= 30), 4 * (t >= length - 7)]), jnp.int32)
    return q, k, v, seg, do


@functools.partial(jax.jit, static_argnames=("impl", "window", "platform"))
def _fwd_bwd(q, k, v, seg, do, *, impl, window, platform=None):
    """``o`` and its vjp for ``impl`` (``"ref"``, ``"interpret"`` through the op, or ``"kernel"``: the kernels'
    ``platform`` variant in the interpreter at 16 x 16 tiles)."""
    if impl == "kernel":
        bs = pallas.BlockSizes(16, 16, 16, 16).fit(q.shape[1], q.shape[1])
        s = jnp.zeros(q.shape[:2], jnp.int32) if seg is None else seg

        def fn(q, k, v):
            return ops._flash(q, k, v, s, window, D ** -0.5, bs, True, platform)
    else:
        fn = functools.partial(causal_attention, window=window, segment_ids=seg, impl=impl, block_q=16, block_k=16)
    o, vjp = jax.vjp(fn, q, k, v)
    return o, vjp(do)


# (length, dtype, window, segments, variant): each row adds an odd length, a mask kind and a dtype to a variant.
CASES = [
    (37, "float32", 0, True, "gpu"),      # full causal, packed documents, 3 query blocks
    (70, "bfloat16", 20, False, "gpu"),   # sliding window across blocks: the band skips 1-3 key blocks
    (70, "bfloat16", 20, True, "tpu"),    # Mosaic variant: window band of 3 steps (clamped steps skipped), documents
]  # the Mosaic variant in float32: test_segment_attention.py::test_flash_backward_tpu_variant_matches_ref


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-{c[1]}-W{c[2]}-seg{int(c[3])}-{c[4]}")
def test_kernel_matches_dense_reference(case):
    length, dtype, window, segments, variant = case
    q, k, v, seg, do = _inputs(length, jnp.dtype(dtype), segments=segments)
    o_ref, g_ref = _fwd_bwd(q, k, v, seg, do, impl="ref", window=window)
    if variant == "gpu":  # through the public op (impl="interpret" runs the Triton variant's code)
        o, g = _fwd_bwd(q, k, v, seg, do, impl="interpret", window=window)
    else:
        o, g = _fwd_bwd(q, k, v, seg, do, impl="kernel", window=window, platform=variant)
    assert o.dtype == q.dtype
    assert_close(o, o_ref, dtype, f"{case} o")
    for name, a, e in zip(("dq", "dk", "dv"), g, g_ref):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, dtype, f"{case} {name}")


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_masked_blocks_are_outside_the_loop_bounds(variant):
    """T = 64, window 16, tiles 16: query blocks 2-3 never read key block 0, key block 0 is never read by query
    block 3, and query blocks 0-1 never read key blocks 2-3. NaN planted there must not reach those outputs (a
    masked-but-computed block would: 0 * NaN = NaN in the matmul)."""
    q, k, v, _, do = _inputs(64, F32, seed=1)
    run = functools.partial(_fwd_bwd, impl="kernel", window=16, platform=variant, seg=None)
    o, (dq, dk, dv) = run(q, k, v, do=do)
    o_p, _ = run(q, k, v.at[:, :16].set(jnp.nan), do=do)
    np.testing.assert_array_equal(np.asarray(o_p[:, 32:]), np.asarray(o[:, 32:]))
    assert np.isnan(np.asarray(o_p[:, :16])).all()
    _, (dq_p, dk_p, dv_p) = run(q, k, v, do=do.at[:, 48:].set(jnp.nan))
    np.testing.assert_array_equal(np.asarray(dk_p[:, :16]), np.asarray(dk[:, :16]))
    np.testing.assert_array_equal(np.asarray(dv_p[:, :16]), np.asarray(dv[:, :16]))
    _, (dq_p, _, _) = run(q, k.at[:, 48:].set(jnp.nan), v, do=do)
    np.testing.assert_array_equal(np.asarray(dq_p[:, :32]), np.asarray(dq[:, :32]))


def test_band_geometry():
    """Block ranges: full causal visits the lower triangle, a window its band, SCOUT checkpoints (stride L) the
    blocks before each query block."""
    full = pallas.Geometry(num_keys=64)
    assert [full.key_blocks(i * 16, 16, 16) for i in range(4)] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert [full.query_blocks(j * 16, 16, 16, 64) for j in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    swa = pallas.Geometry(num_keys=64, window=16)
    assert [swa.key_blocks(i * 16, 16, 16) for i in range(4)] == [(0, 1), (0, 2), (1, 3), (2, 4)]
    assert [swa.query_blocks(j * 16, 16, 16, 64) for j in range(4)] == [(0, 2), (1, 3), (2, 4), (3, 4)]
    assert swa.key_band(64, 16, 16) == 2 and full.key_band(64, 16, 16) == 4
    scout = pallas.Geometry(num_keys=6, stride=10, offset=10)  # T = 64, L = 10: checkpoints 9, 19, ..., 59
    assert [scout.key_range(i * 16, 16) for i in range(4)] == [(0, 1), (0, 3), (0, 4), (0, 6)]
    assert scout.query_range(0, 16, 64) == (10, 64) and scout.query_range(16, 16, 64) == (64, 64)


@pytest.mark.parametrize("stride,offset,window", [(1, 0, 0), (1, 0, 5), (1, 0, 40), (3, 3, 0), (7, 7, 0)])
def test_block_ranges_are_exactly_the_blocks_with_a_visible_pair(stride, offset, window):
    """Against brute force over every (row, key) pair: each query block's key-block range and each key block's
    query-block range contain every block with a visible pair and start and end on one (none skipped, none spare);
    the TPU bands are the widest ranges."""
    for length_q, bq, bk in ((70, 16, 16), (64, 32, 16), (37, 16, 32)):
        num_keys = length_q if stride == 1 else length_q // stride
        length_k = tiles.round_up(max(num_keys, 1), bk)
        geo = pallas.Geometry(num_keys=num_keys, stride=stride, offset=offset, window=window)
        t, j = np.arange(length_q)[:, None], np.arange(length_k)[None, :]
        kpos = j * stride + offset
        vis = (kpos <= t) & (j < num_keys) & ((t - kpos < window) if window else True)
        q_pad = tiles.round_up(length_q, bq)
        vis = np.pad(vis, ((0, q_pad - length_q), (0, 0)))  # padded rows: not checked, need no block
        blocks = vis.reshape(q_pad // bq, bq, length_k // bk, bk).any(axis=(1, 3))  # [query block, key block]
        for i, row in enumerate(blocks):
            lo, hi = geo.key_blocks(i * bq, bq, bk)
            want = np.flatnonzero(row)
            assert (lo, hi) == ((want[0], want[-1] + 1) if want.size else (lo, lo)), (i, lo, hi, want)
        for jb, col in enumerate(blocks.T):
            lo, hi = geo.query_blocks(jb * bk, bk, bq, length_q)
            want = np.flatnonzero(col)
            assert (lo, hi) == ((want[0], want[-1] + 1) if want.size else (lo, lo)), (jb, lo, hi, want)
        assert geo.key_band(q_pad, bq, bk) == max(int(np.ptp(np.flatnonzero(r))) + 1 for r in blocks if r.any())


@pytest.mark.parametrize("op", ["causal", "segment"])
def test_gradient_holds_no_score_matrix(op):
    """Forward + backward of the kernels (traced for a GPU target, not run) never materialise the [T, T] scores
    (causal) or the [T, T / L] checkpoint scores (segment attention at L = 1): the reference paths do."""
    t, heads = 512, 2
    x = jnp.zeros((1, t, heads, 32), BF16)
    fn = (causal_attention if op == "causal" else functools.partial(segment_attention, segment_len=1))

    def grad(impl):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, impl=impl).astype(F32)), argnums=(0, 1, 2))

    full = heads * t * t
    with dispatch.lowering_target("gpu"):
        assert _largest_intermediate(grad("ref"), x, x, x) >= full  # the check can see a T x T array
        assert _largest_intermediate(grad("pallas"), x, x, x) <= full // 8


# ---- lowering and footprints ---------------------------------------------------------------------------------

LOWERING = {  # bf16 production attention shapes: (op, kernel names that must appear, args)
    "sse_h_2b": (functools.partial(causal_attention), "flash_attention",       # 16 heads of 128, T = 4096, full
                 [S((1, 4096, 16, 128), BF16)] * 3),
    "scout_swa_400m": (functools.partial(causal_attention, window=1024), "flash_attention",   # 16 x 64, W = 1024
                       [S((1, 2048, 16, 64), BF16)] * 3),
    "scout_segment_400m": (functools.partial(segment_attention, segment_len=10), "segment_attention_bwd",
                           [S((1, 2048, 16, 64), BF16)] * 3),
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(LOWERING))
def test_fwd_bwd_lower_at_production_shapes_and_fit(name, platform):
    op, prefix, args = LOWERING[name]
    with tiles.record() as footprints:
        text = lower_fwd_bwd(op, args, platform)
    kernels = [f"{prefix}_dq", f"{prefix}_dkdv"] + ([f"{prefix}_fwd"] if prefix == "flash_attention" else [])
    for kernel in kernels:
        assert kernel in text, kernel
    assert ("__gpu$xla.gpu.triton" in text) == (platform == "cuda")
    assert ("tpu_custom_call" in text) == (platform == "tpu")
    fps = {fp.kernel: fp for fp in footprints if fp.kernel.startswith(prefix)}
    assert sorted(fps) == sorted(kernels)
    for fp in fps.values():
        assert fp.platform == ("gpu" if platform == "cuda" else "tpu")
        assert fp.fits, fp.reason()
        if fp.platform == "tpu":
            assert fp.bytes < fp.vmem_limit_bytes <= min(tiles.TPU_VMEM.values())
            assert f"{fp.vmem_limit_bytes}}}]}}" in text  # Mosaic's scoped_memory_configs carry the limit


def test_auto_takes_the_kernel_on_accelerators_and_falls_back_when_it_does_not_fit(caplog):
    """On a GPU/TPU target ``auto`` traces the kernel; on CPU the blocked jnp path. A head dim of 512 (tiles of
    128 x 512 bf16) does not fit an SM's shared memory: ``auto`` falls back with the reason, ``pallas`` refuses."""
    x = S((1, 256, 2, 64), BF16)
    for platform in ("gpu", "tpu"):
        with dispatch.lowering_target(platform):
            assert "flash_attention_fwd" in str(jax.make_jaxpr(causal_attention)(x, x, x))
    assert "pallas_call" not in str(jax.make_jaxpr(causal_attention)(x, x, x))
    dispatch._log_choice.cache_clear()
    wide = S((1, 256, 2, 512), BF16)
    with caplog.at_level(logging.WARNING, logger="kernels"), dispatch.lowering_target("cuda"):
        assert "pallas_call" not in str(jax.make_jaxpr(causal_attention)(wide, wide, wide))
        with pytest.raises(ValueError, match="flash_attention_fwd needs .* MiB of shared memory per program"):
            jax.eval_shape(functools.partial(causal_attention, impl="pallas"), wide, wide, wide)
    assert any("causal_attention: impl=auto on gpu -> chunked (flash_attention_fwd needs" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="block_k=64 is not a multiple of 128"):
        jax.eval_shape(functools.partial(causal_attention, impl="pallas", target="tpu", block_k=64), x, x, x)


# ---- the mixer and the mesh --------------------------------------------------------------------------------------


def test_attention_mixer_with_the_kernel_equals_ref():
    """Sliding-window ``Attention`` (GQA, packed segments; full attention is the same call with window 0):
    impl="interpret" == impl="ref", output and input gradient."""
    from flax import nnx
    from sqattn.mixers.attention import Attention
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 21, 32), F32)
    seg = jnp.asarray(np.stack([np.arange(21) >= 9, np.zeros(21)]), jnp.int32)
    outs = {}
    for impl in ("ref", "interpret"):
        mixer = Attention(32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2, window=8, impl=impl)
        outs[impl] = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(mixer(x, segment_ids=seg)))))(x)
    assert_close(outs["interpret"][0], outs["ref"][0], F32, "mixer loss")
    assert_close(outs["interpret"][1], outs["ref"][1], F32, "mixer dx")


def test_under_mesh_equals_reference():
    """8 simulated devices (data 4 x tensor 2: batch and heads split inside shard_map) == the dense reference on
    one device, loss and gradients."""
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    q, k, v = (jax.random.normal(kk, (4, 24, 2, 8), F32) for kk in ks)
    seg = jnp.repeat(jnp.arange(2), 12)[None].repeat(4, 0)

    def loss(q, k, v, impl):
        return jnp.sum(jnp.sin(causal_attention(q, k, v, window=10, segment_ids=seg, impl=impl)))

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    l1, g1 = f(q, k, v, "ref")
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with dispatch.kernel_context(mesh, batch_axes=("data",), head_axes=("tensor",)):
        assert "shard_map" in str(f.trace(q, k, v, "interpret").jaxpr)
        l8, g8 = f(q, k, v, "interpret")
    assert_close(l8, l1, F32, "loss")
    for name, a, e in zip("qkv", g8, g1):
        assert_close(a, e, F32, f"d{name}")
