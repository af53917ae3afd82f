"""Compute kernels: one folder per op, each with ref.py (pure jnp), pallas.py and ops.py (public)."""
