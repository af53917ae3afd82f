"""Expert parallelism: a ``jax.shard_map`` program over the ``expert`` mesh axis (papers/flashmoe.md, EP).

Experts are split over the ``expert`` axis (``E_loc = E / D`` per device); capacity groups are split over the
batch axes *and* the expert axis, so every device routes its own groups, sends each routed row to the device that
owns its expert, runs its local experts on what it receives, and sends the results back for the weighted
combine. Because a capacity group never straddles devices, the drop rule (``sqattn.moe.router``) gives exactly
the single-device answer: the program's output, ``keep`` and gradients equal ``dispatch.dense_dispatch``.

Two exchanges, chosen in one place (``resolve_exchange``):

* ``"padded"`` -- capacity-shaped ``all_to_all``: every device sends ``[E, g*C, H]`` (``g`` local groups,
  ``C`` slots each; empty slots are zeros) and receives ``[D, E_loc, g*C, H]``, runs a batched gated MLP per
  local expert, and returns the same shape. Works everywhere (XLA:CPU has no ``ragged_all_to_all``), moves
  ``E*g*C`` rows whatever the routing.
* ``"ragged"`` -- exact-count ``jax.lax.ragged_all_to_all`` (FlashMoE's payload efficiency): rows are sorted by
  expert (``dispatch.sorted_layout``), per-expert counts are all-gathered (``[D, E]`` ints) to compute every
  send/receive offset, each expert's rows are sent as one slice straight into the owner's buffer grouped by
  local expert (no re-sort on arrival), a grouped matmul runs on them, and the reverse exchange puts the results
  back in the sender's sorted order. Only kept rows move. The receive buffer is still worst-case sized
  (``D * E_loc * g * C`` rows), as in MaxText.
* ``"ragged_emulated"`` -- the ragged program with ``ragged_all_to_all`` replaced by an implementation of its
  semantics on a padded ``all_to_all`` (``ragged_all_to_all_emulated``): how CPU tests check the offset logic.

``"auto"`` is ``"ragged"`` on GPU/TPU and ``"padded"`` on CPU. The return trip carries float32 rows (the
single-device paths combine float32 expert outputs; a bf16 return would add a rounding they do not have).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import dispatch as kernel_dispatch
from sqattn.moe import dispatch
from sqattn.moe.dispatch import ExpertParams
from sqattn.parallel import sharding

EXCHANGES = ("auto", "padded", "ragged", "ragged_emulated")


def resolve_exchange(exchange: str, target: str | None = None) -> str:
    """The one place that picks the all-to-all: exact-count where the backend implements it."""
    if exchange not in EXCHANGES:
        raise ValueError(f"expert_parallel: unknown exchange {exchange!r}; expected one of {EXCHANGES}")
    platform = kernel_dispatch.target_platform(target)
    if exchange == "auto":
        return "ragged" if platform in ("gpu", "tpu") else "padded"
    if exchange == "ragged" and platform not in ("gpu", "tpu"):
        raise ValueError(f"expert_parallel: jax.lax.ragged_all_to_all is not implemented on {platform!r}; use "
                         f"exchange='padded' (or 'ragged_emulated' to run the ragged program on CPU)")
    return exchange


def active_mesh():
    """``(mesh, rules)`` of the enclosing ``sharding.activation_sharding`` context, or ``(None, None)``."""
    ctx = sharding.active_sharding()
    return ctx if ctx is not None else (None, None)


def token_axes(mesh, rules: dict | None, expert_axis: str = "expert") -> tuple[str, ...]:
    """Mesh axes that split capacity groups: the rules' ``act_batch`` axes present in ``mesh``, then ``expert``."""
    batch = (rules or {}).get("act_batch", ("data", "fsdp"))
    batch = (batch,) if isinstance(batch, str) else tuple(batch or ())
    return tuple(a for a in batch if a in mesh.shape and a != expert_axis) + (expert_axis,)


# ----------------------------------------------------------------------------------------------- exchanges
def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name: str, max_rows: int):
    """``jax.lax.ragged_all_to_all`` semantics on a padded ``all_to_all`` (each slice padded to ``max_rows``).

    Slice ``i`` (``operand[input_offsets[i]:][:send_sizes[i]]``) goes to device ``i // (K / D)`` and is written
    there at the ``output_offsets[i]`` this sender chose; the rest of ``output`` is kept.
    """
    k = input_offsets.shape[0]
    rows = jnp.arange(max_rows, dtype=jnp.int32)
    src = input_offsets[:, None] + rows  # [K, R]
    chunks = operand.at[src].get(mode="fill", fill_value=0)  # [K, R, ...]
    valid = (rows[None] < send_sizes[:, None]).reshape(k, max_rows, *([1] * (operand.ndim - 1)))
    chunks = jnp.where(valid, chunks, 0)
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [K, R, ...], slice s*spd+q from s
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [K]
    dest = jnp.where(rows[None] < recv_sizes[:, None], offsets[:, None] + rows, output.shape[0])  # [K, R]
    return output.at[dest.reshape(-1)].set(recv.reshape(k * max_rows, *operand.shape[1:]), mode="drop")


