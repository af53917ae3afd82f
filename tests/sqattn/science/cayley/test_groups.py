"""Generator families, validation of user generators, and the packed encoding (no BFS here)."""

import numpy as np
import pytest

from sqattn.science.cayley import (Encoding, all_transpositions, burnt_pancake, coxeter, cyclic_coxeter, family,
                                   full_reversals, growth, lrx, lx, make_graph, pancake, stars, top_spin)


def test_family_sizes_and_inverse_closure():
    n = 6
    expected = {lrx(n): 3, lx(n): 2, pancake(n): n - 1, burnt_pancake(n): n, all_transpositions(n): n * (n - 1) // 2,
                coxeter(n): n - 1, cyclic_coxeter(n): n, stars(n): n - 1, full_reversals(n): n * (n - 1) // 2,
                top_spin(n): 3}
    for graph, count in expected.items():
        assert graph.num_generators == count, graph.name
        assert graph.inverse_closed == (graph.name != f"lx-{n}"), graph.name
        assert graph.is_cayley
    assert burnt_pancake(n).n == 2 * n


def test_generators_match_cayleypy_conventions():
    # Read from cayleypy 0.2.0's PermutationGroups (0-indexed, state -> state[p]).
    assert lrx(4).generators.tolist() == [[1, 2, 3, 0], [3, 0, 1, 2], [1, 0, 2, 3]]
    assert burnt_pancake(4).generators[1].tolist() == [5, 4, 2, 3, 1, 0, 6, 7]
    assert top_spin(6).generators[2].tolist() == [3, 2, 1, 0, 4, 5]
    assert family("top_spin-6-4").generators.tolist() == top_spin(6, 4).generators.tolist()


@pytest.mark.parametrize("gens, match", [
    ([[0, 1, 2], [0, 0, 2]], r"generator 1 \('g1'\) is not a permutation of 0..2: \[0, 0, 2\] \(missing \[1\]\)"),
    ([[0, 1, 2], [1, 0]], r"generator 1 \('g1'\) has length 2 but generator 0 has length 3"),
    ([[0, 1, 3]], r"generator 0 \('g0'\) is not a permutation"),
    ([[0.5, 1, 2]], r"generator 0 \('g0'\) must hold integers"),
    ([[[0, 1], [1, 0]]], r"generator 0 \('g0'\) must be a flat list"),
    ([[]], r"generator 0 \('g0'\) is empty"),
    ([], r"at least one generator"),
])
def test_bad_generators_are_rejected_by_name(gens, match):
    with pytest.raises(ValueError, match=match):
        make_graph(gens)


def test_bad_generator_named_when_names_given():
    with pytest.raises(ValueError, match=r"generator 1 \('flip'\)"):
        make_graph([[1, 0, 2], [2, 2, 0]], names=["swap", "flip"])


def test_bad_central_state_and_specs():
    with pytest.raises(ValueError, match="central_state must have 3 entries"):
        make_graph([[1, 0, 2]], central_state=[0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        make_graph([[1, 0, 2]], central_state=[0, -1, 2])
    with pytest.raises(ValueError, match="unknown family 'lrz'"):
        family("lrz-5")
    with pytest.raises(ValueError, match=r"lrx\(n\) needs an integer n >= 3"):
        lrx(2)


def test_state_beyond_encoding_is_rejected():
    big = make_graph([list(range(1, 80)) + [0]])  # 80 symbols of 7 bits: 9 fields a word -> 9 words
    with pytest.raises(ValueError, match=r"'custom'.*need 9 uint64 words, more than the 4"):
        growth(big, engine="sort")
    with pytest.raises(ValueError, match="chunk_size must be a positive power of two"):
        growth(lrx(4), chunk_size=1000)
    with pytest.raises(ValueError, match="dense engine cannot run 'custom@0011'"):
        growth(make_graph([[1, 2, 3, 0]]).with_central_state([0, 0, 1, 1]), engine="dense")


@pytest.mark.parametrize("n, top", [(10, 9), (16, 15), (8, 15), (20, 4), (30, 200)])
def test_encoding_round_trip_and_packed_generators(n, top):
    """decode(encode(s)) == s, and the packed generator code equals a gather s[p] (one and several words)."""
    rng = np.random.default_rng(n)
    states = rng.integers(0, top + 1, size=(50, n))
    states[0, 0] = top                                           # the width is set by the largest symbol
    enc = Encoding.for_state(states[0])
    assert enc.width == int(top).bit_length()
    keys = enc.encode(states)
    assert keys.shape == (enc.words, 50) and keys.dtype == np.uint64
    np.testing.assert_array_equal(enc.decode(keys), states)
    for _ in range(5):
        perm = rng.permutation(n)
        np.testing.assert_array_equal(enc.decode(enc.apply_np(keys, perm)), states[:, perm])
