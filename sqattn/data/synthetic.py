"""Synthetic sequence tasks: MQAR, copy and selective copy.

Every row is a token sequence ``s`` of length ``seq_len + 1`` drawn fresh from (seed, split, step,
row); the model sees ``inputs = s[:-1]`` and predicts ``targets = s[1:]``, and ``weights`` is 1
only where the target is part of the answer. Train and eval use disjoint random streams.

* **mqar** (Zoology multi-query associative recall, Arora et al. 2023). Token ids: 0 = pad,
  keys ``[1, 1 + K)``, values ``[1 + K, 1 + K + V)``. Layout::

      k_1 v_1 k_2 v_2 ... k_P v_P | query region: Q pairs "k v" in random 2-token slots, noise elsewhere

  The P keys are distinct, as are the values. The Q queried keys are distinct keys of the kv
  block; each query slot ``g`` (0 = right after the kv block) is drawn without replacement with
  probability proportional to ``(g + 1) ** (power_a - 1)`` (Zoology's power law; ``power_a = 1``
  is uniform). Weight 1 exactly at the query keys, whose target is the bound value.
* **copy** (Mamba free-lunch paper, section 5)::

      x_1 .. x_L SEP x_1 .. x_L PAD ...        x_i uniform over num_symbols data tokens

  with L uniform in ``[min_copy_len, copy_len]``; the loss covers the L copied tokens.
  Token ids: 0 = pad, data ``[1, 1 + num_symbols)``, SEP = ``num_symbols + 1``.
* **selective_copy** (Mamba paper, section 4.1.1)::

      [region of seq_len - num_tokens tokens: num_tokens data tokens at random positions, noise
       elsewhere] MARKER y_1 .. y_num_tokens

  where ``y`` are the data tokens in order of position; the loss covers the outputs ``y``.
  Token ids: 0 = noise, data ``[1, 1 + num_symbols)``, MARKER = ``num_symbols + 1``.
"""

from __future__ import annotations

import numpy as np
from ml_collections import config_dict

from sqattn.data import base

PAD = 0


# --------------------------------------------------------------------------------------------
# MQAR
# --------------------------------------------------------------------------------------------


def mqar_default_config() -> config_dict.ConfigDict:
    """Data sub-config of the "mqar" source (defaults: the SSE note's P = 16, T = 4P, vocab 256)."""
    cfg = config_dict.ConfigDict()
    cfg.name = "mqar"
    # Tokens per row; must be >= 2 * num_kv_pairs + 2 * num_queries.
    cfg.seq_len = 64
    # Seed of the random stream (train and eval streams are disjoint).
    cfg.seed = 0
    # P: key-value pairs stated at the start of each sequence.
    cfg.num_kv_pairs = 16
    # Q: queries per sequence, each a distinct key of the kv block; None = num_kv_pairs.
    cfg.num_queries = config_dict.placeholder(int)
    # K: size of the key vocabulary (ids 1..K); must be >= num_kv_pairs.
    cfg.key_vocab_size = 127
    # V: size of the value vocabulary (ids K+1..K+V); must be >= num_kv_pairs.
    cfg.value_vocab_size = 128
    # Zoology's power-law exponent for query distances (small = queries near the kv block;
    # 1.0 = uniform over the free slots). Irrelevant when the query region is full.
    cfg.power_a = 0.01
    # Fill non-query positions of the query region with uniform random tokens (Zoology's
    # random_non_queries) instead of pad.
    cfg.noise = True
    return cfg


def _num_queries(cfg: config_dict.ConfigDict) -> int:
    return cfg.num_kv_pairs if cfg.num_queries is None else cfg.num_queries


