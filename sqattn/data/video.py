"""Video sources for GRT (``../shared/papers/grt.md``): a synthetic dense-evidence clip sampled at any FPS, and a
reader for real video files through PyAV (optional extra ``video``: ``pip install -e '.[video]'``).

The synthetic clip (all numpy, deterministic in ``VideoSpec.seed``) is rendered at a native rate (30 FPS) and
sampled at ``fps`` by taking, for each sampling time ``i / fps``, the first native frame at or after it, so every
sampled frame is a native frame and codec-style reconstructions can be scored on all native frames. Content:

- ``num_scenes`` equal-length scenes, each a static smooth-noise textured background around a base colour;
  ``scene_backgrounds`` maps scene -> background (default ``(0, 1, 0)``: scene 3 reuses scene 1's, to test merging);
- ``num_sprites`` solid-colour squares moving at constant velocity and bouncing off the walls of the area above the
  strip; positions are rounded to whole pixels, so a slow sprite changes the image only when it crosses a pixel;
- a subtitle strip (``strip_height`` rows at the bottom, flat dark grey) showing one 3x5-pixel digit glyph that
  changes every ``glyph_period`` seconds (consecutive glyphs always differ): the dense evidence;
- optional per-frame sensor noise (``noise_std`` grey levels, keyed by the native frame index).

Frames are uint8 ``[T, H, W, 3]``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from scipy import ndimage

# 3x5 digit glyphs, rows top to bottom. Some pairs differ in a single pixel (0/8, 6/8, 8/9): "tiny text".
_GLYPH_ROWS = {
    0: ("111", "101", "101", "101", "111"),
    1: ("010", "110", "010", "010", "111"),
    2: ("111", "001", "111", "100", "111"),
    3: ("111", "001", "111", "001", "111"),
    4: ("101", "101", "111", "001", "001"),
    5: ("111", "100", "111", "001", "111"),
    6: ("111", "100", "111", "101", "111"),
    7: ("111", "001", "001", "001", "001"),
    8: ("111", "101", "111", "101", "111"),
    9: ("111", "101", "111", "001", "111"),
}
GLYPHS = np.array([[[c == "1" for c in row] for row in _GLYPH_ROWS[d]] for d in range(10)])  # [10, 5, 3] bool
NUM_GLYPHS = 10
_STRIP_GREY = 40
_GLYPH_GREY = 230


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """Settings of the synthetic clip (defaults: the note's 64x64, 12 s at 30 FPS, 3 scenes, 3 sprites)."""
    size: int = 64                      # frame height = width (pixels)
    duration: float = 12.0              # seconds
    native_fps: int = 30
    num_scenes: int = 3                 # equal-length scenes
    scene_backgrounds: tuple = (0, 1, 0)  # scene -> background index (scene 3 reuses scene 1's)
    num_sprites: int = 3
    sprite_size: int = 8
    sprite_speed: tuple = (8.0, 24.0)   # px/s, drawn uniformly per sprite
    strip_height: int = 8               # subtitle strip rows at the bottom
    glyph_period: float = 0.25          # seconds per glyph
    glyph_x: int = 26                   # left column of the glyph (inside the strip)
    noise_std: float = 0.0              # per-frame Gaussian noise, grey levels (0..255 scale)
    seed: int = 0

    def __post_init__(self):
        if self.size < 16 or self.strip_height < 6 or self.strip_height >= self.size // 2:
            raise ValueError(f"VideoSpec: need size >= 16 and 6 <= strip_height < size/2, got {self.size}, "
                             f"{self.strip_height}")
        if self.duration <= 0 or self.native_fps <= 0 or self.glyph_period <= 0:
            raise ValueError("VideoSpec: duration, native_fps and glyph_period must be > 0")
        if len(self.scene_backgrounds) != self.num_scenes:
            raise ValueError(f"VideoSpec: scene_backgrounds {self.scene_backgrounds} must have num_scenes="
                             f"{self.num_scenes} entries")
        if not 0 <= self.glyph_x <= self.size - 3:
            raise ValueError(f"VideoSpec: glyph_x={self.glyph_x} outside the frame")
        if self.sprite_size > self.size - self.strip_height:
            raise ValueError("VideoSpec: sprite_size larger than the area above the strip")


@dataclasses.dataclass
class Clip:
    """Frames sampled from a video.

    Attributes:
      frames: uint8 [T, H, W, 3].  times: [T] seconds.  native_index: [T] native frame index (synthetic clips;
      for a real file the decoded frame number).  fps: the sampling rate asked for (None = every frame).
    """
    frames: np.ndarray
    times: np.ndarray
    native_index: np.ndarray
    fps: float | None


def sample_indices(num_native: int, native_fps: float, fps: float) -> np.ndarray:
    """Native frame indices sampled at ``fps``: for each time ``i / fps`` in the clip, the first native frame at or
    after it (deduplicated, so ``fps >= native_fps`` gives every frame)."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    duration = num_native / native_fps
    n = int(math.ceil(duration * fps - 1e-9))
    idx = np.ceil(np.arange(n) * native_fps / fps - 1e-6).astype(np.int64)
    return np.unique(idx[idx < num_native])


def _bounce(x: np.ndarray, length: float) -> np.ndarray:
    """Reflects positions into [0, length] (triangle wave of period 2*length)."""
    if length <= 0:
        return np.zeros_like(x)
    m = np.mod(x, 2 * length)
    return length - np.abs(m - length)


class SyntheticVideo:
    """The note's synthetic clip; ``sample(fps)`` returns a ``Clip``.

    Attributes:
      spec: the ``VideoSpec``.  num_native: number of native frames.  glyph_ids: [num_windows] glyph per window.
      glyph_box: (y0, y1, x0, x1) pixel box of the glyph.
    """

    def __init__(self, spec: VideoSpec = VideoSpec()):
        self.spec = spec
        s = spec.size
        rng = np.random.default_rng(spec.seed)
        self.num_native = int(round(spec.duration * spec.native_fps))
        n_bg = max(spec.scene_backgrounds) + 1
        self.backgrounds = np.stack([self._background(rng, i, n_bg) for i in range(n_bg)])   # [n_bg, s, s, 3]
        area_h = s - spec.strip_height
        self._range = np.array([area_h - spec.sprite_size, s - spec.sprite_size], np.float64)   # (y, x) travel
        self.sprite_pos0 = rng.uniform(0, 1, (spec.num_sprites, 2)) * self._range
        speed = rng.uniform(*spec.sprite_speed, spec.num_sprites)
        angle = rng.uniform(0, 2 * np.pi, spec.num_sprites)
        self.sprite_vel = np.stack([speed * np.sin(angle), speed * np.cos(angle)], -1)          # px/s (y, x)
        hues = rng.uniform(0, 1, spec.num_sprites)
        self.sprite_colors = np.stack([_saturated(h) for h in hues]) if spec.num_sprites else np.zeros((0, 3))
        num_windows = int(math.ceil(spec.duration / spec.glyph_period - 1e-9))
        ids = [int(rng.integers(NUM_GLYPHS))]
        for _ in range(num_windows - 1):                                # consecutive glyphs always differ
            ids.append(int((ids[-1] + rng.integers(1, NUM_GLYPHS)) % NUM_GLYPHS))
        self.glyph_ids = np.array(ids, np.int64)
        y0 = s - spec.strip_height + (spec.strip_height - 5) // 2
        self.glyph_box = (y0, y0 + 5, spec.glyph_x, spec.glyph_x + 3)

    def _background(self, rng, index, count):
        s = self.spec.size
        base = np.array(_saturated((index + rng.uniform(0, 0.3)) / count)) * 0.5 + 0.25      # distinct base hues
        coarse = ndimage.zoom(rng.normal(0, 0.18, (5, 5, 3)), (s / 5, s / 5, 1), order=3, mode="nearest")
        fine = ndimage.zoom(rng.normal(0, 0.08, (s // 4, s // 4, 3)), (4, 4, 1), order=1, mode="nearest")
        return np.clip(base + coarse[:s, :s] + fine[:s, :s], 0.0, 1.0)

    # -- time -> content ---------------------------------------------------------------------------------------------
    def scene_of(self, t: np.ndarray) -> np.ndarray:
        sc = np.floor(np.asarray(t) / (self.spec.duration / self.spec.num_scenes) + 1e-9).astype(np.int64)
        return np.clip(sc, 0, self.spec.num_scenes - 1)

    def window_of(self, t: np.ndarray) -> np.ndarray:
        w = np.floor(np.asarray(t) / self.spec.glyph_period + 1e-9).astype(np.int64)
        return np.clip(w, 0, len(self.glyph_ids) - 1)

    def sprite_positions(self, t: float) -> np.ndarray:
        """[num_sprites, 2] integer (y, x) top-left corners at time t."""
        raw = self.sprite_pos0 + self.sprite_vel * t
        return np.round(np.stack([_bounce(raw[:, 0], self._range[0]),
                                  _bounce(raw[:, 1], self._range[1])], -1)).astype(np.int64)

    def native_time(self, n) -> np.ndarray:
        return np.asarray(n) / self.spec.native_fps

    def native_frame(self, n: int) -> np.ndarray:
        """Native frame ``n`` as uint8 [H, W, 3]."""
        if not 0 <= n < self.num_native:
            raise IndexError(f"native frame {n} outside [0, {self.num_native})")
        spec = self.spec
        t = float(self.native_time(n))
        img = self.backgrounds[spec.scene_backgrounds[int(self.scene_of(t))]].copy()
        k = spec.sprite_size
        for (y, x), c in zip(self.sprite_positions(t), self.sprite_colors):
            img[y:y + k, x:x + k] = c
        img = img * 255.0
        img[spec.size - spec.strip_height:] = _STRIP_GREY
        y0, y1, x0, x1 = self.glyph_box
        img[y0:y1, x0:x1] = np.where(GLYPHS[self.glyph_ids[int(self.window_of(t))]][..., None],
                                     _GLYPH_GREY, _STRIP_GREY)
        if spec.noise_std > 0:
            img = img + np.random.default_rng([spec.seed, 7, n]).normal(0, spec.noise_std, img.shape)
        return np.clip(np.round(img), 0, 255).astype(np.uint8)

    def native_frames(self, indices) -> np.ndarray:
        return np.stack([self.native_frame(int(n)) for n in indices])

    def sample_indices(self, fps: float) -> np.ndarray:
        return sample_indices(self.num_native, self.spec.native_fps, fps)

    def sample(self, fps: float) -> Clip:
        idx = self.sample_indices(fps)
        return Clip(self.native_frames(idx), self.native_time(idx), idx, fps)

    def glyph_change_times(self) -> np.ndarray:
        """Start time of every glyph window after the first (each is a change: consecutive glyphs differ)."""
        return np.arange(1, len(self.glyph_ids)) * self.spec.glyph_period


def _saturated(hue: float) -> tuple[float, float, float]:
    """A fully saturated RGB colour in [0, 1] for hue in [0, 1)."""
    h = (hue % 1.0) * 6.0
    x = 1.0 - abs(h % 2.0 - 1.0)
    return [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h) % 6]


# -- real video files ----------------------------------------------------------------------------------------------

def read_video(path: str, *, fps: float | None = None, size: int | None = None,
               max_frames: int | None = None) -> Clip:
    """Decodes a video file with PyAV into RGB uint8 frames.

    Args:
      path: a file PyAV/FFmpeg can decode.
      fps: sample rate (the first decoded frame at or after each ``i / fps`` seconds); None keeps every frame.
      size: resize every frame to ``size x size`` (FFmpeg's scaler); None keeps the stored size.
      max_frames: stop after this many sampled frames.

    Raises:
      ImportError: PyAV is not installed (``pip install av`` or the ``video`` extra).
      FileNotFoundError: no file at ``path``.
      ValueError: the file cannot be decoded as video, or holds no video frames.
    """
    try:
        import av
    except ImportError as e:
        raise ImportError("read_video needs PyAV: pip install av  (or pip install -e '.[video]')") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_video: no such file {path!r}")
    if fps is not None and fps <= 0:
        raise ValueError(f"read_video: fps must be > 0, got {fps}")
    frames, times, numbers = [], [], []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"read_video: {path!r} has no video stream")
            stream = container.streams.video[0]
            next_time = 0.0
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / float(stream.average_rate or 1)
                if fps is not None and t < next_time - 1e-6:
                    continue
                if size is not None:
                    frame = frame.reformat(width=size, height=size)
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(t)
                numbers.append(i)
                if fps is not None:
                    next_time = (math.floor(t * fps + 1e-6) + 1) / fps
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"read_video: cannot decode {path!r} as video ({type(e).__name__}: {e})") from e
    if not frames:
        raise ValueError(f"read_video: {path!r} decoded to no video frames")
    return Clip(np.stack(frames), np.array(times), np.array(numbers, np.int64), fps)
