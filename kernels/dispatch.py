"""One place that decides which implementation of an op runs.

Every public op takes ``impl`` with one of:

* ``"auto"``     compiled Pallas where a kernel exists for the target backend (GPU/TPU);
                 on CPU the XLA chunked/reference path.
* ``"ref"``      the pure-jnp reference (recurrent ``lax.scan`` or exact parallel form).
* ``"chunked"``  the pure-jnp chunked form (what ``auto`` uses on CPU for linear mixers).
* ``"pallas"``   the compiled Pallas kernel (GPU/TPU only).
* ``"interpret"`` the Pallas kernel run by the Pallas interpreter: what CPU tests use.

The target platform is taken from an explicit argument or the default backend, never from
``jax.devices()[0]`` of an AOT target (MaxText's caveat): callers that compile for a mesh pass
``target=mesh.devices.flat[0].platform``.
"""

from __future__ import annotations

import functools
import logging

import jax

IMPLS = ("auto", "ref", "chunked", "pallas", "interpret")


def target_platform(target: str | None = None) -> str:
    """Returns "cpu", "gpu" or "tpu" for ``target`` (default: jax's default backend)."""
    platform = (target or jax.default_backend()).lower()
    if platform in ("cuda", "rocm"):
        platform = "gpu"
    return platform


@functools.lru_cache(maxsize=None)
def _log_choice(op: str, impl: str, resolved: str) -> None:
    logging.info("kernel %s: impl=%s -> %s", op, impl, resolved)


def resolve_impl(impl: str, *, op: str = "op", has_pallas: tuple[str, ...] = ("gpu", "tpu"),
                 cpu_default: str = "chunked", target: str | None = None) -> str:
    """Maps ``impl`` to a concrete implementation name.

    Args:
      impl: requested implementation, one of ``IMPLS``.
      op: op name, for the log line and error messages.
      has_pallas: platforms for which the op has a compiled Pallas kernel.
      cpu_default: what ``auto`` means where no compiled kernel exists.
      target: platform to compile for; defaults to ``jax.default_backend()``.

    Returns:
      One of ``"ref"``, ``"chunked"``, ``"pallas"``, ``"interpret"``.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: unknown impl {impl!r}; expected one of {IMPLS}")
    platform = target_platform(target)
    resolved = impl
    if impl == "auto":
        resolved = "pallas" if platform in has_pallas else cpu_default
    elif impl == "pallas" and platform not in has_pallas:
        raise ValueError(
            f"{op}: impl='pallas' needs a compiled kernel for {platform!r}; this op has kernels for "
            f"{has_pallas}. Use impl='interpret' to run the kernel code on CPU, or 'auto'.")
    _log_choice(op, impl, resolved)
    return resolved
