"""The fused MoE expert op: ``moe_ffn(x, expert_ids, weights, w_gate, w_up, w_down)``.

For tokens ``x [N, H]`` each routed to ``k`` experts (``expert_ids [N, k]`` int, ``-1`` = not routed, e.g. dropped
by capacity) with combine weights ``weights [N, k]``::

    out[t] = sum_j weights[t, j] * (silu(x_t W_gate[e]) * (x_t W_up[e])) W_down[e],   e = expert_ids[t, j]

GEMMs accumulate in float32, ``silu(.) * (.)`` is cast to ``x.dtype`` before the down projection, the combine is
float32; the result is returned in ``x.dtype``. Routing itself (top-k, capacity) is the caller's business
(``sqattn.moe``); this op is the expert compute after routing.

Implementations (``impl``, resolved by ``kernels.dispatch.resolve_impl``):

* ``"ref"``: sort by expert + ``jax.lax.ragged_dot`` + unsort (``ref.moe_ffn_ref``); what ``"auto"`` runs on CPU.
* ``"chunked"``: the kernel's padded tile layout computed in jnp (``ref.moe_ffn_tiled``).
* ``"pallas"`` / ``"interpret"``: the Pallas kernels (``pallas.moe_ffn_fwd``: gather + gate/up GEMM + activation,
  then down GEMM + weighted combine, every dimension tiled) compiled, or run by the interpreter; their backward
  is ``jax.vjp`` of ``ref.moe_ffn_tiled`` inside a ``jax.custom_vjp``. ``"auto"`` picks them on GPU/TPU where
  their tiles fit (``pallas.footprints``: independent of the token count, H and I, so at every shape with the
  default tiles, ``moe_large`` included).

Example (runs on CPU)::

    import jax, jax.numpy as jnp
    from kernels.moe import moe_ffn

    N, H, I, E, k = 37, 32, 48, 4, 2
    r = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(r[0], (N, H))
    ids = jax.random.randint(r[1], (N, k), 0, E).at[:, 1].set(-1)     # second choice dropped everywhere
    w = jax.nn.softmax(jax.random.normal(r[2], (N, k)), axis=-1)
    wg, wu = jax.random.normal(r[3], (2, E, H, I)) / H ** 0.5
    wd = jax.random.normal(r[4], (E, I, H)) / I ** 0.5
    out = moe_ffn(x, ids, w, wg, wu, wd, impl="interpret")            # [N, H] float32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels.moe import pallas, ref

__all__ = ["kernel_unsupported", "moe_ffn"]


def _validate(x, expert_ids, weights, w_gate, w_up, w_down) -> None:
    if x.ndim != 2:
        raise ValueError(f"moe_ffn: x must have shape [N, H], got {tuple(x.shape)}")
    n, h = x.shape
    if expert_ids.ndim != 2 or expert_ids.shape[0] != n:
        raise ValueError(f"moe_ffn: expert_ids must have shape [N, k] = ({n}, k), got {tuple(expert_ids.shape)}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"moe_ffn: expert_ids must be an integer dtype, got {expert_ids.dtype}")
    if tuple(weights.shape) != tuple(expert_ids.shape):
        raise ValueError(f"moe_ffn: weights must have shape [N, k] = {tuple(expert_ids.shape)}, "
                         f"got {tuple(weights.shape)}")
    if w_gate.ndim != 3 or w_gate.shape[1] != h:
        raise ValueError(f"moe_ffn: w_gate must have shape [E, H, I] with H={h}, got {tuple(w_gate.shape)}")
    e, _, i = w_gate.shape
    if tuple(w_up.shape) != (e, h, i):
        raise ValueError(f"moe_ffn: w_up must have shape [E, H, I] = {(e, h, i)}, got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (e, i, h):
        raise ValueError(f"moe_ffn: w_down must have shape [E, I, H] = {(e, i, h)}, got {tuple(w_down.shape)}")
    for name, arr in (("x", x), ("weights", weights), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"moe_ffn: {name} must be a floating dtype, got {arr.dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _moe_pallas(x_pad, layout, w_gate, w_up, w_down, block_sizes, interpret, platform):
    return pallas.moe_ffn_fwd(x_pad, layout, w_gate, w_up, w_down, block_sizes=block_sizes,
                              interpret=interpret, platform=platform)


def _moe_pallas_fwd(x_pad, layout, w_gate, w_up, w_down, block_sizes, interpret, platform):
    out = _moe_pallas(x_pad, layout, w_gate, w_up, w_down, block_sizes, interpret, platform)
    return out, (x_pad, layout, w_gate, w_up, w_down)


def _moe_pallas_bwd(block_sizes, interpret, platform, residuals, d_out):
    del block_sizes, interpret, platform
    x_pad, layout, w_gate, w_up, w_down = residuals

    def tiled(x_pad, weights, w_gate, w_up, w_down):
        return ref.moe_ffn_tiled(x_pad, layout._replace(weights=weights), w_gate, w_up, w_down)

    _, vjp = jax.vjp(tiled, x_pad, layout.weights, w_gate, w_up, w_down)
    dx, dw, dwg, dwu, dwd = vjp(d_out)
    d_layout = ref.TileLayout(None, dw, None, None)  # integer fields: no cotangent
    return dx, d_layout, dwg, dwu, dwd


_moe_pallas.defvjp(_moe_pallas_fwd, _moe_pallas_bwd)


def kernel_unsupported(d_model: int, hidden: int, dtype, *, block_sizes: pallas.BlockSizes | None = None,
                       target: str | None = None) -> str | None:
    """Why ``moe_ffn(impl="auto")`` would not run the compiled kernels for ``[., d_model]`` tokens and experts of
    width ``hidden`` on the target (``kernels.dispatch.target_platform``), or ``None`` when it would: no kernel
    for the platform, or tiles that do not fit it (``pallas.footprints``)."""
    platform = dispatch.target_platform(target)
    if platform not in ("gpu", "tpu"):
        return f"no compiled MoE kernel for {platform!r}"
    bs = block_sizes or pallas.BlockSizes.get_default(hidden, platform, d_model=d_model)
    return next((fp.reason() for fp in pallas.footprints(platform, dtype, bs) if fp.reason()), None)


def moe_ffn(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
            w_down: jax.Array, *, impl: str = "auto", block_sizes: pallas.BlockSizes | None = None,
            target: str | None = None) -> jax.Array:
    """Routed gated-MLP experts with a weighted combine.

    Args:
      x: ``[N, H]`` tokens.
      expert_ids: ``[N, k]`` int expert per assignment; ``-1`` skips the assignment.
      weights: ``[N, k]`` combine weights (cast to float32).
      w_gate: ``[E, H, I]``.
      w_up: ``[E, H, I]``.
      w_down: ``[E, I, H]``.
      impl: ``"auto"``, ``"ref"``, ``"chunked"``, ``"pallas"`` or ``"interpret"``.
      block_sizes: Pallas tiles; defaults to ``pallas.BlockSizes.get_default(I, platform, d_model=H)``.
      target: platform to compile for (``"cpu"``, ``"gpu"``, ``"tpu"``); default: the context's
        (``kernels.dispatch.target_platform``). With
        ``impl="interpret"`` it selects which kernel variant the interpreter runs (GPU's by default).

    Returns:
      ``[N, H]`` in ``x.dtype``.

    Raises:
      ValueError: on a shape, dtype or argument that does not fit; the message names it.
    """
    _validate(x, expert_ids, weights, w_gate, w_up, w_down)
    num_experts, _, hidden = w_gate.shape

    def unsupported(platform):
        return kernel_unsupported(x.shape[1], hidden, x.dtype, block_sizes=block_sizes, target=platform)

    resolved = dispatch.resolve_impl(impl, op="moe_ffn", cpu_default="ref", target=target, unsupported=unsupported)
    ids = expert_ids.astype(jnp.int32)
    if resolved == "ref":
        return ref.moe_ffn_ref(x, ids, weights, w_gate, w_up, w_down).astype(x.dtype)
    platform = dispatch.target_platform(target)
    if platform not in ("gpu", "tpu"):
        platform = "gpu"  # the interpreter runs the GPU variant unless asked for the TPU one
    if block_sizes is None:
        block_sizes = pallas.BlockSizes.get_default(hidden, platform if resolved == "pallas" else "cpu",
                                                    d_model=x.shape[1])
    if min(block_sizes.block_m, block_sizes.block_i, block_sizes.block_h) < 1:
        raise ValueError(f"moe_ffn: block sizes must be positive, got {block_sizes}")

    def run(x, ids, weights, w_gate, w_up, w_down):
        layout = ref.tile_layout(ids, weights, num_experts, block_sizes.block_m)
        x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)  # [N+1, H]
        if resolved == "chunked":
            out = ref.moe_ffn_tiled(x_pad, layout, w_gate, w_up, w_down)
        else:
            out = _moe_pallas(x_pad, layout, w_gate, w_up, w_down, block_sizes, resolved == "interpret",
                              platform)
        return out[:-1].astype(x.dtype)

    # Under a mesh: tokens split over the batch axes, experts replicated (kernels.dispatch.shard_op).
    return dispatch.shard_op(run, (x, ids, weights, w_gate, w_up, w_down),
                             [(0, None), (0, None), (0, None), None, None, None], [(0, None)])
