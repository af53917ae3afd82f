"""Test session setup: 8 simulated CPU devices and a persistent compilation cache.

Both must be set before jax is imported anywhere, which is why they live here. ``SQATTN_TEST_TIMES=FILE``
appends each test's wall time to FILE as it finishes (find the slow tests of a long run while it runs).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.environ.setdefault(
    "SQATTN_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sqattn-jax-test"))
# pytest-xdist workers (setup.cfg runs two, one per core of the CI machine) each get their own cache directory.
_CACHE = os.path.join(_CACHE, os.environ.get("PYTEST_XDIST_WORKER", "main"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_runtest_logreport(report):
    times = os.environ.get("SQATTN_TEST_TIMES")
    # Under xdist the hook runs in the worker and again in the controller (replayed report): write once.
    if times and report.when == "call" and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(times, "a") as f:
            f.write(f"{report.duration:9.2f} {report.outcome:7s} {report.nodeid}\n")
