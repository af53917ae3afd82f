"""Synthetic teacher-student tasks for the training-dynamics analyses (papers/lmc.md, papers/scaling_laws.md).

A fixed random 2-layer teacher ``in_dim -> teacher_hidden -> num_outputs`` (weights ~ N(0, 1/fan_in), activation
``teacher_activation``) labels Gaussian inputs x ~ N(0, I_in_dim):

* ``kind="classification"``: y = argmax of the teacher's outputs, replaced by a uniform random class with
  probability ``label_noise`` (lmc.md's 10-class task; scaling_laws.md task B with label_noise 0.1).
* ``kind="regression"``: y = teacher(x) + N(0, noise^2) (scaling_laws.md task A: 16 -> 64 -> 1 tanh, noise 0.1,
  so the validation-MSE floor is 0.01).

Data are nested: example i of a split is a pure function of (teacher_seed, split, i) (generated in blocks of
``BLOCK`` rows), so the train set of ``n_train = m`` is the first m examples of one fixed stream and every smaller
shard is a prefix of every larger one. The eval set (``n_eval`` examples) is a separate stream, identical for
every shard. The train order is the data-order seed's: the global example index ``k = step * batch + row`` falls
in epoch ``k // n_train`` at position ``k % n_train`` of that epoch's permutation (drawn from (seed, epoch)), so
each epoch visits every example once and ``batch(step)`` is a pure function of (seed, step).

Registered as task ``"teacher"`` (``sqattn.train.tasks.TASKS``); the student is ``sqattn.models.mlp.MLP``. Eval
reports ``eval_loss`` (cross-entropy or MSE), ``eval_error`` (classification error, or MSE for regression) and
``eval_accuracy`` (classification).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

BLOCK = 1024                       # examples generated per random block (nesting does not depend on it)
KINDS = ("classification", "regression")
_SPLIT_ID = {"train": 0, "eval": 1}
_TEACHER_ACTS = {"relu": lambda h: np.maximum(h, 0.0), "tanh": np.tanh}


def default_config() -> ml_collections.ConfigDict:
    """``config.data`` of the teacher task (every field commented)."""
    return ml_collections.ConfigDict(dict(
        name="teacher",
        kind="classification",     # "classification" (argmax labels) | "regression" (teacher output + noise)
        in_dim=32,                 # input dimension; x ~ N(0, I)
        teacher_hidden=64,         # the teacher's hidden width
        teacher_activation="relu",  # "relu" | "tanh"
        num_outputs=10,            # classes (classification) or output dimension (regression)
        noise=0.0,                 # regression: output noise standard deviation
        label_noise=0.0,           # classification: probability that a label is replaced by a uniform class
        n_train=10000,             # train examples (the first n_train of the nested stream)
        n_eval=5000,               # eval examples (a separate stream, the same for every n_train)
        teacher_seed=0,            # the teacher's weights and the example streams
        seed=0,                    # data order (epoch permutations)
    ))


def _check(cfg) -> None:
    if cfg.kind not in KINDS:
        raise ValueError(f"teacher data: kind must be one of {KINDS}, got {cfg.kind!r}")
    if cfg.teacher_activation not in _TEACHER_ACTS:
        raise ValueError(f"teacher data: teacher_activation must be one of {sorted(_TEACHER_ACTS)}, got "
                         f"{cfg.teacher_activation!r}")
    for key in ("in_dim", "teacher_hidden", "num_outputs", "n_train", "n_eval"):
        if int(cfg[key]) < 1:
            raise ValueError(f"teacher data: {key} must be >= 1, got {cfg[key]}")
    if cfg.kind == "classification" and cfg.num_outputs < 2:
        raise ValueError(f"teacher data: classification needs num_outputs >= 2 classes, got {cfg.num_outputs}")
    if not 0.0 <= cfg.label_noise <= 1.0 or cfg.noise < 0:
        raise ValueError(f"teacher data: need 0 <= label_noise <= 1 and noise >= 0, got {cfg.label_noise}, "
                         f"{cfg.noise}")
    if cfg.seed < 0 or cfg.teacher_seed < 0:
        raise ValueError(f"teacher data: seeds must be >= 0, got seed={cfg.seed}, teacher_seed={cfg.teacher_seed}")


def teacher_weights(cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(W1 [in, h], b1 [h], W2 [h, out], b2 [out]) of the teacher of ``cfg`` (float64)."""
    rng = np.random.default_rng([int(cfg.teacher_seed), 7])
    w1 = rng.standard_normal((cfg.in_dim, cfg.teacher_hidden)) / math.sqrt(cfg.in_dim)
    b1 = 0.1 * rng.standard_normal(cfg.teacher_hidden)
    w2 = rng.standard_normal((cfg.teacher_hidden, cfg.num_outputs)) / math.sqrt(cfg.teacher_hidden)
    b2 = np.zeros(cfg.num_outputs)
    return w1, b1, w2, b2


def teacher_outputs(cfg, x: np.ndarray) -> np.ndarray:
    """The noiseless teacher f(x) [n, num_outputs] for inputs x [n, in_dim]."""
    w1, b1, w2, b2 = teacher_weights(cfg)
    return _TEACHER_ACTS[cfg.teacher_activation](x @ w1 + b1) @ w2 + b2


