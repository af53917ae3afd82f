"""Growth functions by breadth-first search over bit-packed states, one jitted layer step at a time.

``growth(graph)`` returns the sphere sizes ``s_k = |{v : d(start, v) = k}|`` and the diameter of a Cayley graph (start
= identity) or a Schreier coset graph (start = ``graph.central_state``). The algorithm is cayleypy's (sort-based
deduplication of exact packed keys), written as a few jitted functions with static, bucketed shapes:

1. **Expand** (:func:`_expand_chunk`): a chunk of ``F`` frontier states ``[W, F]`` -> ``X`` neighbours each
   ``[W, X*F]`` by the packed generator code of :mod:`encoding` (elementwise, no ``[M, X, n]`` gather);
   slots past the frontier's count become ``SENTINEL``.
2. **Deduplicate**: sort the candidates, keep first occurrences, drop those already seen (binary search in
   each sorted "seen" array; a tagged merge sort when states take several words), and compact the survivors to
   the front with a cumulative sum and a scatter. The survivors stay sorted, so the new layer is itself a sorted
   "seen" array for the next steps.
3. **Seen set**: when the generating set is closed under inverses, a neighbour of layer ``k`` lies in layers
   ``k-1, k, k+1``, so only the previous and current layers are kept (the two-layer shortcut). A directed
   generating set (e.g. LX) keeps every layer, in three sorted arrays so the step's signature stays fixed:
   ``old`` (big, rarely rebuilt), ``recent`` (layers since the last rebuild) and the current layer; ``recent`` is
   folded into ``old`` once it holds a quarter as many states, so every state is re-sorted O(log) times.
4. **Chunking**: a frontier larger than ``chunk_size`` is expanded ``chunk_size`` states at a time (peak memory
   ~``X * chunk_size`` candidate words plus the layers), and the sorted chunk outputs are merged pairwise in a
   balanced tree with the same dedup step.

Every buffer length is a power of two >= ``min_capacity`` (or ``X`` times one), and only the per-step counts go
to the host, so the number of compilations grows like the log of the largest layer, not with the number of
layers (:attr:`GrowthResult.compilations` reports the distinct shapes traced in a run).

States are packed into uint64 words, so the computation runs under ``jax.enable_x64(True)`` (scoped: the
process-wide setting is left alone).

This module is the *sort engine* (any graph whose states fit ``max_words`` words, coset graphs included).
:func:`growth` with ``engine="auto"`` uses the *dense engine* of :mod:`dense` instead when the graph is a Cayley
graph of permutations with ``n! <= max_dense_states`` (default 11!): it replaces sorting by a visited array indexed
by Lehmer rank and is 5-20x faster on CPU (``experiments/bench_cayley.py``). Both return identical vectors.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.science.cayley.encoding import SENTINEL, Encoding
from sqattn.science.cayley.groups import GraphDef

MIN_CAPACITY = 1 << 14  # smallest buffer: tiny layers cost ~nothing, and fewer buckets mean fewer compilations


def bucket(count: int, min_capacity: int = MIN_CAPACITY) -> int:
    """The buffer capacity for ``count`` states: the next power of two, at least ``min_capacity``."""
    return max(min_capacity, 1 << max(0, int(count) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------
# Traced helpers on key tuples (W uint64 arrays of one length L).


def sort_keys(keys: tuple) -> tuple:
    """Lexicographic sort of ``W``-word keys."""
    if len(keys) == 1:
        return (jnp.sort(keys[0]),)
    return tuple(jax.lax.sort(tuple(keys), num_keys=len(keys)))


def is_valid(keys: tuple):
    """bool ``[L]``: the slot holds a state (not ``SENTINEL`` in every word)."""
    pad = keys[0] == jnp.uint64(SENTINEL)
    for k in keys[1:]:
        pad = pad & (k == jnp.uint64(SENTINEL))
    return ~pad


def first_occurrences(sorted_keys: tuple):
    """bool ``[L]``: valid and different from the previous slot (sorted input)."""
    diff = sorted_keys[0][1:] != sorted_keys[0][:-1]
    for k in sorted_keys[1:]:
        diff = diff | (k[1:] != k[:-1])
    return jnp.concatenate([jnp.ones((1,), bool), diff]) & is_valid(sorted_keys)


def member(queries: tuple, seen: tuple):
    """bool ``[L]``: ``queries[i]`` occurs in ``seen`` (sorted, unique, ``SENTINEL``-padded, length ``S``).

    One word: a vectorised binary search. Several words: sort ``seen ++ queries`` with a tag (0 seen, 1 query) as
    the last key; a query is present iff the slot before it holds the same key tagged 0.
    """
    num_seen, num_q = seen[0].shape[0], queries[0].shape[0]
    if len(queries) == 1:
        idx = jnp.searchsorted(seen[0], queries[0])                       # [L] in 0..S
        return seen[0][jnp.minimum(idx, num_seen - 1)] == queries[0]
    cat = tuple(jnp.concatenate([s, q]) for s, q in zip(seen, queries))  # W x [S + L]
    tag = jnp.concatenate([jnp.zeros(num_seen, jnp.uint8), jnp.ones(num_q, jnp.uint8)])
    slot = jnp.concatenate([jnp.full(num_seen, num_q, jnp.int32), jnp.arange(num_q, dtype=jnp.int32)])
    *skeys, stag, sslot = jax.lax.sort(cat + (tag, slot), num_keys=len(cat) + 1)
    same = jnp.ones(num_seen + num_q - 1, bool)
    for k in skeys:
        same = same & (k[1:] == k[:-1])
    hit = jnp.concatenate([jnp.zeros((1,), bool), same & (stag[:-1] == 0)]) & (stag == 1)
    return jnp.zeros(num_q + 1, bool).at[sslot].set(hit)[:num_q]     # back to query order; seen rows -> slot L


def compact(keys: tuple, keep, capacity: int):
    """Moves the kept slots to the front (order preserved) of ``capacity``-long ``SENTINEL`` buffers.

    Returns (keys W x ``[capacity]``, count). Requires ``sum(keep) <= capacity``.
    """
    pos = jnp.cumsum(keep.astype(jnp.int32)) - 1                          # [L] target slot of each kept key
    target = jnp.where(keep, pos, capacity)                               # dropped slots go out of range
    out = tuple(jnp.full((capacity,), SENTINEL, jnp.uint64).at[target].set(k, mode="drop") for k in keys)
    return out, pos[-1] + 1


# ----------------------------------------------------------------------------------------------------------------
# Jitted steps.


@functools.partial(jax.jit, static_argnames=("enc", "gens", "chunk"))
def _expand_chunk(cur: tuple, cur_count, offset, seen: tuple, *, enc: Encoding, gens: tuple, chunk: int):
    """New states reached from ``cur[offset : offset + chunk]``.

    Args:
      cur: W x ``[C]`` the current layer (sorted, padded). ``cur_count``: its valid length; ``offset``: the
        chunk start (a multiple of ``chunk``, which divides ``C``).
      seen: tuple of sorted key tuples (each W x ``[S_j]``) that new states must avoid.
      gens: the generators as tuples (static). ``chunk``: frontier states per call (static).

    Returns:
      (W x ``[X*chunk]`` sorted new states then ``SENTINEL``, their count).
    """
    front = tuple(jax.lax.dynamic_slice(k, (offset,), (chunk,)) for k in cur)          # W x [F]
    valid = offset + jnp.arange(chunk) < cur_count                                      # [F]
    cand = [enc.apply(front, g) for g in gens]                                          # X x W x [F]
    cand = tuple(jnp.concatenate([jnp.where(valid, c[w], jnp.uint64(SENTINEL)) for c in cand])
                 for w in range(enc.words))                                             # W x [X*F]
    cand = sort_keys(cand)
    new = first_occurrences(cand)                                                       # [X*F]
    for block in seen:
        new = new & ~member(cand, block)
    return compact(cand, new, cand[0].shape[0])


@jax.jit
def _merge(a: tuple, b: tuple):
    """Sorted union without duplicates of two sorted, padded key tuples -> (W x ``[A+B]``, count)."""
    cat = sort_keys(tuple(jnp.concatenate([x, y]) for x, y in zip(a, b)))   # W x [A+B]
    return compact(cat, first_occurrences(cat), cat[0].shape[0])


def _shrink(keys: tuple, count: int, min_capacity: int) -> tuple:
    """Cuts a padded buffer down to ``bucket(count)`` slots (the valid states are at the front)."""
    cap = min(bucket(count, min_capacity), keys[0].shape[0])
    return keys if cap == keys[0].shape[0] else tuple(k[:cap] for k in keys)


def _pad(keys: np.ndarray, capacity: int) -> tuple:
    """Host uint64 ``[W, M]`` -> device tuple of W ``[capacity]`` arrays padded with ``SENTINEL``."""
    out = np.full((keys.shape[0], capacity), SENTINEL, np.uint64)
    out[:, :keys.shape[1]] = keys
    return tuple(jnp.asarray(row) for row in out)


def _host(keys: tuple, count: int) -> np.ndarray:
    """The ``count`` valid states of a device buffer as uint64 ``[W, count]``."""
    return np.stack([np.asarray(k[:count]) for k in keys]) if count else np.zeros((len(keys), 0), np.uint64)


@dataclasses.dataclass
class GrowthResult:
    """What :func:`growth` returns.

    Attributes:
      name: the graph's label.
      layer_sizes: ``s_0 = 1, s_1, ...``; complete unless ``truncated``.
      layers: stored layers ``{k: int32 [s_k, n] states, sorted by packed key}`` (those with ``s_k <=
        max_layer_size_to_store``, and always the last one).
      seconds: wall time of the search (compilation included).
      compilations: distinct (function, shapes) pairs traced by this run (an upper bound on XLA compilations).
      truncated: stopped by ``max_layers`` before the orbit was exhausted.
      encoding: how states were packed.
      engine: ``"sort"``, ``"dense"`` or ``"mesh"``.
    """

    name: str
    layer_sizes: list[int]
    layers: dict[int, np.ndarray]
    seconds: float
    compilations: int
    truncated: bool = False
    encoding: Encoding | None = None
    engine: str = "sort"

    @property
    def diameter(self) -> int:
        """Largest distance from the start (number of layers minus one)."""
        return len(self.layer_sizes) - 1

    @property
    def num_states(self) -> int:
        return int(sum(self.layer_sizes))


def _check_sizes(chunk_size: int, min_capacity: int) -> None:
    for name, v in (("chunk_size", chunk_size), ("min_capacity", min_capacity)):
        if not isinstance(v, (int, np.integer)) or v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a positive power of two, got {v!r}")


def _validate_encodable(graph: GraphDef, max_words: int) -> Encoding:
    try:
        return Encoding.for_state(graph.central_state, max_words=max_words)
    except ValueError as e:
        raise ValueError(f"graph {graph.name!r}: {e}") from None


def growth(graph: GraphDef, *, engine: str = "auto", max_layers: int | None = None, chunk_size: int | None = None,
           min_capacity: int = MIN_CAPACITY, max_layer_size_to_store: int = 1000, max_words: int = 4,
           max_dense_states: int = 39_916_800, on_layer: Callable[[int, int], None] | None = None) -> GrowthResult:
    """Breadth-first growth of ``graph`` from its central state.

    Args:
      graph: generators and start state (:mod:`groups`).
      engine: ``"sort"`` (this module: packed keys, sort-based dedup; any graph whose states fit ``max_words``
        words), ``"dense"`` (:mod:`dense`: a visited array indexed by Lehmer rank; Cayley graphs of permutations
        with ``n! <= max_dense_states``), or ``"auto"`` (dense when it applies, else sort).
      max_dense_states: the largest ``n!`` the dense engine may allocate (4 bytes a state; default 11!).
      chunk_size: frontier states per jitted call; default 2^16 (dense) or 2^18 (sort).
      Other arguments: see :func:`growth_sorted`.

    Returns:
      a :class:`GrowthResult` (identical layer sizes from either engine).
    """
    from sqattn.science.cayley import dense  # noqa: PLC0415 (dense imports this module)

    if engine not in ("auto", "sort", "dense"):
        raise ValueError(f"engine must be 'auto', 'sort' or 'dense', got {engine!r}")
    common = dict(max_layers=max_layers, min_capacity=min_capacity, max_layer_size_to_store=max_layer_size_to_store,
                  on_layer=on_layer)
    if engine == "dense" or (engine == "auto" and dense.dense_applicable(graph, max_dense_states) is None):
        return dense.growth_dense(graph, max_dense_states=max_dense_states, chunk_size=chunk_size or 1 << 16,
                                  **common)
    return growth_sorted(graph, max_words=max_words, chunk_size=chunk_size or 1 << 18, **common)


def growth_sorted(graph: GraphDef, *, max_layers: int | None = None, chunk_size: int = 1 << 18,
                  min_capacity: int = MIN_CAPACITY, max_layer_size_to_store: int = 1000, max_words: int = 4,
                  on_layer: Callable[[int, int], None] | None = None) -> GrowthResult:
    """Breadth-first growth of ``graph`` from its central state with the sort engine (module docstring).

    Args:
      graph: generators and start state (:mod:`groups`).
      max_layers: stop after computing layers ``0..max_layers`` (then ``truncated`` is set if more remain).
      chunk_size: frontier states expanded per jitted call (a power of two; memory ~ ``16 * X * chunk_size``
        bytes of candidates per word).
      min_capacity: smallest buffer (a power of two); larger means fewer compilations, more padding.
      max_layer_size_to_store: layers up to this size are kept (decoded) in the result, for paths/inspection.
      max_words: largest packed state, in uint64 words.
      on_layer: called as ``on_layer(k, s_k)`` after each layer (progress bars).

    Returns:
      a :class:`GrowthResult`.

    Raises:
      ValueError: a state that does not fit ``max_words`` words, or a ``chunk_size`` that is not a power of two.
    """
    _check_sizes(chunk_size, min_capacity)
    enc = _validate_encodable(graph, max_words)
    gens = tuple(tuple(int(v) for v in g) for g in graph.generators)
    inverse_closed = graph.inverse_closed
    start = time.perf_counter()
    shapes: set = set()
    with jax.enable_x64(True):
        first = enc.encode(graph.central_state[None])                          # [W, 1]
        sizes, layers = [1], {0: graph.central_state[None].copy()}
        if on_layer:
            on_layer(0, 1)
        if len(set(graph.central_state.tolist())) == 1:                        # every generator fixes it
            return GrowthResult(graph.name, sizes, layers, time.perf_counter() - start, 0, False, enc)
        cur, cur_count = _pad(first, min_capacity), 1
        empty = _pad(np.zeros((enc.words, 0), np.uint64), min_capacity)
        prev = empty
        old, old_count, recent, recent_count = empty, 0, empty, 0             # directed: layers < k
        truncated = False
        while True:
            if max_layers is not None and len(sizes) > max_layers:
                truncated = True
                break
            seen = (prev, cur) if inverse_closed else (old, recent, cur)
            cap = cur[0].shape[0]
            chunk = min(chunk_size, cap)
            outs = []
            for offset in range(0, cur_count, chunk):
                shapes.add(("expand", cap, chunk, tuple(s[0].shape[0] for s in seen)))
                out, cnt = _expand_chunk(cur, cur_count, offset, seen, enc=enc, gens=gens, chunk=chunk)
                cnt = int(cnt)
                outs.append((_shrink(out, cnt, min_capacity), cnt))
            while len(outs) > 1:                                               # balanced pairwise merge
                merged = []
                for i in range(0, len(outs) - 1, 2):
                    (a, _), (b, _) = outs[i], outs[i + 1]
                    shapes.add(("merge", a[0].shape[0], b[0].shape[0]))
                    m, cnt = _merge(a, b)
                    cnt = int(cnt)
                    merged.append((_shrink(m, cnt, min_capacity), cnt))
                if len(outs) % 2:
                    merged.append(outs[-1])
                outs = merged
            new, new_count = outs[0]
            if new_count == 0:
                break
            sizes.append(new_count)
            if new_count <= max_layer_size_to_store:
                layers[len(sizes) - 1] = enc.decode(_host(new, new_count))
            if on_layer:
                on_layer(len(sizes) - 1, new_count)
            prev, cur, cur_count = cur, new, new_count
            if not inverse_closed:                                             # fold layer k-1 into seen
                shapes.add(("merge", recent[0].shape[0], prev[0].shape[0]))
                recent, _ = _merge(recent, prev)
                recent_count += sizes[-2]
                recent = _shrink(recent, recent_count, min_capacity)
                if 4 * recent_count > old_count:                                # geometric: O(log) big merges
                    shapes.add(("merge", old[0].shape[0], recent[0].shape[0]))
                    old, _ = _merge(old, recent)
                    old_count += recent_count
                    old, recent, recent_count = _shrink(old, old_count, min_capacity), empty, 0
        last = len(sizes) - 1
        if last not in layers and not truncated:
            layers[last] = enc.decode(_host(cur, cur_count))
    return GrowthResult(graph.name, sizes, layers, time.perf_counter() - start, len(shapes), truncated, enc)


# ----------------------------------------------------------------------------------------------------------------
# References for tests, and shortest paths.


def growth_reference(graph: GraphDef, max_states: int = 200_000) -> list[int]:
    """Plain Python BFS over tuples (the oracle for tests; small orbits only)."""
    gens = [tuple(int(v) for v in g) for g in graph.generators]
    start = tuple(int(v) for v in graph.central_state)
    seen, frontier, sizes = {start}, [start], [1]
    while frontier:
        nxt = []
        for s in frontier:
            for g in gens:
                t = tuple(s[i] for i in g)
                if t not in seen:
                    seen.add(t)
                    nxt.append(t)
        if len(seen) > max_states:
            raise ValueError(f"growth_reference: orbit of {graph.name!r} exceeds {max_states} states")
        if nxt:
            sizes.append(len(nxt))
        frontier = nxt
    return sizes


def find_path(graph: GraphDef, result: GrowthResult, state: Sequence[int]) -> list[int]:
    """Generator indices ``[g_1, ..., g_d]`` with ``state = central[g_1][g_2]...[g_d]``, ``d`` = its distance.

    Walks back through the stored layers: a predecessor of ``v`` in layer ``k`` is a state ``u`` of layer ``k-1``
    with ``u[g] = v`` for some generator ``g``, i.e. ``u = v[g^-1]``. Needs every layer up to the state's to be
    stored (``max_layer_size_to_store`` at least the largest of them).

    Raises:
      ValueError: the state is not in any stored layer, or a needed layer was not stored.
    """
    enc = result.encoding
    target = enc.encode(np.asarray(state)[None])                                  # [W, 1]
    index = {k: {tuple(col) for col in enc.encode(v).T.tolist()} for k, v in result.layers.items()}

    def layer_of(key: np.ndarray) -> int | None:
        word = tuple(key[:, 0].tolist())
        return next((k for k, members in index.items() if word in members), None)

    depth = layer_of(target)
    if depth is None:
        raise ValueError(f"state {list(state)} is not in a stored layer of {result.name!r}")
    inverses = [np.argsort(g) for g in graph.generators]
    path, cur = [], target
    for k in range(depth, 0, -1):
        if k - 1 not in result.layers:
            raise ValueError(f"layer {k - 1} of {result.name!r} was not stored; raise max_layer_size_to_store")
        for gi, inv in enumerate(inverses):
            cand = enc.apply_np(cur, inv)
            if layer_of(cand) == k - 1:
                path.append(gi)
                cur = cand
                break
        else:  # pragma: no cover - impossible if the layers are a BFS of this graph
            raise RuntimeError(f"no predecessor of a layer-{k} state found")
    return path[::-1]
