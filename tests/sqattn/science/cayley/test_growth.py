"""Growth functions against known vectors, closed forms, a plain-Python BFS, and each other (both engines).

Vectors: ../shared/papers/cayleypy_growth.md (cayleypy 0.2.0's shipped datasets, recomputed there).
"""

import math

import numpy as np
import pytest

from sqattn.science.cayley import (all_transpositions, burnt_pancake, coxeter, cyclic_coxeter, find_path,
                                   full_reversals, growth, growth_reference, lrx, lx, make_graph, pancake, stars,
                                   top_spin)

SMALL = {  # the note's small vectors
    "lrx-4": (lrx(4), [1, 3, 5, 6, 5, 3, 1]),
    "lrx-5": (lrx(5), [1, 3, 6, 10, 16, 24, 29, 21, 6, 3, 1]),
    "pancake-5": (pancake(5), [1, 4, 12, 35, 48, 20]),
    "burnt_pancake-3": (burnt_pancake(3), [1, 3, 6, 12, 18, 6, 2]),
    "cyclic_coxeter-5": (cyclic_coxeter(5), [1, 5, 15, 35, 42, 20, 2]),
    "lx-5": (lx(5), [1, 2, 3, 5, 8, 12, 15, 20, 22, 19, 11, 2]),
}
LRX9 = [1, 3, 6, 12, 24, 46, 85, 156, 283, 492, 845, 1415, 2258, 3476, 5188, 7448, 10303, 13816, 17827, 22311, 26810,
        31091, 34664, 36935, 37516, 35651, 31354, 23197, 13382, 4680, 1212, 268, 88, 25, 8, 3, 1]
PANCAKE9 = [1, 8, 56, 391, 2278, 10666, 38015, 93585, 132697, 79379, 5804]


def stirling_first(n: int) -> list[int]:
    """Unsigned Stirling numbers c(n, k), k = 0..n (recurrence c(n,k) = c(n-1,k-1) + (n-1) c(n-1,k))."""
    row = [1]
    for m in range(1, n + 1):
        row = [(row[k - 1] if k >= 1 else 0) + (m - 1) * (row[k] if k < len(row) else 0) for k in range(m + 1)]
    return row


def mahonian(n: int) -> list[int]:
    """Coefficients of prod_{j=1..n} (1 - q^j) / (1 - q): permutations of n by number of inversions."""
    poly = np.array([1], dtype=np.int64)
    for j in range(1, n + 1):
        poly = np.convolve(poly, np.ones(j, dtype=np.int64))
    return poly.tolist()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_known_vectors(name):
    graph, expected = SMALL[name]
    result = growth(graph)                                      # auto: the dense engine (all are Cayley graphs)
    assert result.layer_sizes == expected
    assert result.diameter == len(expected) - 1
    assert result.num_states == (2 ** 3 * 6 if name.startswith("burnt") else math.factorial(graph.n))


@pytest.mark.parametrize("name", ["lrx-5", "burnt_pancake-3"])
def test_small_known_vectors_sort_engine(name):
    graph, expected = SMALL[name]
    assert growth(graph, engine="sort").layer_sizes == expected


def test_closed_forms_and_diameters():
    n = 6
    sizes = growth(all_transpositions(n)).layer_sizes
    assert sizes == stirling_first(n)[::-1][:n]                 # s_k = c(n, n-k), diameter n-1
    sizes = growth(coxeter(n)).layer_sizes
    assert sizes == mahonian(n) and sizes == sizes[::-1]        # Mahonian, symmetric, diameter n(n-1)/2
    assert growth(cyclic_coxeter(n)).diameter == n * n // 4
    assert growth(full_reversals(n)).diameter == n - 1
    assert growth(pancake(8)).diameter == 9                      # pancake number (OEIS A058986)
    assert growth(lrx(7)).diameter == 21


def test_n9_vectors_exactly():
    assert growth(lrx(9)).layer_sizes == LRX9
    assert growth(pancake(9)).layer_sizes == PANCAKE9


def test_sort_engine_chunks_and_merges():
    """Chunks of 256 frontier states: each big layer is several chunks, merged pairwise; equal to dense."""
    graph = lrx(7)
    chunked = growth(graph, engine="sort", chunk_size=256, min_capacity=1024)
    assert chunked.layer_sizes == growth(graph, engine="dense").layer_sizes
    assert max(chunked.layer_sizes) > 2 * 256


def test_directed_lx_against_reference_both_engines():
    graph = lx(7)
    expected = growth_reference(graph)
    assert growth(graph, engine="dense").layer_sizes == expected
    # The directed seen set (old / recent / current): recent is folded into old several times.
    assert growth(graph, engine="sort").layer_sizes == expected


def test_random_generators_against_reference():
    """A random (not inverse-closed) generating set: a Cayley graph and a coset graph."""
    rng = np.random.default_rng(0)
    n = 6
    graph = make_graph([rng.permutation(n) for _ in range(3)])
    assert not graph.inverse_closed
    assert growth(graph, engine="dense").layer_sizes == growth_reference(graph)
    coset = graph.with_central_state([0, 0, 1, 1, 2, 2])
    assert growth(coset).layer_sizes == growth_reference(coset)  # auto -> sort (repeated symbols)


def test_multiword_states():
    """20 positions of 5 bits (12 fields a word -> 2 words): the tagged-sort membership path."""
    n = 20
    gens = [list(range(n)) for _ in range(3)]
    gens[0][:6] = [1, 2, 3, 4, 5, 0]                             # a 6-cycle on positions 0..5
    gens[1][:6] = [5, 0, 1, 2, 3, 4]                             # its inverse
    gens[2][5], gens[2][14] = 14, 5                              # swap positions 5 and 14 (crosses words)
    graph = make_graph(gens)
    result = growth(graph, engine="sort")
    assert result.encoding.words == 2
    assert result.layer_sizes == growth_reference(graph)


def test_stored_layers_and_paths():
    graph = top_spin(6)
    result = growth(graph, max_layer_size_to_store=10_000)
    rng = np.random.default_rng(0)
    for _ in range(5):
        k = int(rng.integers(1, result.diameter + 1))
        state = result.layers[k][int(rng.integers(len(result.layers[k])))]
        path = find_path(graph, result, state)
        assert len(path) == k
        walked = graph.central_state
        for g in path:
            walked = walked[graph.generators[g]]
        np.testing.assert_array_equal(walked, state)
    assert sorted(result.layers) == list(range(result.diameter + 1))


def test_truncation_and_compilation_count():
    full = growth(lrx(8), engine="dense", chunk_size=1024)
    part = growth(lrx(8), engine="dense", chunk_size=1024, max_layers=5)
    assert part.truncated and part.layer_sizes == full.layer_sizes[:6]
    # One expansion program; buffers grow by doubling (a slice and an append program per size): far below 28.
    assert full.diameter == 28
    assert full.compilations <= 2 * math.ceil(math.log2(4 * max(full.layer_sizes) / 1024)) + 1


def test_single_state_orbit():
    graph = stars(4).with_central_state([1, 1, 1, 1])
    assert growth(graph).layer_sizes == [1]
