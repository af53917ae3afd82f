"""Data interface shared by every source: the registry, ``make_dataset`` and ``Dataset``.

A source turns its sub-config into a grain ``MapDataset`` of *rows* indexed by the global row
number ``k = step * global_batch + row``. Each row is a dict of three ``[seq_len]`` arrays:

* ``inputs``  int32 tokens fed to the model,
* ``targets`` int32 next-token targets (``targets[t]`` is the token that follows ``inputs[t]``),
* ``weights`` float32 loss mask (1 where the target counts).

``Dataset.batch(step)`` batches the rows of one shard of one step. A row is a pure function of
``(cfg.seed, split, step, row)``, so ``batch(step)`` has no hidden iterator state: the
checkpointable data position is the step number, and shard ``i`` of ``n`` receives rows
``[i * b, (i + 1) * b)`` of the global batch of that step (``b = global_batch / n``), whatever ``n``.

Train and eval draw from disjoint random streams (the split is part of every row's seed).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import grain
import numpy as np
from ml_collections import config_dict

SPLITS = ("train", "eval")

# Random stream id of each split: part of every row's seed, so train and eval never share data.
_SPLIT_STREAM = {"train": 0, "eval": 1}

# Source name -> module (under sqattn.data) and the prefix of its functions
# ``<prefix>default_config()`` / ``<prefix>build_rows(cfg, *, split, global_batch)``.
_REGISTRY = {
    "text": ("text", ""),
    "tfds": ("tfds_source", ""),
    "mqar": ("synthetic", "mqar_"),
    "copy": ("synthetic", "copy_"),
    "selective_copy": ("synthetic", "selective_copy_"),
    "recall": ("synthetic", "recall_"),
}

# Global row counts are bounded by this for unbounded (train / synthetic) splits; far beyond any run.
_UNBOUNDED_ROWS = 2**62

Row = dict[str, np.ndarray]


def source_names() -> tuple[str, ...]:
    """Returns the registered source names, in registry order."""
    return tuple(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Rows:
    """What a source builds for one split.

    Attributes:
        rows: grain ``MapDataset`` whose element ``k`` is the row ``k = step * global_batch + r``.
        vocab_size: number of token ids (all tokens lie in ``[0, vocab_size)``).
        num_batches: number of distinct global batches (a finite eval set), or None if unbounded.
    """

    rows: grain.MapDataset
    vocab_size: int
    num_batches: int | None = None


class Dataset:
    """Random-access batches of one split, for one data shard.

    Attributes:
        name: source name.
        split: "train" or "eval".
        vocab_size: number of token ids.
        seq_len: tokens per row.
        batch_size: rows per batch *of this shard* (global batch / shard_count).
        global_batch_size: rows per step over all shards.
        shard_index: which shard this is.
        shard_count: number of shards.
        num_batches: number of distinct batches for a finite split (``batch(i)`` and
            ``batch(i + num_batches)`` coincide), or None when every step has fresh data.
    """

    def __init__(self, rows: Rows, *, name: str, split: str, seq_len: int, global_batch_size: int,
                 shard_index: int, shard_count: int):
        self.name = name
        self.split = split
        self.vocab_size = int(rows.vocab_size)
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self.batch_size = self.global_batch_size // self.shard_count
        self.num_batches = rows.num_batches
        # Element j of ``_batches`` stacks rows [j * b, (j + 1) * b); j = step * n + shard.
        self._batches = rows.rows.batch(self.batch_size, drop_remainder=True)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Returns this shard's batch of ``step``: a pure function of (seed, split, step, shard).

        Args:
            step: non-negative step (train) or eval batch index. Finite splits wrap around
                modulo ``num_batches``.

        Returns:
            {"inputs": int32 [b, seq_len], "targets": int32 [b, seq_len],
             "weights": float32 [b, seq_len]} with ``b = batch_size``.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.num_batches is not None:
            step %= self.num_batches
        return self._batches[step * self.shard_count + self.shard_index]

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, split={self.split!r}, vocab_size={self.vocab_size}, "
                f"seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"shard={self.shard_index}/{self.shard_count}, num_batches={self.num_batches})")


def _source_fn(name: str, what: str) -> Callable:
    if name not in _REGISTRY:
        raise ValueError(f"unknown data source {name!r}; known sources: {', '.join(_REGISTRY)}")
    module_name, prefix = _REGISTRY[name]
    module = importlib.import_module(f"sqattn.data.{module_name}")
    return getattr(module, prefix + what)


def default_config(name: str) -> config_dict.ConfigDict:
    """Returns the data sub-config of source ``name`` (every field commented in its module).

    Args:
        name: a registered source name (see ``source_names()``).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    cfg = _source_fn(name, "default_config")()
    cfg.name = name
    return cfg


