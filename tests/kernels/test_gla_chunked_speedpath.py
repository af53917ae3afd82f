"""The CPU fast paths of ``kernels.gla.ref.gla_chunked`` against the per-token recurrence.

``gla_chunked`` has a scalar-decay path (one ``[C, C]`` decay matrix per chunk) and a per-key
path that halves each chunk recursively down to leaf blocks of at most ``ref.LEAF`` rows, whose
pairs are computed one diagonal at a time and placed by ``ref._skew``. These tests cover the
structures tests/kernels/test_gla.py does not reach: chunk sizes that are not ``leaf * 2**m``
(odd chunk: leaf = chunk; 24: leaf 3), the deepest split of a 64-chunk, every leaf size from 1 to
the whole chunk, exactly zero log-decay (gradients), and strong decay (finite), each forward and
vjp against ``impl="ref"`` (itself checked against a float64 numpy oracle in test_gla.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gla import ref
from tests.kernels.test_gla import _check_grads, fwd_bwd
from tests.testing import assert_close

B, H, K, V, T = 2, 2, 8, 12, 70


def _inputs(scalar_decay: bool, *, decay: str = "gate", packed: bool = True, seed: int = 0):
    """f32 ``(q, k, v, g, h0, segment_ids)`` and cotangents ``(do, dh)``.

    ``decay``: "gate" (log-sigmoid, GLA-like), "zero" (g == 0: no decay) or "strong" (about -20 a
    step). Packed rows change document inside leaf blocks and on block starts.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, k, v = normal(B, T, H, K), normal(B, T, H, K), normal(B, T, H, V)
    g_shape = (B, T, H) if scalar_decay else (B, T, H, K)
    if decay == "zero":
        g = jnp.zeros(g_shape, jnp.float32)
    elif decay == "strong":
        g = jnp.asarray(-20.0 + rng.standard_normal(g_shape), jnp.float32)
    else:
        g = jnp.asarray(-np.logaddexp(0.0, -(2.0 * rng.standard_normal(g_shape) + 1.0)),
                        jnp.float32)  # log-sigmoid
    seg = None
    if packed:
        ids = np.zeros((B, T), np.int32)
        ids[0, 13:] = 1  # inside a leaf block
        ids[0, 32:] = 2  # on a block start
        ids[1, 45:] = 5
        seg = jnp.asarray(ids)
    return (q, k, v, g, normal(B, H, K, V), seg), (normal(B, T, H, V), normal(B, H, K, V))


# One compile per (impl, chunk); jitted wrappers built here are reused across tests. A LEAF
# override needs its own trace, so those tests build fresh wrappers (``jax.jit`` of a new partial).
_jitted = functools.lru_cache(maxsize=None)(
    lambda impl, chunk: jax.jit(functools.partial(fwd_bwd, impl=impl, chunk_size=chunk)))


def _check(args, cts, chunk: int, tag: str, fn=None, dg_cancels: bool = False) -> None:
    """``dg_cancels``: strong decay, where dg is checked relative to its cancelling terms (test_gla)."""
    (o, s), grads = (fn or _jitted("chunked", chunk))(args, cts)
    (o_ref, s_ref), grads_ref = _jitted("ref", 16)(args, cts)
    assert_close(o, o_ref, jnp.float32, f"{tag} o")
    assert_close(s, s_ref, jnp.float32, f"{tag} final_state")
    qk = dict(q=args[0], k=args[1]) if dg_cancels else {}
    _check_grads(grads, grads_ref, jnp.float32, tag, **qk)


@pytest.mark.parametrize("chunk,scalar_decay", [(7, False), (24, False), (64, False), (24, True)],
                         ids=["C7-vector", "C24-vector", "C64-vector", "C24-scalar"])
def test_chunk_structures_match_recurrence(chunk, scalar_decay):
    """Leaf-only chunk (odd), a 3-row leaf under two levels, four levels, and the [C, C] path."""
    args, cts = _inputs(scalar_decay)
    _check(args, cts, chunk, f"C{chunk}")


@pytest.mark.parametrize("leaf", [1, 2, 32])
def test_every_leaf_size_matches_recurrence(leaf, monkeypatch):
    """``LEAF`` is a speed knob only: 1 (no diagonal bands), 2, and the whole 32-row chunk."""
    monkeypatch.setattr(ref, "LEAF", leaf)
    args, cts = _inputs(scalar_decay=False, seed=leaf)
    fresh = jax.jit(functools.partial(fwd_bwd, impl="chunked", chunk_size=32))
    _check(args, cts, 32, f"leaf {leaf}", fn=fresh)


@pytest.mark.parametrize("scalar_decay", [False, True], ids=["vector", "scalar"])
def test_zero_decay_gradients_match_recurrence(scalar_decay):
    """g == 0 makes G_i == G_j for every pair: dg must still be the recurrence's (no halving)."""
    args, cts = _inputs(scalar_decay, decay="zero", packed=False)
    _check(args, cts, 24, "g=0")


@pytest.mark.parametrize("scalar_decay", [False, True], ids=["vector", "scalar"])
def test_strong_decay_finite_at_deep_split(scalar_decay):
    """About -20 per step (cumulative ~-1280 over a 64-chunk): every exp stays <= 1."""
    args, cts = _inputs(scalar_decay, decay="strong")
    _check(args, cts, 64, "strong", dg_cancels=True)


@pytest.mark.parametrize("sub", [1, 2, 3, 5])
def test_skew_places_diagonals(sub):
    """``_skew`` maps ``X[i, d]`` to ``A[i, i - d]`` and leaves the upper triangle zero."""
    x = np.arange(1.0, 1.0 + 2 * sub * sub).reshape(2, sub, sub)
    expected = np.zeros_like(x)
    for i in range(sub):
        for j in range(i + 1):
            expected[:, i, j] = x[:, i, i - j]
    np.testing.assert_array_equal(np.asarray(ref._skew(jnp.asarray(x))), expected)
