"""Parity tests for kernels/segment_attention: dense [T, T] oracle == ref (gathered checkpoints) ==
interpret-Pallas == step-by-step ``segment_attention_step``, forward and gradients (q, k, v). The Pallas path's
backward is flash-style (``kernels.causal_attention.pallas.flash_bwd`` over the checkpoints, from the saved
log-sum-exp), checked in both its Triton-variant code (``impl="interpret"``) and its Mosaic variant.

Tiles are 16 x 16 so that T=37 and T=64 span several query blocks, T=64 with L=1 spans four checkpoint
blocks (block-causal skipping is exercised), and T, S are padded. Every jitted function is compiled once per
(impl, L, shape, dtype) and reused.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels.segment_attention import score_entries, segment_attention, segment_attention_step
from kernels.segment_attention import ref
from sqattn.mixers.attention import attention_mask, dot_product_attention
from tests.testing import assert_close

B, H, G, D = 2, 4, 2, 8  # GQA: two query heads per kv head; D is padded to 16 by the kernel wrapper
BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Case:
    length: int
    segment_len: int
    dtype: str
    segments: tuple[int, ...] | None  # lengths of the packed documents (same for every row)


CASES = (
    Case(37, 3, "float32", (10, 20, 7)),   # T % L != 0, T % block != 0, doc boundaries mid-segment
    Case(64, 1, "bfloat16", (32, 32)),     # 64 checkpoints = 4 checkpoint blocks
    Case(64, 8, "bfloat16", None),
    Case(7, 8, "float32", None),           # T < L: no checkpoint at all
    Case(1, 1, "bfloat16", None),          # one token: it is a checkpoint, but never before itself
)


def _case_id(c: Case) -> str:
    return f"T{c.length}-L{c.segment_len}-{c.dtype}-seg{int(bool(c.segments))}"


def _segment_ids(segments, length) -> jax.Array | None:
    if not segments:
        return None
    ids = np.concatenate([np.full(n, (5, 2, 9)[i]) for i, n in enumerate(segments)])[:length]
    return jnp.asarray(np.stack([ids] * B), jnp.int32)  # [B, T]


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    t, dtype = case.length, jnp.dtype(case.dtype)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return (normal(B, t, H, D), normal(B, t, G, D), normal(B, t, G, D),
            _segment_ids(case.segments, t), normal(B, t, H, D))


@functools.partial(jax.jit, static_argnames=("impl", "segment_len"))
def _fwd_bwd(q, k, v, seg, do, *, impl: str, segment_len: int):
    """``o`` and its vjp w.r.t. (q, k, v) for ``impl`` in ref | interpret | dense."""
    if impl == "dense":
        fn = functools.partial(ref.segment_attention_dense, segment_len=segment_len, segment_ids=seg)
    else:
        fn = functools.partial(segment_attention, segment_len=segment_len, segment_ids=seg, impl=impl,
                               block_q=BLOCK, block_k=BLOCK)
    o, vjp = jax.vjp(fn, q, k, v)
    return o, vjp(do)


def _check(actual, expected, dtype, tag, inputs):
    """``inputs`` = (q, k, v, do): where every query sees a single key (T <= L), dq and dk are exactly zero
    in exact arithmetic, a difference ``do . v - do . o`` of equal terms; their error is then bounded
    relative to those terms' magnitude."""
    (o_a, g_a), (o_e, g_e) = actual, expected
    q, k, v, do = (np.abs(np.asarray(x, np.float32)) for x in inputs)
    terms = float(do.max() * v.max() * max(q.max(), k.max()))
    assert o_a.dtype == o_e.dtype and o_a.shape == o_e.shape, f"{tag}: o {o_a.dtype}{o_a.shape}"
    assert_close(o_a, o_e, dtype, f"{tag} o")
    for name, a, e in zip(("dq", "dk", "dv"), g_a, g_e):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{tag}: {name} {a.dtype}{a.shape}"
        zero = not np.any(np.asarray(e, np.float32))
        assert_close(a, e, dtype, f"{tag} {name}", scale=terms if zero else None)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_interpret_ref_and_dense_agree(case):
    """Forward and (q, k, v) gradients: interpret == ref == the dense admissible-set oracle."""
    q, k, v, seg, do = _inputs(case)
    results = {impl: _fwd_bwd(q, k, v, seg, do, impl=impl, segment_len=case.segment_len)
               for impl in ("dense", "ref", "interpret")}
    _check(results["ref"], results["dense"], case.dtype, "ref vs dense", (q, k, v, do))
    _check(results["interpret"], results["ref"], case.dtype, "interpret vs ref", (q, k, v, do))
    for name, g in zip(("dq", "dk", "dv"), results["interpret"][1]):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name} not finite"


