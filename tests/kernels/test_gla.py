"""Parity tests for kernels/gla: numpy recurrence == ref (lax.scan) == chunked == interpret-Pallas
== step-by-step ``gla_step``, forward and gradients.

Every jitted function is compiled once per (impl, chunk, shape) and reused across tests; the strong
decay, packing and bf16 tests reuse the shapes of ``CASE_A`` so they mostly hit the jit cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gla import gla, gla_step, pallas
from tests.testing import assert_close, assert_grads_close, upcast_bf16

B, H, K, V = 3, 2, 8, 12  # K, V are not powers of two: the kernel wrapper pads them
IMPLS = ("ref", "chunked", "interpret")
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dh0")


@dataclasses.dataclass(frozen=True)
class Case:
    length: int
    chunk: int
    scalar_decay: bool
    use_h0: bool
    segments: tuple[tuple[int, ...], ...] | None  # per row: lengths of its packed documents


# Odd lengths, chunk 32 (two sub-chunks) and 16 (one), both decay kinds, h0 on/off. Document
# boundaries fall inside a sub-chunk (10, 30), on sub-chunk/chunk starts (16, 32) or nowhere.
CASE_A = Case(length=37, chunk=32, scalar_decay=False, use_h0=True,
              segments=((10, 20, 7), (16, 16, 5), (32, 5)))
CASE_B = Case(length=100, chunk=16, scalar_decay=True, use_h0=False, segments=None)
CASE_C = Case(length=1, chunk=16, scalar_decay=False, use_h0=True, segments=None)


def _segment_ids(segments) -> jax.Array:
    """Ids that go 7, 3, 7, ...: a reused id still starts a new document once it changes."""
    rows = [np.concatenate([np.full(n, (7, 3)[i % 2]) for i, n in enumerate(lengths)])
            for lengths in segments]
    return jnp.asarray(np.stack(rows), jnp.int32)  # [B, T]


def _inputs(case: Case, seed: int = 0):
    """Random f32 inputs and cotangents for ``case`` (numpy RNG: no per-op compiles)."""
    rng = np.random.default_rng(seed)
    t = case.length

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, k, v = normal(B, t, H, K), normal(B, t, H, K), normal(B, t, H, V)
    g_shape = (B, t, H) if case.scalar_decay else (B, t, H, K)
    g = jnp.asarray(-np.logaddexp(0.0, -(2.0 * rng.standard_normal(g_shape) + 1.0)),
                    jnp.float32)  # log-sigmoid: a GLA-style log-decay
    h0 = normal(B, H, K, V) if case.use_h0 else None
    seg = _segment_ids(case.segments) if case.segments else None
    return (q, k, v, g, h0, seg), (normal(B, t, H, V), normal(B, H, K, V))


def _numpy_gla(q, k, v, g, h0, seg):
    """Independent float64 oracle: the recurrence written out token by token."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    if g.ndim == 3:
        g = np.broadcast_to(g[..., None], q.shape)
    batch, length, heads, k_dim = q.shape
    state = (np.zeros((batch, heads, k_dim, v.shape[-1])) if h0 is None
             else np.array(h0, np.float64))
    o = np.zeros(v.shape)
    for t in range(length):
        if seg is not None and t > 0:
            state[np.asarray(seg[:, t] != seg[:, t - 1])] = 0.0
        state = np.exp(g[:, t])[..., None] * state + k[:, t, ..., None] * v[:, t, :, None, :]
        o[:, t] = k_dim ** -0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], state)
    return o, state


def fwd_bwd(args, cotangents, *, impl: str, chunk_size: int):
    """(o, final_state) and the vjp w.r.t. (q, k, v, g, initial_state) of ``gla``."""
    q, k, v, g, h0, seg = args

    def f(q, k, v, g, h0):
        return gla(q, k, v, g, initial_state=h0, segment_ids=seg, return_final_state=True,
                   chunk_size=chunk_size, impl=impl)

    out, vjp = jax.vjp(f, q, k, v, g, h0)
    return out, vjp(cotangents)


_fwd_bwd = jax.jit(fwd_bwd, static_argnames=("impl", "chunk_size"))


