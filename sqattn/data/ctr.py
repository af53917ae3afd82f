"""Click-through-rate (CTR) data: tabular rows of categorical fields and a 0/1 click label.

Two sources, one output: three fixed splits ``train`` / ``valid`` / ``test``, each
``{"ids": int32 [N, F], "label": float32 [N]}``, plus the per-field vocabulary sizes (``ids[:, f]`` lies in
``[0, vocab_sizes[f])``). The splits are saved once as ``.npz`` and reloaded, so every model (ours and a peer
library's) sees identical rows.

* **synthetic** (the FCN note's CPU reproduction): F categorical fields, vocabulary sizes drawn from
  ``[vocab_min, vocab_max]``, Zipf-distributed ids. The ground-truth logit is

      bias + sum_f T_f[x_f] + sum_{p=1..8} P_p[x_i, x_j] + alpha * sum_{k=1..K} prod_{f in S_k} s_{k,f}[x_f]

  with first-order tables T, random field pairs with tables P, and K high-order terms: term k picks
  ``|S_k|`` in ``[high_min_order, high_max_order]`` fields and hashes each field's id into a sign
  ``s_{k,f}[x] in {-1, +1}`` (a random sign table). ``variant="low"`` sets alpha = 0; ``variant="high"`` picks
  alpha so that the high-order part carries ``high_share`` (0.4) of the logit variance. The bias is solved so the
  mean click rate is ``base_ctr``; ``y ~ Bernoulli(sigmoid(logit))``. Both variants share ids, tables and the
  uniform draws behind the labels (common random numbers), so they differ only by the high-order terms.
* **criteo / avazu** (real-format files): Criteo is tab-separated without a header: label, 13 integer columns,
  26 categorical (hashed hex) columns. Avazu is comma-separated with a header: ``id`` (dropped), ``click`` (the
  label), ``hour`` (YYMMDDHH, expanded to hour-of-day / weekday / weekend fields) and 21 categorical columns.
  Integer columns are bucketised as in FuxiCTR (``v > 2 -> floor(ln(v)^2)``, else ``int(v)``); an empty value is
  its own category. The one file is split 8:1:1 by a seeded permutation (the BARS "x4" protocol). Per-field
  vocabularies are built on the train rows only, keep values seen at least ``min_count`` times (sorted by count,
  then value, so the build is deterministic), and map everything else (rare or unseen) to id 0, the
  out-of-vocabulary bucket. Vocabulary and encoded splits are saved beside the data
  (``<file>.sqattn-ctr/``) and reused. A malformed file (empty, a missing column, a label that is not 0/1, a
  non-numeric integer column) raises ``CTRDataError`` naming the file and line.

``CTRSplit`` serves one split to the trainer: ``batch(step)`` is a pure function of (seed, step) (train: a
seeded permutation per epoch, dropping the last partial batch; eval: the split in order, each eval batch of
``ceil(N / eval_batches)`` rows rounded up to the batch-sharding ways, padded with zero-weight rows, so
``eval_batches`` eval steps cover the whole split exactly once).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
from typing import Sequence

import numpy as np
from ml_collections import config_dict

log = logging.getLogger("sqattn.data.ctr")

SPLITS = ("train", "valid", "test")
SOURCES = ("synthetic", "criteo", "avazu")
OOV = 0  # id of the out-of-vocabulary bucket in every field of a file source


class CTRDataError(ValueError):
    """A CTR data file that cannot be read; the message names the file and line."""


# ------------------------------------------------------------------------------------------------ config
def default_config() -> config_dict.ConfigDict:
    """Data sub-config of a CTR task (every field commented)."""
    c = config_dict.ConfigDict()
    c.source = "synthetic"        # "synthetic" | "criteo" | "avazu"
    c.data_dir = "/tmp/sqattn/ctr"  # where synthetic splits (and the generated sample file) are saved
    c.seed = 0                    # data seed: generator, file split permutation, train shuffling
    c.eval_split = "valid"        # the split the trainer evaluates: "valid" | "test" (| "train")
    # --- synthetic
    c.variant = "high"            # "low" (no high-order terms) | "high" (high-order terms carry high_share)
    c.num_fields = 16             # F
    c.num_rows = 300_000          # N, split train/valid/test by split_fractions
    c.vocab_min = 8               # field vocabulary sizes are drawn uniformly from [vocab_min, vocab_max]
    c.vocab_max = 200
    c.zipf = 1.2                  # id frequency ~ 1 / (rank + 1) ** zipf
    c.first_std = 0.2             # std of first-order table entries
    c.num_pairs = 8               # random pairwise terms
    c.pair_std = 0.3              # std of pairwise table entries
    c.num_high = 6                # K high-order terms
    c.high_min_order = 4          # each picks this many fields ...
    c.high_max_order = 8          # ... up to this many
    c.high_share = 0.4            # share of logit variance carried by the high-order terms (variant="high")
    c.base_ctr = 0.175            # mean click rate (the bias is solved for it)
    c.split_fractions = (0.8, 0.1, 0.1)  # train / valid / test
    # --- criteo / avazu files
    c.path = ""                   # the data file; "" = a generated sample file in data_dir (see sample_rows)
    c.min_count = 10              # vocabulary keeps values seen >= min_count times in train; others -> id 0
    c.sample_rows = 20_000        # rows of the generated sample file when path is ""
    return c


def _norm(cfg) -> config_dict.ConfigDict:
    full = default_config()
    unknown = sorted(set(cfg.keys()) - set(full.keys()))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in the CTR data config; known: {sorted(full.keys())}")
    for k in cfg.keys():
        full[k] = cfg[k]
    if full.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {full.source!r}")
    fr = tuple(float(x) for x in full.split_fractions)
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"data.split_fractions must be 3 positive numbers summing to 1, got {fr}")
    return full


# ------------------------------------------------------------------------------------------------ synthetic
_SYNTH_KEYS = ("seed", "num_fields", "num_rows", "vocab_min", "vocab_max", "zipf", "first_std", "num_pairs",
               "pair_std", "num_high", "high_min_order", "high_max_order", "high_share", "base_ctr",
               "split_fractions")


def synthetic_vocab_sizes(cfg) -> tuple[int, ...]:
    """Field vocabulary sizes of the synthetic source (cheap: no rows are generated)."""
    cfg = _norm(cfg)
    if not 2 <= cfg.vocab_min <= cfg.vocab_max:
        raise ValueError(f"need 2 <= data.vocab_min <= data.vocab_max, got {cfg.vocab_min}, {cfg.vocab_max}")
    rng = np.random.default_rng([cfg.seed, 0])
    return tuple(int(v) for v in rng.integers(cfg.vocab_min, cfg.vocab_max + 1, size=cfg.num_fields))


def _solve_bias(logit: np.ndarray, target: float) -> float:
    lo, hi = -30.0, 30.0
    for _ in range(80):   # mean sigmoid(logit + b) is increasing in b: bisection
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def generate_synthetic(cfg) -> tuple[np.ndarray, np.ndarray, dict]:
    """Generates all rows of the synthetic source: (ids int32 [N, F], labels float32 [N], info)."""
    cfg = _norm(cfg)
    vocab = synthetic_vocab_sizes(cfg)
    f, n = cfg.num_fields, cfg.num_rows
    if not 2 <= cfg.high_min_order <= cfg.high_max_order <= f:
        raise ValueError(f"need 2 <= high_min_order <= high_max_order <= num_fields, got "
                         f"{cfg.high_min_order}, {cfg.high_max_order}, {f}")
    if f < 2 or n < 10:
        raise ValueError(f"need num_fields >= 2 and num_rows >= 10, got {f}, {n}")
    rs = np.random.default_rng([cfg.seed, 1])      # structure: tables, pairs, high-order terms
    rx = np.random.default_rng([cfg.seed, 2])      # ids
    ry = np.random.default_rng([cfg.seed, 3])      # label draws (shared by both variants)
    ids = np.empty((n, f), np.int32)
    for j, v in enumerate(vocab):
        p = 1.0 / np.arange(1, v + 1) ** cfg.zipf
        ids[:, j] = rx.choice(v, size=n, p=p / p.sum())
    low = np.zeros(n)
    for j, v in enumerate(vocab):                  # first order
        low += rs.normal(0.0, cfg.first_std, v)[ids[:, j]]
    pairs = []
    for _ in range(cfg.num_pairs):                 # second order
        a, b = sorted(rs.choice(f, 2, replace=False))
        low += rs.normal(0.0, cfg.pair_std, (vocab[a], vocab[b]))[ids[:, a], ids[:, b]]
        pairs.append((int(a), int(b)))
    high = np.zeros(n)
    terms = []
    for _ in range(cfg.num_high):                  # high order: products of hashed signs
        order = int(rs.integers(cfg.high_min_order, cfg.high_max_order + 1))
        fields = sorted(int(x) for x in rs.choice(f, order, replace=False))
        prod = np.ones(n)
        for j in fields:
            prod *= rs.choice([-1.0, 1.0], vocab[j])[ids[:, j]]
        high += prod
        terms.append(fields)
    share = cfg.high_share if cfg.variant == "high" else 0.0
    if cfg.variant not in ("low", "high"):
        raise ValueError(f"data.variant must be 'low' or 'high', got {cfg.variant!r}")
    alpha = 0.0 if share == 0 else math.sqrt(share / (1 - share) * np.var(low) / max(np.var(high), 1e-12))
    logit = low + alpha * high
    bias = _solve_bias(logit, cfg.base_ctr)
    prob = 1.0 / (1.0 + np.exp(-(logit + bias)))
    labels = (ry.random(n) < prob).astype(np.float32)
    var = np.var(logit)
    info = dict(vocab_sizes=list(vocab), pairs=pairs, high_terms=terms, alpha=alpha, bias=bias,
                high_share=float(alpha ** 2 * np.var(high) / var) if var > 0 else 0.0,
                ctr=float(labels.mean()), bayes_auc=_auc_exact(prob, labels))
    return ids, labels, info


def _auc_exact(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted one half (numpy; for the generator's info only)."""
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]     # average 1-based ranks
    pos = y.sum()
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _split_rows(n: int, fractions, seed: int) -> dict[str, np.ndarray]:
    perm = np.random.default_rng([seed, 4]).permutation(n)
    n_tr = int(round(n * fractions[0]))
    n_va = int(round(n * fractions[1]))
    return {"train": perm[:n_tr], "valid": perm[n_tr:n_tr + n_va], "test": perm[n_tr + n_va:]}


