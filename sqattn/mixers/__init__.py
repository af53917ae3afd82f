"""Sequence mixers. Every mixer is an ``nnx.Module`` with the same interface:

* ``__call__(x[b,t,d], *, segment_ids=None) -> y[b,t,d]``   (training / prefill)
* ``init_cache(batch, max_len, dtype) -> cache``            (pytree; fixed size for recurrent mixers)
* ``step(x_t[b,d], cache) -> (y_t[b,d], cache)``            (decoding)

and is constructed as ``Cls(d_model, *, rngs, dtype, **its_own_config)``. The LM's ``block_pattern`` picks
mixers by letter from ``MIXERS``; each letter names the sub-config ``config.model.mixers.<name>`` it reads.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

_REGISTRY: dict[str, "MixerSpec"] = {}


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    letter: str           # block-pattern letter
    name: str             # sub-config key under config.model.mixers
    factory: Callable     # Cls(d_model, *, rngs, dtype, **cfg)
    doc: str


def register(letter: str, name: str, doc: str):
    """Class decorator adding a mixer to the block-pattern registry."""
    def wrap(cls):
        if letter in _REGISTRY and _REGISTRY[letter].factory is not cls:
            raise ValueError(f"mixer letter {letter!r} already used by {_REGISTRY[letter].name}")
        _REGISTRY[letter] = MixerSpec(letter, name, cls, doc)
        return cls
    return wrap


def _load_all() -> None:
    # Import the mixer modules so their @register decorators run. Optional ones may not exist yet.
    import importlib
    for mod in ("attention", "gla", "mamba", "sse", "scout", "liger"):
        try:
            importlib.import_module(f"sqattn.mixers.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"sqattn.mixers.{mod}":
                raise


def mixers() -> dict[str, MixerSpec]:
    """letter -> MixerSpec for every registered mixer."""
    _load_all()
    return dict(_REGISTRY)


def get(letter: str) -> MixerSpec:
    table = mixers()
    if letter not in table:
        known = ", ".join(f"{k}={v.name}" for k, v in sorted(table.items()))
        raise ValueError(f"unknown mixer letter {letter!r} in block_pattern; known: {known}")
    return table[letter]
