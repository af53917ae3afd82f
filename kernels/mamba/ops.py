"""Public Mamba scan ops: S6 ``selective_scan`` (Mamba-1) and ``ssd`` (Mamba-2), plus decode steps.

Layout is ``[B, T, ...]``; all accumulation is float32; ``y`` has the input dtype and states are
float32. ``impl`` picks the implementation (see kernels/dispatch.py):

* ``"ref"``: one token per ``lax.scan`` step;
* ``"chunked"``: the chunked pure-jnp form (the CPU default of ``"auto"``);
* ``"pallas"`` / ``"interpret"``: the Pallas forward kernel (compiled / interpreted) wrapped in a
  ``jax.custom_vjp`` whose backward is ``jax.vjp`` of the chunked reference; inside ``shard_map`` over the
  batch axes of the context mesh (``kernels.dispatch.shard_op``). ``"auto"`` picks it on GPU and TPU (the
  variant follows the target) unless the shape does not fit on chip (then the chunked path, logged).

Segment ids (packed sequences): the state is reset to zero before every position whose segment
id differs from the previous position's. ``initial_state`` therefore applies only to each row's
first segment, and the returned final state is the state at the end of each row's last segment
(padding tokens with their own id form a segment of their own).

Example:
    >>> y, s = selective_scan(u, delta, A, B, C, D, return_final_state=True)
    >>> y_t, s = selective_scan_step(u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, s)

See /work/shared/papers/mamba_free_lunch.md §3.1 and §3.2.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels.mamba import pallas
from kernels.mamba import ref

_F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Shape validation.
# ----------------------------------------------------------------------------------------------


def _check(op: str, name: str, arr, layout: str, expected: Sequence[int]) -> None:
    """Raises ValueError unless ``arr.shape == expected``, naming the argument and its layout."""
    shape = tuple(jnp.shape(arr))
    if shape != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {layout} = {tuple(expected)}, got {shape}")


def _check_rank(op: str, name: str, arr, layout: str) -> tuple[int, ...]:
    """Raises ValueError unless ``arr`` has as many dims as ``layout`` names; returns its shape."""
    shape = tuple(jnp.shape(arr))
    rank = len(layout.strip("[]").split(","))
    if len(shape) != rank:
        raise ValueError(f"{op}: {name} must have shape {layout} ({rank} dims), got {shape}")
    return shape


def _check_chunk(op: str, chunk_size) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


def _check_selective_scan(op, u, delta, A, B, C, D, state, segment_ids, with_time=True):
    u_layout = "[B, T, Din]" if with_time else "[B, Din]"
    bn_layout = "[B, T, N]" if with_time else "[B, N]"
    shape = _check_rank(op, "u" if with_time else "u_t", u, u_layout)
    _check(op, "delta" if with_time else "delta_t", delta, u_layout, shape)
    d_in = shape[-1]
    a_shape = _check_rank(op, "A", A, "[Din, N]")
    _check(op, "A", A, "[Din, N]", (d_in, a_shape[1]))
    n = a_shape[1]
    lead = shape[:-1]
    _check(op, "B" if with_time else "B_t", B, bn_layout, (*lead, n))
    _check(op, "C" if with_time else "C_t", C, bn_layout, (*lead, n))
    if D is not None:
        _check(op, "D", D, "[Din]", (d_in,))
    if state is not None:
        _check(op, "initial_state" if with_time else "state", state, "[B, Din, N]",
               (shape[0], d_in, n))
    if segment_ids is not None:
        _check(op, "segment_ids", segment_ids, "[B, T]", lead)


def _check_ssd(op, x, dt, A, B, C, D, state, segment_ids, with_time=True):
    x_layout = "[B, T, H, P]" if with_time else "[B, H, P]"
    bc_layout = "[B, T, G, N]" if with_time else "[B, G, N]"
    shape = _check_rank(op, "x" if with_time else "x_t", x, x_layout)
    lead, h, p = shape[:-2], shape[-2], shape[-1]
    _check(op, "dt" if with_time else "dt_t", dt, "[B, T, H]" if with_time else "[B, H]",
           (*lead, h))
    _check(op, "A", A, "[H]", (h,))
    b_shape = _check_rank(op, "B" if with_time else "B_t", B, bc_layout)
    g, n = b_shape[-2:]
    _check(op, "B" if with_time else "B_t", B, bc_layout, (*lead, g, n))
    if g < 1 or h % g:
        raise ValueError(f"{op}: the group count G={g} of B and C must divide H={h}")
    _check(op, "C" if with_time else "C_t", C, bc_layout, (*lead, g, n))
    if D is not None:
        _check(op, "D", D, "[H]", (h,))
    if state is not None:
        _check(op, "initial_state" if with_time else "state", state, "[B, H, P, N]",
               (shape[0], h, p, n))
    if segment_ids is not None:
        _check(op, "segment_ids", segment_ids, "[B, T]", lead)


# ----------------------------------------------------------------------------------------------
# Pallas forward + chunked-reference backward.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _selective_scan_kernel(chunk_size, block_sizes, interpret, platform, u, delta, A, B, C, D, s0, resets):
    return pallas.selective_scan_fwd(u, delta, A, B, C, D, s0, resets, block_sizes=block_sizes,
                                     interpret=interpret, platform=platform)


def _selective_scan_kernel_fwd(chunk_size, block_sizes, interpret, platform, *args):
    out = _selective_scan_kernel(chunk_size, block_sizes, interpret, platform, *args)
    return out, args


def _selective_scan_kernel_bwd(chunk_size, block_sizes, interpret, platform, residuals, cotangents):
    *primals, resets = residuals

    def chunked(u, delta, A, B, C, D, s0):
        return ref.selective_scan_chunked(u, delta, A, B, C, D, s0, resets, chunk_size)

    _, vjp = jax.vjp(chunked, *primals)
    return (*vjp(cotangents), jnp.zeros_like(resets))


_selective_scan_kernel.defvjp(_selective_scan_kernel_fwd, _selective_scan_kernel_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ssd_kernel(chunk_size, interpret, platform, x, dt, A, B, C, D, s0, resets):
    return pallas.ssd_fwd(x, dt, A, B, C, D, s0, resets, chunk_size=chunk_size,
                          interpret=interpret, platform=platform)


def _ssd_kernel_fwd(chunk_size, interpret, platform, *args):
    return _ssd_kernel(chunk_size, interpret, platform, *args), args


def _ssd_kernel_bwd(chunk_size, interpret, platform, residuals, cotangents):
    *primals, resets = residuals

    def chunked(x, dt, A, B, C, D, s0):
        return ref.ssd_chunked(x, dt, A, B, C, D, s0, resets, chunk_size)

    _, vjp = jax.vjp(chunked, *primals)
    return (*vjp(cotangents), jnp.zeros_like(resets))


_ssd_kernel.defvjp(_ssd_kernel_fwd, _ssd_kernel_bwd)


def _kernel_platform(target) -> str:
    """Kernel variant: the target's, and the GPU one when interpreting on CPU."""
    platform = dispatch.target_platform(target)
    return platform if platform in ("gpu", "tpu") else "gpu"


