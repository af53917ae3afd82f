"""CWRU-like vibration records synthesised from bearing physics (papers/digital_twin_bearing.md, "Synthetic
CWRU-like signals"), in jnp: jitted and vmapped over records, a pure function of a PRNG key.

One record of class c at shaft speed rpm (sampling rate fs, ``seconds`` long):

* shaft: f_r = rpm/60 (1 + N(0, speed_jitter)); background a1 sin(2 pi f_r t + phi1) + a2 sin(4 pi f_r t + phi2),
  a1 ~ U(0.05, 0.2), a2 ~ U(0.02, 0.1).
* fault impulses (inner, outer, ball) at period T = 1/f_d, f_d = BPFI, BPFO, 2 BSF (``kinematics``):
  t_k = k T + t0 + N(0, (slip T)^2), t0 ~ U(0, T); amplitude a_k = s m(t_k) (1 + 0.2 N(0, 1)), severity
  s ~ U(0.5, 2) per record; m(t) = 1 + 0.8 cos(2 pi f_r t) (inner: load-zone modulation at the shaft rate),
  1 (outer: stationary), 0.6 (1 + 0.8 cos(2 pi FTF t)) (ball: cage-rate modulation, weaker).
* every impulse rings a structural resonance h(t) = exp(-zeta w_n t) sin(w_n sqrt(1 - zeta^2) t),
  f_n ~ U(3.0, 3.8) kHz, zeta ~ U(0.04, 0.07), truncated at ``ring_ms``.
* white noise of std sigma_n U(0.8, 1.2) (the same for every class), then a record gain 10^(U(-3, 3)/20).
  Class "normal" is background + noise only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.science.bearing import kinematics


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """What every record of a data set shares (hashable: a static argument of the jitted synthesiser).

    Attributes:
      fs: sampling rate in Hz (CWRU drive-end fault data: 12 kHz).
      seconds: record length.
      noise: sigma_n, the white-noise std before the per-record factor U(0.8, 1.2).
      slip: impulse-time jitter as a fraction of the impulse period.
      speed_jitter: relative std of the shaft rate around rpm/60.
      ring_ms: length of each impulse's ringing (truncation of h).
      resonance_hz: range of the structural resonance f_n.
      damping: range of the damping ratio zeta.
      severity: range of the per-record impulse amplitude s.
      gain_db: per-record gain drawn from U(-gain_db, gain_db) dB.
      background: include the shaft-rate sines.
      max_rpm: upper bound on rpm (sizes the static impulse buffer).
    """

    fs: float = 12_000.0
    seconds: float = 5.0
    noise: float = 0.05
    slip: float = 0.01
    speed_jitter: float = 0.002
    ring_ms: float = 10.0
    resonance_hz: tuple[float, float] = (3000.0, 3800.0)
    damping: tuple[float, float] = (0.04, 0.07)
    severity: tuple[float, float] = (0.5, 2.0)
    gain_db: float = 3.0
    background: bool = True
    max_rpm: float = 1900.0

    def __post_init__(self):
        if self.fs <= 0 or self.seconds <= 0:
            raise ValueError(f"fs and seconds must be > 0, got fs={self.fs}, seconds={self.seconds}")
        if self.noise < 0 or self.slip < 0 or self.speed_jitter < 0 or self.gain_db < 0:
            raise ValueError("noise, slip, speed_jitter and gain_db must be >= 0")
        if self.resonance_hz[1] >= self.fs / 2:
            raise ValueError(f"resonance {self.resonance_hz} Hz must lie below Nyquist {self.fs / 2} Hz")

    @property
    def num_samples(self) -> int:
        return int(round(self.seconds * self.fs))

    @property
    def max_impulses(self) -> int:
        """Static bound on impulses per record: the fastest fault rate (BPFI) at max_rpm, with margin."""
        top = kinematics.multipliers()["bpfi"] * self.max_rpm / 60.0 * (1 + 6 * self.speed_jitter)
        return int(math.ceil(self.seconds * top)) + 2

    @property
    def ring_samples(self) -> int:
        return max(1, int(math.floor(self.ring_ms * 1e-3 * self.fs)))


def _rate_table() -> np.ndarray:
    """Impulse rate (multiples of f_r) per class label; "normal" gets 1 (its impulses are masked out)."""
    return np.array([1.0] + [kinematics.impulse_multiplier(c) for c in kinematics.CLASSES[1:]], np.float32)


# Fields that set no shape: traced arguments of the jitted synthesiser, so e.g. every noise level shares one compile.
_DYNAMIC = ("noise", "slip", "resonance_hz", "damping", "severity", "gain_db", "background")


def _record(key: jax.Array, label: jax.Array, rpm: jax.Array, spec: SynthSpec, p: dict) -> dict:
    """One record; ``spec`` gives the shapes (static), ``p`` the ``_DYNAMIC`` values (traced)."""
    n, kmax, ring = spec.num_samples, spec.max_impulses, spec.ring_samples
    ks = jax.random.split(key, 12)
    u = lambda k, lo, hi: jax.random.uniform(k, (), jnp.float32, lo, hi)  # noqa: E731
    f_r = rpm / 60.0 * (1.0 + spec.speed_jitter * jax.random.normal(ks[0], ()))
    t = jnp.arange(n, dtype=jnp.float32) / spec.fs
    a1, a2 = u(ks[1], 0.05, 0.2), u(ks[2], 0.02, 0.1)
    p1, p2 = u(ks[3], 0.0, 2 * np.pi), u(ks[4], 0.0, 2 * np.pi)
    x = p["background"] * (a1 * jnp.sin(2 * np.pi * f_r * t + p1) + a2 * jnp.sin(4 * np.pi * f_r * t + p2))

    # --- fault impulse train
    f_d = jnp.asarray(_rate_table())[label] * f_r
    period = 1.0 / f_d
    t0 = u(ks[5], 0.0, 1.0) * period
    k = jnp.arange(kmax, dtype=jnp.float32)
    tk = k * period + t0 + p["slip"] * period * jax.random.normal(ks[6], (kmax,))           # [K]
    ftf = kinematics.multipliers()["ftf"] * f_r
    modulation = jnp.stack([jnp.zeros_like(tk),                                            # normal: none
                            1.0 + 0.8 * jnp.cos(2 * np.pi * f_r * tk),                      # inner
                            jnp.ones_like(tk),                                             # outer
                            0.6 * (1.0 + 0.8 * jnp.cos(2 * np.pi * ftf * tk))])[label]     # ball
    severity = u(ks[7], p["severity"][0], p["severity"][1])
    amp = severity * modulation * (1.0 + 0.2 * jax.random.normal(ks[8], (kmax,)))           # [K]
    valid = (tk >= 0) & (tk < spec.seconds) & (label > 0)
    f_n = u(ks[9], p["resonance_hz"][0], p["resonance_hz"][1])
    zeta = u(ks[10], p["damping"][0], p["damping"][1])
    w_n = 2 * np.pi * f_n
    start = jnp.ceil(tk * spec.fs).astype(jnp.int32)                                       # first sample >= t_k
    idx = start[:, None] + jnp.arange(ring, dtype=jnp.int32)[None, :]                      # [K, ring]
    tau = (idx.astype(jnp.float32) - tk[:, None] * spec.fs) / spec.fs                      # time since t_k
    ringing = jnp.exp(-zeta * w_n * tau) * jnp.sin(w_n * jnp.sqrt(1.0 - zeta ** 2) * tau)
    vals = jnp.where(valid[:, None], amp[:, None] * ringing, 0.0)
    idx = jnp.where(valid[:, None], idx, n)                                                # n: dropped
    x = x.at[idx.reshape(-1)].add(vals.reshape(-1), mode="drop")

    # --- noise and gain
    kn1, kn2, kg = jax.random.split(ks[11], 3)
    sigma = p["noise"] * u(kn1, 0.8, 1.2)
    x = x + sigma * jax.random.normal(kn2, (n,))
    gain = 10.0 ** (p["gain_db"] * u(kg, -1.0, 1.0) / 20.0)
    return {"x": gain * x, "impulse_times": tk, "impulse_valid": valid, "shaft_hz": f_r, "fault_hz": f_d,
            "gain": gain}


def _check(labels, rpms, spec: SynthSpec) -> None:
    labels, rpms = np.asarray(labels), np.asarray(rpms)
    if labels.shape != rpms.shape or labels.ndim != 1:
        raise ValueError(f"labels and rpms must be 1-D of one length, got {labels.shape} and {rpms.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(kinematics.CLASSES)):
        raise ValueError(f"labels must lie in [0, {len(kinematics.CLASSES)}) ({kinematics.CLASSES})")
    if rpms.size and (rpms.min() <= 0 or rpms.max() > spec.max_rpm):
        raise ValueError(f"rpm must lie in (0, spec.max_rpm={spec.max_rpm}], got {rpms.min()}..{rpms.max()}")


@functools.partial(jax.jit, static_argnames=("spec",))
def _records(keys, labels, rpms, params, spec):
    return jax.vmap(lambda k, c, r: _record(k, c, r, spec, params))(keys, labels, rpms)


def synthesize(keys: jax.Array, labels, rpms, spec: SynthSpec = SynthSpec(), *,
               details: bool = False):
    """Synthesises one record per (key, label, rpm).

    Args:
      keys: [R] PRNG keys (``jax.random.split``); a record is a pure function of its key, label, rpm and spec.
      labels: [R] int class labels, 0..3 = ``kinematics.CLASSES`` (normal, inner, outer, ball).
      rpms: [R] shaft speeds in rpm (CWRU: 1797, 1772, 1750, 1730 for 0..3 hp).
      spec: the shared settings.
      details: also return the impulse times and the drawn shaft/fault rates.

    Returns:
      x: float32 [R, spec.num_samples]; with ``details``, a dict with "x", "impulse_times" [R, K],
      "impulse_valid" [R, K] (impulses inside the record; none for "normal"), "shaft_hz" [R], "fault_hz" [R],
      "gain" [R].
    """
    _check(labels, rpms, spec)
    params = {f: jnp.asarray(getattr(spec, f), jnp.float32) for f in _DYNAMIC}
    shapes_only = dataclasses.replace(spec, **{f: getattr(SynthSpec, f) for f in _DYNAMIC})
    out = _records(keys, jnp.asarray(labels, jnp.int32), jnp.asarray(rpms, jnp.float32), params, shapes_only)
    return out if details else out["x"]