def mqar_build_rows(cfg: config_dict.ConfigDict, *, split: str, global_batch: int) -> base.Rows:
    """MQAR rows; see the module docstring."""
    p, q = cfg.num_kv_pairs, _num_queries(cfg)
    k_vocab, v_vocab = cfg.key_vocab_size, cfg.value_vocab_size
    if p < 1 or not 1 <= q <= p:
        raise ValueError(f"mqar needs num_kv_pairs >= 1 and 1 <= num_queries <= num_kv_pairs, got "
                         f"num_kv_pairs={p}, num_queries={q}")
    if k_vocab < p or v_vocab < p:
        raise ValueError(f"mqar draws distinct keys and values: key_vocab_size ({k_vocab}) and "
                         f"value_vocab_size ({v_vocab}) must be >= num_kv_pairs ({p})")
    if cfg.seq_len < 2 * p + 2 * q:
        raise ValueError(f"mqar does not fit: seq_len={cfg.seq_len} < 2 * num_kv_pairs + "
                         f"2 * num_queries = {2 * p + 2 * q}; raise seq_len or lower "
                         "num_kv_pairs / num_queries")
    if cfg.power_a <= 0:
        raise ValueError(f"mqar power_a must be > 0, got {cfg.power_a}")
    vocab = 1 + k_vocab + v_vocab
    num_slots = (cfg.seq_len - 2 * p + 1) // 2  # "k v" slots with the key inside the inputs.
    log_p = (cfg.power_a - 1.0) * np.log(np.arange(1, num_slots + 1))  # [num_slots]

    def row(step: int, r: int) -> base.Row:
        rng = base.row_rng(cfg.seed, split, step, r)
        keys = 1 + rng.permutation(k_vocab)[:p]  # [P]
        values = 1 + k_vocab + rng.permutation(v_vocab)[:p]  # [P]
        tokens = np.zeros((cfg.seq_len + 1,), np.int64)
        if cfg.noise:
            tokens[:] = rng.integers(0, vocab, size=tokens.shape)
        tokens[0:2 * p:2] = keys
        tokens[1:2 * p:2] = values
        # Gumbel top-q = sampling q slots without replacement with probabilities exp(log_p).
        slots = np.argsort(-(log_p + rng.gumbel(size=num_slots)), kind="stable")[:q]  # [Q]
        which = rng.permutation(p)[:q]  # [Q] index of the queried pair
        key_pos = 2 * p + 2 * slots
        tokens[key_pos] = keys[which]
        tokens[key_pos + 1] = values[which]
        weights = np.zeros((cfg.seq_len,), np.float32)
        weights[key_pos] = 1.0
        return base.lm_row(tokens, weights)

    return base.Rows(base.rows_by_step(row, global_batch), vocab)


# --------------------------------------------------------------------------------------------
# Copy
# --------------------------------------------------------------------------------------------


def copy_default_config() -> config_dict.ConfigDict:
    """Data sub-config of the "copy" source (defaults: L = 16 of the free-lunch note)."""
    cfg = config_dict.ConfigDict()
    cfg.name = "copy"
    # Tokens per row; must be >= 2 * copy_len (the final copied token is a target only).
    cfg.seq_len = 32
    # Seed of the random stream (train and eval streams are disjoint).
    cfg.seed = 0
    # L: (maximum) length of the string to copy.
    cfg.copy_len = 16
    # Minimum copy length; each row draws L uniformly in [min_copy_len, copy_len]. None = copy_len.
    cfg.min_copy_len = config_dict.placeholder(int)
    # Number of data symbols (ids 1..num_symbols; 0 = pad, num_symbols + 1 = separator).
    cfg.num_symbols = 16
    return cfg


def copy_build_rows(cfg: config_dict.ConfigDict, *, split: str, global_batch: int) -> base.Rows:
    """Copy rows; see the module docstring."""
    hi = cfg.copy_len
    lo = hi if cfg.min_copy_len is None else cfg.min_copy_len
    if not 1 <= lo <= hi:
        raise ValueError(f"copy needs 1 <= min_copy_len <= copy_len, got {lo} and {hi}")
    if cfg.num_symbols < 1:
        raise ValueError(f"copy needs num_symbols >= 1, got {cfg.num_symbols}")
    if cfg.seq_len < 2 * hi:
        raise ValueError(f"copy does not fit: seq_len={cfg.seq_len} < 2 * copy_len = {2 * hi}")
    sep = cfg.num_symbols + 1

    def row(step: int, r: int) -> base.Row:
        rng = base.row_rng(cfg.seed, split, step, r)
        n = int(rng.integers(lo, hi + 1))
        x = 1 + rng.integers(0, cfg.num_symbols, size=n)  # [L]
        tokens = np.full((cfg.seq_len + 1,), PAD, np.int64)
        tokens[:n] = x
        tokens[n] = sep
        tokens[n + 1:2 * n + 1] = x
        weights = np.zeros((cfg.seq_len,), np.float32)
        weights[n:2 * n] = 1.0  # inputs SEP, x_1..x_{L-1} -> targets x_1..x_L
        return base.lm_row(tokens, weights)

    return base.Rows(base.rows_by_step(row, global_batch), cfg.num_symbols + 2)


# --------------------------------------------------------------------------------------------
# Selective copy
# --------------------------------------------------------------------------------------------


def selective_copy_default_config() -> config_dict.ConfigDict:
    """Data sub-config of the "selective_copy" source (Mamba: 16 tokens, 16 symbols)."""
    cfg = config_dict.ConfigDict()
    cfg.name = "selective_copy"
    # Tokens per row = a noisy region of seq_len - num_tokens tokens, the marker, then the
    # outputs but the last (a target only).
    cfg.seq_len = 128
    # Seed of the random stream (train and eval streams are disjoint).
    cfg.seed = 0
    # Data tokens to memorise, scattered in the region; must be <= seq_len - num_tokens.
    cfg.num_tokens = 16
    # Number of data symbols (ids 1..num_symbols; 0 = noise, num_symbols + 1 = marker).
    cfg.num_symbols = 16
    return cfg