# ----------------------------------------------------------------------------------------------
# Public ops.
# ----------------------------------------------------------------------------------------------


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   D: jax.Array | None = None, *, initial_state: jax.Array | None = None,
                   return_final_state: bool = False, segment_ids: jax.Array | None = None,
                   chunk_size: int = 64, impl: str = "auto",
                   block_sizes: pallas.BlockSizes | None = None, target: str | None = None
                   ) -> tuple[jax.Array, jax.Array | None]:
    """Mamba-1 (S6) selective scan.

    ``s_t = exp(delta_t[:, None] * A) * s_{t-1} + delta_t[:, None] * B_t[None, :] * u_t[:, None]``
    and ``y_t = s_t C_t + D * u_t``, per batch row, with ``s`` of shape [Din, N].

    Args:
      u: [B, T, Din] input (after conv + SiLU in the Mamba block).
      delta: [B, T, Din] positive step sizes (already softplus'ed).
      A: [Din, N] negative reals (``-exp(A_log)``).
      B: [B, T, N] input projection, shared by all channels.
      C: [B, T, N] output projection, shared by all channels.
      D: [Din] skip weights, or None for no skip term.
      initial_state: [B, Din, N] state before token 0 (zeros when None); applies to each row's
        first segment only.
      return_final_state: also return the [B, Din, N] float32 state after the last token.
      segment_ids: [B, T] ints; the state resets to zero wherever the id changes.
      chunk_size: tokens per chunk for ``"chunked"`` (and the kernels' chunked backward).
      impl: ``"auto"``, ``"ref"``, ``"chunked"``, ``"pallas"`` or ``"interpret"``.
      block_sizes: channel block of the Pallas kernel (default ``BlockSizes.get_default``).
      target: platform to compile for (``kernels.dispatch.target_platform``: the context mesh's otherwise).

    Returns:
      ``(y, final_state)``: y [B, T, Din] in u.dtype; final_state [B, Din, N] float32, or None
      unless ``return_final_state``.

    Raises:
      ValueError: on shapes that do not match the layouts above, or an unknown ``impl``.
    """
    op = "selective_scan"
    _check_selective_scan(op, u, delta, A, B, C, D, initial_state, segment_ids)
    _check_chunk(op, chunk_size)
    b, t, d = u.shape
    n = A.shape[1]

    def unsupported(platform):
        bs = block_sizes or pallas.BlockSizes.get_default(d, platform)
        if d % bs.block_d:
            return f"block_d={bs.block_d} does not divide D_in={d}"
        return pallas.selective_scan_footprint(platform, t, d, n, B.dtype, bs).reason()

    resolved = dispatch.resolve_impl(impl, op=op, target=target, unsupported=unsupported)
    resets = None if segment_ids is None else ref.segment_resets(segment_ids, b, t)
    if resolved == "ref":
        y, s = ref.selective_scan_ref(u, delta, A, B, C, D, initial_state, resets)
    elif resolved == "chunked":
        y, s = ref.selective_scan_chunked(u, delta, A, B, C, D, initial_state, resets, chunk_size)
    else:
        platform = _kernel_platform(target)
        d_skip = jnp.zeros((d,), _F32) if D is None else D
        s0 = jnp.zeros((b, d, n), _F32) if initial_state is None else initial_state
        resets = jnp.zeros((b, t), _F32) if resets is None else resets
        fn = functools.partial(_selective_scan_kernel, chunk_size, block_sizes, resolved == "interpret",
                               platform)
        # Batch-parallel under a mesh; A, D are replicated (channels are not split: B/C are shared by all).
        y, s = dispatch.shard_op(fn, (u, delta, A, B, C, d_skip, s0, resets),
                                 [(0, None), (0, None), None, (0, None), (0, None), None, (0, None), (0, None)],
                                 [(0, None), (0, None)])
    return y, (s if return_final_state else None)


def ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
        D: jax.Array | None = None, *, initial_state: jax.Array | None = None,
        return_final_state: bool = False, segment_ids: jax.Array | None = None,
        chunk_size: int = 64, impl: str = "auto",
        target: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Mamba-2 state-space duality (SSD) scan: scalar decay per head.

    ``S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T`` and ``y_t = S_t C_t + D x_t`` per head, with
    ``S`` of shape [P, N]; head ``i`` reads B/C group ``i // (H // G)``.

    Args:
      x: [B, T, H, P] input (the "values").
      dt: [B, T, H] positive step sizes (already softplus'ed).
      A: [H] negative reals, one per head.
      B: [B, T, G, N] ("keys"); G divides H (G = 1 is typical).
      C: [B, T, G, N] ("queries").
      D: [H] skip weights, or None.
      initial_state: [B, H, P, N] state before token 0 (zeros when None); applies to each row's
        first segment only.
      return_final_state: also return the [B, H, P, N] float32 state after the last token.
      segment_ids: [B, T] ints; the state resets to zero wherever the id changes.
      chunk_size: tokens per chunk for ``"chunked"`` and the Pallas kernel.
      impl: ``"auto"``, ``"ref"``, ``"chunked"``, ``"pallas"`` or ``"interpret"``.
      target: platform to compile for (``kernels.dispatch.target_platform``: the context mesh's otherwise).

    Returns:
      ``(y, final_state)``: y [B, T, H, P] in x.dtype; final_state [B, H, P, N] float32, or None
      unless ``return_final_state``.

    Raises:
      ValueError: on shapes that do not match the layouts above (or G not dividing H), or an
        unknown ``impl``.
    """
    op = "ssd"
    _check_ssd(op, x, dt, A, B, C, D, initial_state, segment_ids)
    _check_chunk(op, chunk_size)
    b, t, h, p = x.shape
    g, n = B.shape[-2:]

    def unsupported(platform):
        if platform == "tpu" and chunk_size % 8 and chunk_size < t:
            return f"chunk_size={chunk_size} is not a multiple of 8 (TPU sublanes)"
        return pallas.ssd_footprint(platform, t, p, n, x.dtype, chunk_size).reason()

    resolved = dispatch.resolve_impl(impl, op=op, target=target, unsupported=unsupported)
    resets = None if segment_ids is None else ref.segment_resets(segment_ids, b, t)
    if resolved == "ref":
        y, s = ref.ssd_ref(x, dt, A, B, C, D, initial_state, resets)
    elif resolved == "chunked":
        y, s = ref.ssd_chunked(x, dt, A, B, C, D, initial_state, resets, chunk_size)
    else:
        d_skip = jnp.zeros((h,), _F32) if D is None else D
        s0 = jnp.zeros((b, h, p, n), _F32) if initial_state is None else initial_state
        resets = jnp.zeros((b, t), _F32) if resets is None else resets
        fn = functools.partial(_ssd_kernel, chunk_size, resolved == "interpret", _kernel_platform(target))
        # Batch-parallel under a mesh (heads stay whole: the B/C groups are shared across heads).
        y, s = dispatch.shard_op(fn, (x, dt, A, B, C, d_skip, s0, resets),
                                 [(0, None), (0, None), None, (0, None), (0, None), None, (0, None), (0, None)],
                                 [(0, None), (0, None)])
    return y, (s if return_final_state else None)


def selective_scan_step(u_t: jax.Array, delta_t: jax.Array, A: jax.Array, B_t: jax.Array,
                        C_t: jax.Array, D: jax.Array | None,
                        state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoding step of ``selective_scan``.

    Args:
      u_t, delta_t: [B, Din].
      A: [Din, N].
      B_t, C_t: [B, N].
      D: [Din] or None.
      state: [B, Din, N].

    Returns:
      (y_t [B, Din] in u_t.dtype, new state [B, Din, N] float32).
    """
    _check_selective_scan("selective_scan_step", u_t, delta_t, A, B_t, C_t, D, state, None,
                          with_time=False)
    return ref.selective_scan_step(u_t, delta_t, A, B_t, C_t, D, state)


def ssd_step(x_t: jax.Array, dt_t: jax.Array, A: jax.Array, B_t: jax.Array, C_t: jax.Array,
             D: jax.Array | None, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoding step of ``ssd``.

    Args:
      x_t: [B, H, P].
      dt_t: [B, H].
      A: [H].
      B_t, C_t: [B, G, N].
      D: [H] or None.
      state: [B, H, P, N].

    Returns:
      (y_t [B, H, P] in x_t.dtype, new state [B, H, P, N] float32).
    """
    _check_ssd("ssd_step", x_t, dt_t, A, B_t, C_t, D, state, None, with_time=False)
    return ref.ssd_step(x_t, dt_t, A, B_t, C_t, D, state)
