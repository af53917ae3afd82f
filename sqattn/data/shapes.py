"""The synthetic shapes world of the SPM reproduction (papers/spm.md): one coloured shape on a dark background.

Images are ``size`` x ``size`` RGB (default 16 x 16) in [-1, 1]: a shape in {circle, square, triangle, star}
filled with a colour in {red, green, blue} (hue jitter), at a random position (+-3 px) and scale (0.6-1.0),
rendered with 4x4 supersampling (anti-aliased edges). Prompts are word-level: ``"a {colour} {shape}"`` padded
to ``TEXT_LEN`` = 6 tokens with ``<pad>`` (id 0); every concept name is one token, so facilitated transport's
token-overlap term is clean. The empty prompt ``""`` (all padding) is the unconditional prompt of CFG.

``ShapesBatches(split, global_batch_size, seed, ...)``: ``batch(step)`` -> ``{"images" f32 [b,H,W,3],
"tokens" i32 [b,6], "shape" i32 [b], "colour" i32 [b]}``, a pure function of (seed, split, step); shard i of n
gets rows [i b, (i + 1) b). Caption dropout (training the diffusion model for CFG and for partial prompts):
with probability ``p_empty`` the caption is "", with ``p_shape_only`` "a {shape}", with ``p_colour_only``
"a {colour}"; labels always describe the image.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue")
VOCAB = ("<pad>", "a") + COLOURS + SHAPES
PAD = 0
TEXT_LEN = 6
RGB = {"red": (0.95, 0.15, 0.12), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.3, 0.95)}
BACKGROUND = 0.06
SUPERSAMPLE = 4


def tokenize(prompt: str, length: int = TEXT_LEN) -> np.ndarray:
    """Word-level token ids of ``prompt`` padded with 0 to ``length`` (int32 [length])."""
    words = prompt.split()
    unknown = [w for w in words if w not in VOCAB or w == "<pad>"]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: unknown words {unknown}; vocabulary: {VOCAB[1:]}")
    if len(words) > length:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words, more than the text length {length}")
    ids = np.zeros((length,), np.int32)
    ids[:len(words)] = [VOCAB.index(w) for w in words]
    return ids


def detokenize(ids) -> str:
    return " ".join(VOCAB[i] for i in np.asarray(ids).tolist() if i != PAD)


def prompt(colour: str | None, shape: str | None) -> str:
    """``"a {colour} {shape}"`` (either may be None: "a star", "a red"; both None: "")."""
    words = [w for w in (colour, shape) if w]
    return " ".join(["a"] + words) if words else ""


def all_prompts() -> list[tuple[str, str]]:
    """The 12 (colour, shape) classes, colour-major."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def _polygon(kind: str) -> np.ndarray:
    """Unit-radius polygon vertices [n, 2] (x right, y down) of a square, triangle or 5-point star."""
    if kind == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.78
    if kind == "triangle":
        ang = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(ang), np.sin(ang)], -1) * 1.05 + [0.0, 0.15]
    if kind == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        return np.stack([np.cos(ang) * rad, np.sin(ang) * rad], -1)
    raise ValueError(kind)


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points of any shape."""
    inside = np.zeros(px.shape, bool)
    n = len(poly)
    for i in range(n):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        xint = x0 + (py - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (px < xint)
    return inside


def render(shape_ids: np.ndarray, colour_ids: np.ndarray, rng: np.random.Generator, size: int = 16,
           jitter: bool = True) -> np.ndarray:
    """Images f32 [b, size, size, 3] in [-1, 1] of the given shapes/colours (random position, scale, hue)."""
    b = len(shape_ids)
    s = SUPERSAMPLE
    coords = (np.arange(size * s) + 0.5) / s                                  # pixel units
    cx = size / 2 + (rng.uniform(-3, 3, b) if jitter else np.zeros(b))
    cy = size / 2 + (rng.uniform(-3, 3, b) if jitter else np.zeros(b))
    radius = size * 0.3 * (rng.uniform(0.6, 1.0, b) if jitter else np.full(b, 0.8))
    px = (coords[None, None, :] - cx[:, None, None]) / radius[:, None, None]  # [b, 1, W s]
    py = (coords[None, :, None] - cy[:, None, None]) / radius[:, None, None]  # [b, H s, 1]
    px, py = np.broadcast_arrays(px, py)                                      # [b, H s, W s]
    mask = np.zeros(px.shape, bool)
    for k, name in enumerate(SHAPES):
        sel = shape_ids == k
        if not sel.any():
            continue
        if name == "circle":
            mask[sel] = px[sel] ** 2 + py[sel] ** 2 < 0.85 ** 2
        else:
            mask[sel] = _inside_polygon(px[sel], py[sel], _polygon(name))
    cover = mask.reshape(b, size, s, size, s).mean(axis=(2, 4))              # [b, H, W] anti-aliased
    base = np.array([RGB[c] for c in COLOURS])[colour_ids]                    # [b, 3]
    if jitter:
        base = np.clip(base + rng.uniform(-0.08, 0.08, (b, 3)), 0.0, 1.0)
    img = BACKGROUND + cover[..., None] * (base[:, None, None, :] - BACKGROUND)
    return (img * 2.0 - 1.0).astype(np.float32)


def caption_tokens(shape_ids, colour_ids, rng: np.random.Generator | None = None, p_empty: float = 0.0,
                   p_shape_only: float = 0.0, p_colour_only: float = 0.0) -> np.ndarray:
    """Tokens i32 [b, TEXT_LEN] of each row's caption, with caption dropout drawn from ``rng``."""
    b = len(shape_ids)
    u = rng.uniform(size=b) if rng is not None else np.ones(b)
    rows = []
    for i in range(b):
        colour, shape = COLOURS[colour_ids[i]], SHAPES[shape_ids[i]]
        if u[i] < p_empty:
            colour = shape = None
        elif u[i] < p_empty + p_shape_only:
            colour = None
        elif u[i] < p_empty + p_shape_only + p_colour_only:
            shape = None
        rows.append(tokenize(prompt(colour, shape)))
    return np.stack(rows)


