"""Parity tests for kernels/mamba: ref == chunked == interpret (Pallas) == step-by-step.

Forward outputs, final states and gradients (``jax.vjp`` with random cotangents for y and the
final state) with respect to every input, for odd lengths, both chunk sizes, initial state on and
off, packed segments, f32 and bf16, and very strong decays. Compiled functions are memoised per
(op, impl, chunk, flags) and shapes are shared between tests, so each program compiles once, and
they are compiled with XLA's backend optimisation level 0: compile time dominates this file on a
2-core CPU, and the checks are on our algorithms, not on XLA's code generation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from kernels.mamba import ops
from kernels.mamba import pallas
from kernels.mamba import ref
from tests.testing import assert_close

# Small shapes: Mamba-1 (B, Din, N); Mamba-2 (B, H, P, N).
_B, _DIN, _N1 = 2, 8, 4
_H, _P, _N2 = 4, 4, 4
_SEG_SPLIT = 13  # packed rows: tokens [0, 13) are segment 0, the rest segment 1

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_OPS = {"selective_scan": ops.selective_scan, "ssd": ops.ssd}
_GRAD_NAMES = {
    "selective_scan": ("u", "delta", "A", "B", "C", "D", "initial_state"),
    "ssd": ("x", "dt", "A", "B", "C", "D", "initial_state"),
}


def _inputs(op: str, seed: int, t: int, dtype=jnp.float32, groups: int = 1,
            strong: bool = False, width: int | None = None,
            state: int | None = None) -> tuple[np.ndarray, ...]:
    """Random (u|x, delta|dt, A, B, C, D, initial_state); delta*A ~ -30 when ``strong``.

    Host (numpy) arrays: building test data must not compile anything. ``width`` overrides Din
    (Mamba-1) or P (Mamba-2), ``state`` overrides N.
    """
    rng = np.random.default_rng(seed)

    def nrm(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    if op == "selective_scan":
        din, n = width or _DIN, state or _N1
        x_shape, dt_shape, a_shape = (_B, t, din), (_B, t, din), (din, n)
        bc_shape, d_shape, s_shape = (_B, t, n), (din,), (_B, din, n)
    else:
        p, n = width or _P, state or _N2
        x_shape, dt_shape, a_shape = (_B, t, _H, p), (_B, t, _H), (_H,)
        bc_shape, d_shape, s_shape = (_B, t, groups, n), (_H,), (_B, _H, p, n)
    x = nrm(*x_shape)
    if strong:
        dt = rng.uniform(2.0, 3.0, dt_shape).astype(np.float32)
        a = -rng.uniform(10.0, 15.0, a_shape).astype(np.float32)
    else:
        dt = np.logaddexp(0.0, nrm(*dt_shape) - 1.0).astype(np.float32)  # softplus
        a = -np.exp(0.5 * nrm(*a_shape)).astype(np.float32)
    b, c, d, s0 = nrm(*bc_shape), nrm(*bc_shape), nrm(*d_shape), nrm(*s_shape)
    # A, D and the state stay float32 (as in the Mamba blocks); activations take ``dtype``.
    x, dt, b, c = (z.astype(jnp.dtype(dtype)) for z in (x, dt, b, c))
    return x, dt, a, b, c, d, s0


def _segment_ids(t: int) -> np.ndarray:
    """Row 0 packs two sequences (split at 13, inside a chunk). Row 1 has non-monotonic ids
    7, 3, 7 with resets at 16 and 32, exactly on chunk boundaries."""
    pos = np.arange(t)
    row0 = (pos >= _SEG_SPLIT).astype(np.int32)
    row1 = np.where((pos >= 16) & (pos < 32), 3, 7).astype(np.int32)
    return np.stack([row0, row1])  # [B, T]


def _fwd_bwd(op: str, impl: str, chunk: int, with_init: bool, with_seg: bool, grads: bool = True):
    """Memoised ``_make_fwd_bwd`` (arguments normalised so each program compiles once)."""
    return _make_fwd_bwd(op, impl, chunk, with_init, with_seg, grads)


@functools.lru_cache(maxsize=None)
def _make_fwd_bwd(op: str, impl: str, chunk: int, with_init: bool, with_seg: bool, grads: bool):
    """Jitted (args, segment_ids, cotangents) -> ((y, final_state), grads or None)."""

    def run(args, segment_ids, cotangents):
        def call(*a):
            return _OPS[op](*a[:6], initial_state=a[6] if with_init else None,
                            return_final_state=True,
                            segment_ids=segment_ids if with_seg else None,
                            chunk_size=chunk, impl=impl)

        if not grads:
            return call(*args), None
        out, vjp = jax.vjp(call, *args)
        return out, vjp(cotangents)

    return jax.jit(run, compiler_options=_FAST_COMPILE)


def _cotangents(seed: int, args) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    return (rng.standard_normal(args[0].shape).astype(args[0].dtype),
            rng.standard_normal(args[6].shape).astype(np.float32))


def _compare(op, got, want, dtype, with_init, label):
    (y, s), g = got
    (y_ref, s_ref), g_ref = want
    assert y.dtype == y_ref.dtype and s.dtype == jnp.float32
    assert_close(y, y_ref, dtype, f"{label} y")
    assert_close(s, s_ref, dtype, f"{label} final_state")
    if g is None:
        return
    for name, a, e in zip(_GRAD_NAMES[op], g, g_ref):
        if name == "initial_state" and not with_init:
            continue
        assert_close(a, e, dtype, f"{label} d{name}")


@functools.lru_cache(maxsize=None)
def _jitted_step(op: str):
    return jax.jit(ops.selective_scan_step if op == "selective_scan" else ops.ssd_step,
                   compiler_options=_FAST_COMPILE)


def _step_by_step(op: str, args, with_init: bool) -> tuple[jax.Array, jax.Array]:
    """Runs the public single-token step over the sequence (no segments)."""
    x, dt, a, b, c, d, s0 = args
    x, dt, b, c = (np.asarray(z) for z in (x, dt, b, c))  # host slicing: no per-index compiles
    step = _jitted_step(op)
    s = s0 if with_init else np.zeros_like(s0)
    ys = []
    for i in range(x.shape[1]):
        y_t, s = step(x[:, i], dt[:, i], a, b[:, i], c[:, i], d, s)
        ys.append(np.asarray(y_t))
    return jnp.asarray(np.stack(ys, axis=1)), s


# (T, chunk, initial_state, segment_ids, dtype, groups, interpret grads)
_CASES = [
    pytest.param(37, 16, True, True, jnp.float32, 2, True, id="T37-q16-init-seg-f32"),
    pytest.param(100, 32, False, False, jnp.float32, 1, False, id="T100-q32-f32"),
    pytest.param(1, 16, True, False, jnp.float32, 1, False, id="T1-q16-init-f32"),
    pytest.param(37, 32, True, True, jnp.bfloat16, 1, False, id="T37-q32-init-seg-bf16"),
]


@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
@pytest.mark.parametrize("t,chunk,with_init,with_seg,dtype,groups,interp_grads", _CASES)
def test_parity(op, t, chunk, with_init, with_seg, dtype, groups, interp_grads):
    """ref == chunked == interpret, forward and all gradients; step-by-step == ref."""
    args = _inputs(op, seed=t, t=t, dtype=dtype, groups=groups)
    seg = _segment_ids(t)
    cts = _cotangents(t, args)
    want = _fwd_bwd(op, "ref", chunk, with_init, with_seg)(args, seg, cts)
    assert want[0][0].dtype == args[0].dtype
    got = _fwd_bwd(op, "chunked", chunk, with_init, with_seg)(args, seg, cts)
    _compare(op, got, want, dtype, with_init, f"{op} chunked")
    got = _fwd_bwd(op, "interpret", chunk, with_init, with_seg, interp_grads)(args, seg, cts)
    _compare(op, got, want, dtype, with_init, f"{op} interpret")
    if not with_seg:
        y, s = _step_by_step(op, args, with_init)
        _compare(op, ((y, s), None), (want[0], None), dtype, with_init, f"{op} step")


@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
def test_strong_decay_finite(op):
    """delta*A ~ -30 per token: no inf/NaN in outputs or gradients, impls still agree."""
    t, chunk = 37, 16
    args = _inputs(op, seed=3, t=t, groups=2, strong=True)
    seg, cts = _segment_ids(t), _cotangents(3, args)
    want = _fwd_bwd(op, "ref", chunk, True, True)(args, seg, cts)
    for impl in ("chunked", "interpret"):
        got = _fwd_bwd(op, impl, chunk, True, True, True)(args, seg, cts)
        for leaf in jax.tree.leaves(got):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32))), f"{op} {impl} non-finite"
        _compare(op, got, want, jnp.float32, True, f"{op} {impl} strong")


@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
@pytest.mark.parametrize("impl", ["ref", "chunked", "interpret"])
def test_segments_isolate_packed_sequences(op, impl):
    """Changing one packed sequence (or the initial state) leaves the other's results bit-exact,
    gradients do not cross a segment boundary, and each segment equals the sequence run alone."""
    t, chunk = 37, 16
    fn = _fwd_bwd(op, impl, chunk, True, True, True)
    seg = _segment_ids(t)
    args = _inputs(op, seed=5, t=t, groups=2)
    other = _inputs(op, seed=6, t=t, groups=2)
    # Perturb segment 0 of row 0 (tokens and initial state); keep A and D shared.
    perturbed = [z.copy() for z in args]
    for i in (0, 1, 3, 4):
        perturbed[i][0, :_SEG_SPLIT] = other[i][0, :_SEG_SPLIT]
    perturbed[6][0] = other[6][0]
    # Cotangents only on segment 1 of row 0 (y and the final state, which belongs to it).
    ct_y, ct_s = _cotangents(5, args)
    ct_y[0, :_SEG_SPLIT] = 0
    ct_y[1] = 0
    ct_s[1] = 0
    (y, s), g = fn(tuple(args), seg, (ct_y, ct_s))
    (y2, s2), g2 = fn(tuple(perturbed), seg, (ct_y, ct_s))
    np.testing.assert_array_equal(np.asarray(y[0, _SEG_SPLIT:]), np.asarray(y2[0, _SEG_SPLIT:]))
    np.testing.assert_array_equal(np.asarray(s[0]), np.asarray(s2[0]))
    np.testing.assert_array_equal(np.asarray(y[1]), np.asarray(y2[1]))
    for i in (0, 1, 3, 4):  # no gradient reaches segment 0's tokens
        assert np.all(np.asarray(g[i][0, :_SEG_SPLIT]) == 0), f"{op} {impl} grad leaks to seg 0"
    assert np.all(np.asarray(g[6]) == 0), f"{op} {impl} grad reaches the initial state"

    # Each segment equals its sequence run alone (segment 1 from a zero state).
    run_alone = jax.jit(lambda a, init: ref.selective_scan_ref(*a[:6], init)
                        if op == "selective_scan" else ref.ssd_ref(*a[:6], init))
    seq1 = tuple(z[:1, _SEG_SPLIT:] if z.ndim >= 3 else z for z in args[:6])  # [1, T-13, ...]
    y_alone, s_alone = run_alone(seq1, None)
    assert_close(y[:1, _SEG_SPLIT:], y_alone, jnp.float32, f"{op} {impl} segment 1 alone")
    assert_close(s[:1], s_alone, jnp.float32, f"{op} {impl} segment 1 final state")
    seq0 = tuple(z[:1, :_SEG_SPLIT] if z.ndim >= 3 else z for z in args[:6])  # [1, 13, ...]
    y_alone, _ = run_alone(seq0, args[6][:1])
    assert_close(y[:1, :_SEG_SPLIT], y_alone, jnp.float32, f"{op} {impl} segment 0 alone")


def _largest_intermediate(jaxpr) -> int:
    """Element count of the largest value in ``jaxpr``, sub-jaxprs (scan, remat, ...) included."""

    def sizes(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if isinstance(inner, jex_core.Jaxpr):
                        yield from sizes(inner)

    return max(sizes(jaxpr))


def test_selective_scan_chunked_memory_is_per_chunk():
    """The chunked S6 forward and backward never build a [B, T, Din, N] state tensor
    (the per-token reference does, which shows the detector works)."""
    t, chunk = 256, 16
    args = _inputs("selective_scan", seed=0, t=t)
    full = _B * t * _DIN * _N1

    def grad_jaxpr(impl):
        def loss(*a):
            y, s = ops.selective_scan(*a[:6], initial_state=a[6], return_final_state=True,
                                      chunk_size=chunk, impl=impl)
            return jnp.sum(y) + jnp.sum(s)

        return jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(7))))(*args).jaxpr

    assert _largest_intermediate(grad_jaxpr("ref")) >= full
    biggest = _largest_intermediate(grad_jaxpr("chunked"))
    assert biggest <= full // 4, f"an intermediate has {biggest} elements (full: {full})"


def test_stable_segsum_matches_definition_and_has_finite_grads():
    a64 = -30.0 * np.random.default_rng(0).uniform(size=(3, 9))
    a = jnp.asarray(a64, jnp.float32)
    seg = jax.jit(ref.stable_segsum)(a)
    want = np.zeros((3, 9, 9), np.float64)
    for i in range(9):
        for j in range(i):
            want[:, i, j] = a64[:, j + 1:i + 1].sum(-1)
    np.testing.assert_allclose(np.asarray(seg), want, rtol=1e-6, atol=1e-4)
    g = jax.jit(jax.grad(lambda z: jnp.sum(jnp.exp(ref.stable_segsum(z)))))(a)
    assert np.all(np.isfinite(np.asarray(g)))


def test_auto_resolves_to_chunked_on_cpu():
    """On CPU ``auto`` traces to exactly the chunked program; ``pallas`` is refused."""
    args = _inputs("ssd", seed=1, t=37, groups=2)

    def jaxpr(impl):
        return str(jax.make_jaxpr(lambda *a: ops.ssd(*a, chunk_size=16, impl=impl))(*args[:6]))

    assert jaxpr("auto") == jaxpr("chunked")
    assert "pallas_call" in jaxpr("interpret") and "pallas_call" not in jaxpr("auto")
    out = jax.eval_shape(lambda *a: ops.ssd(*a, impl="ref"), *args[:6])
    assert out[1] is None  # return_final_state=False
    with pytest.raises(ValueError, match="impl='pallas' needs a compiled kernel"):
        ops.ssd(*args[:6], impl="pallas")


@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
def test_kernel_channel_blocks_and_no_skip_term(op):
    """D=None means no skip term (reference and kernel path); the S6 kernel split into several
    channel blocks (grid (B, Din / block_d)) gives the same outputs and final state."""
    t = 5
    args = _inputs(op, seed=2, t=t, groups=2)
    extra = {"block_sizes": pallas.BlockSizes(block_d=2)} if op == "selective_scan" else {}

    @functools.partial(jax.jit, static_argnums=1, compiler_options=_FAST_COMPILE)
    def no_d(a, impl):
        kw = extra if impl == "interpret" else {}
        return _OPS[op](*a[:5], None, initial_state=a[6], return_final_state=True, impl=impl, **kw)

    zero_d = list(args)
    zero_d[5] = np.zeros_like(args[5])
    want = _fwd_bwd(op, "ref", 16, True, False, False)(tuple(zero_d), None, None)[0]
    for impl in ("ref", "interpret"):
        y, s = no_d(args, impl)
        assert_close(y, want[0], jnp.float32, f"{op} {impl} D=None y")
        assert_close(s, want[1], jnp.float32, f"{op} {impl} D=None final_state")


@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
def test_compiled_pallas_matches_ref(op):
    """The compiled kernel (Triton lowering: power-of-two blocks, matmul dims >= 16)."""
    t, chunk = 100, 32
    args = _inputs(op, seed=4, t=t, groups=1, width=32 if op == "ssd" else 64, state=16)
    seg, cts = _segment_ids(t), _cotangents(4, args)
    want = _fwd_bwd(op, "ref", chunk, True, True, True)(args, seg, cts)
    got = _fwd_bwd(op, "pallas", chunk, True, True, True)(args, seg, cts)
    _compare(op, got, want, jnp.float32, True, f"{op} pallas")


def _ss_shapes(t=5):
    z = np.zeros
    return dict(u=z((_B, t, _DIN)), delta=z((_B, t, _DIN)), A=z((_DIN, _N1)), B=z((_B, t, _N1)),
                C=z((_B, t, _N1)), D=z((_DIN,)))


def _ssd_shapes(t=5, g=1):
    z = np.zeros
    return dict(x=z((_B, t, _H, _P)), dt=z((_B, t, _H)), A=z((_H,)), B=z((_B, t, g, _N2)),
                C=z((_B, t, g, _N2)), D=z((_H,)))


@pytest.mark.parametrize("field,bad,match", [
    ("delta", (2, 5, 7), r"delta must have shape \[B, T, Din\] = \(2, 5, 8\), got \(2, 5, 7\)"),
    ("A", (8,), r"A must have shape \[Din, N\] \(2 dims\), got \(8,\)"),
    ("A", (7, 4), r"A must have shape \[Din, N\] = \(8, 4\), got \(7, 4\)"),
    ("B", (2, 5, 3), r"B must have shape \[B, T, N\] = \(2, 5, 4\), got \(2, 5, 3\)"),
    ("C", (2, 4, 4), r"C must have shape \[B, T, N\] = \(2, 5, 4\), got \(2, 4, 4\)"),
    ("D", (4,), r"D must have shape \[Din\] = \(8,\), got \(4,\)"),
    ("u", (2, 5), r"u must have shape \[B, T, Din\] \(3 dims\), got \(2, 5\)"),
])
def test_selective_scan_shape_errors(field, bad, match):
    kw = _ss_shapes()
    kw[field] = np.zeros(bad)
    with pytest.raises(ValueError, match="selective_scan: " + match):
        ops.selective_scan(**kw)


def test_selective_scan_state_and_segment_errors():
    kw = _ss_shapes()
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, Din, N\] = "
                                         r"\(2, 8, 4\), got \(2, 4, 8\)"):
        ops.selective_scan(**kw, initial_state=np.zeros((2, 4, 8)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\] = \(2, 5\)"):
        ops.selective_scan(**kw, segment_ids=np.zeros((2, 6), jnp.int32))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ops.selective_scan(**kw, chunk_size=0)
    with pytest.raises(ValueError, match="unknown impl"):
        ops.selective_scan(**kw, impl="fast")
    with pytest.raises(ValueError, match=r"selective_scan_step: state must have shape "
                                         r"\[B, Din, N\] = \(2, 8, 4\)"):
        ops.selective_scan_step(np.zeros((2, 8)), np.zeros((2, 8)), kw["A"], np.zeros((2, 4)),
                                np.zeros((2, 4)), kw["D"], np.zeros((2, 8, 5)))


@pytest.mark.parametrize("field,bad,match", [
    ("dt", (2, 5, 3), r"dt must have shape \[B, T, H\] = \(2, 5, 4\), got \(2, 5, 3\)"),
    ("A", (4, 1), r"A must have shape \[H\] = \(4,\), got \(4, 1\)"),
    ("B", (2, 5, 3, 4), r"the group count G=3 of B and C must divide H=4"),
    ("B", (2, 5, 4), r"B must have shape \[B, T, G, N\] \(4 dims\), got \(2, 5, 4\)"),
    ("C", (2, 5, 2, 4), r"C must have shape \[B, T, G, N\] = \(2, 5, 1, 4\), got \(2, 5, 2, 4\)"),
    ("D", (2,), r"D must have shape \[H\] = \(4,\), got \(2,\)"),
])
def test_ssd_shape_errors(field, bad, match):
    kw = _ssd_shapes()
    kw[field] = np.zeros(bad)
    with pytest.raises(ValueError, match="ssd: " + match):
        ops.ssd(**kw)


def test_ssd_state_errors():
    kw = _ssd_shapes()
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, P, N\] = "
                                         r"\(2, 4, 4, 4\), got \(2, 4, 4\)"):
        ops.ssd(**kw, initial_state=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"ssd_step: x_t must have shape \[B, H, P\]"):
        ops.ssd_step(np.zeros((2, 4)), np.zeros((2, 4)), kw["A"], np.zeros((2, 1, 4)),
                     np.zeros((2, 1, 4)), kw["D"], np.zeros((2, 4, 4, 4)))
