"""A CWRU-like data set: synthesised records -> non-overlapping windows -> features, with record ids and a
train/test split by record (no leakage) or by window (the leaky split most CWRU papers report).

Records: every (class, rpm) cell holds ``records_per_cell`` records; record r of a cell is a pure function of
(seed, record id). Record-level split: even r train, odd r test. Window-level split: a seeded random half of
all windows is train (windows of one record land on both sides).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import numpy as np

from sqattn.science.bearing import features as features_lib
from sqattn.science.bearing import kinematics, synth

SPLITS = ("record", "window")


def default_config() -> ml_collections.ConfigDict:
    """The data sub-config (``config.data``) of a bearing run; every field commented."""
    return ml_collections.ConfigDict(dict(
        name="bearing",
        seed=0,                    # records and the window split are pure functions of it
        noise=0.05,                # sigma_n of the synthesiser (note: 0.05, 0.15, 0.3)
        records_per_cell=8,        # records per (class, rpm); even ones train, odd ones test (split=record)
        seconds=5.0,               # record length
        rpms=(1797, 1772, 1750, 1730),   # CWRU loads 0..3 hp
        fs=12_000.0,               # sampling rate (CWRU drive-end fault data)
        window=2048,               # samples per window (171 ms at 12 kHz); non-overlapping
        split="record",            # "record" (no leakage) or "window" (random half of all windows)
        envelope=False,            # add the 3 envelope-spectrum features (15 -> 18)
    ))


@dataclasses.dataclass(frozen=True)
class BearingData:
    """Windows of one data config, all splits together.

    Attributes:
      features: float32 [W, F] (15, or 18 with envelope features).
      labels: int32 [W] class (``kinematics.CLASSES``).
      record: int32 [W] record id.
      rpm: float32 [W] nominal shaft speed of the record.
      train: bool [W] True for training windows.
      names: feature names.
    """

    features: np.ndarray
    labels: np.ndarray
    record: np.ndarray
    rpm: np.ndarray
    train: np.ndarray
    names: tuple[str, ...]

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of "train" or "test"."""
        if which not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {which!r}")
        m = self.train if which == "train" else ~self.train
        return self.features[m], self.labels[m]


def _check(cfg) -> None:
    if cfg.split not in SPLITS:
        raise ValueError(f"data.split must be one of {SPLITS}, got {cfg.split!r}")
    if cfg.records_per_cell < 2:
        raise ValueError(f"data.records_per_cell must be >= 2 (even train, odd test), got {cfg.records_per_cell}")
    if windows_per_record(cfg) < 1:
        raise ValueError(f"data.seconds={cfg.seconds} at fs={cfg.fs} holds no window of {cfg.window} samples")


def windows_per_record(cfg) -> int:
    return int(round(cfg.seconds * cfg.fs)) // int(cfg.window)


def num_windows(cfg, which: str) -> int:
    """Windows in the "train" or "test" split (known before anything is synthesised)."""
    _check(cfg)
    cells = len(kinematics.CLASSES) * len(cfg.rpms)
    total = cells * cfg.records_per_cell * windows_per_record(cfg)
    if cfg.split == "window":
        n_train = total // 2
    else:
        n_train = cells * ((cfg.records_per_cell + 1) // 2) * windows_per_record(cfg)
    return n_train if which == "train" else total - n_train


def record_table(cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, rpms, replicate index) of every record, in record-id order."""
    c, j, r = np.meshgrid(np.arange(len(kinematics.CLASSES)), np.arange(len(cfg.rpms)),
                          np.arange(cfg.records_per_cell), indexing="ij")
    return (c.reshape(-1).astype(np.int32), np.asarray(cfg.rpms, np.float32)[j.reshape(-1)],
            r.reshape(-1).astype(np.int32))


def synth_spec(cfg) -> synth.SynthSpec:
    return synth.SynthSpec(fs=float(cfg.fs), seconds=float(cfg.seconds), noise=float(cfg.noise))


def synthesize_windows(cfg, record_ids=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(windows [R, nw, N] float32, labels [R], rpms [R]) of the given records (all by default)."""
    labels, rpms, _ = record_table(cfg)
    ids = np.arange(labels.shape[0]) if record_ids is None else np.asarray(record_ids)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(cfg.seed), i))(ids)
    x = np.asarray(synth.synthesize(keys, labels[ids], rpms[ids], synth_spec(cfg)))
    nw, n = windows_per_record(cfg), int(cfg.window)
    return x[:, :nw * n].reshape(len(ids), nw, n), labels[ids], rpms[ids]


def _key(cfg) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()))


def build(cfg) -> BearingData:
    """The windows, features, labels and split of data config ``cfg`` (cached per distinct config)."""
    full = default_config()
    unknown = sorted(set(cfg.keys()) - set(full.keys()))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in bearing data config; known: {sorted(full.keys())}")
    full.update(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    _check(full)
    return _build(_key(full))


@functools.lru_cache(maxsize=8)
def _build(key: tuple) -> BearingData:
    cfg = ml_collections.ConfigDict(dict(key))
    x, labels, rpms = synthesize_windows(cfg)                                # [R, nw, N]
    r, nw = x.shape[:2]
    shaft = np.broadcast_to(rpms[:, None] / 60.0, (r, nw))
    feats = np.asarray(features_lib.all_features(x, cfg.fs, shaft, envelope=cfg.envelope), np.float32)
    _, _, rep = record_table(cfg)
    record = np.repeat(np.arange(r, dtype=np.int32), nw)
    if cfg.split == "record":
        train = np.repeat(rep % 2 == 0, nw)
    else:
        perm = np.random.default_rng([cfg.seed, 1]).permutation(r * nw)
        train = np.zeros(r * nw, bool)
        train[perm[:r * nw // 2]] = True
    return BearingData(features=feats.reshape(r * nw, -1), labels=np.repeat(labels, nw), record=record,
                       rpm=np.repeat(rpms, nw), train=train, names=features_lib.names(cfg.envelope))