def _check_grads(actual, expected, dtype, tag, q=None, k=None):
    """Every gradient against the reference; with ``q, k`` given, ``dg`` relative to its cancelling terms.

    dg is a reverse cumulative sum of ``q * dq - k * dk``: terms of order 1 that cancel almost exactly when
    every decay is ~exp(-20) (only the diagonal, where they are equal and opposite, survives). Its float
    error then scales with those terms, not with the ~1e-7 result, so it is bounded relative to them."""
    if q is None:
        assert_grads_close(actual, expected, GRAD_NAMES, dtype, tag)
        return
    i = GRAD_NAMES.index("dg")
    others = [n for n in GRAD_NAMES if n != "dg"]
    pick = lambda grads: [grads[GRAD_NAMES.index(n)] for n in others]  # noqa: E731
    assert_grads_close(pick(actual), pick(expected), others, dtype, tag)
    dq, dk = expected[GRAD_NAMES.index("dq")], expected[GRAD_NAMES.index("dk")]
    terms = jnp.abs(q * dq) + jnp.abs(k * dk)
    if expected[i].ndim == terms.ndim - 1:                # scalar decay: dg sums its terms over K
        terms = terms.sum(-1)
    assert actual[i].shape == expected[i].shape and actual[i].dtype == expected[i].dtype, f"{tag}: dg"
    assert_close(actual[i], expected[i], dtype, f"{tag} dg", scale=float(jnp.max(terms)))


@pytest.mark.parametrize("case", (CASE_A, CASE_B), ids=lambda c: f"T{c.length}-C{c.chunk}"
                         f"-{'scalar' if c.scalar_decay else 'vector'}"
                         f"-h0{int(c.use_h0)}-seg{int(bool(c.segments))}")
def test_impls_match_recurrence(case):
    args, cts = _inputs(case)
    o_np, s_np = _numpy_gla(*args)
    results = {impl: _fwd_bwd(args, cts, impl=impl, chunk_size=case.chunk) for impl in IMPLS}
    for impl, ((o, s), grads) in results.items():
        assert o.dtype == jnp.float32 and s.dtype == jnp.float32
        assert_close(o, o_np, jnp.float32, f"{impl} o")
        assert_close(s, s_np, jnp.float32, f"{impl} final_state")
        if impl != "ref":
            _check_grads(grads, results["ref"][1], jnp.float32, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_length_one(impl):
    """T=1 (one padded chunk) forward; its gradient path is the same padding as T=37."""
    args, _ = _inputs(CASE_C)
    q, k, v, g, h0, _ = args
    o, s = jax.jit(functools.partial(gla, impl=impl, chunk_size=CASE_C.chunk,
                                     return_final_state=True))(q, k, v, g, initial_state=h0)
    o_np, s_np = _numpy_gla(*args)
    assert_close(o, o_np, jnp.float32, f"{impl} o")
    assert_close(s, s_np, jnp.float32, f"{impl} final_state")


def test_step_by_step_decode_matches():
    """Decoding with ``gla_step`` (resetting the state where a document starts) == ``gla``."""
    args, (do, dh) = _inputs(CASE_A)
    q, k, v, g, h0, seg = args
    reset = np.concatenate([np.zeros((B, 1), bool), np.diff(np.asarray(seg), axis=1) != 0], 1)

    @jax.jit
    def step(q_t, k_t, v_t, g_t, state, reset_t):
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)  # a new document starts
        return gla_step(q_t, k_t, v_t, g_t, state)

    q_np, k_np, v_np, g_np = (np.asarray(x) for x in (q, k, v, g))
    state, outs = h0, []
    for t in range(CASE_A.length):
        o_t, state = step(q_np[:, t], k_np[:, t], v_np[:, t], g_np[:, t], state, reset[:, t])
        assert o_t.shape == (B, H, V) and state.shape == (B, H, K, V)
        outs.append(np.asarray(o_t))
    (o_ref, s_ref), grads_ref = _fwd_bwd(args, (do, dh), impl="ref", chunk_size=CASE_A.chunk)
    assert_close(np.stack(outs, axis=1), o_ref, jnp.float32, "step o")
    assert_close(state, s_ref, jnp.float32, "step final_state")

    # Gradients through a scan of gla_step equal the op's.
    def decode(q, k, v, g, h0):
        def body(state, xs):
            return step(*xs[:4], state, xs[4])[::-1]
        final, o = jax.lax.scan(body, h0, tuple(jnp.moveaxis(x, 1, 0)
                                                for x in (q, k, v, g, reset)))
        return jnp.moveaxis(o, 0, 1), final

    grads = jax.jit(lambda primals, cts: jax.vjp(decode, *primals)[1](cts))(
        (q, k, v, g, h0), (do, dh))
    _check_grads(grads, grads_ref, jnp.float32, "step")


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_rows_equal_documents_alone(impl):
    """A packed row == each document run alone (h0 reaches only the first); no gradient leaks."""
    case = CASE_A
    args, (do, dh) = _inputs(case, seed=1)
    q, k, v, g, h0, seg = args
    (o, s), _ = _fwd_bwd(args, (do, dh), impl=impl, chunk_size=case.chunk)
    o, s = np.asarray(o), np.asarray(s)
    bounds = [np.cumsum((0,) + lengths) for lengths in case.segments]  # per row
    for d in range(max(len(lengths) for lengths in case.segments)):
        # Row r holds document d of packed row r at its start, zero-padded (zero k/v, decay 1).
        def alone(x, d=d):
            x, out = np.asarray(x), np.zeros(x.shape, np.float32)
            for r, b in enumerate(bounds):
                if d + 1 < len(b):
                    out[r, :b[d + 1] - b[d]] = x[r, b[d]:b[d + 1]]
            return jnp.asarray(out)
        args_d = (alone(q), alone(k), alone(v), alone(g),
                  h0 if d == 0 else jnp.zeros_like(h0), jnp.zeros_like(seg))
        (o_d, s_d), _ = _fwd_bwd(args_d, (do, dh), impl=impl, chunk_size=case.chunk)
        o_d, s_d = np.asarray(o_d), np.asarray(s_d)
        for r, b in enumerate(bounds):
            if d + 1 < len(b):
                lo, hi = b[d], b[d + 1]
                assert_close(o[r, lo:hi], o_d[r, :hi - lo], jnp.float32, f"row {r} doc {d} o")
            if d + 2 == len(b):
                assert_close(s[r], s_d[r], jnp.float32, f"row {r} final_state (last document)")

    # Cotangent only on document 1 of every row: other documents and h0 get no gradient.
    inside = np.zeros((B, case.length), bool)
    for r, b in enumerate(bounds):
        inside[r, b[1]:b[2]] = True
    do_1 = np.where(inside[:, :, None, None], np.asarray(do), 0.0).astype(np.float32)
    _, (dq, dk, dv, dg, dh0) = _fwd_bwd(args, (jnp.asarray(do_1), jnp.zeros_like(dh)), impl=impl,
                                        chunk_size=case.chunk)
    dq, dk, dv, dg, dh0 = (np.asarray(x) for x in (dq, dk, dv, dg, dh0))
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.abs(grad[~inside]).max() == 0.0, f"{name} leaks across documents"
        assert np.abs(grad[inside]).max() > 0.0
    assert np.abs(dh0).max() == 0.0, "dh0 leaks past the first document"
    # dg outside document 1 is zero up to rounding: the chunked form differences cumulative sums.
    assert np.abs(dg[~inside]).max() <= 1e-6 * np.abs(dg).max()


