"""Parity tests for kernels/sse: numpy recurrence == ref (replicated GLA scan) == chunked ==
interpret-Pallas == step-by-step ``sse_step``, forward and gradients (w.r.t. q, k, v, g, the
routing weights and the initial state); top-K routing ties; bf16.

Each jitted function compiles once per (impl, shape) and is reused across tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.sse import pallas, sse, sse_step, topk_indices, topk_mask, topk_rank
from tests.testing import assert_close, assert_grads_close, upcast_bf16

B, H, K, V = 2, 2, 8, 12  # K, V not powers of two: the kernel wrapper pads them
IMPLS = ("ref", "chunked", "interpret")
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dw", "dh0")


@dataclasses.dataclass(frozen=True)
class Case:
    length: int
    chunk: int
    partitions: int
    top_k: int
    use_h0: bool
    segments: tuple[tuple[int, ...], ...] | None  # per row: lengths of its packed documents
    ties: bool  # router probabilities with exact ties


# Odd lengths, T not a multiple of the chunk; chunk 32 = two sub-chunks, 16 = one; K > 1 with
# ties; documents ending inside / on sub-chunk boundaries.
CASE_A = Case(length=37, chunk=32, partitions=3, top_k=2, use_h0=True,
              segments=((10, 20, 7), (16, 21)), ties=True)
CASE_B = Case(length=21, chunk=16, partitions=4, top_k=1, use_h0=False, segments=None,
              ties=False)


def _probs(rng, case: Case) -> np.ndarray:
    """Router probabilities ``[B, T, N]``; with ``ties`` many tokens have exactly equal entries."""
    logits = rng.standard_normal((B, case.length, case.partitions))
    if case.ties:
        tied = rng.random((B, case.length)) < 0.6
        logits[tied, 1:] = logits[tied, 1:2]  # partitions 1..N-1 equal
        logits[:, :3] = 0.0  # first tokens: every partition equal
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _inputs(case: Case, seed: int = 0):
    """Random f32 inputs and cotangents for ``case`` (numpy RNG: no per-op compiles)."""
    rng = np.random.default_rng(seed)
    t, n = case.length, case.partitions

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, k, v = normal(B, t, H, K), normal(B, t, H, K), normal(B, t, H, V)
    g = -np.logaddexp(0.0, -(2.0 * rng.standard_normal((B, t, H, K)) + 1.0))  # log-sigmoid
    g[:, ::5] -= 15.0  # some strong decays (cumulative ~ -100 in a chunk): must stay finite
    e = _probs(rng, case)
    w = jnp.where(topk_mask(jnp.asarray(e), case.top_k), jnp.asarray(e), 0.0)
    h0 = normal(B, n, H, K, V) if case.use_h0 else None
    seg = None
    if case.segments:
        seg = jnp.asarray(np.stack([np.concatenate([np.full(m, (7, 3)[i % 2])
                                                    for i, m in enumerate(lengths)])
                                    for lengths in case.segments]), jnp.int32)
    args = (q, k, v, jnp.asarray(g, jnp.float32), w, h0, seg)
    return args, (normal(B, t, H, V), normal(B, n, H, K, V))


def _numpy_sse(q, k, v, g, w, h0, seg):
    """Independent float64 oracle: the partition recurrence token by token, selection = w != 0."""
    q, k, v, g, w = (np.asarray(x, np.float64) for x in (q, k, v, g, w))
    batch, length, heads, k_dim = q.shape
    n = w.shape[-1]
    state = (np.zeros((batch, n, heads, k_dim, v.shape[-1])) if h0 is None
             else np.array(h0, np.float64))
    o = np.zeros(v.shape)
    for t in range(length):
        if seg is not None and t > 0:
            state[np.asarray(seg[:, t] != seg[:, t - 1])] = 0.0
        for b in range(batch):
            for i in range(n):
                if w[b, t, i] == 0.0:
                    continue  # not selected: no decay, no write, no read
                state[b, i] = (np.exp(g[b, t])[..., None] * state[b, i]
                               + w[b, t, i] * k[b, t, :, :, None] * v[b, t, :, None, :])
                o[b, t] += (w[b, t, i] * k_dim ** -0.5
                            * np.einsum("hk,hkv->hv", q[b, t], state[b, i]))
    return o, state


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _fwd_bwd(args, cotangents, *, impl: str, chunk_size: int):
    """(o, final_state) and the vjp w.r.t. (q, k, v, g, w, initial_state) of ``sse``."""
    q, k, v, g, w, h0, seg = args

    def f(q, k, v, g, w, h0):
        return sse(q, k, v, g, w, initial_state=h0, segment_ids=seg, return_final_state=True,
                   chunk_size=chunk_size, impl=impl)

    out, vjp = jax.vjp(f, q, k, v, g, w, h0)
    return out, vjp(cotangents)


def _check_grads(actual, expected, dtype, tag):
    assert_grads_close(actual, expected, GRAD_NAMES, dtype, tag)


@pytest.mark.parametrize("case", (CASE_A, CASE_B), ids=("T37-C32-n3k2-h0-seg-ties",
                                                        "T21-C16-n4k1"))
def test_impls_match_recurrence(case):
    args, cts = _inputs(case)
    o_np, s_np = _numpy_sse(*args)
    results = {impl: _fwd_bwd(args, cts, impl=impl, chunk_size=case.chunk) for impl in IMPLS}
    for impl, ((o, s), grads) in results.items():
        assert o.dtype == jnp.float32 and s.dtype == jnp.float32
        assert_close(o, o_np, jnp.float32, f"{impl} o")
        assert_close(s, s_np, jnp.float32, f"{impl} final_state")
        for name, x in zip(GRAD_NAMES, grads):
            assert x is None or bool(jnp.all(jnp.isfinite(x))), f"{impl} {name} not finite"
        if impl != "ref":
            _check_grads(grads, results["ref"][1], jnp.float32, impl)
    # The routing weights get a gradient where selected (write and read scaling).
    dw, w = np.asarray(results["interpret"][1][4]), np.asarray(args[4])
    assert np.all(np.abs(dw[w != 0]) > 0)


def test_topk_ties_go_to_the_lowest_index():
    p = jnp.asarray([[0.2, 0.3, 0.3, 0.2],     # tie for first place
                     [0.25, 0.25, 0.25, 0.25],  # all equal
                     [0.1, 0.2, 0.2, 0.5]],     # tie for second place
                    jnp.float32)
    np.testing.assert_array_equal(np.asarray(topk_rank(p)), [[2, 0, 1, 3], [0, 1, 2, 3],
                                                             [3, 1, 2, 0]])
    np.testing.assert_array_equal(np.asarray(topk_mask(p, 2)),
                                  [[0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1]])
    np.testing.assert_array_equal(np.asarray(topk_indices(p, 2)), [[1, 2], [0, 1], [3, 1]])
    # Random ties: the mask is exactly numpy's stable descending sort.
    e = _probs(np.random.default_rng(5), CASE_A)
    order = np.argsort(-e, axis=-1, kind="stable")[..., :2]
    expected = np.zeros(e.shape, bool)
    np.put_along_axis(expected, order, True, axis=-1)
    np.testing.assert_array_equal(np.asarray(topk_mask(jnp.asarray(e), 2)), expected)
    np.testing.assert_array_equal(np.asarray(topk_indices(jnp.asarray(e), 2)), order)


def test_bf16_inputs():
    """bf16 q/k/v (f32 g, w, state) through the kernel match the f32 reference on the same
    values; the kernel runs its matmuls in bf16 with f32 accumulation."""
    args, (do, dh) = _inputs(CASE_A, seed=2)
    q, k, v, g, w, h0, seg = args
    args_bf16 = (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), g, w,
                 h0, seg)
    cts_bf16 = (do.astype(jnp.bfloat16), dh)
    (o, s), grads = _fwd_bwd(args_bf16, cts_bf16, impl="interpret", chunk_size=CASE_A.chunk)
    (o_ref, s_ref), grads_ref = _fwd_bwd(upcast_bf16(args_bf16), upcast_bf16(cts_bf16), impl="ref",
                                         chunk_size=CASE_A.chunk)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o, o_ref, jnp.bfloat16, "o")
    assert_close(s, s_ref, jnp.bfloat16, "final_state")
    assert [x.dtype for x in grads[:3]] == [jnp.bfloat16] * 3
    _check_grads(upcast_bf16(grads), grads_ref, jnp.bfloat16, "bf16 interpret")


def test_step_by_step_decode_matches():
    """``sse_step`` over the sequence (resetting states at document starts) == ``sse``; an
    unselected partition's state is bit-identical before and after a token."""
    args, cts = _inputs(CASE_A, seed=3)
    q, k, v, g, w, h0, seg = args
    reset = np.concatenate([np.zeros((B, 1), bool), np.diff(np.asarray(seg), axis=1) != 0], 1)
    step = jax.jit(sse_step)
    state, outs = h0, []
    for t in range(CASE_A.length):
        state = jnp.where(reset[:, t, None, None, None, None], 0.0, state)
        o_t, new = step(q[:, t], k[:, t], v[:, t], g[:, t], w[:, t], state)
        untouched = np.asarray(w[:, t] == 0)  # [B, N]
        np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(state)[untouched])
        assert np.all(np.any(np.asarray(new != state)[~untouched].reshape(-1, H * K * V), -1))
        state = new
        outs.append(np.asarray(o_t))
    (o_ref, s_ref), _ = _fwd_bwd(args, cts, impl="ref", chunk_size=CASE_A.chunk)
    assert_close(np.stack(outs, axis=1), o_ref, jnp.float32, "step o")
    assert_close(state, s_ref, jnp.float32, "step final_state")


