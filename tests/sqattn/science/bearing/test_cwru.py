"""The CWRU .mat reader on files written here in the CWRU layout (no download)."""

import numpy as np
import pytest
import scipy.io

from sqattn.science.bearing import cwru


def _write(path, **arrays):
    scipy.io.savemat(str(path), arrays)
    return str(path)


def test_reads_drive_end_and_rpm(tmp_path):
    de = np.random.default_rng(0).standard_normal(5000)
    p = _write(tmp_path / "105.mat", X105_DE_time=de[:, None], X105_FE_time=-de[:, None], X105RPM=np.array([[1797]]))
    r = cwru.load_record(p)
    np.testing.assert_array_equal(r.signal, de)
    assert r.rpm == 1797 and r.key == "X105_DE_time"


def test_mismatched_prefixes_pick_the_file_number(tmp_path):
    a, b = np.ones((10, 1)), 2 * np.ones((10, 1))
    r = cwru.load_record(_write(tmp_path / "99.mat", X098_DE_time=a, X099_DE_time=b))
    assert r.key == "X099_DE_time" and r.rpm is None and np.all(r.signal == 2)
    with pytest.raises(ValueError, match="several drive-end series"):
        cwru.load_record(_write(tmp_path / "300.mat", X098_DE_time=a, X099_DE_time=b))


def test_a_file_that_is_not_a_cwru_record_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a CWRU record: no '\\*_DE_time' variable"):
        cwru.load_record(_write(tmp_path / "x.mat", signal=np.ones((4, 1))))
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"this is not matlab")
    with pytest.raises(ValueError, match="not a MATLAB .mat file"):
        cwru.load_record(str(junk))
    with pytest.raises(FileNotFoundError):
        cwru.load_record(str(tmp_path / "missing.mat"))


def test_decimate_removes_what_would_alias_and_windows():
    fs = 48_000
    t = np.arange(48_000) / fs
    x = np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 10_000 * t)     # 10 kHz would alias to 2 kHz at 12 kHz
    y = cwru.decimate(x, 4)
    spec = np.abs(np.fft.rfft(y[1000:-1000] * np.hanning(len(y) - 2000)))
    f = np.fft.rfftfreq(len(y) - 2000, 1 / 12_000)
    assert spec[np.abs(f - 2000) < 20].max() < 1e-3 * spec[np.abs(f - 1000) < 20].max()
    w = cwru.windows(np.arange(10), 4)
    np.testing.assert_array_equal(w, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert cwru.windows(np.arange(10), 4, hop=2).shape == (4, 4)
    with pytest.raises(ValueError, match="holds no window"):
        cwru.windows(np.arange(3), 4)
