"""Byte-level LM on a nested shard of the local text corpus, for data-scaling sweeps (papers/scaling_laws.md).

Task ``"lm_shards"`` (``sqattn.train.tasks.TASKS``): the model and loss are ``LMTask``'s; only the train data
differ. The train part of the ``text`` source's corpus (everything but the last ``eval_fraction``, by default the
stdlib's Python sources) is cut into ``CHUNK``-byte chunks, which are put in one fixed random order (drawn from
``shard_seed``); the shard of ``train_bytes`` bytes is the first ``train_bytes // CHUNK`` chunks of that order, so
every shard contains every smaller one and all are spread over the whole corpus. A train row of (step, row) is a
window of ``seq_len + 1`` bytes inside one chunk of the shard, drawn from (seed, step, row). The eval rows are the
``text`` source's (the last ``eval_fraction`` of the corpus), identical for every shard.

``config.data``: the ``text`` source's fields (name "text", seq_len, seed, path, eval_fraction) plus
``train_bytes`` (0 = the whole train part) and ``shard_seed``.
"""

from __future__ import annotations

import functools

import numpy as np

from sqattn import data
from sqattn.data import base as data_base
from sqattn.data import text
from sqattn.train.tasks import LMTask

CHUNK = 4096


@functools.lru_cache(maxsize=4)
def _chunk_order(path: str, eval_fraction: float, shard_seed: int) -> tuple[np.ndarray, np.ndarray]:
    corpus = text.load_corpus(path)
    train = corpus[:len(corpus) - int(len(corpus) * eval_fraction)]
    n_chunks = len(train) // CHUNK
    order = np.random.default_rng([int(shard_seed), 11]).permutation(n_chunks)
    return train, order


def shard_chunks(cfg) -> tuple[np.ndarray, np.ndarray]:
    """(train bytes, chunk indices of the shard of ``cfg.train_bytes`` bytes, in the fixed order)."""
    train, order = _chunk_order(cfg.get("path", ""), float(cfg.get("eval_fraction", 0.02)),
                                int(cfg.get("shard_seed", 0)))
    want = int(cfg.get("train_bytes", 0))
    n = len(order) if want <= 0 else want // CHUNK
    if n < 1 or n > len(order):
        raise ValueError(f"lm_shards: train_bytes={want} gives {n} chunks of {CHUNK} bytes; the train part holds "
                         f"{len(order)} chunks ({len(order) * CHUNK} bytes)")
    return train, order[:n]


class ShardedTextTask(LMTask):
    """``LMTask`` whose train rows come from a nested shard of the corpus (module docstring)."""

    byte_level = True

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        cfg = config.data
        if cfg.seq_len + 1 > CHUNK:
            raise ValueError(f"lm_shards: seq_len + 1 = {cfg.seq_len + 1} exceeds the chunk of {CHUNK} bytes")
        text_cfg = data.default_config("text")
        for key in text_cfg.keys():
            if key in cfg:
                text_cfg[key] = cfg[key]
        text_cfg.name = "text"
        kw = dict(shard_index=shard_index, shard_count=shard_count)
        evals = data.make_dataset(text_cfg, batch_size=config.batch_size, split="eval", **kw)
        train, chunks = shard_chunks(cfg)
        window = cfg.seq_len + 1
        seed = int(cfg.seed)

        def train_row(step: int, row: int) -> data_base.Row:
            rng = data_base.row_rng(seed, "train", step, row)
            c = int(chunks[rng.integers(0, len(chunks))])
            start = c * CHUNK + int(rng.integers(0, CHUNK - window + 1))
            return data_base.lm_row(train[start:start + window])

        rows = data_base.Rows(data_base.rows_by_step(train_row, config.batch_size), text.VOCAB_SIZE)
        train_ds = data_base.Dataset(rows, name="lm_shards", split="train", seq_len=cfg.seq_len,
                                     global_batch_size=config.batch_size, **kw)
        self.byte_level = True
        return train_ds, evals
