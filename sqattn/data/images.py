"""Offline image-classification data and class-incremental task streams (``ClassifyTask``, SEMA).

Sources (``cfg.source``), every one local, never downloaded:

* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey digits, 10 classes), values / 16,
  resized (bilinear) to ``image_size``.
* ``glyphs``: a procedural generator of ``glyph_classes`` stroke classes. Class c is 3 random strokes (quadratic
  Bezier curves) drawn from a generator seeded by c; an example jitters every control point, shifts the glyph and
  varies the stroke width, then rasterises it anti-aliased. ``glyph_per_class`` examples per class.
* ``tfds``: an image dataset prepared under ``tfds_data_dir`` in the array_record format, read with
  ``tfds.data_source`` (``sqattn.data.tfds_source.open_split``). A dataset that is not prepared is a
  ``ValueError`` saying how to prepare it elsewhere; nothing is downloaded.

Every source gives float32 images ``[N, S, S, C]`` in [0, 1] (C = 1 for the two offline sources) and int labels.
``digits``/``glyphs`` are split into train/test once, per class, by a fixed permutation (``test_fraction`` of each
class is test); ``tfds`` uses its own splits.

**Streams.** ``cfg.stream`` is a task spec ``"0,1;2,3;4,5;6,7@invert_noise;8,9@invert_noise"``: tasks separated by
``;``, each a comma list of class ids or ranges (``0-4``), optionally ``@domain``. Domains: ``clean``, ``invert``
(1 - x), ``invert_noise`` (1 - x plus Gaussian noise of std ``noise``, clipped; the noise of example i is fixed by
(seed, i)), ``rot90``, ``transpose`` (rows <-> columns). ``cfg.task`` picks the current task t: the train split
holds the classes of task t in its domain; the eval split holds every class of tasks 0..t, each in its own task's
domain (class-incremental evaluation: no task id). Overlapping classes, an empty task, an unknown domain or a class
the source lacks are ``ValueError``s naming the task.

Batches (``ImageBatches.batch(step)``): ``images`` f32 [b,S,S,C] (scaled to [-1, 1]), ``labels`` i32 [b],
``weights`` f32 [b], ``logit_mask`` bool [b, K] (K = the source's class count: True for the classes the loss
may score: task t's classes in train, classes of tasks 0..t in eval; the task masks the rest to -inf, so old
classes never win during training and unseen ones never win in eval) and ``task_onehot`` f32 [b, T] (the
task each example belongs to, for per-task accuracy). Train batches draw ``b`` examples with replacement from a
generator seeded by (seed, step): a pure function of (seed, step); shard i of n gets rows [i b, (i+1) b). Eval
batches cover the eval examples once in order, padded with weight-0 rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import ml_collections
import numpy as np

SOURCES = ("digits", "glyphs", "tfds")
DOMAINS = ("clean", "invert", "invert_noise", "rot90", "transpose")
SPLITS = ("train", "eval")


def default_config() -> ml_collections.ConfigDict:
    """Data sub-config of the image sources (every field commented)."""
    return ml_collections.ConfigDict(dict(
        source="digits",        # one of SOURCES
        image_size=16,          # images are resized to image_size x image_size
        seed=0,                 # train sampling and domain-noise seed (the train/test split is fixed)
        stream="0-9",           # task spec (module docstring); "0-9" = one task of the ten digits
        task=0,                 # index of the current task in the stream
        test_fraction=0.2,      # digits / glyphs: share of each class held out for eval
        noise=0.3,              # std of the Gaussian noise of the invert_noise domain
        glyph_classes=20,       # glyphs: number of classes
        glyph_per_class=200,    # glyphs: examples per class
        tfds_name="",           # tfds: registered name, e.g. "mnist" (must be prepared, array_record)
        tfds_data_dir="",       # tfds: data dir ("" = TFDS default)
        tfds_train_split="train",
        tfds_eval_split="test",
        tfds_image_key="image",
        tfds_label_key="label",
    ))


# ----------------------------------------------------------------------------------------------- streams
@dataclasses.dataclass(frozen=True)
class StreamTask:
    classes: tuple[int, ...]
    domain: str = "clean"


def _parse_classes(text: str, where: str) -> list[int]:
    out: list[int] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        lo, dash, hi = item.partition("-")
        try:
            ids = list(range(int(lo), int(hi) + 1)) if dash else [int(item)]
        except ValueError:
            raise ValueError(f"{where}: {item!r} is not a class id or a range like 0-4") from None
        if dash and int(hi) < int(lo):
            raise ValueError(f"{where}: empty range {item!r}")
        out += ids
    return out


def parse_stream(spec: str, num_classes: int | None = None) -> list[StreamTask]:
    """Parses a task spec (module docstring) and checks it.

    Raises:
      ValueError: an empty spec or task, a repeated or negative class, a class >= ``num_classes``, a class
        shared by two tasks, or an unknown domain; the message names the task.
    """
    if not spec or not spec.strip():
        raise ValueError("stream spec is empty; expected e.g. '0,1;2,3@invert_noise'")
    tasks, owner = [], {}
    for t, part in enumerate(spec.split(";")):
        body, _, domain = part.partition("@")
        domain = domain.strip() or "clean"
        where = f"stream {spec!r} task {t}"
        if domain not in DOMAINS:
            raise ValueError(f"{where}: unknown domain {domain!r}; known: {DOMAINS}")
        classes = _parse_classes(body, where)
        if not classes:
            raise ValueError(f"{where} is empty: every task needs at least one class")
        for c in classes:
            if c < 0 or (num_classes is not None and c >= num_classes):
                raise ValueError(f"{where}: class {c} is outside the source's classes [0, {num_classes})")
            if c in owner:
                raise ValueError(f"{where}: class {c} overlaps with task {owner[c]} "
                                 f"(class-incremental tasks must have disjoint classes)")
            owner[c] = t
        tasks.append(StreamTask(tuple(classes), domain))
    return tasks


# ----------------------------------------------------------------------------------------------- sources
@dataclasses.dataclass(frozen=True)
class Source:
    """All examples of a source: images f32 [N,S,S,C] in [0,1], labels i32 [N], is_test bool [N]."""
    images: np.ndarray
    labels: np.ndarray
    is_test: np.ndarray
    num_classes: int


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N, h, w, C] to [N, size, size, C] (half-pixel centres, as jax.image.resize)."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images.astype(np.float32)

    def axis(n_in):
        pos = (np.arange(size) + 0.5) * n_in / size - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    ylo, yhi, fy = axis(h)
    xlo, xhi, fx = axis(w)
    rows = images[:, ylo] * (1 - fy)[None, :, None, None] + images[:, yhi] * fy[None, :, None, None]
    out = rows[:, :, xlo] * (1 - fx)[None, None, :, None] + rows[:, :, xhi] * fx[None, None, :, None]
    return out.astype(np.float32)


def _split_per_class(labels: np.ndarray, test_fraction: float) -> np.ndarray:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    is_test = np.zeros(labels.shape[0], bool)
    perm = np.random.default_rng(12345).permutation(labels.shape[0])   # fixed: the split never moves
    for c in np.unique(labels):
        idx = perm[labels[perm] == c]
        is_test[idx[:max(1, int(round(test_fraction * idx.size)))]] = True
    return is_test


@functools.lru_cache(maxsize=8)
def _digits(image_size: int, test_fraction: float) -> Source:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = _resize((d.images / 16.0)[..., None].astype(np.float32), image_size)
    y = d.target.astype(np.int32)
    return Source(x, y, _split_per_class(y, test_fraction), 10)


def _bezier(ctrl: np.ndarray, n: int = 16) -> np.ndarray:
    """Points [..., n, 2] of quadratic Bezier curves with control points ``ctrl`` [..., 3, 2]."""
    t = np.linspace(0, 1, n)[:, None]                                   # [n, 1]
    p0, p1, p2 = (ctrl[..., i:i + 1, :] for i in range(3))              # [..., 1, 2]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def render_glyphs(strokes: np.ndarray, size: int, width: np.ndarray) -> np.ndarray:
    """Anti-aliased rasters [B, size, size] of glyphs made of quadratic Bezier strokes.

    Args:
      strokes: [B, k, 3, 2] control points in [0, 1] (x, y).
      size: output side in pixels.
      width: [B] stroke widths in pixels.
    """
    curve = (_bezier(strokes) * size).astype(np.float32)                # [B, k, n, 2] pixel units
    b = curve.shape[0]
    a = curve[:, :, :-1].reshape(b, 1, -1, 2)                           # [B, 1, M, 2] segment starts
    ab = curve[:, :, 1:].reshape(b, 1, -1, 2) - a                       # [B, 1, M, 2] segment vectors
    centres = np.arange(size, dtype=np.float32) + 0.5
    px = np.tile(centres, size)[None, :, None]                          # [1, P, 1] (row-major pixels)
    py = np.repeat(centres, size)[None, :, None]
    dx, dy = px - a[..., 0], py - a[..., 1]                             # [B, P, M]
    ux, uy = ab[..., 0], ab[..., 1]
    t = np.clip((dx * ux + dy * uy) / np.maximum(ux * ux + uy * uy, 1e-9), 0, 1)
    dist = np.sqrt(np.min((dx - t * ux) ** 2 + (dy - t * uy) ** 2, axis=-1))   # [B, P]
    img = np.clip(width[:, None] / 2 + 0.5 - dist, 0, 1)
    return img.reshape(-1, size, size).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _glyphs(image_size: int, num_classes: int, per_class: int, test_fraction: float) -> Source:
    if num_classes < 1 or per_class < 2:
        raise ValueError(f"glyphs need glyph_classes >= 1 and glyph_per_class >= 2, got {num_classes}, "
                         f"{per_class}")
    images = []
    for c in range(num_classes):
        proto = np.random.default_rng([7, c]).uniform(0.15, 0.85, size=(3, 3, 2))    # 3 strokes x 3 points
        rng = np.random.default_rng([8, c])
        s = (proto + rng.normal(0, 0.04, (per_class, *proto.shape))
             + rng.uniform(-0.06, 0.06, (per_class, 1, 1, 2)))                       # [n, 3, 3, 2]
        images.append(render_glyphs(s, image_size, rng.uniform(0.9, 1.6, per_class) * image_size / 16))
    y = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    return Source(np.concatenate(images)[..., None], y, _split_per_class(y, test_fraction), num_classes)


def _tfds_split(cfg, split_name: str, image_size: int):
    from sqattn.data import tfds_source
    if not cfg.tfds_name:
        raise ValueError("data.source='tfds' needs data.tfds_name (a prepared TFDS image dataset)")
    src = tfds_source.open_split(ml_collections.ConfigDict(dict(
        tfds_name=cfg.tfds_name, tfds_data_dir=cfg.tfds_data_dir)), split_name)
    xs, ys = [], []
    for i in range(len(src)):
        ex = src[i]
        if cfg.tfds_image_key not in ex or cfg.tfds_label_key not in ex:
            raise KeyError(f"TFDS {cfg.tfds_name!r} examples have features {sorted(ex)}; set data.tfds_image_key "
                           f"and data.tfds_label_key")
        img = np.asarray(ex[cfg.tfds_image_key], np.float32)
        xs.append(img[..., None] if img.ndim == 2 else img)
        ys.append(int(ex[cfg.tfds_label_key]))
    x = np.stack(xs) / 255.0
    return _resize(x, image_size), np.asarray(ys, np.int32)


def load_source(cfg) -> Source:
    """The examples of ``cfg.source`` (cached per setting)."""
    if cfg.source == "digits":
        return _digits(int(cfg.image_size), float(cfg.test_fraction))
    if cfg.source == "glyphs":
        return _glyphs(int(cfg.image_size), int(cfg.glyph_classes), int(cfg.glyph_per_class),
                       float(cfg.test_fraction))
    if cfg.source == "tfds":
        xtr, ytr = _tfds_split(cfg, cfg.tfds_train_split, int(cfg.image_size))
        xte, yte = _tfds_split(cfg, cfg.tfds_eval_split, int(cfg.image_size))
        y = np.concatenate([ytr, yte])
        return Source(np.concatenate([xtr, xte]), y, np.r_[np.zeros(len(ytr), bool), np.ones(len(yte), bool)],
                      int(y.max()) + 1)
    raise ValueError(f"unknown image source {cfg.source!r}; known: {SOURCES}")


def num_classes(cfg) -> int:
    return load_source(cfg).num_classes


def apply_domain(images: np.ndarray, domain: str, *, noise: float, seed: int, ids: np.ndarray) -> np.ndarray:
    """``images`` [n,S,S,C] in ``domain``; the noise of example ``ids[j]`` is a pure function of (seed, id)."""
    if domain == "clean":
        return images
    if domain == "invert":
        return 1.0 - images
    if domain == "invert_noise":
        eps = np.stack([np.random.default_rng([seed, 99, int(i)]).normal(0, noise, images.shape[1:])
                        for i in ids]).astype(np.float32) if len(ids) else np.zeros_like(images)
        return np.clip(1.0 - images + eps, 0.0, 1.0)
    if domain == "rot90":
        return np.rot90(images, 1, axes=(1, 2)).copy()
    if domain == "transpose":
        return np.swapaxes(images, 1, 2).copy()
    raise ValueError(f"unknown domain {domain!r}; known: {DOMAINS}")


@dataclasses.dataclass(frozen=True)
class Examples:
    """One split of one stream position: images f32 [n,S,S,C] in [0,1], labels, task of each example."""
    images: np.ndarray
    labels: np.ndarray
    task_ids: np.ndarray
    allowed: np.ndarray       # bool [K]: the classes the loss may score
    num_tasks: int
    num_classes: int


def examples(cfg, split: str) -> Examples:
    """The examples of ``split`` at task ``cfg.task`` of ``cfg.stream`` (module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    src = load_source(cfg)
    tasks = parse_stream(cfg.stream, src.num_classes)
    t = int(cfg.task)
    if not 0 <= t < len(tasks):
        raise ValueError(f"data.task={t} is outside the stream's {len(tasks)} tasks ({cfg.stream!r})")
    wanted = [t] if split == "train" else list(range(t + 1))
    pool = ~src.is_test if split == "train" else src.is_test
    xs, ys, ts = [], [], []
    allowed = np.zeros(src.num_classes, bool)
    for u in wanted:
        ids = np.nonzero(pool & np.isin(src.labels, tasks[u].classes))[0]
        if ids.size == 0:
            raise ValueError(f"stream task {u} (classes {tasks[u].classes}) has no {split} examples")
        xs.append(apply_domain(src.images[ids], tasks[u].domain, noise=float(cfg.noise), seed=int(cfg.seed),
                               ids=ids))
        ys.append(src.labels[ids])
        ts.append(np.full(ids.size, u, np.int32))
        allowed[list(tasks[u].classes)] = True
    return Examples(np.concatenate(xs), np.concatenate(ys), np.concatenate(ts), allowed, len(tasks),
                    src.num_classes)


class ImageBatches:
    """Batches of one split for one data shard (module docstring).

    Attributes:
      split, batch_size (this shard's rows), global_batch_size, num_rows, num_batches (eval: batches covering
      the split once; None for train), num_classes, num_tasks.
    """

    def __init__(self, cfg, split: str, *, global_batch_size: int, shard_index: int = 0, shard_count: int = 1):
        if global_batch_size < 1 or global_batch_size % shard_count:
            raise ValueError(f"batch_size {global_batch_size} must be a positive multiple of shard_count "
                             f"{shard_count}")
        ex = examples(cfg, split)
        self.split = split
        self._x = (ex.images * 2.0 - 1.0).astype(np.float32)
        self._y = ex.labels.astype(np.int32)
        self._task = np.eye(ex.num_tasks, dtype=np.float32)[ex.task_ids]
        self._allowed = ex.allowed
        self.seed = int(cfg.seed)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // shard_count
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.num_rows = int(self._y.shape[0])
        self.num_classes, self.num_tasks = ex.num_classes, ex.num_tasks
        self.num_batches = None if split == "train" else math.ceil(self.num_rows / self.global_batch_size)

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices [global_batch], weights) of global batch ``step``."""
        g = self.global_batch_size
        if self.split == "train":
            return (np.random.default_rng([self.seed, 0, int(step)]).integers(0, self.num_rows, g),
                    np.ones(g, np.float32))
        step %= self.num_batches
        rows = np.arange(step * g, (step + 1) * g)
        return np.minimum(rows, self.num_rows - 1), (rows < self.num_rows).astype(np.float32)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rows, weights = self.rows(step)
        mine = slice(self.shard_index * self.batch_size, (self.shard_index + 1) * self.batch_size)
        rows, weights = rows[mine], weights[mine]
        return {"images": self._x[rows], "labels": self._y[rows], "weights": weights,
                "logit_mask": np.broadcast_to(self._allowed, (rows.size, self.num_classes)).copy(),
                "task_onehot": self._task[rows]}

    def all_images(self) -> np.ndarray:
        """Every example of the split in order, model-scaled ([-1, 1])."""
        return self._x

    def __repr__(self) -> str:
        return (f"ImageBatches(split={self.split!r}, rows={self.num_rows}, batch_size={self.batch_size}, "
                f"classes={self.num_classes}, tasks={self.num_tasks})")
