"""sqattn.data.video: the synthetic dense-evidence clip at any FPS, and the PyAV reader."""

import numpy as np
import pytest

from sqattn.data import video
from sqattn.data.video import GLYPHS, SyntheticVideo, VideoSpec

SPEC = VideoSpec(duration=2.0, noise_std=1.0, seed=3)


def test_sample_indices_any_fps():
    assert video.sample_indices(360, 30, 30).tolist() == list(range(360))
    assert video.sample_indices(360, 30, 0.5).tolist() == [0, 60, 120, 180, 240, 300]
    four = video.sample_indices(360, 30, 4)                   # 7.5 native frames apart: first frame at/after i/4 s
    assert len(four) == 48 and four[:5].tolist() == [0, 8, 15, 23, 30]
    assert len(video.sample_indices(360, 30, 60)) == 360     # above the native rate: every frame once
    with pytest.raises(ValueError, match="fps"):
        video.sample_indices(360, 30, 0)


def test_synthetic_clip_content():
    v = SyntheticVideo(SPEC)
    assert v.num_native == 60
    clip = v.sample(15)
    assert clip.frames.shape == (30, 64, 64, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_array_equal(clip.native_index, np.arange(0, 60, 2))
    np.testing.assert_allclose(clip.times, clip.native_index / 30)
    full = v.sample(30)
    np.testing.assert_array_equal(clip.frames, full.frames[::2])      # noise keyed by native index: any FPS agrees
    again = SyntheticVideo(SPEC).sample(15)
    np.testing.assert_array_equal(clip.frames, again.frames)          # deterministic in the seed
    assert not np.array_equal(SyntheticVideo(VideoSpec(duration=2.0, seed=4)).native_frame(0),
                              SyntheticVideo(VideoSpec(duration=2.0, seed=3)).native_frame(0))
    # glyph windows: 8 windows of 0.25 s, consecutive glyphs differ, the strip shows the window's glyph
    assert len(v.glyph_ids) == 8 and np.all(np.diff(v.glyph_ids) != 0)
    clean = SyntheticVideo(VideoSpec(duration=2.0, seed=3))
    y0, y1, x0, x1 = clean.glyph_box
    for n in (0, 8, 59):
        f = clean.native_frame(n)
        glyph = f[y0:y1, x0:x1, 0] > 128
        np.testing.assert_array_equal(glyph, GLYPHS[clean.glyph_ids[int(n / 30 / 0.25)]])
        strip = f[64 - 8:].copy()
        strip[y0 - 56:y1 - 56, x0:x1] = 40
        assert np.all(strip == 40)                                    # flat strip apart from the glyph
    np.testing.assert_allclose(v.glyph_change_times(), np.arange(1, 8) * 0.25)


def test_scenes_and_sprites():
    v = SyntheticVideo(VideoSpec(duration=3.0, seed=1))
    np.testing.assert_array_equal(v.scene_of([0.0, 0.99, 1.0, 2.5, 3.0]), [0, 0, 1, 2, 2])
    sprite_free = SyntheticVideo(VideoSpec(duration=3.0, seed=1, num_sprites=0))
    f0, f1, f2 = (sprite_free.native_frame(n) for n in (0, 45, 75))
    np.testing.assert_array_equal(f0[:56], f2[:56])                   # scene 3 reuses scene 1's background
    assert np.abs(f0[:56].astype(int) - f1[:56]).mean() > 20          # scene 2 differs
    for t in np.linspace(0, 3, 37):
        pos = v.sprite_positions(t)
        assert np.all(pos >= 0) and np.all(pos[:, 0] <= 64 - 8 - 8) and np.all(pos[:, 1] <= 64 - 8)
    # a sprite moves by at most ceil(speed / native_fps) pixels per native frame
    step = np.abs(np.diff(np.stack([v.sprite_positions(n / 30) for n in range(90)]), axis=0)).max()
    assert 0 < step <= int(np.ceil(24.0 / 30))


def test_bad_specs():
    with pytest.raises(ValueError, match="scene_backgrounds"):
        VideoSpec(num_scenes=2)
    with pytest.raises(ValueError, match="strip_height"):
        VideoSpec(strip_height=40)
    with pytest.raises(IndexError, match="native frame"):
        SyntheticVideo(SPEC).native_frame(60)


def test_read_video_roundtrip_and_errors(tmp_path):
    av = pytest.importorskip("av", reason="pip install av  (or the 'video' extra)")
    frames = SyntheticVideo(VideoSpec(duration=1.0, seed=2)).sample(30).frames          # 30 frames
    path = str(tmp_path / "clip.mkv")
    with av.open(path, "w") as out:
        stream = out.add_stream("ffv1", rate=30)                  # lossless
        stream.width, stream.height, stream.pix_fmt = 64, 64, "bgr0"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    clip = video.read_video(path)
    assert clip.frames.shape == (30, 64, 64, 3)
    np.testing.assert_array_equal(clip.frames, frames)
    np.testing.assert_allclose(clip.times, np.arange(30) / 30, atol=1e-3)
    sub = video.read_video(path, fps=4, size=32)
    assert sub.frames.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(sub.native_index, [0, 8, 15, 23])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError, match="bad.mp4"):
        video.read_video(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        video.read_video(str(tmp_path / "missing.mp4"))
