"""Reader for real CWRU bearing records (MATLAB v5 ``.mat`` files, when they are on the machine; nothing is
downloaded).

A record holds ``X<rec>_DE_time`` (drive end), usually ``X<rec>_FE_time`` and ``X<rec>_BA_time`` and ``X<rec>RPM``,
each an ``(L, 1)`` float64 array. The drive-end key is found by pattern, not by a table (a few files carry extra or
mismatched record numbers); when a file holds several drive-end series, the one whose number matches the file
name is taken. The 48 kHz normal baseline is brought to 12 kHz with ``decimate`` (anti-alias filter first).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

_DE = re.compile(r"^X?(\d+)_DE_time$")
_RPM = re.compile(r"^X?(\d+)RPM$")


@dataclasses.dataclass(frozen=True)
class Record:
    """One CWRU record's drive-end signal.

    Attributes:
      signal: float64 [L] drive-end acceleration.
      rpm: shaft speed from the file (None when the file has no RPM variable).
      key: the variable the signal came from.
      path: the file.
    """

    signal: np.ndarray
    rpm: float | None
    key: str
    path: str


def load_record(path: str) -> Record:
    """Reads the drive-end series of a CWRU ``.mat`` file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a MATLAB file, or a MATLAB file that is not a CWRU record (no ``*_DE_time`` variable), or
        several drive-end series none of which matches the file name.
    """
    import scipy.io
    if not os.path.exists(path):
        raise FileNotFoundError(f"CWRU record {path!r} does not exist")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises several types for non-MAT input
        raise ValueError(f"{path!r} is not a MATLAB .mat file ({type(e).__name__}: {e})") from None
    names = [k for k in mat if not k.startswith("__")]
    de = sorted(k for k in names if _DE.match(k))
    if not de:
        raise ValueError(f"{path!r} is not a CWRU record: no '*_DE_time' variable (it holds {names})")
    key = de[0]
    if len(de) > 1:
        stem = re.findall(r"\d+", os.path.basename(path))
        match = [k for k in de if stem and int(_DE.match(k).group(1)) == int(stem[-1])]
        if len(match) != 1:
            raise ValueError(f"{path!r} holds several drive-end series {de} and none matches the file name")
        key = match[0]
    signal = np.asarray(mat[key], np.float64).reshape(-1)
    if signal.size == 0 or not np.all(np.isfinite(signal)):
        raise ValueError(f"{path!r}: {key} is empty or not finite")
    rpm_keys = [k for k in names if _RPM.match(k)]
    rpm = float(np.asarray(mat[rpm_keys[0]]).reshape(-1)[0]) if rpm_keys else None
    return Record(signal=signal, rpm=rpm, key=key, path=path)


def decimate(signal: np.ndarray, factor: int) -> np.ndarray:
    """Down-samples by an integer ``factor`` after an anti-alias low-pass (zero-phase FIR; scipy.signal)."""
    import scipy.signal
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return np.asarray(signal, np.float64)
    return scipy.signal.decimate(np.asarray(signal, np.float64), factor, ftype="fir", zero_phase=True)


def windows(signal: np.ndarray, window: int, hop: int | None = None) -> np.ndarray:
    """[n, window] windows of a 1-D signal (non-overlapping unless ``hop`` < ``window``); the tail is dropped."""
    hop = window if hop is None else hop
    if window < 1 or hop < 1:
        raise ValueError(f"window and hop must be >= 1, got {window}, {hop}")
    n = (len(signal) - window) // hop + 1
    if n < 1:
        raise ValueError(f"signal of {len(signal)} samples holds no window of {window}")
    idx = np.arange(window)[None, :] + hop * np.arange(n)[:, None]
    return np.asarray(signal)[idx]
