"""Bit-packed states: ``n`` symbols of ``width`` bits in ``words`` uint64 words, and generators applied on the words.

A state ``s`` (``n`` symbols, each ``< 2**width``) is stored as ``W`` uint64 words. Position ``i`` lives in word
``i // F`` at bit ``width * (i % F)``, where ``F = 64 // width`` fields fit in a word (fields never straddle
words). The packed key is exact (no hash): equal states have equal words, and ordering the words
lexicographically orders the states, so a sort deduplicates them. Permutations of ``n <= 16`` take one word at 4
bits a symbol (``n = 10``: 40 bits); burnt pancake ``n = 8`` (16 points) takes exactly 64 bits.

A generator ``p`` (``new[i] = old[p[i]]``) moves the field at source position ``p[i]`` to target position ``i``.
Fields that move by the same bit shift between the same pair of words move together, so the generator is
``out[dw] |= shift(x[sw] & mask, s)`` over its distinct ``(sw, dw, s)`` groups: 2 groups for a cyclic shift, 3
for a transposition, about ``k`` for a prefix reversal of length ``k`` (cayleypy's packed form, traced once into
elementwise XLA code with the masks as constants).

All key arrays are tuples of ``W`` uint64 arrays of equal shape (words in order, most significant first for the
sort: word 0 holds positions ``0..F-1`` and is compared first). ``SENTINEL`` (all ones in every word) pads
buffers; it sorts last and is never a reachable state unless every symbol equals ``2**width - 1``, which
:func:`growth` excludes (such an orbit has one element).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

SENTINEL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
MAX_WORDS = 4  # up to 256 bits a state: 64 symbols of 4 bits, 32 of 8


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How states of ``n`` symbols are packed: ``width`` bits a symbol, ``words`` uint64 words."""

    n: int
    width: int
    words: int

    @property
    def fields_per_word(self) -> int:
        return 64 // self.width

    @classmethod
    def for_state(cls, central_state: Sequence[int], max_words: int = MAX_WORDS) -> "Encoding":
        """The smallest encoding for states with the symbols of ``central_state`` (``width`` = bits of the max).

        Raises:
          ValueError: the state does not fit in ``max_words`` words.
        """
        state = np.asarray(central_state)
        n = int(state.size)
        width = max(1, int(state.max()).bit_length())
        fpw = 64 // width
        words = -(-n // fpw)
        if width > 64 or words > max_words:
            raise ValueError(
                f"states of n={n} symbols of {width} bits need {words} uint64 words, more than the "
                f"{max_words} this encoding supports ({max_words * fpw} symbols of {width} bits); use fewer "
                f"positions or smaller symbols")
        return cls(n=n, width=width, words=words)

    def position(self, i: int) -> tuple[int, int]:
        """(word, bit offset) of position ``i``."""
        return i // self.fields_per_word, self.width * (i % self.fields_per_word)

    # -------------------------------------------------------------------------------------------------------------
    # Host side (numpy).

    def encode(self, states: np.ndarray) -> np.ndarray:
        """int ``[M, n]`` -> uint64 ``[W, M]``."""
        states = np.asarray(states, dtype=np.uint64).reshape(-1, self.n)
        out = np.zeros((self.words, states.shape[0]), np.uint64)
        for i in range(self.n):
            w, off = self.position(i)
            out[w] |= states[:, i] << np.uint64(off)
        return out

    def decode(self, keys: np.ndarray) -> np.ndarray:
        """uint64 ``[W, M]`` -> int32 ``[M, n]``."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(self.words, -1)
        mask = np.uint64((1 << self.width) - 1)
        out = np.empty((keys.shape[1], self.n), np.int32)
        for i in range(self.n):
            w, off = self.position(i)
            out[:, i] = (keys[w] >> np.uint64(off)) & mask
        return out

    # -------------------------------------------------------------------------------------------------------------
    # Generators on packed words.

    def groups(self, perm: Sequence[int]) -> tuple[tuple[int, int, int, int], ...]:
        """The ``(src word, dst word, left shift in bits, source mask)`` groups of generator ``perm``.

        A negative shift is a right shift. Sorted for a deterministic trace.
        """
        field = (1 << self.width) - 1
        acc: dict[tuple[int, int, int], int] = {}
        for i, src in enumerate(perm):
            sw, so = self.position(int(src))
            dw, do = self.position(i)
            key = (sw, dw, do - so)
            acc[key] = acc.get(key, 0) | (field << so)
        return tuple(sorted((sw, dw, s, m) for (sw, dw, s), m in acc.items()))

    def apply(self, keys: tuple, perm: Sequence[int]) -> tuple:
        """Applies ``perm`` to packed keys (tuple of ``W`` uint64 jnp arrays, any equal shape); traced code."""
        import jax.numpy as jnp

        out = [None] * self.words
        for sw, dw, shift, mask in self.groups(perm):
            moved = keys[sw] & jnp.uint64(mask)
            moved = moved << jnp.uint64(shift) if shift >= 0 else moved >> jnp.uint64(-shift)
            out[dw] = moved if out[dw] is None else out[dw] | moved
        return tuple(jnp.zeros_like(keys[0]) if o is None else o for o in out)

    def apply_np(self, keys: np.ndarray, perm: Sequence[int]) -> np.ndarray:
        """numpy twin of :meth:`apply` on ``[W, M]`` keys (used for path reconstruction and tests)."""
        out = np.zeros_like(keys)
        for sw, dw, shift, mask in self.groups(perm):
            moved = keys[sw] & np.uint64(mask)
            out[dw] |= moved << np.uint64(shift) if shift >= 0 else moved >> np.uint64(-shift)
        return out