def _spec_hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _save_splits(directory: str, splits: dict, meta: dict) -> None:
    tmp = directory + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for name, arrays in splits.items():
        np.savez(os.path.join(tmp, f"{name}.npz"), **arrays)
    with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
    try:
        os.replace(tmp, directory)
    except OSError:              # another process saved it first: keep theirs
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def _load_splits(directory: str) -> dict:
    out = {}
    for name in SPLITS:
        with np.load(os.path.join(directory, f"{name}.npz")) as z:
            out[name] = {"ids": z["ids"].astype(np.int32), "label": z["label"].astype(np.float32)}
    return out


def synthetic_dir(cfg) -> str:
    cfg = _norm(cfg)
    spec = {k: cfg[k] for k in _SYNTH_KEYS}
    spec["split_fractions"] = list(spec["split_fractions"])
    return os.path.join(cfg.data_dir, f"synthetic-{cfg.variant}-{_spec_hash(spec)}")


# ------------------------------------------------------------------------------------------------ files
@dataclasses.dataclass(frozen=True)
class FileFormat:
    """Column layout of a real-format CTR file."""
    name: str
    delimiter: str
    header: bool
    num_columns: int
    label: int                      # column index of the label
    dense: tuple[int, ...]          # integer columns (bucketised)
    categorical: tuple[int, ...]    # string columns
    hour: int | None = None         # Avazu YYMMDDHH column -> hour / weekday / weekend fields
    field_names: tuple[str, ...] = ()


