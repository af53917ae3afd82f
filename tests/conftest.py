"""Test session setup: 8 simulated CPU devices and a persistent compilation cache.

Both must be set before jax is imported anywhere, which is why they live here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.environ.setdefault(
    "SQATTN_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sqattn-jax-test"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
