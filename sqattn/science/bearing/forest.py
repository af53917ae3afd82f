"""The paper's random forest (scikit-learn) and the same forest compiled to flat arrays for a jitted JAX traversal.

``fit_forest`` trains scikit-learn's ``RandomForestClassifier`` with its defaults (100 trees, Gini,
max_features="sqrt", bootstrap, no depth limit; the paper's settings are not confirmed). ``compile_forest``
exports its trees into padded [T, M] arrays (feature, threshold, left, right) and [T, M, C] leaf class
probabilities; ``forest_proba`` walks every (sample, tree) pair ``depth`` levels down with ``lax.fori_loop``
(leaves point at themselves, so a leaf reached early stays put) and averages the leaf probabilities, as
scikit-learn's ``predict_proba`` does.

Exactness: scikit-learn compares float32 features with float64 thresholds (``x <= t``). The export rounds each
threshold *down* to the largest float32 <= t, so ``x <= t32`` and ``x <= t`` agree for every float32 x and the
compiled forest picks the same leaf as scikit-learn.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def fit_forest(x: np.ndarray, y: np.ndarray, *, n_estimators: int = 100, seed: int = 0, n_jobs: int = 1, **kw):
    """scikit-learn ``RandomForestClassifier`` (defaults but ``random_state``) fitted on features ``x``."""
    from sklearn.ensemble import RandomForestClassifier
    rf = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs, **kw)
    return rf.fit(np.asarray(x, np.float32), np.asarray(y))


@dataclasses.dataclass(frozen=True)
class CompiledForest:
    """A tree ensemble as arrays (nodes padded to M per tree; padding nodes are leaves with zero probability).

    Attributes:
      feature: int32 [T, M] split feature (0 at leaves).
      threshold: float32 [T, M] go left when x[feature] <= threshold.
      left, right: int32 [T, M] children (a leaf's are itself).
      proba: float32 [T, M, C] class probabilities at leaves.
      depth: levels to descend (the deepest tree's depth).
      classes: the class labels of the C columns.
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    proba: np.ndarray
    depth: int
    classes: np.ndarray

    @property
    def num_trees(self) -> int:
        return self.feature.shape[0]

    def arrays(self) -> tuple:
        return tuple(jnp.asarray(a) for a in (self.feature, self.threshold, self.left, self.right, self.proba))


def _float32_floor(t: np.ndarray) -> np.ndarray:
    """The largest float32 <= t (elementwise, t float64)."""
    t32 = t.astype(np.float32)
    over = t32.astype(np.float64) > t
    t32[over] = np.nextafter(t32[over], np.float32(-np.inf))
    return t32


def compile_forest(rf) -> CompiledForest:
    """Exports a fitted scikit-learn forest (or any estimator with ``estimators_`` of decision trees)."""
    trees = [est.tree_ for est in getattr(rf, "estimators_", [])]
    if not trees:
        raise ValueError("compile_forest needs a fitted forest (no estimators_ found)")
    if any(t.n_outputs != 1 for t in trees):
        raise ValueError("compile_forest supports single-output classifiers only")
    m = max(t.node_count for t in trees)
    c = trees[0].value.shape[-1]
    feature = np.zeros((len(trees), m), np.int32)
    threshold = np.zeros((len(trees), m), np.float32)
    self_index = np.broadcast_to(np.arange(m, dtype=np.int32), (len(trees), m))
    left, right = self_index.copy(), self_index.copy()
    proba = np.zeros((len(trees), m, c), np.float32)
    for i, t in enumerate(trees):
        n = t.node_count
        leaf = t.children_left[:n] == -1
        feature[i, :n] = np.where(leaf, 0, t.feature[:n])
        threshold[i, :n] = np.where(leaf, 0.0, _float32_floor(t.threshold[:n]))
        left[i, :n] = np.where(leaf, np.arange(n), t.children_left[:n])
        right[i, :n] = np.where(leaf, np.arange(n), t.children_right[:n])
        v = t.value[:n, 0, :].astype(np.float64)
        v = v / np.maximum(v.sum(-1, keepdims=True), 1e-300)
        proba[i, :n] = np.where(leaf[:, None], v, 0.0)
    depth = max(t.max_depth for t in trees)
    return CompiledForest(feature, threshold, left, right, proba, int(depth), np.asarray(rf.classes_))


@functools.partial(jax.jit, static_argnames=("depth",))
def _proba(x, feature, threshold, left, right, proba, depth):
    t, m = feature.shape
    base = jnp.arange(t, dtype=jnp.int32) * m                                   # [T] offset of each tree
    feat, thr, lft, rgt = (a.reshape(-1) for a in (feature, threshold, left, right))

    def level(_, node):                                                         # node: [B, T] global index
        xv = jnp.take_along_axis(x, feat[node], axis=1)                         # [B, T]
        nxt = jnp.where(xv <= thr[node], lft[node], rgt[node])
        return base[None, :] + nxt

    # a rolled loop: unrolling it measured no faster at batch 1 and 2-3x slower at batch 1024 on CPU
    node = jax.lax.fori_loop(0, depth, level, jnp.broadcast_to(base, (x.shape[0], t)))
    return jnp.mean(proba.reshape(t * m, -1)[node], axis=1)                     # [B, C]


def forest_proba(forest: CompiledForest, x: jax.Array, arrays: tuple | None = None) -> jax.Array:
    """Class probabilities [B, C] of feature rows ``x`` [B, F] (float32), equal to ``rf.predict_proba``.

    ``arrays`` (``forest.arrays()``, device arrays) skips the host-to-device copy of the forest per call.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"forest_proba expects [batch, features], got shape {x.shape}")
    arrays = forest.arrays() if arrays is None else arrays
    return _proba(x, *arrays, depth=forest.depth)
