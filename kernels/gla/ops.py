"""Gated linear attention (GLA): the public op.

The recurrence behind the GLA, SSE and Liger mixers (papers/sse.md §3.1, papers/liger.md §3.3).
Per batch ``b`` and head ``h``, with key dim ``K`` and value dim ``V``::

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        S_t in R^{K x V}, g_t <= 0 (log-decay)
    o_t = scale * q_t S_t

Layout is fla-style ``[B, T, H, D]``. ``g`` is a per-key log-decay ``[B, T, H, K]`` (GLA) or a
scalar log-decay per head ``[B, T, H]`` (Mamba-2/SSD style, broadcast over ``K``); keep it in
float32. Output dtype is ``q.dtype``; the state and all accumulation are float32.

Packed sequences: with ``segment_ids`` ``[B, T]`` the state is reset to zero at every position
whose id differs from the previous position's, so documents packed into one row never see each
other. ``initial_state`` is the state before position 0 and therefore reaches only the first
segment of each row; ``final_state`` is the state after the last position, i.e. the last
segment's state.

Implementations (``impl``, resolved by ``kernels.dispatch.resolve_impl``):

* ``"ref"``: per-token ``lax.scan`` (``ref.gla_recurrent``).
* ``"chunked"``: pure-jnp chunked parallel form (``ref.gla_chunked``); what ``"auto"`` runs on CPU.
* ``"pallas"`` / ``"interpret"``: the Pallas forward kernel (``pallas.gla_fwd``) compiled, or run
  by the Pallas interpreter, inside a ``jax.custom_vjp`` whose backward is the Pallas backward
  (``pallas_bwd.gla_bwd``: the per-chunk states recomputed by a kernel, then a reverse-chunk kernel
  for ``dq, dk, dv`` and the state gradient; ``dg`` from those in jnp). It saves only the inputs
  and the final state. ``"auto"`` picks it on GPU/TPU.

``"ref"`` and ``"chunked"`` are differentiated by plain autodiff.

Example (runs on CPU)::

    import jax, jax.numpy as jnp
    from kernels.gla import gla, gla_step

    B, T, H, K, V = 2, 100, 4, 32, 64
    rng = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(rng[0], (B, T, H, K), jnp.bfloat16)
    k = jax.random.normal(rng[1], (B, T, H, K), jnp.bfloat16)
    v = jax.random.normal(rng[2], (B, T, H, V), jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(rng[3], (B, T, H, K))) / 16  # GLA gate, f32
    o, state = gla(q, k, v, g, return_final_state=True)       # o: [B, T, H, V] bf16
    # state: [B, H, K, V] f32. Decode the next token from it (here the last token is reused):
    o_t, state = gla_step(q[:, -1], k[:, -1], v[:, -1], g[:, -1], state)  # o_t: [B, H, V]
    # Two documents packed in each row: the state resets at t = 60.
    seg = jnp.concatenate([jnp.zeros((B, 60), jnp.int32), jnp.ones((B, 40), jnp.int32)], 1)
    o_packed, _ = gla(q, k, v, g, segment_ids=seg, impl="chunked", chunk_size=32)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels.gla import pallas, pallas_bwd, ref

__all__ = ["gla", "gla_step"]


def _check_shape(name: str, x: jax.Array, expected: tuple[int, ...], legend: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"gla: {name} must have shape {legend} = {tuple(expected)}, "
                         f"got {tuple(x.shape)}")


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"gla: {name} must be a floating dtype, got {x.dtype}")


def _validate(q, k, v, g, initial_state, segment_ids, chunk_size) -> None:
    if q.ndim != 4:
        raise ValueError(f"gla: q must have shape [B, T, H, K], got {tuple(q.shape)}")
    batch, length, heads, k_dim = q.shape
    _check_shape("k", k, q.shape, "[B, T, H, K]")
    if v.ndim != 4 or tuple(v.shape[:3]) != (batch, length, heads):
        raise ValueError(f"gla: v must have shape [B, T, H, V] = ({batch}, {length}, {heads}, V), "
                         f"got {tuple(v.shape)}")
    if tuple(g.shape) not in (tuple(q.shape), (batch, length, heads)):
        raise ValueError(f"gla: g must have shape [B, T, H, K] = {tuple(q.shape)} or [B, T, H] = "
                         f"{(batch, length, heads)}, got {tuple(g.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        _check_float(name, x)
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (batch, heads, k_dim, v.shape[-1]),
                     "[B, H, K, V]")
        _check_float("initial_state", initial_state)
    if segment_ids is not None:
        _check_shape("segment_ids", segment_ids, (batch, length), "[B, T]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"gla: segment_ids must be an integer dtype, got {segment_ids.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"gla: chunk_size must be a positive int, got {chunk_size!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _gla_pallas(q, k, v, g, initial_state, doc, scale, chunk_size, block_sizes, interpret,
                platform):
    return pallas.gla_fwd(q, k, v, g, initial_state, doc, scale=scale, chunk_size=chunk_size,
                          block_sizes=block_sizes, interpret=interpret, platform=platform)


def _gla_pallas_fwd(q, k, v, g, initial_state, doc, scale, chunk_size, block_sizes, interpret,
                    platform):
    out = _gla_pallas(q, k, v, g, initial_state, doc, scale, chunk_size, block_sizes, interpret,
                      platform)
    return out, (q, k, v, g, initial_state, doc, out[1])


def _gla_pallas_bwd(scale, chunk_size, block_sizes, interpret, platform, residuals, cotangents):
    q, k, v, g, initial_state, doc, final_state = residuals
    d_out, d_final = cotangents
    grads = pallas_bwd.gla_bwd(q, k, v, g, initial_state, doc, final_state, d_out, d_final, scale=scale,
                               chunk_size=chunk_size, block_sizes=block_sizes, interpret=interpret,
                               platform=platform)
    return (*grads, None)


_gla_pallas.defvjp(_gla_pallas_fwd, _gla_pallas_bwd)


def gla(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float | None = None,
        initial_state: jax.Array | None = None, return_final_state: bool = False,
        segment_ids: jax.Array | None = None, chunk_size: int = 64, impl: str = "auto",
        block_sizes: pallas.BlockSizes | None = None,
        target: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Gated linear attention over a sequence.

    Args:
      q: ``[B, T, H, K]`` queries.
      k: ``[B, T, H, K]`` keys.
      v: ``[B, T, H, V]`` values.
      g: ``[B, T, H, K]`` per-key log-decay, or ``[B, T, H]`` scalar log-decay per head; values
        must be <= 0 (e.g. ``logsigmoid(x) / 16``). float32 recommended.
      scale: output scale, a Python float (static for the Pallas kernel); defaults to
        ``K ** -0.5``.
      initial_state: ``[B, H, K, V]`` state before position 0 (cast to float32); ``None`` means
        zeros. With ``segment_ids`` it applies only to the first segment of each row.
      return_final_state: also return the state after the last position.
      segment_ids: ``[B, T]`` integer ids of packed sequences; the state resets to zero at each
        position whose id differs from the previous position's.
      chunk_size: chunk length of the chunked and Pallas forms (``T`` need not be a multiple).
        Compiled Pallas on GPU wants a multiple of 16 (``auto`` falls back to ``chunked`` otherwise).
      impl: ``"auto"``, ``"ref"``, ``"chunked"``, ``"pallas"`` or ``"interpret"``.
      block_sizes: Pallas tiles; defaults to ``pallas.BlockSizes.get_default``.
      target: platform to compile for (``"cpu"``, ``"gpu"``, ``"tpu"``); default: the context's
        (``kernels.dispatch.target_platform``: lowering target, mesh devices, then the default backend).

    Returns:
      ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in ``q.dtype``; ``final_state``
      ``[B, H, K, V]`` float32, or ``None`` unless ``return_final_state``.

    Raises:
      ValueError: on a shape, dtype or argument that does not fit; the message names it.
    """
    _validate(q, k, v, g, initial_state, segment_ids, chunk_size)
    batch, length, heads, k_dim = q.shape
    if scale is None:
        scale = k_dim ** -0.5
    v_dim = v.shape[-1]

    def unsupported(platform):
        if platform == "gpu" and chunk_size % 16:
            return f"chunk_size={chunk_size} is not a multiple of 16 (Triton tl.dot tiles)"
        if platform == "tpu" and chunk_size % 8 and chunk_size < length:
            return f"chunk_size={chunk_size} is not a multiple of 8 (TPU sublanes)"
        bs = block_sizes or pallas.BlockSizes.get_default(v_dim, platform)
        fps = (pallas.footprint(platform, length, k_dim, v_dim, q.dtype, chunk_size, bs),
               *pallas_bwd.footprints(platform, k_dim, v_dim, q.dtype, chunk_size, bs))
        return next((fp.reason() for fp in fps if fp.reason()), None)

    resolved = dispatch.resolve_impl(impl, op="gla", target=target, unsupported=unsupported)
    if resolved == "ref":
        o, final_state = ref.gla_recurrent(q, k, v, g, scale=scale, initial_state=initial_state,
                                           segment_ids=segment_ids)
    elif resolved == "chunked":
        o, final_state = ref.gla_chunked(q, k, v, g, scale=scale, initial_state=initial_state,
                                         segment_ids=segment_ids, chunk_size=chunk_size)
    else:
        platform = dispatch.target_platform(target)
        if block_sizes is None:
            block_sizes = pallas.BlockSizes.get_default(v_dim, platform)
        if initial_state is None:
            initial_state = jnp.zeros((batch, heads, k_dim, v_dim), jnp.float32)
        kernel_platform = platform if platform in ("gpu", "tpu") else "gpu"

        def run(q, k, v, g, h0, doc):
            return _gla_pallas(q, k, v, g, h0, doc, float(scale), chunk_size, block_sizes,
                               resolved == "interpret", kernel_platform)

        # Under a mesh: shard_map over batch and heads (kernels.dispatch.shard_op).
        o, final_state = dispatch.shard_op(
            run, (q, k, v, ref.expand_decay(g, q), initial_state.astype(jnp.float32),
                  ref.document_index(segment_ids, batch, length)),
            [(0, 2), (0, 2), (0, 2), (0, 2), (0, 1), (0, None)], [(0, 2), (0, 1)])
    return o, (final_state if return_final_state else None)


