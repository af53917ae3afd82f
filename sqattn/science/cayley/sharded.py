"""The dense-engine BFS (:mod:`dense`) over a device mesh: states owned by rank modulo device count.

Device ``d`` of ``D`` owns the permutations whose Lehmer rank ``r`` has ``r % D == d``; its slice of the visited
array is ``claim_d[r // D]`` (``ceil(n!/D)`` int32), and its frontier holds only states it owns. One layer step,
inside ``shard_map`` over the mesh axis:

1. each device expands its next ``chunk`` frontier slots (``X * chunk`` candidates, packed keys and ranks);
2. candidates are bucketed by owner ``rank % D`` into a ``[D, S]`` send buffer (one-hot cumulative sum gives each
   candidate its slot; ``SENTINEL`` pads) and exchanged with one ``all_to_all`` -- device ``d`` receives the
   ``[D, S]`` candidates every device produced for it (cayleypy shards by hash modulo GPU the same way);
3. each device deduplicates what it received against its claim slice exactly as the one-device dense step does
   (fresh = unclaimed, claim with a scatter of ids, winners read their id back) and appends the winners to its
   next-layer buffer.

Only the per-device counts (and an overflow flag) go to the host. ``S`` (slots per destination) starts at twice
the even share ``X * chunk / D`` and doubles, redoing the chunk, if any bucket overflowed (the step does not donate
its inputs, so a redo starts from the same state). Layer sizes equal the one-device engine's for any ``D``; the
tests compare 8 simulated CPU devices with 1.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sqattn.science.cayley.bfs import GrowthResult, _check_sizes, bucket
from sqattn.science.cayley.dense import dense_applicable, rank_packed
from sqattn.science.cayley.encoding import SENTINEL, Encoding
from sqattn.science.cayley.groups import GraphDef

AXIS = "states"


def _local_step(claim, front, count, *, enc: Encoding, gens: tuple, slots: int, num_devices: int):
    """Per-device body (inside shard_map; local shapes): claim int32 ``[n!/D]``, front uint64 ``[F]``, count ``[1]``.

    Returns (claim, uint64 ``[D*S]`` new states first then ``SENTINEL``, their count ``[1]``, overflow ``[1]``).
    """
    num_local, chunk = claim.shape[0], front.shape[0]
    valid = jnp.tile(jnp.arange(chunk) < count[0], len(gens))                     # [X*F]
    cand = jnp.concatenate([enc.apply((front,), g)[0] for g in gens])             # [X*F]
    rank = rank_packed(cand, enc, None)                                           # [X*F] int32
    dest = jnp.where(valid, rank % num_devices, num_devices)                      # [X*F]; invalid -> none
    onehot = (dest[:, None] == jnp.arange(num_devices)[None, :]).astype(jnp.int32)  # [X*F, D]
    slot = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), jnp.minimum(dest, num_devices - 1)[:, None],
                               axis=1)[:, 0] - 1                                   # [X*F] slot in its bucket
    overflow = jnp.max(jnp.sum(onehot, axis=0)) > slots
    flat = jnp.where(valid & (slot < slots), dest * slots + slot, num_devices * slots)
    send = jnp.full((num_devices * slots,), SENTINEL, jnp.uint64).at[flat].set(cand, mode="drop")
    recv = jax.lax.all_to_all(send.reshape(num_devices, slots), AXIS, 0, 0, tiled=False).reshape(-1)  # [D*S]
    ok = recv != jnp.uint64(SENTINEL)
    local = rank_packed(recv, enc, None) // num_devices                           # [D*S] index in my slice
    fresh = ok & (claim[jnp.where(ok, local, 0)] < 0)
    ids = jnp.arange(recv.shape[0], dtype=jnp.int32)
    claim = claim.at[jnp.where(fresh, local, num_local)].set(ids, mode="drop")
    win = fresh & (claim[jnp.where(fresh, local, 0)] == ids)
    pos = jnp.cumsum(win.astype(jnp.int32)) - 1
    out = jnp.full(recv.shape, SENTINEL, jnp.uint64).at[jnp.where(win, pos, recv.shape[0])].set(recv, mode="drop")
    overflow = jax.lax.pmax(overflow.astype(jnp.int32), AXIS)
    return claim, out, (pos[-1] + 1)[None], overflow[None]


@functools.lru_cache(maxsize=None)
def _make_step(mesh: Mesh, enc: Encoding, gens: tuple, slots: int):
    """The jitted shard_map of :func:`_local_step` (one program per graph and ``slots``)."""
    body = functools.partial(_local_step, enc=enc, gens=gens, slots=slots, num_devices=mesh.shape[AXIS])
    spec = P(AXIS)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec,) * 4,
                                 check_vma=False))


@functools.lru_cache(maxsize=None)
def _make_take_append(mesh: Mesh, chunk: int):
    """Per-device ``buf[offset : offset + chunk]`` and ``buf[at_d : at_d + len(block)] = block`` (donated)."""
    spec = P(AXIS)

    def take(buf, offset):
        return jax.lax.dynamic_slice(buf, (offset,), (chunk,))

    def append(buf, block, at):
        return jax.lax.dynamic_update_slice(buf, block, (at[0],))

    take_fn = jax.jit(jax.shard_map(take, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False))
    append_fn = jax.jit(jax.shard_map(append, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                                      check_vma=False), donate_argnums=(0,))
    return take_fn, append_fn


def sharded_growth(graph: GraphDef, mesh: Mesh | None = None, *, max_layers: int | None = None,
                   chunk_size: int = 1 << 14, max_layer_size_to_store: int = 1000,
                   max_dense_states: int = math.factorial(11)) -> GrowthResult:
    """Growth of a Cayley graph of permutations over ``mesh`` (1-D, axis ``"states"``; default all devices).

    Args:
      graph: a Cayley graph the dense engine accepts (distinct symbols 0..n-1 in the start state, n <= 12).
      mesh: a 1-D mesh with axis name ``"states"``; default ``Mesh(jax.devices(), ("states",))``.
      chunk_size: frontier slots each device expands per step (a power of two).
      Others: as :func:`sqattn.science.cayley.dense.growth_dense`.

    Raises:
      ValueError: the graph is not supported by the dense engine, its start state is not ``0..n-1``, or the mesh
        lacks the ``"states"`` axis.
    """
    reason = dense_applicable(graph, max_dense_states)
    if reason:
        raise ValueError(f"sharded_growth cannot run {graph.name!r}: {reason}")
    if not np.array_equal(graph.central_state, np.arange(graph.n)):
        raise ValueError(f"sharded_growth needs the identity 0..{graph.n - 1} as start state (a Cayley graph's "
                         f"growth does not depend on it), got {graph.central_state.tolist()}")
    _check_sizes(chunk_size, 1)
    if mesh is None:
        mesh = Mesh(np.array(jax.devices()), (AXIS,))
    if AXIS not in mesh.shape or len(mesh.shape) != 1:
        raise ValueError(f"sharded_growth needs a 1-D mesh with axis {AXIS!r}, got axes {dict(mesh.shape)}")
    num_devices = mesh.shape[AXIS]
    enc = Encoding.for_state(graph.central_state, max_words=1)
    gens = tuple(tuple(int(v) for v in g) for g in graph.generators)
    num_x, total = len(gens), math.factorial(graph.n)
    per_device = -(-total // num_devices)
    sharding = NamedSharding(mesh, P(AXIS))
    start = time.perf_counter()
    shapes: set = set()

    def put(host):                                                                 # host [D * L] -> sharded
        return jax.device_put(host, sharding)

    with jax.enable_x64(True):
        first = enc.encode(graph.central_state[None])[0]
        rank0 = int(rank_packed(jnp.asarray(first), enc, None)[0])
        owner = rank0 % num_devices
        slots = min(num_x * chunk_size, 2 * -(-num_x * chunk_size // num_devices))
        cap = bucket(num_devices * slots * 2, chunk_size)                      # per device; grows only
        cur_host = np.full((num_devices, cap), SENTINEL, np.uint64)
        cur_host[owner, 0] = first[0]
        cur = put(cur_host.reshape(-1))
        counts = np.zeros(num_devices, np.int32)
        counts[owner] = 1
        claim_host = np.full((num_devices, per_device), -1, np.int32)
        claim_host[owner, rank0 // num_devices] = 0
        claim = put(claim_host.reshape(-1))
        spare = put(np.full(num_devices * cap, SENTINEL, np.uint64))
        take, append = _make_take_append(mesh, chunk_size)
        sizes, layers, seen_total, truncated = [1], {0: graph.central_state[None].copy()}, 1, False
        while True:
            if max_layers is not None and len(sizes) > max_layers:
                truncated = True
                break
            rounds = -(-int(counts.max()) // chunk_size)                           # chunks per device
            # A device receives at most D * slots per round (slots may double, up to X * chunk).
            need = min(total - seen_total, rounds * num_devices * num_x * chunk_size) + num_devices * num_x * chunk_size
            if need > cap:                                                         # grow the layer buffers
                grown = bucket(need, cap)
                cur_host = np.full((num_devices, grown), SENTINEL, np.uint64)
                cur_host[:, :cap] = np.asarray(cur).reshape(num_devices, cap)
                spare = put(np.full(num_devices * grown, SENTINEL, np.uint64))
                cur, cap = put(cur_host.reshape(-1)), grown
            nxt, nxt_counts = spare, put(np.zeros(num_devices, np.int32))
            cur_counts = counts.copy()
            for r in range(rounds):
                offset = r * chunk_size
                front = take(cur, jnp.int32(offset))
                left = put(np.clip(cur_counts - offset, 0, chunk_size).astype(np.int32))
                while True:
                    shapes.add(("step", slots))
                    out = _make_step(mesh, enc, gens, slots)(claim, front, left)
                    if not int(np.asarray(out[3]).max()):
                        break
                    slots = min(num_x * chunk_size, 2 * slots)                     # a bucket overflowed: redo
                claim, block, found = out[:3]
                shapes.update([("take", cap), ("append", cap, block.shape[0])])
                nxt = append(nxt, block, nxt_counts)
                nxt_counts = nxt_counts + found
            counts_last, counts = counts, np.asarray(nxt_counts).astype(np.int32)
            new = int(counts.sum())
            if new == 0:
                counts = counts_last
                break
            seen_total += new
            sizes.append(new)
            spare, cur = cur, nxt
            if new <= max_layer_size_to_store:
                host = np.asarray(cur).reshape(num_devices, cap)
                keys = np.sort(np.concatenate([host[d, :counts[d]] for d in range(num_devices)]))
                layers[len(sizes) - 1] = enc.decode(keys[None])
        if len(sizes) - 1 not in layers and not truncated:                          # always keep the last layer
            host = np.asarray(cur).reshape(num_devices, cap)
            keys = np.sort(np.concatenate([host[d, :counts[d]] for d in range(num_devices)]))
            layers[len(sizes) - 1] = enc.decode(keys[None])
    return GrowthResult(graph.name, sizes, layers, time.perf_counter() - start, len(shapes), truncated, enc, "mesh")