def test_bf16_inputs():
    """bf16 q/k/v (f32 decay and state) match the f32 recurrence on the same values.

    The interpret kernels (forward and the backward of ``pallas_bwd``) run their matmuls in bf16 with f32
    accumulation.
    """
    impl = "interpret"
    args, (do, dh) = _inputs(CASE_A, seed=2)
    q, k, v, g, h0, seg = args
    args_bf16 = (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), g, h0,
                 seg)
    cts_bf16 = (do.astype(jnp.bfloat16), dh)
    (o, s), grads = _fwd_bwd(args_bf16, cts_bf16, impl=impl, chunk_size=CASE_A.chunk)
    (o_ref, s_ref), grads_ref = _fwd_bwd(upcast_bf16(args_bf16), upcast_bf16(cts_bf16), impl="ref",
                                         chunk_size=CASE_A.chunk)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o, o_ref, jnp.bfloat16, "o")
    assert_close(s, s_ref, jnp.bfloat16, "final_state")
    assert [x.dtype for x in grads[:3]] == [jnp.bfloat16] * 3
    _check_grads(upcast_bf16(grads), grads_ref, jnp.bfloat16, f"bf16 {impl}")


@pytest.mark.parametrize("case", (CASE_A, CASE_B), ids=("vector-C32", "scalar-C16"))
def test_strong_decay_is_finite(case):
    """Log-decays around -20 per step (cumulative -640 in a chunk of 32) stay finite and exact."""
    args, cts = _inputs(case, seed=3)
    g = np.random.default_rng(4).uniform(-30.0, -10.0, args[3].shape)
    args = args[:3] + (jnp.asarray(g, jnp.float32),) + args[4:]
    results = {impl: _fwd_bwd(args, cts, impl=impl, chunk_size=case.chunk) for impl in IMPLS}
    for impl, ((o, s), grads) in results.items():
        for name, x in (("o", o), ("final_state", s)) + tuple(zip(GRAD_NAMES, grads)):
            if x is not None:
                assert bool(jnp.all(jnp.isfinite(x))), f"{impl} {name} is not finite"
        if impl != "ref":
            assert_close(o, results["ref"][0][0], jnp.float32, f"{impl} o")
            _check_grads(grads, results["ref"][1], jnp.float32, impl, q=args[0], k=args[1])


