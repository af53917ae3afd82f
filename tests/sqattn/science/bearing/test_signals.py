"""Kinematics, the synthesiser and the window features of the bearing twin against known values and references."""

import math

import jax
import numpy as np
import pytest

from sqattn.science.bearing import features as F
from sqattn.science.bearing import kinematics, synth

FS = 12_000.0


def _col_rel_err(a, b):
    """Per-feature max |a - b| over windows, relative to that feature's largest |reference| value."""
    a, b = np.asarray(a, np.float64).reshape(-1, a.shape[-1]), np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    return np.abs(a - b).max(0) / np.maximum(np.abs(b).max(0), 1e-300)


# ----------------------------------------------------------------------------------------------- kinematics
def test_fault_multipliers_from_cwru_geometry():
    m = kinematics.multipliers()
    expected = {"bpfo": 3.5848, "bpfi": 5.4152, "ftf": 0.39831, "bsf": 2.3567, "two_bsf": 4.7135}
    for k, v in expected.items():
        assert abs(m[k] - v) / v < 1e-4, (k, m[k], v)
    f = kinematics.fault_frequencies(1797 / 60)
    for k, v in {"bpfo": 107.4, "bpfi": 162.2, "two_bsf": 141.2, "ftf": 11.9}.items():
        assert abs(f[k] - v) < 0.05, (k, f[k])
    assert m["bpfo"] + m["bpfi"] == pytest.approx(9.0)        # n_balls, for any geometry


def test_contact_angle_and_bad_geometry():
    tilted = kinematics.multipliers(kinematics.Geometry(0.3126, 1.537, 9, contact_angle_deg=60.0))
    r = 0.3126 / 1.537 * 0.5
    assert tilted["bpfi"] == pytest.approx(4.5 * (1 + r))
    with pytest.raises(ValueError, match="ball_diameter < pitch_diameter"):
        kinematics.Geometry(2.0, 1.0, 9)
    with pytest.raises(ValueError, match="no impulse rate for class 'normal'"):
        kinematics.impulse_multiplier("normal")


# ----------------------------------------------------------------------------------------------- synthesiser
@pytest.fixture(scope="module")
def records():
    """8 records of 0.2 s (labels 0..3 twice) at 1772 rpm, noise 0.15: one synthesiser compile for the module."""
    keys = jax.random.split(jax.random.key(7), 8)
    return np.asarray(synth.synthesize(keys, np.arange(8) % 4, np.full(8, 1772.0),
                                       synth.SynthSpec(seconds=0.2, noise=0.15)))


CLEAN = synth.SynthSpec(seconds=1.0, noise=0.0, background=False, gain_db=0.0)   # impulses only


@pytest.fixture(scope="module")
def clean():
    """One clean record per class (normal, inner, outer, ball) at 1797 rpm."""
    return synth.synthesize(jax.random.split(jax.random.key(3), 4), [0, 1, 2, 3], [1797.0] * 4, CLEAN,
                            details=True)


@pytest.mark.parametrize("label", [1, 2, 3])
def test_fault_impulses_land_at_the_kinematic_period(clean, label):
    out = {k: np.asarray(v[label]) for k, v in clean.items()}
    rate = kinematics.impulse_multiplier(kinematics.CLASSES[label]) * 1797 / 60
    # the drawn fault rate is the kinematic one (shaft speed jitter 0.2 %)
    assert abs(float(out["fault_hz"]) / rate - 1) < 0.01
    t = out["impulse_times"][out["impulse_valid"]]
    period = 1 / float(out["fault_hz"])
    assert len(t) == pytest.approx(CLEAN.seconds / period, abs=1.5)
    assert abs(np.median(np.diff(t)) / period - 1) < 0.01        # 1 % slip jitter, no drift
    # and the signal itself repeats at that period: autocorrelation of x^2 peaks there
    x = out["x"].astype(np.float64)
    e = x * x - np.mean(x * x)
    ac = np.fft.irfft(np.abs(np.fft.rfft(e, 2 * len(e))) ** 2)[: len(e)]
    lag_t = period * FS
    lo, hi = int(0.5 * lag_t), int(1.5 * lag_t)
    lag = lo + int(np.argmax(ac[lo:hi]))
    assert abs(lag - lag_t) <= max(2.0, 0.015 * lag_t), (lag, lag_t)


def test_normal_has_no_impulses_and_records_are_pure_functions_of_the_key(clean, records):
    assert not np.asarray(clean["impulse_valid"][0]).any() and np.all(np.asarray(clean["x"][0]) == 0)
    assert np.abs(np.asarray(clean["x"][1:])).max(1).min() > 0.1
    again = synth.synthesize(jax.random.split(jax.random.key(7), 8), np.arange(8) % 4, np.full(8, 1772.0),
                             synth.SynthSpec(seconds=0.2, noise=0.15))
    np.testing.assert_array_equal(np.asarray(again), records)
    assert not np.allclose(records[0], records[4])                 # same class, other key
    assert records.shape == (8, 2400)


