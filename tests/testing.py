"""Shared test helpers: dtype-keyed tolerances and a comparison bounding relative RMSE and worst-element error."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (relative RMSE bound, worst-element bound) per dtype of the computation under test. Both are relative to the
# reference's magnitude: the RMSE of the error to the reference's RMS, the largest error to its largest entry.
_TOL = {
    "float32": (2e-5, 2e-4),
    "bfloat16": (2e-2, 6e-2),
    "float16": (5e-3, 2e-2),
}


def tolerances(dtype) -> tuple[float, float]:
    """Returns (rel_rmse, rel_max) for ``dtype``."""
    return _TOL[jnp.dtype(dtype).name]


def assert_close(actual, expected, dtype=jnp.float32, name: str = "value", rtol=None, mtol=None, scale=None):
    """Fails unless ``actual`` matches ``expected`` by BOTH measures:

    - relative RMSE: ``rms(actual - expected) <= rtol * rms(expected)``, and
    - worst element: ``max|actual - expected| <= mtol * max|expected|``.

    ``scale`` replaces the reference's magnitude in both bounds (as ``rms = max = scale``) where the reference
    is a difference of much larger terms (cancellation: the error of any float computation scales with the
    terms, not with the result); pass the terms' magnitude, never a number chosen to make a test pass. A
    reference that is exactly zero everywhere has no magnitude and needs ``scale``. Never downgrades a failure
    to a warning.
    """
    rt, mt = tolerances(dtype)
    rtol = rt if rtol is None else rtol
    mtol = mt if mtol is None else mtol
    a = np.asarray(jnp.asarray(actual, jnp.float32), dtype=np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{name}: non-finite values in actual"
    assert np.all(np.isfinite(e)), f"{name}: non-finite values in the reference"
    if not e.size:
        return
    diff = a - e
    rmse = float(np.sqrt(np.mean(diff ** 2)))
    max_abs = float(np.max(np.abs(diff)))
    if scale is None:
        ref_rms, ref_max = float(np.sqrt(np.mean(e ** 2))), float(np.max(np.abs(e)))
        assert ref_max > 0, f"{name}: the reference is all zeros; pass scale= (the magnitude of its inputs)"
    else:
        assert scale > 0, f"{name}: scale must be positive, got {scale}"
        ref_rms = ref_max = float(scale)
    ok_rms, ok_max = rmse <= rtol * ref_rms, max_abs <= mtol * ref_max
    assert ok_rms and ok_max, (
        f"{name}: rel RMSE {rmse / ref_rms:.3e} (bound {rtol:.1e}){'' if ok_rms else ' FAILED'}, "
        f"worst element {max_abs:.3e} = {max_abs / ref_max:.3e} of max|ref| (bound {mtol:.1e})"
        f"{'' if ok_max else ' FAILED'}")


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
