"""Core attention disaggregation as a ``jax.shard_map`` program over the data-parallel axes.

Per device (in-place attention servers: every device is a worker for its own tokens and a server for the
CA-tasks the plan assigns to it), for each nano-batch ``i`` of the plan (``sqattn.parallel.cad.plan``):

1. gather the Q rows it sends to each server, and the K/V rows each server needs, into padded
   ``[n, cap, ...]`` buffers with their (doc, pos) metadata (padding: doc -1 / -2, masked everywhere);
2. ``all_to_all`` over the balancing axes (the self slot stays empty: kept rows never leave the device);
3. one varlen causal attention call over the fused batch: kept local queries + received queries against
   all local keys + received keys (``sqattn.parallel.cad.attention``);
4. ``all_to_all`` the outputs of received queries back and scatter every output into its original row.

Ping-pong: nano-batch ``i+1``'s exchange is issued before nano-batch ``i``'s attention, and ``i``'s return
before ``i+1``'s attention, so an async collective scheduler (GPU/TPU) can overlap one's communication
with the other's compute. On simulated CPU devices there is no overlap; only counts are meaningful there.

Backward: JAX transposes the gathers and ``all_to_all``s, so dO travels to the server through the same
exchange and dQ/dK/dV return (dK/dV of a key row sent to several servers are summed at its owner). By
default servers keep their received Q/K/V, O and LSE as residuals; ``resend_in_backward`` rematerialises
each nano-batch instead (stateless servers: Q/K/V are re-sent and the forward recomputed in the backward).

Two entry points:
* ``cad_attention(q, k, v, doc, pos, plan_arrays, mesh=..., axes=...)``: a plan made on the host
  (``plan_tokens``) passed as sharded int32 inputs; capacities bucketed from the plan.
* ``core_attention(q, k, v, segment_ids, config)``: what the attention mixer calls under ``cad=True``. It finds
  the mesh from ``activation_sharding``, derives (doc, pos) from ``segment_ids`` in-graph, and plans on the
  host through a ``pure_callback`` (one plan per batch, cached across layers and devices) with fixed
  capacities from ``CADConfig.capacity``, so shapes are static at trace time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sqattn.parallel import sharding
from sqattn.parallel.cad.attention import count_pairs, varlen_attention
from sqattn.parallel.cad.cost import CostModel
from sqattn.parallel.cad.plan import plan_tokens


# ------------------------------------------------------------------------------------------------ per device
def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take(x, jnp.maximum(idx, 0), axis=0)


def _exchange(q, k, v, doc, pos, send_q, send_kv, axes):
    """Sends this nano-batch's Q rows and K/V rows to their servers; returns what this device receives."""
    a2a = functools.partial(jax.lax.all_to_all, axis_name=axes, split_axis=0, concat_axis=0, tiled=True)
    qm = jnp.stack([jnp.where(send_q >= 0, _take(doc, send_q), -1), _take(pos, send_q)], -1)    # [n,cq,2]
    km = jnp.stack([jnp.where(send_kv >= 0, _take(doc, send_kv), -2), _take(pos, send_kv)], -1)  # [n,ckv,2]
    return (a2a(_take(q, send_q)), a2a(qm), a2a(_take(k, send_kv)), a2a(_take(v, send_kv)), a2a(km))