CRITEO = FileFormat("criteo", "\t", False, 40, 0, tuple(range(1, 14)), tuple(range(14, 40)),
                    field_names=tuple(f"I{i}" for i in range(1, 14)) + tuple(f"C{i}" for i in range(1, 27)))
AVAZU_COLUMNS = ("id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                 "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21")
AVAZU = FileFormat("avazu", ",", True, 24, 1, (), tuple(range(3, 24)), hour=2,
                   field_names=("hour", "weekday", "weekend") + AVAZU_COLUMNS[3:])
FORMATS = {"criteo": CRITEO, "avazu": AVAZU}


def bucketize(v: int) -> int:
    """FuxiCTR's ``convert_to_bucket`` for an integer column: ``v > 2 -> int(floor(ln(v)^2))``, else ``v``."""
    return int(math.floor(math.log(v) ** 2)) if v > 2 else int(v)


def _row_values(fmt: FileFormat, row: list[str], path: str, line: int) -> tuple[float, list[str]]:
    """(label, one string token per field) of one parsed row; raises CTRDataError naming path:line."""
    if len(row) != fmt.num_columns:
        raise CTRDataError(f"{path}:{line}: expected {fmt.num_columns} {fmt.name} columns, found {len(row)}"
                           + (" (missing column)" if len(row) < fmt.num_columns else ""))
    lab = row[fmt.label].strip()
    if lab not in ("0", "1"):
        try:
            lv = float(lab)
        except ValueError:
            lv = None
        if lv not in (0.0, 1.0):
            raise CTRDataError(f"{path}:{line}: label {lab!r} is not 0 or 1")
        lab = "1" if lv == 1.0 else "0"
    vals: list[str] = []
    if fmt.hour is not None:
        h = row[fmt.hour].strip()
        try:
            t = datetime.datetime.strptime(h, "%y%m%d%H")
        except ValueError:
            raise CTRDataError(f"{path}:{line}: hour {h!r} is not YYMMDDHH") from None
        vals += [str(t.hour), str(t.weekday()), str(int(t.weekday() >= 5))]
    for c in fmt.dense:
        s = row[c].strip()
        if s == "":
            vals.append("")
            continue
        try:
            v = int(float(s))
        except ValueError:
            raise CTRDataError(f"{path}:{line}: column {c} ({fmt.field_names[len(vals)]}) value {s!r} is not "
                               f"a number") from None
        vals.append(str(bucketize(v)))
    vals += [row[c].strip() for c in fmt.categorical]
    return float(lab), vals


def read_file(path: str, fmt: FileFormat) -> tuple[np.ndarray, list[list[str]]]:
    """Parses a whole file: (labels float32 [N], per-row field tokens). Raises CTRDataError when malformed."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"CTR data file {path!r} does not exist")
    labels: list[float] = []
    rows: list[list[str]] = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh, delimiter=fmt.delimiter, quoting=csv.QUOTE_NONE)
        line = 0
        if fmt.header:
            head = next(reader, None)
            line = 1
            if head is None:
                raise CTRDataError(f"{path}: the file is empty (expected a header and rows)")
            if fmt is AVAZU and [h.strip() for h in head] != list(AVAZU_COLUMNS):
                raise CTRDataError(f"{path}:1: header {head} is not the Avazu header {list(AVAZU_COLUMNS)}")
        for row in reader:
            line += 1
            if not row:
                continue          # blank line
            y, vals = _row_values(fmt, row, path, line)
            labels.append(y)
            rows.append(vals)
    if not rows:
        raise CTRDataError(f"{path}: the file has no data rows")
    return np.asarray(labels, np.float32), rows


def build_vocabulary(rows: Sequence[Sequence[str]], num_fields: int, min_count: int) -> list[list[str]]:
    """Per field, the values seen >= min_count times, sorted by (-count, value); id = 1 + position (0 = OOV)."""
    from collections import Counter
    counts = [Counter() for _ in range(num_fields)]
    for r in rows:
        for j, v in enumerate(r):
            counts[j][v] += 1
    return [[v for v, c in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
            for cnt in counts]


def encode(rows: Sequence[Sequence[str]], vocab: list[list[str]]) -> np.ndarray:
    """Maps field tokens to ids with ``vocab`` (unseen or rare -> OOV = 0): int32 [N, F]."""
    index = [{v: i + 1 for i, v in enumerate(vs)} for vs in vocab]
    out = np.empty((len(rows), len(vocab)), np.int32)
    for i, r in enumerate(rows):
        out[i] = [index[j].get(v, OOV) for j, v in enumerate(r)]
    return out


def cache_dir(path: str) -> str:
    """Where a file's vocabulary and encoded splits are saved: beside the data."""
    return path + ".sqattn-ctr"


def _file_prepared(cfg) -> tuple[str, str]:
    """(vocabulary json, encoded-splits dir) for cfg's file, building and saving them when missing."""
    fmt = FORMATS[cfg.source]
    path = cfg.path or sample_file(cfg)
    d = cache_dir(path)
    st = os.stat(path)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fr = [float(x) for x in cfg.split_fractions]
    vocab_path = os.path.join(d, f"vocab-min{cfg.min_count}-seed{cfg.seed}-{_spec_hash([fr])}.json")
    enc_dir = os.path.join(d, f"splits-min{cfg.min_count}-seed{cfg.seed}-{_spec_hash([fr])}")
    if os.path.exists(vocab_path) and os.path.exists(os.path.join(enc_dir, "meta.json")):
        with open(vocab_path) as fh:
            meta = json.load(fh)
        if meta.get("file") == stamp:
            return vocab_path, enc_dir
        log.warning("%s changed since its vocabulary was built; rebuilding", path)
    labels, rows = read_file(path, fmt)
    parts = _split_rows(len(rows), fr, cfg.seed)
    vocab = build_vocabulary([rows[i] for i in parts["train"]], len(fmt.field_names), cfg.min_count)
    ids = encode(rows, vocab)
    os.makedirs(d, exist_ok=True)
    import shutil
    shutil.rmtree(enc_dir, ignore_errors=True)
    _save_splits(enc_dir, {k: {"ids": ids[v], "label": labels[v]} for k, v in parts.items()},
                 {"rows": {k: int(len(v)) for k, v in parts.items()}, "file": stamp})
    tmp = vocab_path + f".tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"format": fmt.name, "min_count": cfg.min_count, "file": stamp, "fields": list(fmt.field_names),
                   "vocab": vocab}, fh)
    os.replace(tmp, vocab_path)
    log.info("built the %s vocabulary of %s (%d rows): %s", fmt.name, path, len(rows), vocab_path)
    return vocab_path, enc_dir


