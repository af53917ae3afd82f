"""Shared test helpers: dtype-keyed tolerances and a relative-RMSE comparison (fla style)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (relative RMSE bound, max-abs floor) per dtype of the computation under test.
_TOL = {
    "float32": (2e-5, 1e-4),
    "bfloat16": (2e-2, 5e-2),
    "float16": (5e-3, 1e-2),
}


def tolerances(dtype) -> tuple[float, float]:
    """Returns (rel_rmse, abs_floor) for ``dtype``."""
    return _TOL[jnp.dtype(dtype).name]


def assert_close(actual, expected, dtype=jnp.float32, name: str = "value", rtol=None, atol=None):
    """Fails unless ``actual`` matches ``expected`` by relative RMSE or a max-abs floor.

    Passes when ``rmse(actual - expected) <= rtol * rms(expected)`` or, for near-zero references,
    when ``max|actual - expected| <= atol``. Never downgrades a failure to a warning.
    """
    rt, at = tolerances(dtype)
    rtol = rt if rtol is None else rtol
    atol = at if atol is None else atol
    a = np.asarray(jnp.asarray(actual, jnp.float32), dtype=np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{name}: non-finite values in actual"
    diff = a - e
    rmse = float(np.sqrt(np.mean(diff ** 2))) if diff.size else 0.0
    ref_rms = float(np.sqrt(np.mean(e ** 2))) if e.size else 0.0
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    ok = rmse <= rtol * ref_rms or max_abs <= atol
    assert ok, (f"{name}: rel RMSE {rmse / max(ref_rms, 1e-30):.3e} (bound {rtol:.1e}), "
                f"max abs {max_abs:.3e} (floor {atol:.1e})")


def upcast_bf16(tree):
    """Every bfloat16 leaf of ``tree`` as float32: the reference run on the same rounded inputs."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)


def assert_grads_close(actual: Sequence, expected: Sequence, names: Sequence[str], dtype, tag: str) -> None:
    """``assert_close`` per named gradient, with equal shape and dtype; a ``None`` reference (no gradient for
    that input) requires ``None``."""
    for name, a, e in zip(names, actual, expected, strict=True):
        if e is None:
            assert a is None, f"{tag}: {name} should be None"
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, f"{tag}: {name} {a.dtype}{a.shape}"
        assert_close(a, e, dtype, f"{tag} {name}")