def _padded_body(x, expert_ids, weights, params: ExpertParams, *, capacity: int, axis: str):
    """Per device: ``x [g, S, H]``, routing ``[g, S, k]``, local experts ``[E_loc, ...]``."""
    g, s, k = expert_ids.shape
    h = x.shape[-1]
    d = jax.lax.axis_size(axis)
    e_loc = params.w_gate.shape[0]
    e = d * e_loc
    lay = dispatch.sorted_layout(expert_ids, e, capacity)
    a = g * s * k
    token = jnp.arange(a, dtype=jnp.int32) // k
    ids = expert_ids.reshape(a)
    slot = jnp.where(lay.keep, (token // s) * capacity + lay.rank, g * capacity)  # [A], dropped: out of range
    send = jnp.zeros((e, g * capacity, h), x.dtype).at[ids, slot].set(x.reshape(g * s, h)[token], mode="drop")
    recv = jax.lax.all_to_all(send.reshape(d, e_loc, g * capacity, h), axis, 0, 0)  # [D_src, E_loc, gC, H]
    rows = jnp.swapaxes(recv, 0, 1).reshape(e_loc, d * g * capacity, h)  # [E_loc, D*gC, H]
    y = dispatch.expert_ffn(rows, params)  # [E_loc, D*gC, H] float32
    y = jnp.swapaxes(y.reshape(e_loc, d, g * capacity, h), 0, 1)  # [D_src, E_loc, gC, H]
    back = jax.lax.all_to_all(y, axis, 0, 0).reshape(e, g * capacity, h)  # [E, gC, H] my rows' results
    y_assign = back.at[ids, slot].get(mode="fill", fill_value=0.0)  # [A, H]
    w = jnp.where(lay.keep, weights.reshape(a).astype(jnp.float32), 0.0)
    out = jnp.einsum("nk,nkh->nh", w.reshape(g * s, k), y_assign.reshape(g * s, k, h))
    return out.reshape(g, s, h), lay.keep.reshape(g, s, k)


def _ragged_offsets(counts, axis: str, e_loc: int):
    """Offsets of both exchanges from everyone's kept-row counts ``counts [D, E]`` (``cnt[s, e]``).

    The owner's buffer is grouped by local expert, sources in order inside each group.
    """
    d = counts.shape[0]
    me = jax.lax.axis_index(axis)
    cnt = counts.reshape(d, d, e_loc)  # [src, owner, j]
    per_owner = jnp.sum(cnt, axis=0)  # [owner, j] rows each owner gets per local expert
    base = jnp.cumsum(per_owner, axis=1) - per_owner  # [owner, j] start of group j in the owner's buffer
    before = jnp.cumsum(cnt, axis=0) - cnt  # [src, owner, j] rows of earlier sources in that group
    in_off_all = jnp.cumsum(counts, axis=1) - counts  # [src, E] start of expert e in src's sorted rows
    fwd_out_off = (base + before[me]).reshape(d * e_loc)  # my slice for expert e=(owner, j)
    fwd_recv = cnt[:, me, :].reshape(d * e_loc)  # slice (src, j) I receive
    bwd_in_off = (base[me][None, :] + before[:, me, :]).reshape(d * e_loc)  # (src, j) in my buffer
    bwd_out_off = in_off_all.reshape(d, d, e_loc)[:, me, :].reshape(d * e_loc)
    return fwd_out_off, fwd_recv, bwd_in_off, bwd_out_off, per_owner[me]


def _ragged_body(x, expert_ids, weights, params: ExpertParams, *, capacity: int, axis: str, emulate: bool,
                 gmm: str, block_m: int, target: str | None):
    """Per device: sort kept rows by expert, one exact-size slice per expert to its owner (landing grouped by
    local expert), grouped matmul there, the reverse exchange back into the sorted order, unsort, combine."""
    g, s, k = expert_ids.shape
    h = x.shape[-1]
    d = jax.lax.axis_size(axis)
    e_loc = params.w_gate.shape[0]
    a = g * s * k
    lay = dispatch.sorted_layout(expert_ids, d * e_loc, capacity)
    xs = x.reshape(g * s, h)[lay.perm // k]  # [A, H] kept rows first, by expert
    sizes = lay.group_sizes  # [E]
    in_off = jnp.cumsum(sizes) - sizes
    counts = jax.lax.all_gather(sizes, axis)  # [D, E]
    fwd_out_off, fwd_recv, bwd_in_off, bwd_out_off, local_sizes = _ragged_offsets(counts, axis, e_loc)
    slice_rows = g * capacity  # most rows one source sends to one expert
    if emulate:
        a2a = functools.partial(ragged_all_to_all_emulated, axis_name=axis, max_rows=slice_rows)
    else:
        a2a = functools.partial(jax.lax.ragged_all_to_all, axis_name=axis)
    recv = a2a(xs, jnp.zeros((d * e_loc * slice_rows, h), x.dtype), in_off, sizes, fwd_out_off, fwd_recv)
    ys = dispatch.grouped_ffn(recv, local_sizes, params, gmm=gmm, block_m=block_m, target=target)  # f32
    back = a2a(ys, jnp.zeros((a, h), jnp.float32), bwd_in_off, fwd_recv, bwd_out_off, sizes)  # [A, H]
    y = back[lay.inverse].reshape(g * s, k, h)
    w = jnp.where(lay.keep, weights.reshape(a).astype(jnp.float32), 0.0).reshape(g * s, k)
    out = jnp.einsum("nk,nkh->nh", w, y)
    return out.reshape(g, s, h), lay.keep.reshape(g, s, k)


def expert_parallel_dispatch(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, params: ExpertParams, *,
                             capacity: int, mesh: jax.sharding.Mesh, expert_axis: str = "expert",
                             batch_axes: Sequence[str] | None = None, exchange: str = "auto",
                             gmm: str = "auto", block_m: int = 128) -> tuple[jax.Array, jax.Array]:
    """Dispatch strategy (``dispatch`` module signature) run as a ``shard_map`` over ``mesh``.

    Args:
      x: ``[G, S, H]`` tokens in capacity groups; ``G`` must divide over ``batch_axes x expert_axis``.
      expert_ids: ``[G, S, k]`` routing.
      weights: ``[G, S, k]`` combine weights.
      params: expert weights with ``E`` divisible by the expert axis size.
      capacity: slots per (group, expert).
      mesh: the device mesh.
      expert_axis: mesh axis that holds the experts.
      batch_axes: further mesh axes that split the groups (default ``("data", "fsdp")`` where present).
      exchange: ``"auto"``, ``"padded"``, ``"ragged"`` or ``"ragged_emulated"`` (``resolve_exchange``).
      gmm: grouped matmul of the ragged program (``dispatch.resolve_gmm``).
      block_m: tile height of the tiled grouped matmul.

    Returns:
      ``(out [G, S, H] float32, keep [G, S, k] bool)``.
    """
    if expert_axis not in mesh.shape:
        raise ValueError(f"expert_parallel: mesh {dict(mesh.shape)} has no axis {expert_axis!r}")
    d = mesh.shape[expert_axis]
    num_experts = params.w_gate.shape[0]
    if num_experts % d:
        raise ValueError(f"expert_parallel: num_experts={num_experts} is not divisible by the {expert_axis!r} "
                         f"mesh axis ({d})")
    axes = token_axes(mesh, {"act_batch": tuple(batch_axes) if batch_axes is not None else ("data", "fsdp")},
                      expert_axis)
    shards = math.prod(mesh.shape[a] for a in axes)
    if x.shape[0] % shards:
        raise ValueError(f"expert_parallel: {x.shape[0]} capacity groups do not split over the mesh axes {axes} "
                         f"({shards} shards); use a batch (or moe group_size) that divides")
    target = mesh.devices.flat[0].platform
    resolved = resolve_exchange(exchange, target)
    if resolved == "padded":
        body = functools.partial(_padded_body, capacity=capacity, axis=expert_axis)
    else:
        body = functools.partial(_ragged_body, capacity=capacity, axis=expert_axis,
                                 emulate=resolved == "ragged_emulated", gmm=gmm, block_m=block_m, target=target)
    tok = P(axes, None, None)
    wspec = P(expert_axis, None, None)
    program = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, ExpertParams(wspec, wspec, wspec)),
                            out_specs=(tok, tok), check_vma=False)
    return program(x, expert_ids, weights, params)


# ----------------------------------------------------------------------------------------------- accounting
@functools.partial(jax.jit, static_argnums=1)
def _kept_rows(expert_ids, num_experts, capacity):
    return jnp.sum(dispatch.sorted_layout(expert_ids, num_experts, capacity).keep)


def exchange_rows(expert_ids: jax.Array, num_experts: int, capacity: int) -> dict:
    """Rows one dispatch exchange moves for the routing ``expert_ids [G, S, k]`` (all devices together).

    Returns ``{"padded": E*G*C (capacity-shaped all_to_all), "exact": kept rows (ragged, payload-efficient),
    "routed": G*S*k, "dropped": routed - exact}`` (send side of one direction; the return trip moves the same
    rows again). How the groups are spread over devices does not change these numbers.
    """
    g = expert_ids.shape[0]
    exact = int(_kept_rows(expert_ids, num_experts, jnp.int32(capacity)))
    routed = int(expert_ids.size)
    return {"padded": int(num_experts * g * capacity), "exact": exact, "routed": routed, "dropped": routed - exact}