def sample_file(cfg) -> str:
    """A generated file in ``cfg.source``'s format (``sample_rows`` rows) in ``data_dir``; written once."""
    path = os.path.join(cfg.data_dir, f"sample-{cfg.source}-{cfg.sample_rows}-seed{cfg.seed}.txt")
    if not os.path.exists(path):
        os.makedirs(cfg.data_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        write_sample_file(tmp, cfg.source, cfg.sample_rows, cfg.seed)
        os.replace(tmp, path)
    return path


def write_sample_file(path: str, source: str, num_rows: int, seed: int = 0) -> None:
    """Writes ``num_rows`` rows in the Criteo or Avazu format, with labels from the synthetic generator.

    Criteo: a missing integer (about 10%) is an empty column; categorical values are 8-digit hex hashes.
    Avazu: hours span 10 days from 14102100; the id column is the row number.
    """
    fmt = FORMATS[source]
    nf = len(fmt.dense) + len(fmt.categorical) + (1 if fmt.hour is not None else 0)
    gen = default_config()
    gen.seed, gen.num_fields, gen.num_rows, gen.variant = seed, nf, max(num_rows, 10), "high"
    gen.high_max_order = min(gen.high_max_order, nf)
    ids, labels, _ = generate_synthetic(gen)
    ids, labels = ids[:num_rows], labels[:num_rows]
    rng = np.random.default_rng([seed, 9])

    def hexhash(j, v):
        return hashlib.md5(f"{source}{j}:{v}".encode()).hexdigest()[:8]

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=fmt.delimiter, lineterminator="\n")
        if fmt.header:
            w.writerow(AVAZU_COLUMNS)
        for i in range(num_rows):
            r = ids[i]
            if fmt is CRITEO:
                dense = ["" if rng.random() < 0.1 else str(int(r[j]) * 3) for j in range(13)]
                w.writerow([str(int(labels[i]))] + dense + [hexhash(j, r[j]) for j in range(13, 39)])
            else:
                t = datetime.datetime(2014, 10, 21) + datetime.timedelta(hours=int(r[0]) % 240)
                w.writerow([str(i), str(int(labels[i])), t.strftime("%y%m%d%H")]
                           + [hexhash(j, r[j]) for j in range(1, 22)])