def _block(cfg, split: str, j: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([int(cfg.teacher_seed), _SPLIT_ID[split], j])
    x = rng.standard_normal((BLOCK, cfg.in_dim))
    f = teacher_outputs(cfg, x)
    noise_rng = np.random.default_rng([int(cfg.teacher_seed), _SPLIT_ID[split], j, 1])
    if cfg.kind == "classification":
        y = np.argmax(f, axis=-1)
        flip = noise_rng.random(BLOCK) < cfg.label_noise
        y = np.where(flip, noise_rng.integers(0, cfg.num_outputs, BLOCK), y).astype(np.int32)
    else:
        y = (f + cfg.noise * noise_rng.standard_normal(f.shape)).astype(np.float32)
    return x.astype(np.float32), y


def examples(cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x [n, in_dim] f32, y) of ``split`` ("train": n_train, "eval": n_eval); nested in n (module docstring)."""
    _check(cfg)
    n = int(cfg.n_train if split == "train" else cfg.n_eval)
    blocks = [_block(cfg, split, j) for j in range(-(-n // BLOCK))]
    x = np.concatenate([b[0] for b in blocks])[:n]
    y = np.concatenate([b[1] for b in blocks])[:n]
    return x, y


class TeacherBatches:
    """Batches of one split for one data shard: ``batch(step)`` -> {"x", "y", "weights"}.

    Attributes:
      split: "train" or "eval".
      batch_size: rows of this shard per batch.
      num_batches: eval batches covering the eval set once (padded with weight-0 rows); None for train.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, split: str, global_batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1):
        if global_batch_size % shard_count:
            raise ValueError(f"batch_size {global_batch_size} is not divisible by shard_count {shard_count}")
        self.split = split
        self._x, self._y = x, y
        self.n = x.shape[0]
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // shard_count
        self.shard_index = int(shard_index)
        self.num_batches = None if split == "train" else -(-self.n // self.global_batch_size)

    @functools.lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 3, epoch]).permutation(self.n)

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices, weights) of the global batch of ``step``."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = self.global_batch_size
        if self.split == "train":
            k = step * g + np.arange(g)
            epoch, pos = np.divmod(k, self.n)
            rows = np.empty(g, np.int64)
            for e in np.unique(epoch):
                sel = epoch == e
                rows[sel] = self._perm(int(e))[pos[sel]]
            return rows, np.ones(g, np.float32)
        step %= self.num_batches
        rows = np.arange(step * g, (step + 1) * g)
        weights = (rows < self.n).astype(np.float32)
        return np.minimum(rows, self.n - 1), weights

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows, weights = self.rows(step)
        mine = slice(self.shard_index * self.batch_size, (self.shard_index + 1) * self.batch_size)
        rows, weights = rows[mine], weights[mine]
        return {"x": self._x[rows], "y": self._y[rows], "weights": weights}

    def __repr__(self) -> str:
        return f"TeacherBatches(split={self.split!r}, n={self.n}, batch_size={self.batch_size})"


class TeacherTask:
    """Cross-entropy (classification) or MSE (regression) of an MLP student; see the module docstring."""

    kind = "classification"

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        cfg = default_config()
        unknown = sorted(set(config.data.keys()) - set(cfg.keys()))
        if unknown:
            raise ValueError(f"teacher data: unknown field(s) {unknown}; known: {sorted(cfg.keys())}")
        cfg.update(config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data))
        _check(cfg)
        self.kind = cfg.kind
        m = config.model
        if m.get("in_features", cfg.in_dim) != cfg.in_dim or m.get("out_features", cfg.num_outputs) != cfg.num_outputs:
            raise ValueError(f"teacher data has in_dim={cfg.in_dim}, num_outputs={cfg.num_outputs} but the model has "
                             f"in_features={m.get('in_features')}, out_features={m.get('out_features')}")
        kw = dict(global_batch_size=config.batch_size, seed=cfg.seed, shard_index=shard_index,
                  shard_count=shard_count)
        return (TeacherBatches(*examples(cfg, "train"), split="train", **kw),
                TeacherBatches(*examples(cfg, "eval"), split="eval", **kw))

    def loss_fn(self, model, batch, rng):
        del rng
        out = model(batch["x"]).astype(jnp.float32)                              # [b, out]
        w = batch["weights"]
        weight = jnp.sum(w)
        denom = jnp.maximum(weight, 1.0)
        if self.kind == "classification":
            y = batch["y"]
            nll = -jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=-1)[:, 0]
            wrong = (jnp.argmax(out, -1) != y).astype(jnp.float32)
            loss = jnp.sum(nll * w) / denom
            error = jnp.sum(wrong * w) / denom
            return loss, {"ce": loss, "error": error, "accuracy": 1.0 - error, "weight": weight}
        se = jnp.sum(jnp.square(out - batch["y"]), axis=-1)
        loss = jnp.sum(se * w) / denom
        return loss, {"mse": loss, "error": loss, "weight": weight}

    def eval_metrics(self, sums: dict) -> dict:
        w = max(float(sums["weight"]), 1.0)
        if self.kind == "classification":
            return {"eval_loss": float(sums["ce"]) / w, "eval_error": float(sums["error"]) / w,
                    "eval_accuracy": float(sums["accuracy"]) / w}
        mse = float(sums["mse"]) / w
        return {"eval_loss": mse, "eval_error": mse, "eval_mse": mse}


def eval_batches_for(data_cfg, batch_size: int) -> int:
    """``config.eval_batches`` that covers the eval set exactly once."""
    return max(1, -(-int(data_cfg.n_eval) // int(batch_size)))
