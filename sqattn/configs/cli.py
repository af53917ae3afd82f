"""Command-line config handling: ``--config=NAME[:arg]`` plus ``--config.a.b=value`` overrides.

Overrides are applied with the type of the existing field (ints widen to floats; strings are taken verbatim;
other values go through ``ast.literal_eval``). Unknown keys and values of the wrong type raise ``ValueError``
naming the key, before anything is built.
"""

from __future__ import annotations

import ast
import sys
from typing import Sequence

import ml_collections

from sqattn import configs


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Separates ``--config=NAME`` and ``--config.key=value`` from the other flags."""
    name, overrides, rest = None, [], []
    it = iter(argv)
    for tok in it:
        if tok == "--config" or tok.startswith("--config="):
            name = tok.split("=", 1)[1] if "=" in tok else next(it, None)
            if not name:
                raise ValueError("--config needs a value: --config=NAME[:arg]")
        elif tok.startswith("--config."):
            body = tok[len("--config."):]
            if "=" in body:
                key, val = body.split("=", 1)
            else:
                key, val = body, next(it, None)
                if val is None:
                    raise ValueError(f"--config.{key} needs a value")
            overrides.append((key, val))
        else:
            rest.append(tok)
    return name, overrides, rest


def _convert(key: str, old, raw: str):
    if isinstance(old, str) or old is None and not _looks_literal(raw):
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":  # a quoted string: strip the quotes
            return ast.literal_eval(raw)
        return raw
    if isinstance(old, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}: expected a bool, got {raw!r}")
    try:
        val = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"--config.{key}: cannot parse {raw!r} as {type(old).__name__}") from None
    if isinstance(old, float) and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if old is not None and not isinstance(val, type(old)):
        raise ValueError(f"--config.{key}: expected {type(old).__name__}, got {raw!r} "
                         f"({type(val).__name__})")
    return val


def _looks_literal(raw: str) -> bool:
    try:
        ast.literal_eval(raw)
        return True
    except (ValueError, SyntaxError):
        return False


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
    """Applies ``[("model.d_model", "256"), ...]`` in place, with clear errors for bad keys/values."""
    for key, raw in overrides:
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                where = ".".join(parts[:i]) or "<root>"
                raise ValueError(f"--config.{key}: unknown key {part!r} under {where}; "
                                 f"known: {sorted(node.keys())}")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            where = ".".join(parts[:-1]) or "<root>"
            raise ValueError(f"--config.{key}: unknown key {leaf!r} under {where}; known: {sorted(node.keys())}")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ValueError(f"--config.{key} is a section; set one of its fields: {sorted(node[leaf].keys())}")
        val = _convert(key, node[leaf], raw)
        with node.ignore_type():
            node[leaf] = val


def config_from_argv(argv: Sequence[str], default: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Builds the config named on the command line (or ``default``) with its overrides applied and locked."""
    name, overrides, rest = split_argv(argv)
    cfg = configs.get(name or default)
    apply_overrides(cfg, overrides)
    cfg.lock()
    return cfg, rest


def absl_flags_parser(config_argv: list[str]):
    """A ``flags_parser`` for ``absl.app.run`` that moves ``--config``/``--config.*`` into ``config_argv``.

    absl parses every other flag; ``config_from_argv(config_argv, default)`` then builds the config::

        _CONFIG_ARGV: list[str] = []
        app.run(main, flags_parser=cli.absl_flags_parser(_CONFIG_ARGV))
    """
    def parse(argv):
        from absl import flags
        try:
            name, overrides, rest = split_argv(argv[1:])
        except ValueError as e:
            sys.exit(f"error: {e}")
        config_argv[:] = ([f"--config={name}"] if name else []) + [f"--config.{k}={v}" for k, v in overrides]
        try:
            return flags.FLAGS([argv[0]] + rest)
        except flags.Error as e:
            sys.exit(f"error: {e} (see --help for the flags; --config=NAME and --config.a.b=value set the config)")
    return parse