def make_dataset(cfg: config_dict.ConfigDict, *, batch_size: int, split: str, shard_index: int = 0,
                 shard_count: int = 1) -> Dataset:
    """Builds the ``split`` dataset of the source named by ``cfg.name``.

    Args:
        cfg: a data sub-config, as returned by ``default_config(cfg.name)`` and possibly edited.
            Fields it lacks take their defaults; a field the source does not know is an error.
        batch_size: global batch size (rows per step over all shards).
        split: "train" or "eval".
        shard_index: which data shard this process reads, in ``[0, shard_count)``.
        shard_count: number of data shards; must divide ``batch_size``.

    Returns:
        A ``Dataset`` whose ``batch(step)`` returns this shard's ``batch_size / shard_count`` rows.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} of {shard_count}")
    if batch_size < 1 or batch_size % shard_count:
        raise ValueError(f"global batch_size {batch_size} must be a positive multiple of "
                         f"shard_count {shard_count}")
    name = cfg.get("name")
    full = default_config(name)
    unknown = sorted(set(cfg.keys()) - set(full.keys()))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in data config of source {name!r}; "
                         f"known fields: {sorted(full.keys())}")
    for key in cfg.keys():  # Values, not references: placeholders in both would clash.
        full[key] = cfg[key]
    if full.seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {full.seq_len}")
    if full.seed < 0:
        raise ValueError(f"seed must be >= 0, got {full.seed}")
    rows = _source_fn(name, "build_rows")(full, split=split, global_batch=batch_size)
    return Dataset(rows, name=name, split=split, seq_len=full.seq_len, global_batch_size=batch_size,
                   shard_index=shard_index, shard_count=shard_count)


# --------------------------------------------------------------------------------------------
# Helpers for sources.
# --------------------------------------------------------------------------------------------


def row_rng(seed: int, split: str, step: int, row: int) -> np.random.Generator:
    """The random generator of one row: a pure function of (seed, split, step, row)."""
    return np.random.default_rng([seed, _SPLIT_STREAM[split], step, row])


def rows_by_step(fn: Callable[[int, int], Row], global_batch: int,
                 num_rows: int | None = None) -> grain.MapDataset:
    """A ``MapDataset`` whose element ``k`` is ``fn(step, row)`` with ``k = step * global_batch + row``.

    Args:
        fn: builds one row from (step, row index within the global batch).
        global_batch: rows per step.
        num_rows: number of rows for a finite split (a multiple of ``global_batch``); None for
            unbounded.
    """
    if num_rows is None:
        num_rows = _UNBOUNDED_ROWS // global_batch * global_batch

    def by_index(k: int) -> Row:
        step, row = divmod(int(k), global_batch)
        return fn(step, row)

    return grain.MapDataset.range(num_rows).map(by_index)


def lm_row(tokens: np.ndarray, weights: np.ndarray | None = None) -> Row:
    """Splits ``seq_len + 1`` tokens into next-token ``inputs``/``targets`` (and a loss mask).

    Args:
        tokens: [seq_len + 1] integer tokens.
        weights: [seq_len] loss mask aligned with ``targets``; all ones if None.
    """
    tokens = np.asarray(tokens, np.int32)
    n = tokens.shape[0] - 1
    w = np.ones((n,), np.float32) if weights is None else np.asarray(weights, np.float32)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": w}
