"""Generating sets of permutation groups, and the graph definitions the BFS runs on.

Conventions (those of cayleypy 0.2.0, so vectors compare one to one): a state is an integer vector ``s`` of length
``n`` and a generator is a permutation ``p`` of ``range(n)`` acting on positions, ``s -> s[p]`` (the new state's
position ``i`` holds the old state's symbol at position ``p[i]``). A Cayley graph starts from the identity
``0, 1, ..., n-1`` and its vertices are all products of generators; a Schreier coset graph starts from a *central
state* with repeated symbols (e.g. ``0, 0, 1, 1``) and its vertices are the images of that state. Positions are
0-indexed.

Families (``n`` = number of positions; ``burnt_pancake`` acts on ``2n`` points):

| family | generators | count | inverse-closed |
|---|---|---|---|
| ``lrx(n, k=1)`` | L (cyclic left shift), R (right shift), X = swap(0, k) | 3 | yes |
| ``lx(n)`` | L, X = swap(0, 1) | 2 | no (directed) |
| ``pancake(n)`` | reverse the prefix of length 2..n | n-1 | yes |
| ``burnt_pancake(n)`` | reverse-and-flip the prefix of length 1..n (2n points) | n | yes |
| ``all_transpositions(n)`` | (i j), i < j | n(n-1)/2 | yes |
| ``coxeter(n)`` | (i i+1) | n-1 | yes |
| ``cyclic_coxeter(n)`` | (i i+1) and (0 n-1) | n | yes |
| ``stars(n)`` | (0 i) | n-1 | yes |
| ``full_reversals(n)`` | reverse positions i..j, i < j | n(n-1)/2 | yes |
| ``top_spin(n, k=4)`` | L, R, reverse the first k | 3 | yes |
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class GraphDef:
    """A Cayley or Schreier coset graph: generators acting on positions and the start state.

    Attributes:
        name: a label for tables ("lrx-10", "custom", ...).
        generators: int32 ``[X, n]``; row ``g`` is a permutation, applied as ``state[generators[g]]``.
        generator_names: one name per generator.
        central_state: int32 ``[n]``, the BFS start; ``range(n)`` for a Cayley graph.
    """

    name: str
    generators: np.ndarray
    generator_names: tuple[str, ...]
    central_state: np.ndarray

    @property
    def n(self) -> int:
        return int(self.generators.shape[1])

    @property
    def num_generators(self) -> int:
        return int(self.generators.shape[0])

    @property
    def inverse_closed(self) -> bool:
        """Whether the inverse of every generator is a generator (the graph is then undirected)."""
        rows = {tuple(int(v) for v in g) for g in self.generators}
        return all(tuple(int(v) for v in np.argsort(g)) in rows for g in self.generators)

    @property
    def is_cayley(self) -> bool:
        """True when the central state has ``n`` distinct symbols (the orbit is then the group itself)."""
        return len(set(self.central_state.tolist())) == self.n

    def with_central_state(self, central_state: Sequence[int], name: str | None = None) -> "GraphDef":
        """The Schreier coset graph of the same generators from another start state."""
        return make_graph(self.generators, central_state=central_state, names=self.generator_names,
                                            name=name or f"{self.name}@{''.join(map(str, central_state))}")


def _as_permutation(gen, index: int, name: str, n: int | None) -> np.ndarray:
    """Checks that ``gen`` is a permutation of ``range(n)`` and returns it as int32, or raises naming it."""
    label = f"generator {index} ({name!r})"
    try:
        arr = np.asarray(gen)
    except Exception as e:  # ragged nested lists
        raise ValueError(f"{label} is not a flat list of integers: {gen!r}") from e
    if arr.ndim != 1:
        raise ValueError(f"{label} must be a flat list of integers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{label} is empty")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{label} must hold integers, got dtype {arr.dtype}: {gen!r}")
    if n is not None and arr.size != n:
        raise ValueError(f"{label} has length {arr.size} but generator 0 has length {n}; all generators must act "
                                          f"on the same number of positions")
    if not np.array_equal(np.sort(arr), np.arange(arr.size)):
        missing = sorted(set(range(arr.size)) - set(arr.tolist()))
        raise ValueError(f"{label} is not a permutation of 0..{arr.size - 1}: {arr.tolist()} "
                                          f"(missing {missing})")
    return arr.astype(np.int32)


def make_graph(generators, *, central_state: Sequence[int] | None = None, names: Sequence[str] | None = None,
                              name: str = "custom") -> GraphDef:
    """Validates a user-given generating set and start state.

    Args:
        generators: a sequence of permutations (each a list of ``n`` ints, a permutation of ``0..n-1``).
        central_state: the start state (``n`` non-negative ints); default the identity (a Cayley graph).
        names: one name per generator (default ``g0, g1, ...``).
        name: the graph's label.

    Raises:
        ValueError: no generators, a generator that is not a permutation, generators of different lengths, a
            central state of the wrong length or with negative symbols. The message names the generator.
    """
    gens = list(generators)
    if not gens:
        raise ValueError("a generating set needs at least one generator, got none")
    names = tuple(names) if names is not None else tuple(f"g{i}" for i in range(len(gens)))
    if len(names) != len(gens):
        raise ValueError(f"got {len(names)} generator names for {len(gens)} generators")
    rows, n = [], None
    for i, (g, nm) in enumerate(zip(gens, names)):
        rows.append(_as_permutation(g, i, nm, n))
        n = rows[0].size
    gen_arr = np.stack(rows)  # [X, n]
    if central_state is None:
        state = np.arange(n, dtype=np.int32)
    else:
        state = np.asarray(central_state)
        if state.ndim != 1 or state.size != n:
            raise ValueError(f"central_state must have {n} entries (the generators' length), got {state.tolist()}")
        if not np.issubdtype(state.dtype, np.integer) or state.min() < 0:
            raise ValueError(f"central_state must hold non-negative integers, got {state.tolist()}")
        state = state.astype(np.int32)
    return GraphDef(name=name, generators=gen_arr, generator_names=names, central_state=state)


# ----------------------------------------------------------------------------------------------------------------
# Families.


def _check_n(n: int, least: int, family: str) -> None:
    if not isinstance(n, (int, np.integer)) or n < least:
        raise ValueError(f"{family}(n) needs an integer n >= {least}, got {n!r}")


def _shift_left(n: int) -> list[int]:
    return [(i + 1) % n for i in range(n)]


def _shift_right(n: int) -> list[int]:
    return [(i - 1) % n for i in range(n)]


def _transposition(n: int, i: int, j: int) -> list[int]:
    p = list(range(n))
    p[i], p[j] = p[j], p[i]
    return p


def _reversal(n: int, i: int, j: int) -> list[int]:
    """Reverses positions ``i..j`` inclusive."""
    p = list(range(n))
    p[i:j + 1] = p[i:j + 1][::-1]
    return p


def lrx(n: int, k: int = 1) -> GraphDef:
    """L (cyclic left shift), R (its inverse) and X = swap(0, k); diameter n(n-1)/2 for k = 1, n >= 4 (A186783)."""
    _check_n(n, 3, "lrx")
    if not 1 <= k < n:
        raise ValueError(f"lrx(n={n}, k={k}): k must be in 1..n-1")
    return make_graph([_shift_left(n), _shift_right(n), _transposition(n, 0, k)], names=("L", "R", "X"),
                                        name=f"lrx-{n}" if k == 1 else f"lrx-{n}-k{k}")


def lx(n: int) -> GraphDef:
    """L and X = swap(0, 1) only: a directed Cayley graph (Glushkov's question, OEIS A039745)."""
    _check_n(n, 3, "lx")
    return make_graph([_shift_left(n), _transposition(n, 0, 1)], names=("L", "X"), name=f"lx-{n}")


def pancake(n: int) -> GraphDef:
    """Prefix reversals of length 2..n; the diameters are the pancake numbers (OEIS A058986)."""
    _check_n(n, 2, "pancake")
    return make_graph([_reversal(n, 0, k - 1) for k in range(2, n + 1)],
                                        names=tuple(f"R{k}" for k in range(2, n + 1)), name=f"pancake-{n}")


def burnt_pancake(n: int) -> GraphDef:
    """Signed prefix reversals of length 1..n on 2n points: pancake ``j`` has sides at positions j and n + j.

    Reversing the prefix of length ``k`` moves pancake ``j < k`` to ``k-1-j`` and swaps its sides:
    ``new[k-1-j] = old[n+j]``, ``new[n+k-1-j] = old[j]``. Group order 2^n n!; diameters OEIS A078941.
    """
    _check_n(n, 1, "burnt_pancake")
    gens = []
    for k in range(1, n + 1):
        p = list(range(2 * n))
        for j in range(k):
            p[k - 1 - j] = n + j
            p[n + k - 1 - j] = j
        gens.append(p)
    return make_graph(gens, names=tuple(f"B{k}" for k in range(1, n + 1)), name=f"burnt_pancake-{n}")


def all_transpositions(n: int) -> GraphDef:
    """All n(n-1)/2 transpositions; layer k has c(n, n-k) elements (Stirling numbers of the first kind)."""
    _check_n(n, 2, "all_transpositions")
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return make_graph([_transposition(n, i, j) for i, j in pairs], names=tuple(f"({i} {j})" for i, j in pairs),
                                        name=f"all_transpositions-{n}")


def coxeter(n: int) -> GraphDef:
    """Adjacent transpositions (i, i+1); layer k = permutations with k inversions (Mahonian numbers)."""
    _check_n(n, 2, "coxeter")
    return make_graph([_transposition(n, i, i + 1) for i in range(n - 1)],
                                        names=tuple(f"({i} {i + 1})" for i in range(n - 1)), name=f"coxeter-{n}")


def cyclic_coxeter(n: int) -> GraphDef:
    """Adjacent transpositions plus (0, n-1); diameter floor(n^2/4)."""
    _check_n(n, 3, "cyclic_coxeter")
    gens = [_transposition(n, i, i + 1) for i in range(n - 1)] + [_transposition(n, 0, n - 1)]
    names = tuple(f"({i} {i + 1})" for i in range(n - 1)) + (f"(0 {n - 1})",)
    return make_graph(gens, names=names, name=f"cyclic_coxeter-{n}")


def stars(n: int) -> GraphDef:
    """Star transpositions (0, i), i = 1..n-1."""
    _check_n(n, 2, "stars")
    return make_graph([_transposition(n, 0, i) for i in range(1, n)], names=tuple(f"(0 {i})" for i in range(1, n)),
                                        name=f"stars-{n}")


def full_reversals(n: int) -> GraphDef:
    """Reversals of every substring i..j (i < j); diameter n - 1."""
    _check_n(n, 2, "full_reversals")
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return make_graph([_reversal(n, i, j) for i, j in pairs], names=tuple(f"rev{i}..{j}" for i, j in pairs),
                                        name=f"full_reversals-{n}")


def top_spin(n: int, k: int = 4) -> GraphDef:
    """L, R and the reversal of the first k positions (the TopSpin puzzle)."""
    _check_n(n, 3, "top_spin")
    if not 2 <= k <= n:
        raise ValueError(f"top_spin(n={n}, k={k}): k must be in 2..n")
    return make_graph([_shift_left(n), _shift_right(n), _reversal(n, 0, k - 1)], names=("L", "R", f"T{k}"),
                                        name=f"top_spin-{n}-{k}")


FAMILIES: dict[str, Callable[..., GraphDef]] = {
        "lrx": lrx, "lx": lx, "pancake": pancake, "burnt_pancake": burnt_pancake,
        "all_transpositions": all_transpositions, "coxeter": coxeter, "cyclic_coxeter": cyclic_coxeter,
        "stars": stars, "full_reversals": full_reversals, "top_spin": top_spin,
}


def family(spec: str) -> GraphDef:
    """``"lrx-10"`` / ``"top_spin-8-4"`` -> the graph (family name, then its integer arguments, dash-separated)."""
    head, *args = spec.split("-")
    if head not in FAMILIES:
        raise ValueError(f"unknown family {head!r} in {spec!r}; known: {sorted(FAMILIES)}")
    try:
        ints = [int(a) for a in args]
    except ValueError as e:
        raise ValueError(f"graph spec {spec!r}: arguments after the family name must be integers") from e
    if not ints:
        raise ValueError(f"graph spec {spec!r} needs n, e.g. {head}-8")
    return FAMILIES[head](*ints)
