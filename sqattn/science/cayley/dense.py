"""Growth of Cayley graphs of permutations with a visited array indexed by Lehmer rank (no sorting).

For a Cayley graph whose states are permutations of ``n <= 12`` distinct symbols, every state has a rank in
``[0, n!)`` (its Lehmer code read as a factorial-base number). A single int32 array ``claim[n!]`` then replaces
cayleypy's sorted seen-layers:

* ``claim[r] == -1``: state ``r`` not reached yet;
* expanding a frontier chunk gives candidates with ids ``0..X*F-1``; the fresh ones (``claim == -1``) write their
  id with one scatter (duplicates: one write wins), and a candidate is new iff it reads its own id back. The winners
  are compacted (cumsum + scatter) to the front of an ``[X*F]`` block, which is appended in place (donated buffer)
  to the next layer's buffer at the running count.

That is two gathers, two scatters and a cumulative sum per candidate, with no ``O(L log L)`` sort and no binary
search; a state claimed by an earlier chunk of the same layer is already "seen", so chunks need no merge step; and
the directed case (LX) costs the same as the undirected one (the array remembers every layer). Memory: ``4 n!``
bytes (11!: 160 MB, 12!: 1.9 GB) plus two layer buffers of 8 bytes a slot (``<= X |layer|``); the rank-ownership
version over a mesh is :mod:`sharded`. The frontier stays bit-packed (:mod:`encoding`), so
generators are applied as in the sort engine; the rank is computed from the packed fields with a running bitmask
of the symbols already placed: ``c_i = d_i - popcount(placed & ((1 << d_i) - 1))``, ``rank = sum_i c_i (n-1-i)!``.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.science.cayley.bfs import MIN_CAPACITY, GrowthResult, _check_sizes, bucket  # noqa: F401
from sqattn.science.cayley.encoding import SENTINEL, Encoding
from sqattn.science.cayley.groups import GraphDef

MAX_DENSE_N = 12  # 12! < 2**31 (int32 ranks)


def dense_applicable(graph: GraphDef, max_states: int) -> str | None:
    """``None`` if the dense engine can run ``graph``, else the reason it cannot."""
    if not graph.is_cayley:
        return "the central state has repeated symbols (a coset graph); use the sort engine"
    if graph.n > MAX_DENSE_N:
        return f"n = {graph.n} > {MAX_DENSE_N}: ranks would not fit int32"
    if math.factorial(graph.n) > max_states:
        return f"n! = {math.factorial(graph.n)} states exceed max_dense_states = {max_states}"
    return None


def rank_packed(key, enc: Encoding, symbols: np.ndarray):
    """Lehmer rank (int32, in ``[0, n!)``) of packed one-word permutation keys of any shape.

    ``symbols`` maps the central state's symbols to ``0..n-1`` (identity for ``range(n)``); it is applied through
    a small lookup so any set of distinct symbols ranks correctly.
    """
    n = enc.n
    lut = None if symbols is None else jnp.asarray(symbols, jnp.int32)
    placed = jnp.zeros(key.shape, jnp.int32)
    rank = jnp.zeros(key.shape, jnp.int32)
    mask = jnp.uint64((1 << enc.width) - 1)
    for i in range(n - 1):
        raw = ((key >> jnp.uint64(enc.position(i)[1])) & mask).astype(jnp.int32)
        d = raw if lut is None else lut[raw]
        c = d - jax.lax.population_count(placed & ((jnp.int32(1) << d) - 1))
        rank = rank * (n - i) + c
        placed = placed | (jnp.int32(1) << d)
    return rank


@functools.partial(jax.jit, static_argnames=("enc", "gens", "symbols"), donate_argnums=(0,))
def _dense_chunk(claim, front, count, *, enc: Encoding, gens: tuple, symbols: tuple | None):
    """New states reached from the first ``count`` of ``front``; claims them in ``claim``.

    Args:
      claim: int32 ``[n!]`` (-1 = unseen); donated and returned updated.
      front: uint64 ``[F]`` frontier keys (one word), the first ``count`` valid.
    Returns:
      (claim, uint64 ``[X*F]`` the new states first then ``SENTINEL``, their count). The shapes depend only on
      ``F``, so a growth run compiles this once.
    """
    num_states, chunk = claim.shape[0], front.shape[0]
    valid = jnp.arange(chunk) < count                                             # [F]
    cand = jnp.concatenate([enc.apply((front,), g)[0] for g in gens])             # [X*F]
    valid = jnp.tile(valid, len(gens))                                            # [X*F]
    rank = rank_packed(cand, enc, None if symbols is None else np.asarray(symbols))  # [X*F] int32
    fresh = valid & (claim[jnp.where(valid, rank, 0)] < 0)
    ids = jnp.arange(cand.shape[0], dtype=jnp.int32)
    claim = claim.at[jnp.where(fresh, rank, num_states)].set(ids, mode="drop")   # duplicates: one id wins
    win = fresh & (claim[jnp.where(fresh, rank, 0)] == ids)                      # read your own id back
    pos = jnp.cumsum(win.astype(jnp.int32)) - 1
    out = jnp.full(cand.shape, SENTINEL, jnp.uint64).at[jnp.where(win, pos, cand.shape[0])].set(cand, mode="drop")
    return claim, out, pos[-1] + 1


@functools.partial(jax.jit, static_argnames=("size",))
def _take(buf, offset, *, size: int):
    """``buf[offset : offset + size]`` (``offset + size <= len(buf)``)."""
    return jax.lax.dynamic_slice(buf, (offset,), (size,))


@functools.partial(jax.jit, donate_argnums=(0,))
def _append(buf, block, at):
    """``buf[at : at + len(block)] = block`` in place (``at + len(block) <= len(buf)``)."""
    return jax.lax.dynamic_update_slice(buf, block, (at,))


def growth_dense(graph: GraphDef, *, max_layers: int | None = None, chunk_size: int = 1 << 16,
                 min_capacity: int = MIN_CAPACITY, max_layer_size_to_store: int = 1000,
                 max_dense_states: int = math.factorial(11),
                 on_layer: Callable[[int, int], None] | None = None) -> GrowthResult:
    """Growth of a Cayley graph of permutations with the rank-indexed visited array (module docstring).

    Same arguments and result as :func:`sqattn.science.cayley.bfs.growth_sorted`, plus ``max_dense_states`` (the
    largest ``n!`` to allocate; 11! by default). Shapes: the expansion program (:func:`_dense_chunk`) always sees
    exactly ``chunk_size`` frontier slots (tiny layers are padded: ``X * chunk_size`` candidates cost
    milliseconds), so it compiles once per graph; the two layer buffers (current, next; swapped each layer) only
    grow, doubling past ``X * |layer| + X * chunk_size``, and only the tiny slice/append programs depend on their
    size (~``log2(largest layer / chunk_size)`` of each, shared by every graph in the process).

    Raises:
      ValueError: the graph is not a Cayley graph of permutations of ``n <= 12`` symbols or ``n!`` is too large.
    """
    reason = dense_applicable(graph, max_dense_states)
    if reason:
        raise ValueError(f"dense engine cannot run {graph.name!r}: {reason}")
    _check_sizes(chunk_size, min_capacity)
    enc = Encoding.for_state(graph.central_state, max_words=1)
    gens = tuple(tuple(int(v) for v in g) for g in graph.generators)
    central = graph.central_state
    symbols = None
    if not np.array_equal(central, np.arange(graph.n)):
        lut = np.zeros(int(central.max()) + 1, np.int32)
        lut[np.sort(central)] = np.arange(graph.n)
        symbols = tuple(int(v) for v in lut)
    num_x = len(gens)
    total = math.factorial(graph.n)
    start = time.perf_counter()
    shapes: set = set()
    with jax.enable_x64(True):
        first = enc.encode(central[None])[0]                                     # [1] uint64
        cap = bucket(chunk_size * (num_x + 1), min_capacity)                     # both buffers; grows only
        shapes.add(("chunk", chunk_size))
        cur = jnp.asarray(np.concatenate([first, np.full(cap - 1, SENTINEL, np.uint64)]))
        spare = jnp.full((cap,), SENTINEL, jnp.uint64)                           # next layer's buffer
        cur_count = 1
        claim = jnp.full((total,), -1, jnp.int32)
        start_rank = int(rank_packed(jnp.asarray(first), enc, None if symbols is None else np.asarray(symbols))[0])
        claim = claim.at[start_rank].set(0)
        sizes, layers = [1], {0: central[None].copy()}
        if on_layer:
            on_layer(0, 1)
        seen_total, truncated = 1, False
        while True:
            if max_layers is not None and len(sizes) > max_layers:
                truncated = True
                break
            bound = min(num_x * cur_count, total - seen_total)                     # states the layer can have
            if bound + num_x * chunk_size > cap:                                   # grow both buffers
                grown = bucket(bound + num_x * chunk_size, cap)
                cur = jnp.concatenate([cur, jnp.full((grown - cap,), SENTINEL, jnp.uint64)])
                spare, cap = jnp.full((grown,), SENTINEL, jnp.uint64), grown
            nxt, nxt_count = spare, jnp.int32(0)
            for offset in range(0, cur_count, chunk_size):
                shapes.update([("take", cap), ("append", cap)])
                front = _take(cur, offset, size=chunk_size)
                claim, out, found = _dense_chunk(claim, front, min(chunk_size, cur_count - offset), enc=enc,
                                                 gens=gens, symbols=symbols)
                nxt = _append(nxt, out, nxt_count)                                 # whole block; tail is padding
                nxt_count = nxt_count + found
            nxt_count = int(nxt_count)
            if nxt_count == 0:
                break
            seen_total += nxt_count
            sizes.append(nxt_count)
            spare, cur, cur_count = cur, nxt, nxt_count                            # recycle the old layer's buffer
            if nxt_count <= max_layer_size_to_store:
                keys = np.sort(np.asarray(cur[:nxt_count]))
                layers[len(sizes) - 1] = enc.decode(keys[None])
            if on_layer:
                on_layer(len(sizes) - 1, nxt_count)
        last = len(sizes) - 1
        if last not in layers and not truncated:
            layers[last] = enc.decode(np.sort(np.asarray(cur[:cur_count]))[None])
    return GrowthResult(graph.name, sizes, layers, time.perf_counter() - start, len(shapes), truncated, enc, "dense")
