"""Byte-level language modelling on a prepared TFDS text dataset ("tfds" source).

Reads with ``tfds.data_source`` (random access over array_record files; no TensorFlow), so the
dataset must already be prepared in the array_record format under ``tfds_data_dir``. Nothing is
ever downloaded: an unprepared dataset raises an error that says how to prepare it elsewhere.

Each example's ``text_key`` feature is UTF-8 bytes; examples are joined with ``b"\\n"`` into one
stream per split (in the split's stored order, wrapping around at its end). Tokens are bytes
(``vocab_size = 256``).

* train: row (step, row) starts at a random example and a random byte offset inside it, both
  drawn from (seed, step, row), and reads ``seq_len + 1`` bytes of the stream from there.
* eval: the consecutive windows ``[j * seq_len, j * seq_len + seq_len + 1)`` of the eval split's
  stream, read lazily in order (the split repeats if a run asks for more windows than it holds).
"""

from __future__ import annotations

import threading

import numpy as np
from ml_collections import config_dict

from sqattn.data import base

VOCAB_SIZE = 256
_SEPARATOR = b"\n"


def default_config() -> config_dict.ConfigDict:
    """Data sub-config of the "tfds" source."""
    cfg = config_dict.ConfigDict()
    cfg.name = "tfds"
    # Bytes per row fed to the model (each row reads seq_len + 1 bytes for next-byte targets).
    cfg.seq_len = 512
    # Seed of the train window positions (eval windows are fixed).
    cfg.seed = 0
    # Registered TFDS name, optionally with config/version ("lm1b", "wiki40b/en:1.3.0").
    cfg.tfds_name = "lm1b"
    # Directory holding prepared datasets; "" = TFDS's default (TFDS_DATA_DIR or
    # ~/tensorflow_datasets).
    cfg.tfds_data_dir = ""
    # TFDS split read for training (slicing such as "train[:90%]" is allowed).
    cfg.train_split = "train"
    # TFDS split read for eval.
    cfg.eval_split = "test"
    # Feature holding the text of an example.
    cfg.text_key = "text"
    return cfg


def _prepare_hint(name: str, data_dir: str) -> str:
    return (f"prepare it on a machine with internet access with `tfds build {name} "
            f"--data_dir {data_dir} --file_format array_record` (or, in Python, "
            f"`tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
            f".download_and_prepare()`) and copy {data_dir} here")


def open_split(cfg: config_dict.ConfigDict, split_name: str):
    """Opens ``split_name`` of the configured dataset as a random-access source, never downloading.

    Raises:
        ValueError: the dataset is unknown, not prepared under the data dir, or not stored as
            array_record.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Slow import.

    name = cfg.tfds_name
    data_dir = cfg.tfds_data_dir or None
    real_dir = cfg.tfds_data_dir or tfds.core.constants.DATA_DIR
    shown_dir = cfg.tfds_data_dir or f"the TFDS default data dir ({real_dir})"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"TFDS dataset {name!r} is not a registered TFDS name and is not prepared "
                         f"under {shown_dir}; {_prepare_hint(name, real_dir)}") from e
    if not builder.is_prepared():
        raise ValueError(f"TFDS dataset {name!r} is not prepared under {shown_dir} (looked for "
                         f"{builder.data_path}); this code never downloads: "
                         f"{_prepare_hint(name, real_dir)}")
    file_format = builder.info.file_format
    if file_format is None or "array_record" not in str(file_format).lower():
        raise ValueError(f"TFDS dataset {name!r} under {builder.data_dir} is stored as "
                         f"{file_format}, but reading without TensorFlow needs array_record; "
                         f"{_prepare_hint(name, real_dir)}")
    return tfds.data_source(name, split=split_name, data_dir=data_dir)


def _example_bytes(example: dict, key: str) -> bytes:
    """The UTF-8 bytes of feature ``key`` of a decoded example."""
    if key not in example:
        raise KeyError(f"text_key {key!r} is not a feature of the dataset; features: "
                       f"{sorted(example)}")
    value = example[key]
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


class _OrderedStream:
    """The split's examples joined in order (and repeated), read lazily and cached.

    ``window(start, length)`` is a pure function of its arguments; the cache only saves reads.
    """

    def __init__(self, source, key: str):
        self._source = source
        self._key = key
        self._chunks: list[bytes] = []
        self._size = 0
        self._next = 0
        self._lock = threading.Lock()

    def window(self, start: int, length: int) -> np.ndarray:
        with self._lock:
            if self._size < start + length:
                # Read ahead geometrically so that in-order requests cost O(total) reads and joins.
                target = max(start + length, 2 * self._size, 1 << 12)
                while self._size < target:
                    example = self._source[self._next % len(self._source)]
                    chunk = _example_bytes(example, self._key) + _SEPARATOR
                    self._chunks.append(chunk)
                    self._size += len(chunk)
                    self._next += 1
                self._chunks = [b"".join(self._chunks)]
            return np.frombuffer(self._chunks[0], np.uint8)[start:start + length]


def build_rows(cfg: config_dict.ConfigDict, *, split: str, global_batch: int) -> base.Rows:
    """Rows of packed byte windows for ``split``; see the module docstring."""
    split_name = cfg.train_split if split == "train" else cfg.eval_split
    source = open_split(cfg, split_name)
    num_examples = len(source)
    where = f"TFDS {cfg.tfds_name!r} split {split_name!r}"
    if num_examples == 0:
        raise ValueError(f"{where} has no examples")
    window = cfg.seq_len + 1

    if split == "eval":
        stream = _OrderedStream(source, cfg.text_key)

        def eval_row(step: int, row: int) -> base.Row:
            return base.lm_row(stream.window((step * global_batch + row) * cfg.seq_len, window))

        return base.Rows(base.rows_by_step(eval_row, global_batch), VOCAB_SIZE)

    def train_row(step: int, row: int) -> base.Row:
        rng = base.row_rng(cfg.seed, split, step, row)
        index = int(rng.integers(0, num_examples))
        first = _example_bytes(source[index], cfg.text_key) + _SEPARATOR
        parts = [first[int(rng.integers(0, len(first))):]]
        size = len(parts[0])
        for i in range(1, num_examples + 1):
            if size >= window:
                break
            parts.append(_example_bytes(source[(index + i) % num_examples], cfg.text_key))
            parts.append(_SEPARATOR)
            size += len(parts[-2]) + 1
        if size < window:
            raise ValueError(f"{where} holds fewer than seq_len + 1 = {window} bytes")
        tokens = np.frombuffer(b"".join(parts), np.uint8)[:window]
        return base.lm_row(tokens)

    return base.Rows(base.rows_by_step(train_row, global_batch), VOCAB_SIZE)