def _attend(q, k, v, doc, pos, keep, send_q, recv, axes, q_block, count):
    """Attention over kept + received queries; returns (this device's outputs [L,h,d], pairs counted)."""
    rq, rqm, rk, rv, rkm = recv
    n, cq, h, d = rq.shape
    length = q.shape[0]
    qq = jnp.concatenate([_take(q, keep), rq.reshape(n * cq, h, d)])                 # [ck + n*cq, h, d]
    qd = jnp.concatenate([jnp.where(keep >= 0, _take(doc, keep), -1), rqm[..., 0].reshape(-1)])
    qp = jnp.concatenate([_take(pos, keep), rqm[..., 1].reshape(-1)])
    kk = jnp.concatenate([k, rk.reshape(-1, *k.shape[1:])])                         # [L + n*ckv, g, d]
    vv = jnp.concatenate([v, rv.reshape(-1, *v.shape[1:])])
    kd = jnp.concatenate([jnp.where(doc >= 0, doc, -2), rkm[..., 0].reshape(-1)])
    kp = jnp.concatenate([pos, rkm[..., 1].reshape(-1)])
    o, _ = varlen_attention(qq, kk, vv, qd, qp, kd, kp, q_block=q_block)
    ck = keep.shape[0]
    back = jax.lax.all_to_all(o[ck:].reshape(n, cq, h, d), axes, 0, 0, tiled=True)   # [n,cq,h,d] my rows
    out = jnp.zeros((length, h, d), q.dtype)
    out = out.at[jnp.where(keep >= 0, keep, length)].add(o[:ck], mode="drop")
    out = out.at[jnp.where(send_q >= 0, send_q, length).reshape(-1)].add(back.reshape(-1, h, d), mode="drop")
    pairs = count_pairs(qd, qp, kd, kp, q_block=q_block) if count else jnp.zeros((), jnp.int32)
    return out, pairs


def device_program(q, k, v, doc, pos, keep, send_q, send_kv, *, axes, q_block: int = 512,
                   count: bool = False, resend_in_backward: bool = False):
    """The per-device CAD program (call inside ``shard_map`` over ``axes``).

    Args:
      q: [L, h, d] local queries.  k, v: [L, g, d].  doc, pos: [L] int32 (doc < 0: padding token).
      keep: [N, ck], send_q: [N, n, cq], send_kv: [N, n, ckv] int32 plan slices of this device.
      axes: mesh axis name(s) the all-to-all spans (the balancing domain).
      q_block: query rows per attention block.  count: also count unmasked pairs per nano-batch.
      resend_in_backward: rematerialise each nano-batch (re-send Q/K/V in the backward).

    Returns:
      ``(o [L, h, d], pairs [N] int32)``.
    """
    nano = keep.shape[0]

    def one(i, recv):
        return _attend(q, k, v, doc, pos, keep[i], send_q[i], recv, axes, q_block, count)

    out = jnp.zeros(q.shape, q.dtype)
    pairs = []
    if resend_in_backward:
        def full(q_, k_, v_, i):
            recv = _exchange(q_, k_, v_, doc, pos, send_q[i], send_kv[i], axes)
            return _attend(q_, k_, v_, doc, pos, keep[i], send_q[i], recv, axes, q_block, count)
        for i in range(nano):
            o, c = jax.checkpoint(full, static_argnums=(3,))(q, k, v, i)
            out, pairs = out + o, pairs + [c]
        return out, jnp.stack(pairs)
    recv = [_exchange(q, k, v, doc, pos, send_q[0], send_kv[0], axes)]
    for i in range(nano):
        if i + 1 < nano:                                   # ping-pong: next exchange before this compute
            recv.append(_exchange(q, k, v, doc, pos, send_q[i + 1], send_kv[i + 1], axes))
        o, c = one(i, recv[i])
        out, pairs = out + o, pairs + [c]
    return out, jnp.stack(pairs)


def _axes_tuple(axes: str | Sequence[str]) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


