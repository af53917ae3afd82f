"""Window features in jnp (vectorised over any leading axes, jitted), each beside its numpy reference.

``features(x, fs)`` -> the 15 "reconstructed" features of papers/digital_twin_bearing.md (the paper's exact list is
not confirmed; this list is frozen here). Window x_1..x_N, mean mu, population std sigma:

  time domain   0 mean, 1 std, 2 rms, 3 peak max|x|, 4 peak-to-peak, 5 skewness, 6 kurtosis (Pearson, 3 for
                Gaussian), 7 crest = peak/rms, 8 shape = rms/mean|x|, 9 impulse = peak/mean|x|,
                10 clearance = peak/(mean sqrt|x|)^2
  frequency     from P_k = |rFFT(x * hann)|^2 at f_k = k fs/N, p = P/sum P (hann = numpy's symmetric window):
                11 spectral centroid c = sum f_k p_k, 12 spread sqrt(sum (f_k - c)^2 p_k), 13 normalised entropy
                -sum p ln p / ln K (K bins), 14 high-band energy ratio sum_{f_k >= 2 kHz} p_k

``envelope_features(x, fs, shaft_hz)`` -> 3 physics features (ours, not the paper's): the energy of the
envelope spectrum within +-4 Hz (at least the nearest bin) of the 1st and 2nd harmonics of BPFI, BPFO and 2 BSF,
over the envelope energy in 5-600 Hz. Envelope = |analytic signal of x band-passed to 2-5 kHz| (band-pass and
Hilbert transform in one FFT mask); its spectrum uses a Hann window after removing the mean.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal
from jax.scipy.special import xlogy

from sqattn.science.bearing import kinematics

NAMES = ("mean", "std", "rms", "peak", "peak_to_peak", "skewness", "kurtosis", "crest", "shape", "impulse",
         "clearance", "spectral_centroid", "spectral_spread", "spectral_entropy", "high_band_ratio")
ENVELOPE_NAMES = ("env_bpfi", "env_bpfo", "env_two_bsf")
HIGH_BAND_HZ = 2000.0
ENVELOPE_BAND_HZ = (2000.0, 5000.0)
ENVELOPE_NORM_HZ = (5.0, 600.0)
ENVELOPE_TOL_HZ = 4.0
_FAULT_KEYS = ("bpfi", "bpfo", "two_bsf")   # order of ENVELOPE_NAMES
_EPS = 1e-12


def _check(x, fs: float) -> None:
    if x.ndim < 1 or x.shape[-1] < 4:
        raise ValueError(f"windows must have a last axis of >= 4 samples, got shape {tuple(x.shape)}")
    if fs <= 0:
        raise ValueError(f"fs must be > 0, got {fs}")


# ---------------------------------------------------------------------------------------------- the 15
@functools.partial(jax.jit, static_argnames=("fs",))
def _features(x, fs):
    n = x.shape[-1]
    mu = jnp.mean(x, -1, keepdims=True)
    d = x - mu
    var = jnp.mean(d * d, -1)
    sigma = jnp.sqrt(var)
    rms = jnp.sqrt(jnp.mean(x * x, -1))
    ax = jnp.abs(x)
    peak = jnp.max(ax, -1)
    p2p = jnp.max(x, -1) - jnp.min(x, -1)
    safe_var = jnp.maximum(var, _EPS)
    skew = jnp.mean(d ** 3, -1) / safe_var ** 1.5
    kurt = jnp.mean(d ** 4, -1) / safe_var ** 2
    mean_abs = jnp.maximum(jnp.mean(ax, -1), _EPS)
    crest = peak / jnp.maximum(rms, _EPS)
    shape = rms / mean_abs
    impulse = peak / mean_abs
    clearance = peak / jnp.maximum(jnp.mean(jnp.sqrt(ax), -1) ** 2, _EPS)
    hann = jnp.asarray(np.hanning(n), x.dtype)
    spec = jnp.fft.rfft(x * hann, axis=-1)
    power = spec.real ** 2 + spec.imag ** 2                                        # [..., K]
    freqs = jnp.asarray(np.fft.rfftfreq(n, 1.0 / fs), x.dtype)
    p = power / jnp.maximum(jnp.sum(power, -1, keepdims=True), _EPS)
    centroid = jnp.sum(freqs * p, -1)
    spread = jnp.sqrt(jnp.sum((freqs - centroid[..., None]) ** 2 * p, -1))
    entropy = -jnp.sum(xlogy(p, p), -1) / np.log(freqs.shape[0])
    high = jnp.sum(jnp.where(freqs >= HIGH_BAND_HZ, p, 0.0), -1)
    return jnp.stack([mu[..., 0], sigma, rms, peak, p2p, skew, kurt, crest, shape, impulse, clearance,
                      centroid, spread, entropy, high], -1)


def features(x: jax.Array, fs: float) -> jax.Array:
    """The 15 features of every window.

    Args:
      x: [..., N] windows (float32 or, under x64, float64).
      fs: sampling rate in Hz.

    Returns:
      [..., 15] in the order of ``NAMES``.
    """
    x = jnp.asarray(x)
    _check(x, fs)
    return _features(x, float(fs))


def features_reference(x: np.ndarray, fs: float) -> np.ndarray:
    """``features`` in float64 numpy, one window at a time (the reference the jnp path is tested against)."""
    x = np.asarray(x, np.float64)
    _check(x, fs)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty((flat.shape[0], len(NAMES)))
    n = x.shape[-1]
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    for i, w in enumerate(flat):
        mu, sigma, rms = w.mean(), w.std(), np.sqrt(np.mean(w ** 2))
        peak = np.abs(w).max()
        z = (w - mu) / sigma
        power = np.abs(np.fft.rfft(w * np.hanning(n))) ** 2
        p = power / power.sum()
        c = np.sum(freqs * p)
        nz = p[p > 0]
        out[i] = [mu, sigma, rms, peak, w.max() - w.min(), np.mean(z ** 3), np.mean(z ** 4), peak / rms,
                  rms / np.abs(w).mean(), peak / np.abs(w).mean(), peak / np.mean(np.sqrt(np.abs(w))) ** 2,
                  c, np.sqrt(np.sum((freqs - c) ** 2 * p)), -np.sum(nz * np.log(nz)) / np.log(len(p)),
                  p[freqs >= HIGH_BAND_HZ].sum()]
    return out.reshape(*x.shape[:-1], len(NAMES))


# ---------------------------------------------------------------------------------------------- envelope
def _harmonic_masks(n: int, fs: float, shaft_hz, xp):
    """[..., 3, K] masks of envelope-spectrum bins near 1x and 2x each fault rate, and the [K] norm band."""
    freqs = xp.asarray(np.fft.rfftfreq(n, 1.0 / fs))
    tol = max(ENVELOPE_TOL_HZ, fs / n / 2)   # at least the nearest bin
    mults = xp.asarray([kinematics.multipliers()[k] for k in _FAULT_KEYS])
    f_d = shaft_hz[..., None] * mults                                               # [..., 3]
    near = lambda h: xp.abs(freqs - h * f_d[..., None]) <= tol                      # noqa: E731
    masks = near(1) | near(2)                                                       # [..., 3, K]
    norm = (freqs >= ENVELOPE_NORM_HZ[0]) & (freqs <= ENVELOPE_NORM_HZ[1])
    return masks, norm


@functools.partial(jax.jit, static_argnames=("fs",))
def _envelope_features(x, shaft_hz, fs):
    n = x.shape[-1]
    f = np.fft.fftfreq(n, 1.0 / fs)
    analytic_mask = np.where((f >= ENVELOPE_BAND_HZ[0]) & (f <= ENVELOPE_BAND_HZ[1]), 2.0, 0.0)
    env = jnp.abs(jnp.fft.ifft(jnp.fft.fft(x, axis=-1) * jnp.asarray(analytic_mask, x.dtype), axis=-1))
    env = env - jnp.mean(env, -1, keepdims=True)
    es = jnp.fft.rfft(env * jnp.asarray(np.hanning(n), x.dtype), axis=-1)
    e = es.real ** 2 + es.imag ** 2                                                 # [..., K]
    masks, norm = _harmonic_masks(n, fs, shaft_hz, jnp)
    total = jnp.maximum(jnp.sum(jnp.where(norm, e, 0.0), -1), _EPS)                # [...]
    return jnp.sum(jnp.where(masks, e[..., None, :], 0.0), -1) / total[..., None]


def envelope_features(x: jax.Array, fs: float, shaft_hz) -> jax.Array:
    """Envelope-spectrum energy ratios at the fault frequencies.

    Args:
      x: [..., N] windows.
      fs: sampling rate in Hz.
      shaft_hz: shaft rate in Hz, broadcastable to ``x.shape[:-1]`` (e.g. the record's nominal rpm / 60).

    Returns:
      [..., 3] in the order of ``ENVELOPE_NAMES`` (BPFI, BPFO, 2 BSF).
    """
    x = jnp.asarray(x)
    _check(x, fs)
    shaft = jnp.broadcast_to(jnp.asarray(shaft_hz, x.dtype), x.shape[:-1])
    return _envelope_features(x, shaft, float(fs))


def envelope_features_reference(x: np.ndarray, fs: float, shaft_hz) -> np.ndarray:
    """``envelope_features`` in float64 numpy/scipy: band-pass by zeroing rFFT bins, ``scipy.signal.hilbert``."""
    x = np.asarray(x, np.float64)
    _check(x, fs)
    n = x.shape[-1]
    shaft = np.broadcast_to(np.asarray(shaft_hz, np.float64), x.shape[:-1]).reshape(-1)
    flat = x.reshape(-1, n)
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    band = (freqs >= ENVELOPE_BAND_HZ[0]) & (freqs <= ENVELOPE_BAND_HZ[1])
    out = np.empty((flat.shape[0], 3))
    for i, w in enumerate(flat):
        xb = np.fft.irfft(np.where(band, np.fft.rfft(w), 0.0), n)
        env = np.abs(scipy.signal.hilbert(xb))
        e = np.abs(np.fft.rfft((env - env.mean()) * np.hanning(n))) ** 2
        masks, norm = _harmonic_masks(n, fs, shaft[i], np)
        out[i] = (masks * e).sum(-1) / e[norm].sum()
    return out.reshape(*x.shape[:-1], 3)


def all_features(x: jax.Array, fs: float, shaft_hz=None, *, envelope: bool = False) -> jax.Array:
    """The 15 features, followed by the 3 envelope features when ``envelope`` (then ``shaft_hz`` is needed)."""
    f = features(x, fs)
    if not envelope:
        return f
    if shaft_hz is None:
        raise ValueError("envelope features need shaft_hz (the shaft rate of each window)")
    return jnp.concatenate([f, envelope_features(x, fs, shaft_hz)], -1)


def names(envelope: bool = False) -> tuple[str, ...]:
    return NAMES + (ENVELOPE_NAMES if envelope else ())