def test_flash_backward_tpu_variant_matches_ref():
    """The backward's kernels (``kernels.causal_attention.pallas.flash_bwd`` with the checkpoints as keys) in their
    Mosaic variant (sequential grid axis, VMEM scratch), run by the interpreter: T=37, L=3, packed documents, GQA,
    against the reference's gradients; the gradient program holds the flash backward kernels."""
    from kernels.segment_attention import ops as seg_ops, pallas as seg_pallas
    case = CASES[0]
    q, k, v, seg, do = _inputs(case)

    @jax.jit
    def fwd_bwd(q, k, v, seg, do):
        def fn(q, k, v):
            return seg_ops._pallas_op(q, k, v, seg, case.segment_len, D ** -0.5, seg_pallas.BlockSizes(16, 16), True,
                                      "tpu")
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(do)

    assert "segment_attention_bwd_dkdv" in str(jax.make_jaxpr(fwd_bwd)(q, k, v, seg, do))
    expected = _fwd_bwd(q, k, v, seg, do, impl="ref", segment_len=case.segment_len)
    _check(fwd_bwd(q, k, v, seg, do), expected, case.dtype, "tpu variant vs ref", (q, k, v, do))


@pytest.mark.parametrize("impl", ("ref", "interpret"))
def test_segment_len_one_is_causal_attention(impl):
    """L = 1: every token is a checkpoint, so SCOUT attention is causal softmax attention."""
    case = CASES[1]  # T=64, L=1, bf16, packed into two documents (reuses the compiled parity functions)
    q, k, v, seg, do = _inputs(case)
    idx = jnp.broadcast_to(jnp.arange(case.length), (B, case.length))
    expected = dot_product_attention(q, k, v, attention_mask(idx, idx, q_seg=seg, k_seg=seg))
    o, _ = _fwd_bwd(q, k, v, seg, do, impl=impl, segment_len=1)
    assert_close(o, expected, jnp.bfloat16, f"{impl} L=1 vs causal attention")