# ------------------------------------------------------------------------------------------------ host plans
def cad_attention(q: jax.Array, k: jax.Array, v: jax.Array, doc: jax.Array, pos: jax.Array,
                  plan_arrays: Sequence[jax.Array], *, mesh: jax.sharding.Mesh, axes: str | Sequence[str],
                  head_axis: str | None = None, q_block: int = 512, count: bool = False,
                  resend_in_backward: bool = False):
    """CAD core attention of ``n`` devices' packed tokens with a host-made plan.

    Args:
      q: [n, L, h, d], k/v: [n, L, g, d]: device ``i``'s tokens are row ``i`` (dim 0 sharded over ``axes``).
      doc, pos: [n, L] int32 global document id (< 0: padding) and absolute position within the document.
      plan_arrays: ``(keep [n,N,ck], send_q [n,N,n,cq], send_kv [n,N,n,ckv])`` from ``ExecPlan.arrays()``.
      mesh: the device mesh.  axes: mesh axis name(s) whose devices exchange tasks (product = n).
      head_axis: optional mesh axis the heads are sharded over (each head shard runs its own exchange).
      q_block, count, resend_in_backward: see ``device_program``.

    Returns:
      ``(o [n, L, h, d], pairs [n, N] int32)``; pairs are zeros unless ``count``.
    """
    axes = _axes_tuple(axes)
    n = math.prod(mesh.shape[a] for a in axes)
    if q.shape[0] != n or plan_arrays[0].shape[0] != n or plan_arrays[1].shape[2] != n:
        raise ValueError(f"cad_attention: {n} devices on axes {axes}, but q {q.shape} and plan "
                         f"{[a.shape for a in plan_arrays]}")
    row = P(axes)
    heads = P(axes, None, head_axis, None)

    def body(q, k, v, doc, pos, keep, send_q, send_kv):
        o, c = device_program(q[0], k[0], v[0], doc[0], pos[0], keep[0], send_q[0], send_kv[0], axes=axes,
                              q_block=q_block, count=count, resend_in_backward=resend_in_backward)
        return o[None], c[None]

    fn = jax.shard_map(body, mesh=mesh, in_specs=(heads, heads, heads, row, row, row, row, row),
                       out_specs=(heads, row))
    return fn(q, k, v, doc, pos, *plan_arrays)


# ------------------------------------------------------------------------------------------------ mixer path
@dataclasses.dataclass(frozen=True)
class CADConfig:
    """Settings of the in-graph CAD path (``Attention(cad=True | {...})``).

    Attributes:
      eps: scheduler tolerance.  nano_batches: ping-pong nano-batches per device.
      min_rows: smallest split-off task in query rows.  two_sided: scheduler phase 2.
      capacity: all-to-all slots per (sender, server) pair as a fraction of the worst case (query rows: one
        nano-batch; key rows: all local tokens). 1.0 never limits the scheduler; smaller values bound the
        server's buffers (memory ~ capacity * n) and may leave some imbalance.
      q_block: query rows per attention block.  resend_in_backward: stateless servers.
    """
    eps: float = 0.1
    nano_batches: int = 2
    min_rows: int = 1
    two_sided: bool = True
    capacity: float = 1.0
    q_block: int = 512
    resend_in_backward: bool = False

    @classmethod
    def from_arg(cls, arg: bool | Mapping[str, Any] | "CADConfig" | None) -> "CADConfig | None":
        """``False``/``None`` -> None (off), ``True`` -> defaults, a mapping -> those fields."""
        if isinstance(arg, CADConfig):
            return arg
        if arg is None or arg is False:
            return None
        if arg is True:
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(arg) - fields)
        if unknown:
            raise ValueError(f"cad: unknown option(s) {unknown}; known: {sorted(fields)}")
        return cls(**dict(arg))


