"""The kernel contract (DESIGN.md "Op"), checked from a CPU host.

* ``impl="auto"`` resolves from the target (explicit, ``lowering_target``, the context mesh), never from the
  host's backend alone, and falls back with a logged reason for shapes a kernel cannot take;
* every kernel, forward and backward, lowers for ``cuda`` (Triton) and ``tpu`` (Mosaic) through its public op
  at default tiles and bf16 production shapes (``sse_h_2b``, ``scout_swa_400m``, a Mamba-2 1B-class SSD,
  ``moe_large`` for the MoE kernels);
* the on-chip footprint computed from the block specs fits H100/H200 shared memory and TPU v5e/v5p VMEM;
* under an 8-device mesh every op runs inside ``shard_map`` and equals the single-device result, forward and
  gradient; in a train step lowered for ``cuda`` every kernel custom call sits in a manual region.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import pytest

from kernels import dispatch, tiles
from kernels.gla import gla
from kernels.mamba import selective_scan, ssd
from kernels.moe import moe_ffn
from kernels.segment_attention import segment_attention
from kernels.sse import sse
from tests.testing import assert_close

S = jax.ShapeDtypeStruct
BF16, F32 = jnp.bfloat16, jnp.float32


def test_target_follows_context():
    assert dispatch.target_platform() == "cpu"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with dispatch.kernel_context(mesh, batch_axes=("data",)):
        assert dispatch.target_platform() == "cpu"  # the mesh's devices
        with dispatch.lowering_target("cuda"):
            assert dispatch.target_platform() == "gpu"
            assert dispatch.current_context().mesh is mesh  # the mesh is kept
            assert dispatch.target_platform("tpu") == "tpu"  # an explicit target wins
        with dispatch.lowering_target("tpu") as ctx:
            assert dispatch.target_platform() == "tpu"
            assert ctx.abstract_mesh.abstract_device.platform == "tpu"
            assert tuple(ctx.abstract_mesh.axis_sizes) == (8,)
    from sqattn.parallel import sharding
    with sharding.activation_sharding(mesh, sharding.mesh_rules("default"), target="gpu"):
        ctx = dispatch.current_context()
        assert dispatch.target_platform() == "gpu" and ctx.batch_axes == ("data", "fsdp")
        assert ctx.head_axes == ("tensor",)
    with pytest.raises(ValueError, match="unknown target platform 'metal'"):
        dispatch.target_platform("metal")


def test_auto_falls_back_with_the_reason(caplog):
    """sse_h_tiny's chunk of 8 cannot go to the GPU GLA kernel: auto takes the chunked path and says why once;
    impl='pallas' refuses with the same reason. The MoE kernels' tiles fit at moe_large shapes on both targets
    (auto picks them); tiles too large for a target are refused with the figures and auto falls back."""
    dispatch._log_choice.cache_clear()
    q = jnp.ones((1, 16, 1, 8))
    with caplog.at_level(logging.WARNING, logger="kernels"), dispatch.lowering_target("cuda"):
        auto = functools.partial(gla, chunk_size=8)
        jaxprs = [str(jax.make_jaxpr(auto)(q, q, q, -q)) for _ in range(2)]  # traced twice, logged once
        with pytest.raises(ValueError, match="chunk_size=8 is not a multiple of 16"):
            jax.eval_shape(functools.partial(gla, chunk_size=8, impl="pallas"), q, q, q, q)
        assert "pallas_call" in str(jax.make_jaxpr(functools.partial(gla, chunk_size=16))(q, q, q, -q))
    msgs = [r.getMessage() for r in caplog.records if "gla" in r.getMessage()]
    assert msgs == ["kernel gla: impl=auto on gpu -> chunked (chunk_size=8 is not a multiple of 16 (Triton tl.dot "
                    "tiles))"]
    assert all("pallas_call" not in j for j in jaxprs)
    x = S((4096, 2048), BF16)
    args = (x, S((4096, 2), jnp.int32), S((4096, 2), F32), S((64, 2048, 2048), BF16), S((64, 2048, 2048), BF16),
            S((64, 2048, 2048), BF16))
    from kernels.moe import pallas as moe_pallas
    huge = moe_pallas.BlockSizes(block_m=1024, block_i=2048, block_h=2048)
    for platform, what in (("gpu", "shared memory"), ("tpu", "VMEM")):
        with pytest.raises(ValueError, match=f"moe_ffn_fwd_up needs .* MiB of {what} per program"):
            jax.eval_shape(functools.partial(moe_ffn, impl="pallas", target=platform, block_sizes=huge), *args)
        with dispatch.lowering_target(platform):
            jaxpr = str(jax.make_jaxpr(functools.partial(moe_ffn, impl="auto", block_sizes=huge))(*args))
            assert "pallas_call" not in jaxpr and "ragged_dot" in jaxpr
            jaxpr = str(jax.make_jaxpr(functools.partial(moe_ffn, impl="auto"))(*args))
        assert "pallas_call" in jaxpr


# ---- lowering at production shapes -------------------------------------------------------------------------

def _gla_case():  # sse_h_2b shared branch: 8 heads, K = V = 256, T = 4096, chunk 64
    b, t, h, k = 1, 4096, 8, 256
    return (functools.partial(gla, chunk_size=64), "gla_fwd",
            [S((b, t, h, k), BF16)] * 3 + [S((b, t, h, k), F32)])


def _sse_case():  # sse_h_2b sparse partitions: N = 4
    b, t, h, k = 1, 4096, 8, 256
    return (functools.partial(sse, chunk_size=64), "sse_fwd",
            [S((b, t, h, k), BF16)] * 3 + [S((b, t, h, k), F32), S((b, t, 4), F32)])


def _selective_scan_case():  # scout_swa_400m Mamba-1: D_in = 2048, N = 16, T = 2048
    b, t, d, n = 1, 2048, 2048, 16
    return (functools.partial(selective_scan, chunk_size=64), "mamba_selective_scan_fwd",
            [S((b, t, d), BF16), S((b, t, d), F32), S((d, n), F32), S((b, t, n), BF16), S((b, t, n), BF16),
             S((d,), F32)])


def _ssd_case():  # a Mamba-2 1B-class layer: 32 heads of 64, N = 128, T = 2048, chunk 64
    b, t, h, p, n = 1, 2048, 32, 64, 128
    return (functools.partial(ssd, chunk_size=64), "mamba_ssd_fwd",
            [S((b, t, h, p), BF16), S((b, t, h), F32), S((h,), F32), S((b, t, 1, n), BF16), S((b, t, 1, n), BF16),
             S((h,), F32)])


def _segment_attention_case():  # scout_swa_400m SCOUT layer: 16 heads of 64, L = 10, T = 2048
    b, t, h, d = 1, 2048, 16, 64
    return (functools.partial(segment_attention, segment_len=10), "segment_attention_fwd",
            [S((b, t, h, d), BF16)] * 3)


def _moe_case():  # moe_large: 4096 tokens, H = 2048, I = 2048, 64 experts, top-2
    n, h, i, e = 4096, 2048, 2048, 64

    def op(x, ids, w, wg, wu, wd, impl):
        return moe_ffn(x, jnp.clip(ids, 0, e - 1), w, wg, wu, wd, impl=impl)
    return (op, "moe_ffn_fwd", [S((n, h), BF16), S((n, 2), jnp.int32), S((n, 2), F32), S((e, h, i), BF16),
                                S((e, h, i), BF16), S((e, i, h), BF16)])


CASES = {"gla": _gla_case, "sse": _sse_case, "selective_scan": _selective_scan_case, "ssd": _ssd_case,
         "segment_attention": _segment_attention_case, "moe": _moe_case}


def lower_fwd_bwd(op, args, platform: str) -> str:
    """StableHLO text of ``value_and_grad`` of ``sum(op(*args))`` (w.r.t. its float inputs) for ``platform``."""
    floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]

    def loss(*fl):
        full = list(args_holder)
        for i, x in zip(floats, fl):
            full[i] = x
        out = op(*full, impl="pallas")
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(F32))

    args_holder = list(args)

    def step(*all_args):
        args_holder[:] = all_args
        return jax.value_and_grad(loss, argnums=tuple(range(len(floats))))(*[all_args[i] for i in floats])

    with dispatch.lowering_target(platform):
        return jax.jit(step).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lowers_fwd_bwd_at_production_shapes_and_fits(name, platform):
    op, kernel, args = CASES[name]()
    with tiles.record() as footprints:
        text = lower_fwd_bwd(op, args, platform)
    assert kernel in text
    assert ("__gpu$xla.gpu.triton" in text) == (platform == "cuda")
    assert ("tpu_custom_call" in text) == (platform == "tpu")
    fps = [fp for fp in footprints if fp.kernel.startswith(kernel)]
    assert fps and all(fp.platform == ("gpu" if platform == "cuda" else "tpu") for fp in fps)
    for fp in fps:
        assert fp.fits, fp.reason()
        if fp.platform == "tpu":
            assert fp.bytes < fp.vmem_limit_bytes <= min(tiles.TPU_VMEM.values())
            assert f"{fp.vmem_limit_bytes}}}]}}" in text  # Mosaic's scoped_memory_configs carry the limit


def test_footprint_model():
    """(8, 128) padding and double buffering on TPU; dot tiles x stages on GPU."""
    fp = tiles.tpu_footprint("k", [((100, 1), F32), ((16, 64), BF16)], scratch=[((8, 128), F32)])
    assert fp.bytes == 2 * (104 * 128 * 4 + 16 * 128 * 2) + 8 * 128 * 4
    fp = tiles.gpu_footprint("k", [((64, 64), BF16)] * 2, live=[((64, 2048), F32)], num_stages=3)
    assert fp.bytes == 3 * 2 * 64 * 64 * 2 and fp.fits and fp.spills and fp.reason() is None
    fp = tiles.gpu_footprint("k", [((64, 2048), BF16)] * 2)
    assert not fp.fits and "needs 1.00 MiB of shared memory per program" in fp.reason()


# ---- under a mesh ----------------------------------------------------------------------------------------------

def _mesh():
    return jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _mesh_case(name):
    ks = jax.random.split(jax.random.PRNGKey(0), 12)
    b, t, h, k = 4, 16, 2, 8
    q, kk, v = _rand(ks[0], (b, t, h, k)), _rand(ks[1], (b, t, h, k)), _rand(ks[2], (b, t, h, k))
    g = jax.nn.log_sigmoid(_rand(ks[3], (b, t, h, k))) / 4
    w = jnp.where(jax.nn.one_hot(jax.random.randint(ks[4], (b, t), 0, 3), 3) > 0,
                  jax.nn.softmax(_rand(ks[5], (b, t, 3)), -1), 0.0)
    seg = jnp.repeat(jnp.arange(2), t // 2)[None].repeat(b, 0)
    if name == "gla":
        return functools.partial(gla, chunk_size=8, impl="interpret", segment_ids=seg), (q, kk, v, g), (0, 1, 2, 3)
    if name == "sse":
        return functools.partial(sse, chunk_size=8, impl="interpret"), (q, kk, v, g, w), (0, 1, 2, 3, 4)
    if name == "segment_attention":
        return functools.partial(segment_attention, segment_len=3, impl="interpret"), (q, kk, v), (0, 1, 2)
    if name == "ssd":
        return (functools.partial(ssd, chunk_size=8, impl="interpret", segment_ids=seg),
                (q, jax.nn.softplus(g[..., 0]), -jnp.exp(_rand(ks[6], (h,))), kk[:, :, :1], v[:, :, :1],
                 _rand(ks[7], (h,))), (0, 1, 2, 3, 4, 5))
    if name == "selective_scan":
        return (functools.partial(selective_scan, impl="interpret"),
                (q.reshape(b, t, h * k), jax.nn.softplus(g.reshape(b, t, h * k)), -jnp.exp(_rand(ks[8], (h * k, 4))),
                 kk[:, :, 0, :4], v[:, :, 0, :4], _rand(ks[9], (h * k,))), (0, 1, 2, 3, 4, 5))
    return (functools.partial(moe_ffn, impl="interpret"),
            (q.reshape(b * t, h * k), jax.lax.top_k(_rand(ks[10], (b * t, 4)), 2)[1],  # distinct experts per token
             jax.nn.softmax(_rand(ks[11], (b * t, 2)), -1), _rand(ks[0], (4, 16, 24), 0.2),
             _rand(ks[1], (4, 16, 24), 0.2), _rand(ks[2], (4, 24, 16), 0.2)), (0, 2, 3, 4, 5))


def _rand(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, F32)


@pytest.mark.parametrize("name", list(CASES))
def test_op_under_mesh_equals_single_device(name):
    """8 simulated devices (data=4 x tensor=2; heads split where the op has them) == 1, loss and gradients; the
    same jitted function is re-traced inside the context (the context is part of jax's cache key)."""
    op, args, diff = _mesh_case(name)

    def loss(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        out = op(*full)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(jnp.sin(out.astype(F32)))

    f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(diff)))))
    xs = [args[i] for i in diff]
    l1, g1 = f(*xs)
    assert "shard_map" not in str(f.trace(*xs).jaxpr)
    with dispatch.kernel_context(_mesh(), batch_axes=("data",), head_axes=("tensor",)):
        assert "shard_map" in str(f.trace(*xs).jaxpr)
        l8, g8 = f(*xs)
    assert_close(l8, l1, F32, f"{name} loss")
    for i, (a, e) in enumerate(zip(g8, g1)):
        assert_close(a, e, F32, f"{name} grad {i}")


