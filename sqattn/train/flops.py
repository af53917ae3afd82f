"""FLOP accounting helpers: a measured matmul peak to report MFU against."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def measured_peak_flops(n: int = 1024, repeats: int = 5, dtype: str = "bfloat16") -> float:
    """FLOP/s of a ``dtype``-input, f32-accumulate [n,n]x[n,n] matmul on the default device (best of repeats).

    Measure with the run's compute dtype: on CPU a bf16 matmul and an f32 one differ by up to 2x either way."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def system_peak_flops(dtype: str = "bfloat16") -> float:
    """Peak FLOP/s of all devices of the run for ``dtype`` matmuls, from one measured device.

    CPU "devices" (including ``--xla_force_host_platform_device_count`` simulated ones) share the host's
    cores, and one device's matmul already uses all of them, so the CPU peak is one measurement per process;
    accelerators add up per device.
    """
    per_device = measured_peak_flops(dtype=str(jnp.dtype(dtype)))
    if jax.default_backend() == "cpu":
        return per_device * jax.process_count()
    return per_device * jax.device_count()