def doc_pos_from_segments(segment_ids: jax.Array, row_offset: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Global document ids and within-document positions [b, t] int32 of packed rows.

    A document is (row, segment id): tokens of one row with equal ids, wherever they are in the row, exactly
    the ``attention_mask(q_seg=..)`` semantics. ``pos`` is the rank of a token among its document's tokens
    in row order, so "same doc and k_pos <= q_pos" equals "same segment and k index <= q index".
    """
    b, t = segment_ids.shape
    order = jnp.argsort(segment_ids, axis=1, stable=True)                             # [b,t]
    ss = jnp.take_along_axis(segment_ids, order, axis=1)
    idx = jnp.arange(t, dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones((b, 1), bool), ss[:, 1:] != ss[:, :-1]], axis=1)
    gstart = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)                         # group start (sorted)
    rows = (row_offset + jnp.arange(b, dtype=jnp.int32))[:, None]
    inv = jnp.argsort(order, axis=1)
    doc = jnp.take_along_axis(rows * t + gstart, inv, axis=1)
    pos = jnp.take_along_axis(idx - gstart, inv, axis=1)
    return doc.astype(jnp.int32), pos.astype(jnp.int32)


_PLAN_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_PLAN_LOCK = threading.Lock()
_PLAN_CACHE_SIZE = 8


def _host_plan(doc_all: np.ndarray, pos_all: np.ndarray, me: np.ndarray, *, settings: tuple):
    """pure_callback body: the (cached) plan of this batch, sliced for device ``me``."""
    nano, caps, eps, min_rows, two_sided, cost = settings
    doc_all, pos_all = np.asarray(doc_all), np.asarray(pos_all)
    digest = hashlib.blake2b(doc_all.tobytes() + pos_all.tobytes(), digest_size=16).digest()
    key = (settings, doc_all.shape, digest)
    with _PLAN_LOCK:
        plan = _PLAN_CACHE.get(key)
        if plan is None:
            plan = plan_tokens(doc_all, pos_all, nano_batches=nano, eps=eps, cost=cost, min_rows=min_rows,
                               two_sided=two_sided, caps=caps)
            _PLAN_CACHE[key] = plan
            while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
                _PLAN_CACHE.popitem(last=False)
        else:
            _PLAN_CACHE.move_to_end(key)
    d = int(me)
    return plan.keep[d], plan.send_q[d], plan.send_kv[d]


def graph_plan_caps(length: int, config: CADConfig) -> tuple[int, tuple[int, int, int]]:
    """(nano-batches, (cap_keep, cap_q, cap_kv)) of the in-graph plan for ``length`` local tokens."""
    nano = min(config.nano_batches, length)
    cap_keep = -(-length // nano)
    return nano, (cap_keep, max(1, math.ceil(config.capacity * cap_keep)),
                  max(1, math.ceil(config.capacity * length)))


def _active_sharding():
    return sharding.active_sharding()


def core_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                   config: CADConfig) -> jax.Array | None:
    """CAD core attention for the attention mixer, or None when no data-parallel mesh is active.

    Args:
      q: [B, T, h, d] (RoPE applied), k/v: [B, T, g, d].  segment_ids: [B, T] or None (one document per row).
      config: ``CADConfig``.

    Returns:
      [B, T, h, d] equal to ``dot_product_attention`` with the causal same-segment mask, or None when no
      ``activation_sharding`` mesh shards the batch over an axis of size > 1 (the caller then runs the plain
      attention).
    """
    ctx = _active_sharding()
    if ctx is None:
        return None
    mesh, rules = ctx
    b, t, h, d = q.shape
    g = k.shape[2]
    entry = sharding.spec_for(("act_batch",), (b,), mesh, rules)[0]
    if entry is None:
        return None
    axes = _axes_tuple(entry)
    n = math.prod(mesh.shape[a] for a in axes)
    head_entry = sharding.spec_for(("act_heads",), (h,), mesh, rules)[0]
    head_axis = head_entry if isinstance(head_entry, str) and g % mesh.shape[head_entry] == 0 else None
    length = (b // n) * t
    nano, caps = graph_plan_caps(length, config)
    cost = CostModel.from_dims(h, g, d, jnp.dtype(q.dtype).itemsize)
    settings = (nano, caps, config.eps, config.min_rows, config.two_sided, cost)
    shapes = (jax.ShapeDtypeStruct((nano, caps[0]), jnp.int32),
              jax.ShapeDtypeStruct((nano, n, caps[1]), jnp.int32),
              jax.ShapeDtypeStruct((nano, n, caps[2]), jnp.int32))
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def body(q, k, v, seg):
        bl = q.shape[0]
        me = jax.lax.axis_index(axes)
        doc, pos = doc_pos_from_segments(seg, me * bl)
        doc, pos = doc.reshape(-1), pos.reshape(-1)                                   # [L]
        doc_all = jax.lax.all_gather(doc, axes)                                        # [n, L]
        pos_all = jax.lax.all_gather(pos, axes)
        keep, send_q, send_kv = jax.pure_callback(
            functools.partial(_host_plan, settings=settings), shapes, doc_all, pos_all, me,
            vmap_method="sequential")
        o, _ = device_program(q.reshape(length, *q.shape[2:]), k.reshape(length, *k.shape[2:]),
                              v.reshape(length, *v.shape[2:]), doc, pos, keep, send_q, send_kv, axes=axes,
                              q_block=config.q_block, resend_in_backward=config.resend_in_backward)
        return o.reshape(q.shape)

    heads = P(axes, None, head_axis, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(heads, heads, heads, P(axes, None)),
                         out_specs=heads)(q, k, v, seg)
