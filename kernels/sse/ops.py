"""Sparse State Expansion (SSE), sparse partitions: the public op.

The N sparse partitions of an SSE layer (papers/sse.md §3.3, §3.5a) over the GLA recurrence. Per
batch ``b``, head ``h`` and partition ``i``, with routing weights ``w_t`` (the router probability
where the partition is among the token's top-K, exactly 0 elsewhere)::

    w_t[i] != 0:  S^i_t = diag(exp(g_t)) S^i_{t-1} + w_t[i] k_t^T v_t
    w_t[i] == 0:  S^i_t = S^i_{t-1}                          (no decay, no write)
    o_t = scale * sum_i w_t[i] q_t S^i_t

``q, k, v, g`` are shared by all partitions (``[B, T, H, D]``, fla layout); the always-on shared
partition of the layer is a plain ``kernels.gla.gla`` call made by the mixer. Keep ``g`` and ``w``
in float32. Output dtype is ``q.dtype``; states and accumulation are float32.

Packed sequences: with ``segment_ids`` ``[B, T]`` every partition's state resets to zero where the
id changes (``kernels.gla`` semantics); ``initial_state`` reaches only each row's first segment.

Implementations (``impl``, resolved by ``kernels.dispatch.resolve_impl``):

* ``"ref"``: replicate into ``N * H`` heads and run the per-token GLA scan (``ref.sse_masked``).
* ``"chunked"``: replicate and run the chunked GLA form; what ``"auto"`` runs on CPU.
* ``"pallas"`` / ``"interpret"``: the Pallas forward (``pallas.sse_fwd``), which masks and scales
  inside the kernel and never materialises the replicated q/k/v/g, inside a ``jax.custom_vjp``
  whose backward runs the GLA backward kernels (``kernels.gla.pallas_bwd``) on the partitions
  folded into heads and chains through ``ref.replicate`` (``_sse_pallas_bwd``). ``"auto"`` picks
  it on GPU/TPU.

Gradients with respect to ``w`` are those of the expression above with the selection ``w != 0``
held fixed (the hard top-K has no gradient; papers/sse.md §6): at a zero entry the derivative of
the write and read scaling is still reported, so callers route gradients through a ``where``
(``w = where(selected, e, 0)``) to keep them off unselected partitions.

Example (runs on CPU)::

    import jax, jax.numpy as jnp
    from kernels.gla import gla
    from kernels.sse import sse, topk_mask

    B, T, H, K, V, N = 2, 100, 4, 32, 32, 4
    r = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k = (jax.random.normal(x, (B, T, H, K)) for x in r[:2])
    v = jax.random.normal(r[2], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(r[3], (B, T, H, K))) / 16
    e = jax.nn.softmax(jax.random.normal(r[4], (B, T, N)))          # router, f32
    w = jnp.where(topk_mask(e, 1), e, 0.0)                           # top-1 routing weights
    o, states = sse(q, k, v, g, w, return_final_state=True)          # [B,T,H,V], [B,N,H,K,V]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels.gla import pallas as gla_pallas
from kernels.gla import pallas_bwd as gla_pallas_bwd
from kernels.gla import ref as gla_ref
from kernels.sse import pallas, ref

__all__ = ["sse", "sse_step"]


def _fail(msg: str):
    raise ValueError(f"sse: {msg}")


def _validate(q, k, v, g, w, initial_state, segment_ids, chunk_size) -> None:
    if q.ndim != 4:
        _fail(f"q must have shape [B, T, H, K], got {tuple(q.shape)}")
    batch, length, heads, k_dim = q.shape
    if tuple(k.shape) != tuple(q.shape):
        _fail(f"k must have shape [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 4 or tuple(v.shape[:3]) != (batch, length, heads):
        _fail(f"v must have shape [B, T, H, V] = ({batch}, {length}, {heads}, V), "
              f"got {tuple(v.shape)}")
    if tuple(g.shape) not in (tuple(q.shape), (batch, length, heads)):
        _fail(f"g must have shape [B, T, H, K] = {tuple(q.shape)} or [B, T, H] = "
              f"{(batch, length, heads)}, got {tuple(g.shape)}")
    if w.ndim != 3 or tuple(w.shape[:2]) != (batch, length) or w.shape[-1] < 1:
        _fail(f"w must have shape [B, T, N] = ({batch}, {length}, N), got {tuple(w.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("w", w)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            _fail(f"{name} must be a floating dtype, got {x.dtype}")
    if initial_state is not None:
        expected = (batch, w.shape[-1], heads, k_dim, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            _fail(f"initial_state must have shape [B, N, H, K, V] = {expected}, "
                  f"got {tuple(initial_state.shape)}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (batch, length):
            _fail(f"segment_ids must have shape [B, T] = {(batch, length)}, "
                  f"got {tuple(segment_ids.shape)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            _fail(f"segment_ids must be an integer dtype, got {segment_ids.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        _fail(f"chunk_size must be a positive int, got {chunk_size!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _sse_pallas(q, k, v, g, w, initial_state, doc, scale, chunk_size, block_sizes, interpret,
                platform):
    return pallas.sse_fwd(q, k, v, g, w, initial_state, doc, scale=scale, chunk_size=chunk_size,
                          block_sizes=block_sizes, interpret=interpret, platform=platform)


def _sse_pallas_fwd(q, k, v, g, w, initial_state, doc, scale, chunk_size, block_sizes, interpret,
                    platform):
    out = _sse_pallas(q, k, v, g, w, initial_state, doc, scale, chunk_size, block_sizes,
                      interpret, platform)
    return out, (q, k, v, g, w, initial_state, doc, out[1])


def _sse_pallas_bwd(scale, chunk_size, block_sizes, interpret, platform, residuals, cotangents):
    """The GLA backward kernels on the partitions folded into heads, chained through ``ref.replicate``.

    The sparse partitions are a GLA over ``N * H`` heads of ``w``-scaled, selection-masked copies
    (``ref.replicate``); the copies are built here in the input dtype (the forward kernel rounds them to it
    before its matmuls too), run through ``gla.pallas_bwd.gla_bwd``, and ``jax.vjp`` of ``replicate`` maps
    their gradients back to ``q, k, v, g, w`` (summing over partitions). The backward thus holds ``N``
    copies of q/k/v/g and the output cotangent, which the forward kernel avoids.
    """
    q, k, v, g, w, initial_state, doc, final_state = residuals
    d_out, d_final = cotangents
    batch, length, heads, k_dim = q.shape
    n, v_dim = w.shape[-1], v.shape[-1]
    reps, rep_vjp = jax.vjp(ref.replicate, q, k, v, g, w)
    q_r, k_r, v_r, g_r = reps
    fold = lambda s: s.reshape(batch, n * heads, k_dim, v_dim)  # noqa: E731  [B, N*H, K, V]
    d_out_r = jnp.broadcast_to(d_out[:, :, None], (batch, length, n, heads, v_dim)).reshape(
        batch, length, n * heads, v_dim)  # o = sum over partitions
    grads = gla_pallas_bwd.gla_bwd(
        q_r.astype(q.dtype), k_r.astype(k.dtype), v_r.astype(v.dtype), g_r, fold(initial_state), doc,
        fold(final_state), d_out_r, fold(d_final), scale=scale, chunk_size=chunk_size,
        block_sizes=gla_pallas.BlockSizes(block_v=block_sizes.block_v, sub_chunk=block_sizes.sub_chunk),
        interpret=interpret, platform=platform)
    dq, dk, dv, dg, dw = rep_vjp(tuple(x.astype(r.dtype) for x, r in zip(grads[:4], reps)))
    return dq, dk, dv, dg, dw, grads[4].reshape(initial_state.shape), None


_sse_pallas.defvjp(_sse_pallas_fwd, _sse_pallas_bwd)


def sse(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, w: jax.Array, *,
        scale: float | None = None, initial_state: jax.Array | None = None,
        return_final_state: bool = False, segment_ids: jax.Array | None = None,
        chunk_size: int = 64, impl: str = "auto", block_sizes: pallas.BlockSizes | None = None,
        target: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """The sparse partitions of SSE over a sequence (masked GLA recurrence, summed over N).

    Args:
      q: ``[B, T, H, K]`` queries (shared by all partitions).
      k: ``[B, T, H, K]`` keys.
      v: ``[B, T, H, V]`` values.
      g: ``[B, T, H, K]`` per-key log-decay or ``[B, T, H]`` per head; values <= 0. Applied to a
        partition only at tokens that select it.
      w: ``[B, T, N]`` routing weights: nonzero exactly where the token selects the partition.
      scale: output scale, a Python float; defaults to ``K ** -0.5``.
      initial_state: ``[B, N, H, K, V]`` partition states before position 0; ``None`` = zeros.
      return_final_state: also return the states after the last position.
      segment_ids: ``[B, T]`` integer ids of packed sequences (states reset where the id changes).
      chunk_size: chunk length of the chunked and Pallas forms (``T`` need not be a multiple).
        Compiled Pallas on GPU wants a multiple of 16 (``auto`` falls back to ``chunked`` otherwise).
      impl: ``"auto"``, ``"ref"``, ``"chunked"``, ``"pallas"`` or ``"interpret"``.
      block_sizes: Pallas tiles; defaults to ``pallas.BlockSizes.get_default``.
      target: platform to compile for (``"cpu"``, ``"gpu"``, ``"tpu"``); default: the context's
        (``kernels.dispatch.target_platform``: lowering target, mesh devices, then the default backend).

    Returns:
      ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in ``q.dtype``; ``final_state``
      ``[B, N, H, K, V]`` float32, or ``None`` unless ``return_final_state``.

    Raises:
      ValueError: on a shape, dtype or argument that does not fit; the message names it.
    """
    _validate(q, k, v, g, w, initial_state, segment_ids, chunk_size)
    batch, length, heads, k_dim = q.shape
    n, v_dim = w.shape[-1], v.shape[-1]
    if scale is None:
        scale = k_dim ** -0.5
    def unsupported(platform):
        if platform == "gpu" and chunk_size % 16:
            return f"chunk_size={chunk_size} is not a multiple of 16 (Triton tl.dot tiles)"
        bs = block_sizes or pallas.BlockSizes.get_default(v_dim, platform)
        fps = (pallas.footprint(platform, length, k_dim, v_dim, n, q.dtype, chunk_size, bs),
               *gla_pallas_bwd.footprints(platform, k_dim, v_dim, q.dtype, chunk_size,
                                          gla_pallas.BlockSizes(block_v=bs.block_v, sub_chunk=bs.sub_chunk)))
        return next((fp.reason() for fp in fps if fp.reason()), None)

    resolved = dispatch.resolve_impl(impl, op="sse", target=target, unsupported=unsupported)
    if resolved in ("ref", "chunked"):
        o, final_state = ref.sse_masked(
            q, k, v, g, w, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
            chunk_size=chunk_size, form="recurrent" if resolved == "ref" else "chunked")
    else:
        platform = dispatch.target_platform(target)
        if block_sizes is None:
            block_sizes = pallas.BlockSizes.get_default(v_dim, platform)
        if initial_state is None:
            initial_state = jnp.zeros((batch, n, heads, k_dim, v_dim), jnp.float32)
        kernel_platform = platform if platform in ("gpu", "tpu") else "gpu"

        def run(q, k, v, g, w, h0, doc):
            return _sse_pallas(q, k, v, g, w, h0, doc, float(scale), chunk_size, block_sizes,
                               resolved == "interpret", kernel_platform)

        # Under a mesh: shard_map over batch and heads (kernels.dispatch.shard_op).
        o, final_state = dispatch.shard_op(
            run, (q, k, v, gla_ref.expand_decay(g, q), w, initial_state.astype(jnp.float32),
                  gla_ref.document_index(segment_ids, batch, length)),
            [(0, 2), (0, 2), (0, 2), (0, 2), (0, None), (0, 2), (0, None)], [(0, 2), (0, 2)])
    return o, (final_state if return_final_state else None)


def sse_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, w_t: jax.Array,
             state: jax.Array, *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """One decoding step of the SSE sparse partitions.

    Args:
      q_t: ``[B, H, K]``.
      k_t: ``[B, H, K]``.
      v_t: ``[B, H, V]``.
      g_t: ``[B, H, K]`` or ``[B, H]`` log-decay (<= 0).
      w_t: ``[B, N]`` routing weights (0 = not selected: that state is left untouched).
      state: ``[B, N, H, K, V]`` partition states before this token.
      scale: output scale; defaults to ``K ** -0.5``.

    Returns:
      ``(o_t, new_state)``: ``[B, H, V]`` in ``q_t.dtype`` and ``[B, N, H, K, V]`` float32.
    """
    if q_t.ndim != 3:
        _fail(f"sse_step: q_t must have shape [B, H, K], got {tuple(q_t.shape)}")
    batch, heads, k_dim = q_t.shape
    if tuple(k_t.shape) != tuple(q_t.shape):
        _fail(f"sse_step: k_t must have shape [B, H, K] = {tuple(q_t.shape)}, "
              f"got {tuple(k_t.shape)}")
    if v_t.ndim != 3 or tuple(v_t.shape[:2]) != (batch, heads):
        _fail(f"sse_step: v_t must have shape [B, H, V] = ({batch}, {heads}, V), "
              f"got {tuple(v_t.shape)}")
    if tuple(g_t.shape) not in (tuple(q_t.shape), (batch, heads)):
        _fail(f"sse_step: g_t must have shape [B, H, K] = {tuple(q_t.shape)} or [B, H] = "
              f"{(batch, heads)}, got {tuple(g_t.shape)}")
    if w_t.ndim != 2 or w_t.shape[0] != batch:
        _fail(f"sse_step: w_t must have shape [B, N] = ({batch}, N), got {tuple(w_t.shape)}")
    expected = (batch, w_t.shape[1], heads, k_dim, v_t.shape[-1])
    if tuple(state.shape) != expected:
        _fail(f"sse_step: state must have shape [B, N, H, K, V] = {expected}, "
              f"got {tuple(state.shape)}")
    if scale is None:
        scale = k_dim ** -0.5
    return ref.sse_step(q_t, k_t, v_t, g_t, w_t, state, scale=scale)
