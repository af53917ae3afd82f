"""The digital-twin loop and its latency budget (papers/digital_twin_bearing.md, "Latency model").

Pipeline of pure functions ``acquire -> window -> features -> classify -> twin_update``; ``stream`` runs it
window by window and times every stage. ``time_interleaved`` times several callables on the same inputs in
round-robin repeats (p50, p99, min). The link model adds modelled network delays to the measured processing
time:

  T_e2e = T_tx + T_prop + T_access + T_core + T_proc + T_queue,   T_tx = payload / rate,  T_prop = d / c.

``LINKS`` holds the note's illustrative calibration (ours, reproducing the paper's 0.8 / 4.2 / 12.5 ms totals with
T_proc = 0.5 ms); T_access, T_core and T_queue are modelled, not measured. The latency interval runs from "window
complete at the sensor" to "decision applied at the twin": acquiring a 2048-sample window at 12 kHz (171 ms) is
excluded by definition.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import numpy as np

from sqattn.science.bearing import kinematics

SPEED_OF_LIGHT = 299_792_458.0
PAYLOAD_BITS = 2048 * 16          # one window of 16-bit samples


@dataclasses.dataclass(frozen=True)
class Link:
    """A network between sensor and edge node (times in ms, rate in bit/s)."""

    name: str
    rate_bps: float
    access_ms: float
    core_ms: float
    queue_ms: float
    distance_m: float = 100.0

    def budget(self, proc_ms: float, payload_bits: float = PAYLOAD_BITS) -> dict[str, float]:
        """The per-component latency (ms) of one decision with processing time ``proc_ms``, and its total."""
        if proc_ms < 0 or payload_bits < 0:
            raise ValueError(f"proc_ms and payload_bits must be >= 0, got {proc_ms}, {payload_bits}")
        parts = {"tx": payload_bits / self.rate_bps * 1e3, "prop": self.distance_m / SPEED_OF_LIGHT * 1e3,
                 "access": self.access_ms, "core": self.core_ms, "proc": proc_ms, "queue": self.queue_ms}
        parts["total"] = sum(parts.values())
        return parts


# The note's calibration (T_proc 0.5 ms gives its totals 0.80 / 4.20 / 12.50 ms).
LINKS = (
    Link("6G", rate_bps=100e9, access_ms=0.10, core_ms=0.05, queue_ms=0.15),
    Link("5G", rate_bps=1e9, access_ms=1.50, core_ms=1.00, queue_ms=1.17),
    Link("WiFi-6", rate_bps=600e6, access_ms=6.00, core_ms=2.00, queue_ms=3.94),
)


def shannon_rate(bandwidth_hz: float, snr_db: float) -> float:
    """R = B log2(1 + SNR) in bit/s."""
    return bandwidth_hz * math.log2(1 + 10 ** (snr_db / 10))


def mm1_wait_ms(service_per_s: float, arrivals_per_s: float) -> float:
    """M/M/1 time in system W = 1/(mu - lambda), in ms; an unstable queue (lambda >= mu) is an error."""
    if arrivals_per_s >= service_per_s:
        raise ValueError(f"unstable queue: arrivals {arrivals_per_s}/s >= service {service_per_s}/s")
    return 1e3 / (service_per_s - arrivals_per_s)


def thz_path_loss_db(freq_hz: float, distance_m: float, absorption_per_m: float = 0.0) -> float:
    """Free-space path loss 20 log10(4 pi f d / c) plus molecular absorption 10 log10(e) k d (dB)."""
    fspl = 20 * math.log10(4 * math.pi * freq_hz * distance_m / SPEED_OF_LIGHT)
    return fspl + 10 * math.log10(math.e) * absorption_per_m * distance_m


def fit_power_law(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of t = a K^alpha in log-log space; returns (a, alpha)."""
    k, t = np.log(np.asarray(sizes, float)), np.log(np.asarray(times, float))
    if k.size < 2 or np.ptp(k) == 0:
        raise ValueError("fit_power_law needs at least two distinct sizes")
    alpha, log_a = np.polyfit(k, t, 1)
    return float(np.exp(log_a)), float(alpha)


# ----------------------------------------------------------------------------------------------- timing
def _block(x):
    return jax.block_until_ready(x) if isinstance(x, jax.Array) or isinstance(x, (tuple, list, dict)) else x


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """p50, p99, min and mean of a list of durations (seconds in, milliseconds out)."""
    ms = np.asarray(times_s, float) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "min_ms": float(ms.min()), "mean_ms": float(ms.mean()), "n": int(ms.size)}


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Times every zero-argument callable ``repeats`` times, round-robin (all fns once per repeat, so a load
    change on the shared machine hits them alike); JAX results are waited for. Returns ``summarize`` per name."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    times: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            _block(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: summarize(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------------------------- the twin
@dataclasses.dataclass(frozen=True)
class TwinState:
    """The virtual bearing mirrored at the edge.

    Attributes:
      fault: current class name (``kinematics.CLASSES``).
      confidence: its probability in the last decision.
      updated_at: time stamp of the last decision (s, the stream's clock).
      windows: decisions so far.
      counts: decisions per class.
    """

    fault: str = "normal"
    confidence: float = 0.0
    updated_at: float = 0.0
    windows: int = 0
    counts: tuple[int, ...] = (0,) * len(kinematics.CLASSES)

    @property
    def healthy(self) -> bool:
        return self.fault == "normal"


def twin_update(state: TwinState, proba: np.ndarray, timestamp: float) -> TwinState:
    """The twin after one decision with class probabilities ``proba`` [C] at ``timestamp`` (pure)."""
    proba = np.asarray(proba).reshape(-1)
    if proba.shape[0] != len(kinematics.CLASSES):
        raise ValueError(f"expected {len(kinematics.CLASSES)} class probabilities, got {proba.shape[0]}")
    c = int(np.argmax(proba))
    counts = tuple(n + (i == c) for i, n in enumerate(state.counts))
    return TwinState(fault=kinematics.CLASSES[c], confidence=float(proba[c]), updated_at=float(timestamp),
                     windows=state.windows + 1, counts=counts)


def stream(signal: np.ndarray, *, window: int, fs: float, features: Callable, classify: Callable,
           max_windows: int | None = None) -> tuple[TwinState, dict[str, dict]]:
    """Runs the twin over a signal one window at a time and times each stage per window.

    Stages: ``acquire`` (the window copied out of the sensor buffer as a [1, N] float32 array), ``features``
    (``features(window) -> [1, F]``, waited for), ``classify`` (``classify(feats) -> [1, C]`` probabilities,
    brought to the host), ``twin`` (``twin_update``), and ``total``.

    Returns:
      (final twin state, {stage: summarize(...)}).
    """
    n = len(signal) // window if max_windows is None else min(len(signal) // window, max_windows)
    if n < 1:
        raise ValueError(f"signal of {len(signal)} samples holds no window of {window}")
    state = TwinState()
    stages: dict[str, list] = {k: [] for k in ("acquire", "features", "classify", "twin", "total")}
    for i in range(n):
        t0 = time.perf_counter()
        w = np.ascontiguousarray(signal[i * window:(i + 1) * window], np.float32)[None]
        t1 = time.perf_counter()
        f = _block(features(w))
        t2 = time.perf_counter()
        p = np.asarray(classify(f))[0]
        t3 = time.perf_counter()
        state = twin_update(state, p, (i + 1) * window / fs)
        t4 = time.perf_counter()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            stages[k].append(v)
    return state, {k: summarize(v) for k, v in stages.items()}