def file_vocab_sizes(cfg) -> tuple[int, ...]:
    """Per-field vocabulary sizes of a file source (1 + kept values, id 0 = OOV); builds the vocabulary once."""
    cfg = _norm(cfg)
    vocab_path, _ = _file_prepared(cfg)
    with open(vocab_path) as fh:
        return tuple(1 + len(v) for v in json.load(fh)["vocab"])


# ------------------------------------------------------------------------------------------------ entry points
def vocab_sizes(cfg) -> tuple[int, ...]:
    """Per-field vocabulary sizes of the data ``cfg`` describes (what the model's tables need)."""
    cfg = _norm(cfg)
    return synthetic_vocab_sizes(cfg) if cfg.source == "synthetic" else file_vocab_sizes(cfg)


def load_splits(cfg) -> dict[str, dict[str, np.ndarray]]:
    """The three fixed splits ``{"train"|"valid"|"test": {"ids": int32 [N, F], "label": float32 [N]}}``.

    Generated (or parsed) on first use, saved as ``.npz``, then reloaded unchanged.
    """
    cfg = _norm(cfg)
    if cfg.source == "synthetic":
        d = synthetic_dir(cfg)
        if not os.path.exists(os.path.join(d, "meta.json")):
            ids, labels, info = generate_synthetic(cfg)
            parts = _split_rows(len(labels), cfg.split_fractions, cfg.seed)
            _save_splits(d, {k: {"ids": ids[v], "label": labels[v]} for k, v in parts.items()}, info)
            log.info("generated synthetic CTR data (%s): %s", cfg.variant, d)
        return _load_splits(d)
    _, enc_dir = _file_prepared(cfg)
    return _load_splits(enc_dir)