def test_noise_level_is_class_independent():
    spec = synth.SynthSpec(seconds=1.0, noise=0.3, background=False, gain_db=0.0)  # shapes of CLEAN: no compile
    x = np.asarray(synth.synthesize(jax.random.split(jax.random.key(1), 4), [0] * 4, [1797.0] * 4, spec))
    assert 0.8 * 0.3 * 0.98 < x.std(1).min() and x.std(1).max() < 1.2 * 0.3 * 1.02


def test_synthesiser_rejects_bad_input():
    keys = jax.random.split(jax.random.key(0), 1)
    with pytest.raises(ValueError, match="rpm must lie in"):
        synth.synthesize(keys, [1], [2500.0], synth.SynthSpec(seconds=0.1))
    with pytest.raises(ValueError, match="labels must lie in"):
        synth.synthesize(keys, [4], [1797.0], synth.SynthSpec(seconds=0.1))
    with pytest.raises(ValueError, match="below Nyquist"):
        synth.SynthSpec(fs=6000.0)


# ----------------------------------------------------------------------------------------------- features
def test_features_of_known_signals():
    n = 2048
    t = np.arange(n) / FS
    f0 = 4 * FS / n                                                # on a bin, 512 samples a cycle
    sine = np.sin(2 * np.pi * f0 * t)
    f = dict(zip(F.NAMES, np.asarray(F.features(sine[None], FS))[0]))
    assert f["crest"] == pytest.approx(math.sqrt(2), rel=1e-4)
    assert f["shape"] == pytest.approx(math.pi / (2 * math.sqrt(2)), rel=1e-4)
    assert f["impulse"] == pytest.approx(math.pi / 2, rel=1e-4)
    assert f["kurtosis"] == pytest.approx(1.5, rel=1e-4)         # sine: 3/2
    assert f["rms"] == pytest.approx(1 / math.sqrt(2), rel=1e-4)
    assert f["spectral_centroid"] == pytest.approx(f0, rel=1e-4)  # Hann leakage is symmetric about the bin
    assert f["high_band_ratio"] < 1e-6 and f["spectral_entropy"] < 0.2
    noise = np.random.default_rng(0).standard_normal((4, 16384))
    g = np.asarray(F.features(noise, FS))
    assert np.all(np.abs(g[:, F.NAMES.index("kurtosis")] - 3) < 0.15)   # std of the estimate ~0.04
    assert np.all(np.abs(g[:, F.NAMES.index("skewness")]) < 0.08)
    assert np.all(g[:, F.NAMES.index("spectral_entropy")] > 0.9)
    assert np.all(np.abs(g[:, F.NAMES.index("high_band_ratio")] - 4 / 6) < 0.02)   # 2-6 kHz of 0-6 kHz


def _windows(records, n):
    """[3, 2, n] windows of every class (two leading axes; odd n included)."""
    return records[:6, :n].reshape(3, 2, n)


@pytest.mark.parametrize("n", [2048, 777])
def test_features_equal_numpy_reference(records, n):
    x = _windows(records, n)
    ref = F.features_reference(x, FS)
    assert ref.shape == (3, 2, 15)
    assert np.all(_col_rel_err(F.features(x, FS), ref) < 2e-5)                # float32
    with jax.enable_x64(True):
        assert np.all(_col_rel_err(F.features(x.astype(np.float64), FS), ref) < 1e-10)


@pytest.mark.parametrize("n", [2048, 1001])
def test_envelope_features_equal_numpy_reference(records, n):
    x = _windows(records, n)
    shaft = np.array([[1797.0, 1772.0]] * 3) / 60
    ref = F.envelope_features_reference(x, FS, shaft)
    assert ref.shape == (3, 2, 3)
    assert np.all(_col_rel_err(F.envelope_features(x, FS, shaft), ref) < 2e-5)
    with jax.enable_x64(True):
        assert np.all(_col_rel_err(F.envelope_features(x.astype(np.float64), FS, shaft), ref) < 1e-10)


def test_envelope_features_point_at_the_fault(records):
    x = records[:, :2048]                                           # labels 0,1,2,3,0,1,2,3
    e = np.asarray(F.envelope_features(x, FS, 1772.0 / 60))
    for i, label in enumerate([0, 1, 2, 3] * 2):
        if label:                                                   # inner -> BPFI, outer -> BPFO, ball -> 2 BSF
            assert np.argmax(e[i]) == label - 1, (label, e[i])


def test_features_reject_bad_input():
    with pytest.raises(ValueError, match="last axis of >= 4 samples"):
        F.features(np.zeros((2, 3)), FS)
    with pytest.raises(ValueError, match="fs must be > 0"):
        F.features(np.zeros((2, 16)), 0.0)
    with pytest.raises(ValueError, match="envelope features need shaft_hz"):
        F.all_features(np.zeros((2, 16)), FS, envelope=True)
