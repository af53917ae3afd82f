"""Test session setup: 8 simulated CPU devices, a persistent compilation cache, and cheap compiles.

All must be set before jax is imported anywhere, which is why they live here. Most of the suite's time is XLA
compiling small programs that then run a few steps, so XLA's optimisation passes are off
(``jax_disable_most_optimizations``: about half the compile time; results agree with the optimised programs to
rounding, which is what every closeness check allows); ``SQATTN_TEST_OPTIMIZE=1`` turns them back on. The two
pytest-xdist workers share one cache directory; a size limit turns on the cache's file lock, which makes the
sharing safe. ``SQATTN_TEST_TIMES=FILE``
appends each test's wall time to FILE as it finishes (find the slow tests of a long run while it runs).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.environ.setdefault(
    "SQATTN_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sqattn-jax-test"))
# A directory of its own: jax's locked cache expects an access-time file beside every entry, which caches
# written without the lock (older runs of this suite) lack.
_CACHE = os.path.join(_CACHE, "locked")
# Environment, not jax.config, so that the binaries the tests start as subprocesses inherit all three.
os.environ.setdefault("SQATTN_COMPILATION_CACHE", _CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))  # > 0: reads and writes take the lock
if os.environ.get("SQATTN_TEST_OPTIMIZE", "0") != "1":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

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
