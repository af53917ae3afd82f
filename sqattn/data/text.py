"""Byte-level language modelling on local text ("text" source).

Tokens are bytes (``vocab_size = 256``), so a loss in nats per token is a loss in nats per byte,
and ``bits_per_byte(loss) = loss / ln 2``.

The corpus is the concatenation (separated by ``b"\\n"``) of the text files named by ``path``, in
sorted order, read once per process and cached in memory. By default it is the Python standard
library's own sources (``*.py`` under ``sysconfig.get_paths()["stdlib"]``, without test directories
and site-packages; about 12 MB), which exist on every machine.

Split: the last ``eval_fraction`` of the byte stream is eval, the rest train. A train row of
(step, row) is a window of ``seq_len + 1`` bytes at a start drawn from (seed, step, row); the eval
rows are the consecutive windows ``[j * seq_len, j * seq_len + seq_len + 1)`` of the eval part, so
every eval byte after the first is predicted exactly once per pass.

Long-range component (``repeat_fraction`` > 0, for comparisons that need context beyond a local window): that
fraction of the rows is a span of ``ceil((seq_len + 1) / 2)`` bytes followed by the same span again (cut to
``seq_len + 1`` bytes), so every byte of the second copy is predictable by looking back exactly one span length
— beyond any window shorter than ``seq_len / 2`` — and the first copy is plain text. Train rows are repeated at
random (drawn from (seed, step, row)); eval row ``k`` is repeated exactly when ``floor((k + 1) f) >
floor(k f)`` (f = ``repeat_fraction``), so the eval split holds the fraction exactly and is the same every pass;
a repeated eval row reads the first span of its window. ``repeated_rows(cfg, n)`` says which eval rows are.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import sysconfig

import numpy as np
from ml_collections import config_dict

from sqattn.data import base

VOCAB_SIZE = 256

# Directory names left out of the default (stdlib) corpus.
EXCLUDED_STDLIB_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

_SEPARATOR = b"\n"
_SNIFF_BYTES = 8192
_GLOB_CHARS = frozenset("*?[")


def default_config() -> config_dict.ConfigDict:
    """Data sub-config of the "text" source."""
    cfg = config_dict.ConfigDict()
    cfg.name = "text"
    # Bytes per row fed to the model (each row reads seq_len + 1 bytes for next-byte targets).
    cfg.seq_len = 256
    # Seed of the train window positions (eval windows are fixed).
    cfg.seed = 0
    # A file, a directory (searched recursively for text files) or a glob ("**" allowed).
    # "" = the Python standard library sources of the running interpreter, tests excluded.
    cfg.path = ""
    # Fraction of the byte stream, taken from its end, held out for eval.
    cfg.eval_fraction = 0.02
    # Fraction of rows whose second half repeats the first (a long-range component; module docstring).
    cfg.repeat_fraction = 0.0
    return cfg


def span_length(seq_len: int) -> int:
    """Bytes of the span a repeated row holds twice (the distance every repeated byte is copied from)."""
    return (seq_len + 2) // 2


def _repeated(window: np.ndarray, total: int) -> np.ndarray:
    return np.concatenate([window, window])[:total]


def _is_repeated_eval_row(k, fraction: float):
    """Eval row(s) ``k`` (an index or an array of them) repeated at ``fraction``: floor((k+1) f) > floor(k f)."""
    return np.floor((np.asarray(k) + 1) * fraction) > np.floor(np.asarray(k) * fraction)


def repeated_rows(cfg: config_dict.ConfigDict, num_rows: int) -> np.ndarray:
    """[num_rows] bool: which eval rows (in the eval split's row order) are repeated rows."""
    return _is_repeated_eval_row(np.arange(num_rows), float(cfg.get("repeat_fraction", 0.0)))


def bits_per_byte(loss_nats: float) -> float:
    """Converts a mean loss in nats per token (= per byte here) to bits per byte."""
    return float(loss_nats) / math.log(2.0)


def _is_text(path: str) -> bool:
    """True if the first bytes of ``path`` hold no NUL and decode as UTF-8."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    if not head or b"\0" in head:
        return False
    for cut in range(4):  # The sniffed prefix may end inside a multi-byte character.
        try:
            head[:len(head) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def _walk(root: str, *, suffix: str | None = None,
          excluded: frozenset[str] = frozenset()) -> list[str]:
    """Files under ``root`` (recursive), skipping hidden entries and ``excluded`` directories."""
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in excluded]
        for f in files:
            if f.startswith(".") or (suffix is not None and not f.endswith(suffix)):
                continue
            found.append(os.path.join(d, f))
    return found


def stdlib_sources() -> list[str]:
    """The default corpus: ``*.py`` of the running interpreter's stdlib, tests excluded."""
    root = sysconfig.get_paths()["stdlib"]
    return sorted(_walk(root, suffix=".py", excluded=EXCLUDED_STDLIB_DIRS))


def find_files(path: str) -> list[str]:
    """Resolves a ``path`` field to a sorted list of text files.

    Args:
        path: "" (the stdlib sources), a file, a directory or a glob.

    Raises:
        FileNotFoundError: ``path`` is neither an existing file/directory nor a glob.
        ValueError: no text file was found.
    """
    if not path:
        files = stdlib_sources()
        searched = f"*.py under the stdlib {sysconfig.get_paths()['stdlib']} (tests excluded)"
    else:
        expanded = os.path.expanduser(path)
        if _GLOB_CHARS & set(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            searched = f"glob {path!r} ({len(matches)} match(es))"
        elif os.path.exists(expanded):
            matches = [expanded]
            searched = f"{'directory' if os.path.isdir(expanded) else 'file'} {path!r}"
        else:
            raise FileNotFoundError(f"text data path {path!r} does not exist")
        candidates = []
        for m in matches:
            candidates.extend(_walk(m) if os.path.isdir(m) else [m])
        files = sorted({os.path.abspath(f) for f in candidates if os.path.isfile(f) and _is_text(f)})
        searched += f", {len(candidates)} file(s) looked at"
    if not files:
        raise ValueError(f"no text found for data path {path!r}: searched {searched}, and none "
                         "is a non-empty UTF-8 text file")
    return files


@functools.lru_cache(maxsize=4)
def _read_concatenated(key: tuple[tuple[str, int, int], ...]) -> np.ndarray:
    parts = []
    for name, _, _ in key:
        with open(name, "rb") as f:
            parts.append(f.read())
    data = np.frombuffer(_SEPARATOR.join(parts), dtype=np.uint8)
    data.flags.writeable = False
    return data


def load_corpus(path: str) -> np.ndarray:
    """Returns the corpus of ``path`` as a read-only uint8 array (cached per resolved file list)."""
    files = find_files(path)
    key = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    return _read_concatenated(key)


def build_rows(cfg: config_dict.ConfigDict, *, split: str, global_batch: int) -> base.Rows:
    """Rows of byte windows for ``split``; see the module docstring."""
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {cfg.eval_fraction}")
    repeat = float(cfg.get("repeat_fraction", 0.0))
    if not 0.0 <= repeat <= 1.0:
        raise ValueError(f"repeat_fraction must be in [0, 1], got {repeat}")
    span = span_length(cfg.seq_len)
    data = load_corpus(cfg.path)
    n_eval = int(len(data) * cfg.eval_fraction)
    window = cfg.seq_len + 1
    where = f"text corpus {cfg.path or '<stdlib>'!r} ({len(data)} bytes)"
    if split == "train":
        train = data[:len(data) - n_eval]
        max_start = len(train) - window
        if max_start < 0:
            raise ValueError(f"{where}: train part has {len(train)} bytes, fewer than "
                             f"seq_len + 1 = {window}")

        def train_row(step: int, row: int) -> base.Row:
            rng = base.row_rng(cfg.seed, split, step, row)
            start = int(rng.integers(0, max_start + 1))
            if repeat > 0.0 and rng.random() < repeat:  # no extra draw at 0: the plain stream is unchanged
                return base.lm_row(_repeated(train[start:start + span], window))
            return base.lm_row(train[start:start + window])

        return base.Rows(base.rows_by_step(train_row, global_batch), VOCAB_SIZE)

    evals = data[len(data) - n_eval:]
    num_windows = max(len(evals) - 1, 0) // cfg.seq_len
    num_batches = num_windows // global_batch
    if num_batches == 0:
        raise ValueError(f"{where}: eval part ({len(evals)} bytes, eval_fraction "
                         f"{cfg.eval_fraction}) holds {num_windows} window(s) of seq_len "
                         f"{cfg.seq_len}, fewer than one global batch of {global_batch}; raise "
                         "eval_fraction or lower seq_len / the eval batch size")

    def eval_row(step: int, row: int) -> base.Row:
        k = step * global_batch + row
        start = k * cfg.seq_len
        if repeat > 0.0 and _is_repeated_eval_row(k, repeat):
            return base.lm_row(_repeated(evals[start:start + span], window))
        return base.lm_row(evals[start:start + window])

    rows = base.rows_by_step(eval_row, global_batch, num_batches * global_batch)
    return base.Rows(rows, VOCAB_SIZE, num_batches)