def split_info(cfg) -> dict:
    """The saved ``meta.json`` of the synthetic splits (alpha, bias, Bayes AUC, ...) after ``load_splits``."""
    with open(os.path.join(synthetic_dir(cfg), "meta.json")) as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------------ trainer view
class CTRSplit:
    """One split served to the trainer: ``batch(step)`` -> ``{"ids", "label"[, "row_weight"]}``.

    Train (``shuffle=True``): epoch ``e = step // steps_per_epoch`` uses the permutation seeded by (seed, e),
    drops the last partial batch, and the batch of ``step`` is rows ``[j*B, (j+1)*B)`` of it; this shard takes
    its ``B / shard_count`` slice. Eval (``shuffle=False``): batch ``i`` is rows ``[i*B, (i+1)*B)`` in order,
    padded past the end with id-0 rows of ``row_weight`` 0 (the eval marker the task keys on).

    Attributes:
      batch_size: rows per batch of this shard; global_batch_size: over all shards.
      num_batches: distinct batches (steps per epoch for train; batches covering the split for eval).
      seq_len: 1 (one prediction per row; the trainer's tokens/s is then rows/s).
    """

    seq_len = 1

    def __init__(self, arrays: dict, *, global_batch_size: int, shard_index: int = 0, shard_count: int = 1,
                 shuffle: bool, seed: int = 0):
        if global_batch_size < 1 or global_batch_size % shard_count:
            raise ValueError(f"global batch {global_batch_size} must be a positive multiple of the "
                             f"{shard_count} data shards")
        self.ids = np.ascontiguousarray(arrays["ids"], np.int32)
        self.label = np.ascontiguousarray(arrays["label"], np.float32)
        self.num_rows = len(self.label)
        self.global_batch_size = int(global_batch_size)
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.batch_size = self.global_batch_size // self.shard_count
        self.shuffle, self.seed = bool(shuffle), int(seed)
        if shuffle:
            self.num_batches = self.num_rows // self.global_batch_size
            if self.num_batches == 0:
                raise ValueError(f"the train split has {self.num_rows} rows, fewer than one batch of "
                                 f"{self.global_batch_size}")
        else:
            self.num_batches = -(-self.num_rows // self.global_batch_size)
        self._perm_epoch, self._perm = -1, None

    def _rows(self, step: int) -> np.ndarray:
        lo = step * self.global_batch_size + self.shard_index * self.batch_size
        if not self.shuffle:
            return np.arange(lo, lo + self.batch_size)
        epoch, j = divmod(step, self.num_batches)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 5, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        lo = j * self.global_batch_size + self.shard_index * self.batch_size
        return self._perm[lo:lo + self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rows = self._rows(step)
        if self.shuffle:
            return {"ids": self.ids[rows], "label": self.label[rows]}
        valid = rows < self.num_rows
        r = np.where(valid, rows, 0)
        return {"ids": np.where(valid[:, None], self.ids[r], 0).astype(np.int32),
                "label": np.where(valid, self.label[r], 0.0).astype(np.float32),
                "row_weight": valid.astype(np.float32)}

    def __repr__(self) -> str:
        return (f"CTRSplit(rows={self.num_rows}, batch={self.batch_size}, shard={self.shard_index}/"
                f"{self.shard_count}, shuffle={self.shuffle}, num_batches={self.num_batches})")