def test_options_and_dispatch():
    args, _ = _inputs(CASE_B)
    q, k, v, g, w, _, _ = args
    o, s = jax.eval_shape(functools.partial(sse, impl="interpret"), q.astype(jnp.bfloat16), k, v,
                          g, w)
    assert s is None and o.dtype == jnp.bfloat16 and o.shape == (B, CASE_B.length, H, V)
    with pytest.raises(ValueError, match="impl='pallas' needs a compiled kernel"):
        sse(q, k, v, g, w, impl="pallas", target="cpu")

    # The kernel reads one copy of q/k/v/g: no operand of the pallas_call carries N * H heads.
    def eqns(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from eqns(sub)

    jaxpr = jax.make_jaxpr(functools.partial(sse, impl="interpret", chunk_size=16))(
        q, k, v, g, w).jaxpr
    calls = [e for e in eqns(jaxpr) if e.primitive.name == "pallas_call"]
    assert len(calls) == 1
    n = CASE_B.partitions
    in_shapes = [tuple(x.aval.shape) for x in calls[0].invars]
    assert (B, H, 32, 16) in in_shapes  # q/k/g: [B, H, T_pad, K_pad], shared by the partitions
    assert all(n * H not in shape[:3] for shape in in_shapes), in_shapes


@pytest.mark.parametrize("platform, lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernel_lowers_for_accelerators(platform, lowering):
    """No GPU/TPU in CI: the compiled kernel at least lowers (Triton IR / Mosaic) in f32 and bf16,
    with padded odd K/V and a two-sub-chunk chunk."""
    for dtype in (jnp.float32, jnp.bfloat16):
        args = (jax.ShapeDtypeStruct((1, 37, 1, K), dtype),) * 2 + (
            jax.ShapeDtypeStruct((1, 37, 1, V), dtype),
            jax.ShapeDtypeStruct((1, 37, 1, K), jnp.float32),
            jax.ShapeDtypeStruct((1, 37, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, 3, 1, K, V), jnp.float32),
            jax.ShapeDtypeStruct((1, 37), jnp.int32))
        fwd = functools.partial(pallas.sse_fwd, scale=0.5, chunk_size=32, interpret=False,
                                block_sizes=pallas.BlockSizes.get_default(V, platform),
                                platform=platform)
        text = jax.jit(fwd).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
        assert "sse_fwd" in text


@pytest.mark.parametrize("bad, match", [
    (dict(w=jnp.zeros((B, 5))), r"w must have shape \[B, T, N\] = \(2, 5, N\), got \(2, 5\)"),
    (dict(w=jnp.zeros((B, 5, 3), jnp.int32)), r"w must be a floating dtype"),
    (dict(initial_state=jnp.zeros((B, H, K, V))),
     r"initial_state must have shape \[B, N, H, K, V\] = \(2, 3, 2, 8, 12\)"),
    (dict(g=jnp.zeros((B, 5, K))), r"g must have shape \[B, T, H, K\] = \(2, 5, 2, 8\) or"),
    (dict(segment_ids=jnp.zeros((B, 5))), r"segment_ids must be an integer dtype"),
    (dict(chunk_size=0), r"chunk_size must be a positive int"),
])
def test_shape_errors(bad, match):
    kwargs = dict(q=jnp.zeros((B, 5, H, K)), k=jnp.zeros((B, 5, H, K)), v=jnp.zeros((B, 5, H, V)),
                  g=jnp.zeros((B, 5, H, K)), w=jnp.zeros((B, 5, 3)))
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        sse(**kwargs)