def test_options_and_dispatch():
    """Final state only on request, output dtype follows q, impl names are checked."""
    args, _ = _inputs(CASE_A)
    q, k, v, g, h0, seg = args
    o, s = jax.eval_shape(functools.partial(gla, impl="interpret"), q.astype(jnp.bfloat16), k, v,
                          g)
    assert s is None and o.dtype == jnp.bfloat16 and o.shape == (B, CASE_A.length, H, V)
    with pytest.raises(ValueError, match="impl='pallas' needs a compiled kernel"):
        gla(q, k, v, g, impl="pallas", target="cpu")
    with pytest.raises(ValueError, match="unknown impl"):
        gla(q, k, v, g, impl="fast")


@pytest.mark.parametrize("platform, lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernel_lowers_for_accelerators(platform, lowering):
    """No GPU/TPU in CI: check the compiled kernel at least lowers (Triton IR / Mosaic) for both,
    in f32 and bf16, with the padded odd K/V and a two-sub-chunk chunk."""
    for dtype in (jnp.float32, jnp.bfloat16):
        args = (jax.ShapeDtypeStruct((1, 37, 1, K), dtype),) * 2 + (
            jax.ShapeDtypeStruct((1, 37, 1, V), dtype),
            jax.ShapeDtypeStruct((1, 37, 1, K), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, K, V), jnp.float32),
            jax.ShapeDtypeStruct((1, 37), jnp.int32))
        fwd = functools.partial(pallas.gla_fwd, scale=0.5, chunk_size=32, interpret=False,
                                block_sizes=pallas.BlockSizes.get_default(V, platform),
                                platform=platform)
        text = jax.jit(fwd).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
        assert "gla_fwd" in text


@pytest.mark.parametrize("bad, match", [
    (dict(q=jnp.zeros((B, 5, H))), r"q must have shape \[B, T, H, K\], got \(3, 5, 2\)"),
    (dict(k=jnp.zeros((B, 5, H, K + 1))), r"k must have shape \[B, T, H, K\] = \(3, 5, 2, 8\)"),
    (dict(v=jnp.zeros((B, 4, H, V))), r"v must have shape \[B, T, H, V\] = \(3, 5, 2, V\)"),
    (dict(g=jnp.zeros((B, 5, K))), r"g must have shape \[B, T, H, K\] = \(3, 5, 2, 8\) or "
                                   r"\[B, T, H\] = \(3, 5, 2\), got \(3, 5, 8\)"),
    (dict(g=jnp.zeros((B, 5, H, K), jnp.int32)), r"g must be a floating dtype"),
    (dict(initial_state=jnp.zeros((B, H, V, K))),
     r"initial_state must have shape \[B, H, K, V\] = \(3, 2, 8, 12\), got \(3, 2, 12, 8\)"),
    (dict(segment_ids=jnp.zeros((B, 6), jnp.int32)), r"segment_ids must have shape \[B, T\]"),
    (dict(segment_ids=jnp.zeros((B, 5))), r"segment_ids must be an integer dtype"),
    (dict(chunk_size=0), r"chunk_size must be a positive int"),
])
def test_shape_errors(bad, match):
    kwargs = dict(q=jnp.zeros((B, 5, H, K)), k=jnp.zeros((B, 5, H, K)), v=jnp.zeros((B, 5, H, V)),
                  g=jnp.zeros((B, 5, H, K)))
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        gla(**kwargs)


@pytest.mark.parametrize("bad, match", [
    (dict(k_t=jnp.zeros((B, H, K + 1))), r"k_t must have shape \[B, H, K\] = \(3, 2, 8\)"),
    (dict(g_t=jnp.zeros((B, K))), r"g_t must have shape \[B, H, K\] = \(3, 2, 8\) or \[B, H\]"),
    (dict(state=jnp.zeros((B, H, K))), r"state must have shape \[B, H, K, V\] = \(3, 2, 8, 12\)"),
])
def test_step_shape_errors(bad, match):
    kwargs = dict(q_t=jnp.zeros((B, H, K)), k_t=jnp.zeros((B, H, K)), v_t=jnp.zeros((B, H, V)),
                  g_t=jnp.zeros((B, H)), state=jnp.zeros((B, H, K, V)))
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        gla_step(**kwargs)
