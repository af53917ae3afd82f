"""``BearingTask``: window-feature classification (normal / inner / outer / ball) for the one trainer.

Registered as ``"bearing"`` in ``sqattn.train.tasks.TASKS``. The data (``dataset.build(config.data)``) is built
once per process; features are standardised with the train split's mean and std (``FeatureBatches.mean/std``;
the same numbers are recomputed from the config wherever the model is used later).

* train: ``batch(step)`` draws ``batch_size`` training windows with replacement from a generator seeded by
  (data.seed, step) - a pure function of (seed, step); shard i of n gets rows [i b, (i + 1) b).
* eval: the test windows in order, padded to whole batches with weight-0 rows; ``num_batches`` batches cover
  them once (the bearing configs set ``eval_batches`` to it).

Eval reports loss, accuracy, macro-F1, per-class F1 and the confusion matrix (``eval_confusion_<true>_<pred>``,
window counts).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.science.bearing import dataset, kinematics

NUM_CLASSES = len(kinematics.CLASSES)


class FeatureBatches:
    """Batches of standardised feature rows for one split and one data shard.

    Attributes:
      split: "train" or "eval".
      batch_size: rows per batch of this shard.
      global_batch_size: rows per step over all shards.
      num_batches: batches covering the eval split once (None for train: every step is fresh).
      mean, std: [F] standardisation (from the train split).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, split: str, global_batch_size: int, seed: int,
                 mean: np.ndarray, std: np.ndarray, shard_index: int = 0, shard_count: int = 1):
        if global_batch_size % shard_count:
            raise ValueError(f"batch_size {global_batch_size} is not divisible by shard_count {shard_count}")
        if x.shape[0] == 0:
            raise ValueError(f"the {split} split holds no windows")
        self.split = split
        self.mean, self.std = mean, std
        self._x = ((x - mean) / std).astype(np.float32)
        self._y = y.astype(np.int32)
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // shard_count
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.num_features = x.shape[1]
        self.num_rows = x.shape[0]
        self.num_batches = None if split == "train" else math.ceil(self.num_rows / self.global_batch_size)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """{"features": f32 [b, F], "labels": i32 [b], "weights": f32 [b]} of ``step`` (this shard's rows)."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = self.global_batch_size
        if self.split == "train":
            rows = np.random.default_rng([self.seed, 0, step]).integers(0, self.num_rows, g)
            weights = np.ones(g, np.float32)
        else:
            step %= self.num_batches
            rows = np.arange(step * g, (step + 1) * g)
            weights = (rows < self.num_rows).astype(np.float32)
            rows = np.minimum(rows, self.num_rows - 1)
        mine = slice(self.shard_index * self.batch_size, (self.shard_index + 1) * self.batch_size)
        rows, weights = rows[mine], weights[mine]
        return {"features": self._x[rows], "labels": self._y[rows], "weights": weights}

    def __repr__(self) -> str:
        return (f"FeatureBatches(split={self.split!r}, rows={self.num_rows}, features={self.num_features}, "
                f"batch_size={self.batch_size}, shard={self.shard_index}/{self.shard_count})")


def standardisation(data: dataset.BearingData) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std ([F] float32) of the train split's features (std floored to keep constants finite)."""
    x, _ = data.split("train")
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-6).astype(np.float32)


class BearingTask:
    """Cross-entropy classification of feature rows; see the module docstring."""

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        data = dataset.build(config.data)
        mean, std = standardisation(data)
        n_model = config.model.get("in_features")
        if n_model is not None and n_model != data.features.shape[1]:
            raise ValueError(f"data gives {data.features.shape[1]} features ({'with' if config.data.envelope else 'without'}"
                             f" envelope features) but model.in_features={n_model}")
        kw = dict(global_batch_size=config.batch_size, seed=config.data.seed, mean=mean, std=std,
                  shard_index=shard_index, shard_count=shard_count)
        return (FeatureBatches(*data.split("train"), split="train", **kw),
                FeatureBatches(*data.split("test"), split="eval", **kw))

    def loss_fn(self, model, batch, rng):
        del rng
        logits = model(batch["features"]).astype(jnp.float32)                        # [b, C]
        y, w = batch["labels"], batch["weights"]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        weight = jnp.sum(w)
        denom = jnp.maximum(weight, 1.0)
        pred = jnp.argmax(logits, -1)
        confusion = (jax.nn.one_hot(y, NUM_CLASSES) * w[:, None]).T @ jax.nn.one_hot(pred, NUM_CLASSES)
        ce = jnp.sum(nll * w) / denom
        metrics = {"ce": ce, "accuracy": jnp.sum((pred == y) * w) / denom, "weight": weight,
                   "confusion": confusion / denom}   # [C, C]; the eval sums turn it back into counts
        return ce, metrics

    def eval_metrics(self, sums: dict) -> dict:
        w = max(float(sums["weight"]), 1.0)
        conf = np.asarray(sums["confusion"], np.float64)
        out = {"eval_loss": float(sums["ce"]) / w, "eval_accuracy": float(sums["accuracy"]) / w}
        out.update(classification_report(conf))
        return out


def classification_report(confusion: np.ndarray, prefix: str = "eval_") -> dict[str, float]:
    """Macro-F1, per-class F1 and the flattened confusion matrix from [C, C] counts (rows: true class)."""
    conf = np.asarray(confusion, np.float64)
    tp = np.diag(conf)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    present = conf.sum(1) > 0
    out = {f"{prefix}macro_f1": float(f1[present].mean()) if present.any() else 0.0}
    for c, name in enumerate(kinematics.CLASSES):
        out[f"{prefix}f1_{name}"] = float(f1[c])
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            out[f"{prefix}confusion_{i}_{j}"] = float(round(conf[i, j], 3))
    return out


def confusion_from_report(report: dict, prefix: str = "eval_") -> np.ndarray:
    """The [C, C] confusion matrix back from ``classification_report``'s keys."""
    return np.array([[report[f"{prefix}confusion_{i}_{j}"] for j in range(NUM_CLASSES)]
                     for i in range(NUM_CLASSES)])