def selective_copy_build_rows(cfg: config_dict.ConfigDict, *, split: str,
                              global_batch: int) -> base.Rows:
    """Selective-copy rows; see the module docstring."""
    n = cfg.num_tokens
    region = cfg.seq_len - n
    if n < 1 or cfg.num_symbols < 1:
        raise ValueError(f"selective_copy needs num_tokens >= 1 and num_symbols >= 1, got "
                         f"{n} and {cfg.num_symbols}")
    if region < n:
        raise ValueError(f"selective_copy does not fit: seq_len={cfg.seq_len} < 2 * num_tokens = "
                         f"{2 * n}")
    marker = cfg.num_symbols + 1

    def row(step: int, r: int) -> base.Row:
        rng = base.row_rng(cfg.seed, split, step, r)
        pos = np.sort(rng.permutation(region)[:n])  # [n] positions in the region
        y = 1 + rng.integers(0, cfg.num_symbols, size=n)  # [n]
        tokens = np.full((cfg.seq_len + 1,), PAD, np.int64)
        tokens[pos] = y
        tokens[region] = marker
        tokens[region + 1:] = y
        weights = np.zeros((cfg.seq_len,), np.float32)
        weights[region:] = 1.0  # inputs MARKER, y_1..y_{n-1} -> targets y_1..y_n
        return base.lm_row(tokens, weights)

    return base.Rows(base.rows_by_step(row, global_batch), cfg.num_symbols + 2)


# --------------------------------------------------------------------------------------------
# Recall (the SCOUT paper's associative-recall probe)
# --------------------------------------------------------------------------------------------


def recall_default_config() -> config_dict.ConfigDict:
    """Data sub-config of the "recall" source: the SCOUT reproduction's associative-recall probe.

    Row layout (``seq_len + 1`` tokens)::

        BOS k_1 v_1 .. k_P v_P | num_noise noise tokens | the P keys in random order, each followed by its value

    Keys are distinct draws from ``num_keys``, values uniform over ``num_values``, noise uniform over
    ``noise_vocab``. Weight 1 exactly at the query keys (whose target is the bound value). Token ids: 0 = BOS,
    keys ``[1, 1 + K)``, values ``[1 + K, 1 + K + V)``, noise after them.
    """
    cfg = config_dict.ConfigDict()
    cfg.name = "recall"
    cfg.seq_len = 64              # must equal 4 * num_pairs + num_noise
    cfg.seed = 0
    cfg.num_pairs = 4
    cfg.num_keys = 16
    cfg.num_values = 16
    cfg.num_noise = 48
    cfg.noise_vocab = 16
    return cfg


def recall_vocab_size(cfg: config_dict.ConfigDict) -> int:
    return 1 + cfg.num_keys + cfg.num_values + cfg.noise_vocab


def recall_build_rows(cfg: config_dict.ConfigDict, *, split: str, global_batch: int) -> base.Rows:
    p = cfg.num_pairs
    if cfg.seq_len != 4 * p + cfg.num_noise:
        raise ValueError(f"recall: seq_len must be 4 * num_pairs + num_noise = {4 * p + cfg.num_noise}, "
                         f"got {cfg.seq_len}")
    if not 1 <= p <= cfg.num_keys or cfg.num_values < 1 or cfg.noise_vocab < 1 or cfg.num_noise < 0:
        raise ValueError(f"recall: need 1 <= num_pairs <= num_keys and positive vocabularies, got "
                         f"num_pairs={p}, num_keys={cfg.num_keys}, num_values={cfg.num_values}, "
                         f"noise_vocab={cfg.noise_vocab}, num_noise={cfg.num_noise}")
    key0, value0 = 1, 1 + cfg.num_keys
    noise0 = value0 + cfg.num_values
    weights = np.zeros((cfg.seq_len,), np.float32)
    weights[cfg.seq_len - 2 * p + 1::2] = 1.0                     # inputs at the query keys

    def row(step: int, r: int) -> base.Row:
        rng = base.row_rng(cfg.seed, split, step, r)
        keys = rng.permutation(cfg.num_keys)[:p] + key0                            # [P] distinct
        vals = rng.integers(0, cfg.num_values, p) + value0                          # [P]
        noise = rng.integers(0, cfg.noise_vocab, cfg.num_noise) + noise0            # [noise]
        order = rng.permutation(p)                                                  # [P]
        pairs = np.stack([keys, vals], axis=1).reshape(-1)                          # k v k v ...
        queries = np.stack([keys[order], vals[order]], axis=1).reshape(-1)
        seq = np.concatenate([[0], pairs, noise, queries])                          # [seq_len + 1]
        return base.lm_row(seq, weights)

    return base.Rows(base.rows_by_step(row, global_batch), recall_vocab_size(cfg))