def gla_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, state: jax.Array,
             *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """One decoding step of GLA: ``S = diag(exp(g_t)) S + k_t^T v_t``, ``o_t = scale * q_t S``.

    Args:
      q_t: ``[B, H, K]``.
      k_t: ``[B, H, K]``.
      v_t: ``[B, H, V]``.
      g_t: ``[B, H, K]`` or ``[B, H]`` log-decay (<= 0).
      state: ``[B, H, K, V]`` state before this token (zeros for a fresh sequence).
      scale: output scale; defaults to ``K ** -0.5``.

    Returns:
      ``(o_t, new_state)``: ``[B, H, V]`` in ``q_t.dtype`` and ``[B, H, K, V]`` float32.
    """
    if q_t.ndim != 3:
        raise ValueError(f"gla_step: q_t must have shape [B, H, K], got {tuple(q_t.shape)}")
    batch, heads, k_dim = q_t.shape
    if tuple(k_t.shape) != tuple(q_t.shape):
        raise ValueError(f"gla_step: k_t must have shape [B, H, K] = {tuple(q_t.shape)}, "
                         f"got {tuple(k_t.shape)}")
    if v_t.ndim != 3 or tuple(v_t.shape[:2]) != (batch, heads):
        raise ValueError(f"gla_step: v_t must have shape [B, H, V] = ({batch}, {heads}, V), "
                         f"got {tuple(v_t.shape)}")
    if tuple(g_t.shape) not in (tuple(q_t.shape), (batch, heads)):
        raise ValueError(f"gla_step: g_t must have shape [B, H, K] = {tuple(q_t.shape)} or "
                         f"[B, H] = {(batch, heads)}, got {tuple(g_t.shape)}")
    expected = (batch, heads, k_dim, v_t.shape[-1])
    if tuple(state.shape) != expected:
        raise ValueError(f"gla_step: state must have shape [B, H, K, V] = {expected}, "
                         f"got {tuple(state.shape)}")
    if scale is None:
        scale = k_dim ** -0.5
    return ref.gla_step(q_t, k_t, v_t, g_t, state, scale=scale)