def test_tpu_variants_in_the_interpreter_match_the_reference():
    """The TPU block-spec variants (GLA, SSE, selective scan, SSD: a chunk / time-block grid axis, state in VMEM
    scratch, padded time) on odd shapes with packed documents and an initial state, against the per-token
    references."""
    from kernels.gla import pallas as gla_pallas, ref as gla_ref
    from kernels.mamba import pallas as mamba_pallas, ref as mamba_ref
    ks = jax.random.split(jax.random.PRNGKey(1), 8)
    b, t, h, k, v = 2, 37, 2, 12, 20
    q, kk, vv = _rand(ks[0], (b, t, h, k)), _rand(ks[1], (b, t, h, k)), _rand(ks[2], (b, t, h, v))
    g = jax.nn.log_sigmoid(_rand(ks[3], (b, t, h, k))) / 4
    h0 = _rand(ks[4], (b, h, k, v))
    seg = (jnp.arange(t)[None] >= jnp.array([[13], [30]])).astype(jnp.int32)
    o_ref, s_ref = jax.jit(functools.partial(gla_ref.gla_recurrent, scale=0.3))(q, kk, vv, g, initial_state=h0,
                                                                                segment_ids=seg)
    o, s = gla_pallas.gla_fwd(q, kk, vv, g, h0, gla_ref.document_index(seg, b, t), scale=0.3, chunk_size=16,
                              block_sizes=gla_pallas.BlockSizes.get_default(v, "tpu"), interpret=True, platform="tpu")
    assert_close(o, o_ref, F32, "gla tpu o")
    assert_close(s, s_ref, F32, "gla tpu state")

    from kernels.sse import pallas as sse_pallas, ref as sse_ref
    e = jax.nn.softmax(_rand(ks[5], (b, t, 3)), -1)
    w = jnp.where(jax.nn.one_hot(jnp.argmax(e, -1), 3) > 0, e, 0.0)
    hs = _rand(ks[6], (b, 3, h, k, v))
    o_ref, s_ref = jax.jit(functools.partial(sse_ref.sse_masked, scale=0.3, form="recurrent"))(
        q, kk, vv, g, w, initial_state=hs, segment_ids=seg)
    o, s = sse_pallas.sse_fwd(q, kk, vv, g, w, hs, gla_ref.document_index(seg, b, t), scale=0.3, chunk_size=8,
                              block_sizes=sse_pallas.BlockSizes.get_default(v, "tpu"), interpret=True, platform="tpu")
    assert_close(o, o_ref, F32, "sse tpu o")
    assert_close(s, s_ref, F32, "sse tpu state")

    d, n = 256, 8
    u, dl = _rand(ks[5], (b, t, d)), jax.nn.softplus(_rand(ks[6], (b, t, d))) * 0.3
    a = -jnp.exp(_rand(ks[7], (d, n), 0.5))
    bm, cm, dd, s0 = _rand(ks[0], (b, t, n)), _rand(ks[1], (b, t, n)), _rand(ks[2], (d,)), _rand(ks[3], (b, d, n))
    resets = mamba_ref.segment_resets(seg, b, t)
    y_ref, st_ref = jax.jit(mamba_ref.selective_scan_ref)(u, dl, a, bm, cm, dd, s0, resets)
    y, st = jax.jit(functools.partial(mamba_pallas.selective_scan_fwd, interpret=True, platform="tpu",
                                      block_sizes=mamba_pallas.BlockSizes(block_d=128, block_t=16)))(
        u, dl, a, bm, cm, dd, s0, resets)
    assert_close(y, y_ref, F32, "selective_scan tpu y")
    assert_close(st, st_ref, F32, "selective_scan tpu state")

    x, dt = _rand(ks[4], (b, t, 4, 16)), jax.nn.softplus(_rand(ks[5], (b, t, 4))) * 0.3
    a2, bb, cc = -jnp.exp(_rand(ks[6], (4,))), _rand(ks[7], (b, t, 2, 16)), _rand(ks[0], (b, t, 2, 16))
    d2, s02 = _rand(ks[1], (4,)), _rand(ks[2], (b, 4, 16, 16))
    y_ref, st_ref = jax.jit(mamba_ref.ssd_ref)(x, dt, a2, bb, cc, d2, s02, resets)
    y, st = jax.jit(functools.partial(mamba_pallas.ssd_fwd, chunk_size=8, interpret=True, platform="tpu"))(
        x, dt, a2, bb, cc, d2, s02, resets)
    assert_close(y, y_ref, F32, "ssd tpu y")
    assert_close(st, st_ref, F32, "ssd tpu state")
