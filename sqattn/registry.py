"""``"module.path:attribute"`` entries, imported on first use (tasks, models, peft methods, init transforms)."""

from __future__ import annotations

import importlib
from typing import Any


def resolve(spec: Any, what: str) -> Any:
    """The object ``spec`` names (``"module.path:attribute"``), or ``spec`` itself when it is not a string.

    Raises:
      ValueError: ``spec`` is malformed, or its module or attribute does not exist; the message names ``what``.
    """
    if not isinstance(spec, str):
        return spec
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"{what} {spec!r} is not of the form 'module.path:name'")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        raise ValueError(f"{what} {spec!r}: no module {e.name!r}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: module {mod!r} has no {attr!r}") from None