@pytest.mark.parametrize("impl", ("ref", "interpret"))
def test_rows_without_checkpoints_return_v_exactly(impl):
    """t < L (and the start of a document before its first checkpoint) see only themselves: o_t = v_t."""
    case = CASES[0]  # T=37, L=3, documents [0, 10), [10, 30), [30, 37)
    q, k, v, seg, do = _inputs(case, seed=3)
    o, grads = _fwd_bwd(q, k, v, seg, do, impl=impl, segment_len=case.segment_len)
    v_h = np.repeat(np.asarray(v), H // G, axis=2)  # [B, T, H, D]  kv head of each query head
    # Checkpoints are rows 2, 5, 8, 11, ...: rows 0-2 have t < L; rows 10-11 see only doc-0 checkpoints
    # (11 is not < 11); rows 30-32 see only doc-1 checkpoints (29) and 32 is not < 32.
    for t in (0, 1, 2, 10, 11, 30, 31, 32):
        np.testing.assert_array_equal(np.asarray(o[:, t]), v_h[:, t], err_msg=f"{impl} row {t}")
    assert not np.array_equal(np.asarray(o[:, 12]), v_h[:, 12])  # sees checkpoint 11
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert np.all(np.isfinite(np.asarray(g))), f"{impl} {name} not finite"


def test_kernel_skips_invisible_checkpoint_blocks():
    """Block-causal skipping: NaN values in rows >= 32 (checkpoint blocks 2, 3 at L=1, tiles 16) must not
    reach query blocks 0, 1, which would read them (0 * NaN = NaN) if the loop ran over every block."""
    case = CASES[1]  # T=64, L=1: 64 checkpoints in 4 blocks of 16
    q, k, v, seg, do = _inputs(case, seed=2)
    clean, _ = _fwd_bwd(q, k, v, seg, do, impl="interpret", segment_len=1)
    poisoned, _ = _fwd_bwd(q, k, v.at[:, 32:].set(jnp.nan), seg, do, impl="interpret", segment_len=1)
    np.testing.assert_array_equal(np.asarray(poisoned[:, :32]), np.asarray(clean[:, :32]))
    assert np.isnan(np.asarray(poisoned[:, 32:], np.float32)).all()


def test_step_equals_parallel():
    """``segment_attention_step`` with the first t // L checkpoints valid == row t of the op."""
    case = CASES[0]
    q, k, v, _, _ = _inputs(case, seed=4)
    L = case.segment_len
    o = segment_attention(q, k, v, segment_len=L, impl="ref")
    ck, cv = k[:, L - 1::L], v[:, L - 1::L]  # [B, S, G, D]; slots >= n_valid must be ignored
    step = jax.jit(segment_attention_step)
    for t in (0, 2, 3, 5, 17, 36):
        assert_close(step(q[:, t], k[:, t], v[:, t], ck, cv, t // L), o[:, t], jnp.float32, f"step t={t}")


def test_score_entries_matches_mask_and_ratio():
    for length, L in ((1, 1), (7, 3), (37, 8), (64, 1)):
        idx = np.arange(length)
        mask = (idx[None] == idx[:, None]) | (((idx[None] + 1) % L == 0) & (idx[None] < idx[:, None]))
        assert score_entries(length, L) == int(mask.sum()), (length, L)
    assert score_entries(64, 1) == 64 * 65 // 2  # L = 1: causal attention
    n = 4096
    for L in (4, 10, 32):  # full causal / SCOUT -> L as T grows
        ratio = (n * (n + 1) / 2) / score_entries(n, L)
        assert abs(ratio / L - 1) < 0.02, (L, ratio)


@functools.partial(jax.jit, static_argnames=("segment_len",))
def _ref_and_dense(q, k, v, seg, *, segment_len):
    kw = dict(segment_len=segment_len, segment_ids=seg, scale=0.5)
    return ref.segment_attention_ref(q, k, v, **kw), ref.segment_attention_dense(q, k, v, **kw)


@settings(max_examples=5, deadline=None)
@given(length=st.integers(1, 40), segment_len=st.integers(1, 9), groups=st.sampled_from([1, 2, 4]),
       boundary=st.integers(0, 40))
def test_ref_matches_dense_random_shapes(length, segment_len, groups, boundary):
    rng = np.random.default_rng(length * 100 + segment_len)
    q = jnp.asarray(rng.standard_normal((1, length, 4, 4)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, length, groups, 4)), jnp.float32) for _ in range(2))
    seg = jnp.asarray((np.arange(length) >= boundary)[None], jnp.int32)
    got, want = _ref_and_dense(q, k, v, seg, segment_len=segment_len)
    assert_close(got, want, jnp.float32, "ref vs dense")


def test_auto_is_ref_on_cpu_and_pallas_needs_accelerator():
    q, k, v, _, _ = _inputs(CASES[3])
    np.testing.assert_array_equal(np.asarray(segment_attention(q, k, v, segment_len=8)),
                                  np.asarray(segment_attention(q, k, v, segment_len=8, impl="ref")))
    with pytest.raises(ValueError, match="pallas"):
        segment_attention(q, k, v, segment_len=8, impl="pallas", target="cpu")


def test_bad_arguments_raise_naming_them():
    q = jnp.zeros((B, 5, H, D))
    k = jnp.zeros((B, 5, G, D))
    bad = {
        "q must": dict(q=jnp.zeros((B, 5, H * D))),
        "k must": dict(k=jnp.zeros((B, 5, G, D + 1))),
        "kv heads": dict(k=jnp.zeros((B, 5, 3, D)), v=jnp.zeros((B, 5, 3, D))),
        "v must": dict(v=jnp.zeros((B, 4, G, D))),
        "segment_len": dict(segment_len=0),
        "segment_ids must have shape": dict(segment_ids=jnp.zeros((B, 4), jnp.int32)),
        "segment_ids must be an integer": dict(segment_ids=jnp.zeros((B, 5))),
        "block_q": dict(block_q=24, impl="interpret"),
        "block_k": dict(block_k=8, impl="interpret"),
        "unknown impl": dict(impl="fast"),
    }
    for match, kw in bad.items():
        args = dict(q=q, k=k, v=k, segment_len=2) | kw
        with pytest.raises(ValueError, match=match):
            segment_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    ck = jnp.zeros((B, 2, G, D))
    with pytest.raises(ValueError, match="ck must"):
        segment_attention_step(q[:, 0], k[:, 0], k[:, 0], ck[..., :3], ck, 0)
    with pytest.raises(ValueError, match="k_t must"):
        segment_attention_step(q[:, 0], k[:, 0, :, :3], k[:, 0], ck, ck, 0)


@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_pallas_matches_ref(dtype):
    """The compiled kernel with its default GPU tiles (Triton: power-of-two tiles, dot dims >= 16)."""
    case = Case(300, 4, dtype, (100, 200))
    q, k, v, seg, do = _inputs(case, seed=5)
    o_ref = segment_attention(q, k, v, segment_len=case.segment_len, segment_ids=seg, impl="ref")
    o = jax.jit(functools.partial(segment_attention, segment_len=case.segment_len, impl="pallas"))(
        q, k, v, segment_ids=seg)
    assert_close(o, o_ref, dtype, "compiled pallas o")