class ShapesBatches:
    """Step-indexed batches of the shapes world for one split and one data shard.

    Attributes:
      split: "train" or "eval" (independent random streams; eval batches repeat with period ``eval_period``).
      batch_size: rows of this shard; ``global_batch_size`` rows per step over all shards.
      seq_len: 1 (the trainer's tokens-per-step accounting counts images).
    """

    SPLIT_IDS = {"train": 0, "eval": 1}

    def __init__(self, split: str, *, global_batch_size: int, seed: int, size: int = 16, p_empty: float = 0.1,
                 p_shape_only: float = 0.1, p_colour_only: float = 0.1, eval_period: int = 64,
                 shard_index: int = 0, shard_count: int = 1):
        if split not in self.SPLIT_IDS:
            raise ValueError(f"split must be one of {tuple(self.SPLIT_IDS)}, got {split!r}")
        if global_batch_size % shard_count:
            raise ValueError(f"batch_size {global_batch_size} is not divisible by shard_count {shard_count}")
        if not 0 <= p_empty + p_shape_only + p_colour_only <= 1:
            raise ValueError("caption dropout probabilities must be >= 0 and sum to at most 1")
        self.split, self.seed, self.size = split, int(seed), int(size)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // shard_count
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.drop = dict(p_empty=p_empty, p_shape_only=p_shape_only, p_colour_only=p_colour_only)
        self.eval_period = int(eval_period)
        self.seq_len = 1

    def batch(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.split == "eval":
            step %= self.eval_period
        rng = np.random.default_rng([self.seed, self.SPLIT_IDS[self.split], step])
        g = self.global_batch_size
        shape_ids = rng.integers(0, len(SHAPES), g)
        colour_ids = rng.integers(0, len(COLOURS), g)
        images = render(shape_ids, colour_ids, rng, self.size)
        tokens = caption_tokens(shape_ids, colour_ids, rng, **self.drop)
        mine = slice(self.shard_index * self.batch_size, (self.shard_index + 1) * self.batch_size)
        return {"images": images[mine], "tokens": tokens[mine], "shape": shape_ids[mine].astype(np.int32),
                "colour": colour_ids[mine].astype(np.int32)}

    def __repr__(self) -> str:
        return (f"ShapesBatches(split={self.split!r}, size={self.size}, batch_size={self.batch_size}, "
                f"shard={self.shard_index}/{self.shard_count})")


def save_grid(path: str, images: np.ndarray, nrow: int, scale: int = 4, labels: list[str] | None = None) -> str:
    """Writes images [n, H, W, 3] in [-1, 1] as a PNG grid (``nrow`` per row, each upscaled ``scale`` x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    canvas = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1, 3), np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = images[i]
    canvas = np.clip((canvas + 1) / 2, 0, 1)
    canvas = np.repeat(np.repeat(canvas, scale, 0), scale, 1)
    fig_h = canvas.shape[0] / 100 + (0.3 if labels else 0)
    fig = plt.figure(figsize=(canvas.shape[1] / 100 + (1.6 if labels else 0), fig_h), dpi=100)
    ax = fig.add_axes([0.2 if labels else 0, 0, 0.8 if labels else 1, 1])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    if labels:
        for r, text in enumerate(labels[:rows]):
            ax.text(-4, (r + 0.5) * (h + 1) * scale, text, ha="right", va="center", fontsize=7)
    fig.savefig(path)
    plt.close(fig)
    return path
