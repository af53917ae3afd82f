"""Linear mode connectivity of trainer runs (papers/lmc.md): interpolation paths, barriers, their Hessian
predictors, layer-wise paths, and spawning children of a run.

Definitions (lmc.md, used exactly):
* path theta(a) = theta_A + a * M (theta_B - theta_A), a in [0, 1]. M = 1 everywhere for the whole-network path;
  for a layer-wise path M is the 0/1 mask of a group of parameter paths (the other groups stay at A, so the end
  point is the hybrid "A with the group from B").
* barrier (chord form) B = max_a [phi(a) - ((1 - a) phi(0) + a phi(1))], reported with a* = argmax; also
  ``barrier_mean`` = max_a phi(a) - (phi(0) + phi(1)) / 2 (Frankle et al.) and ``barrier_max`` = max_a phi(a) -
  max(phi(0), phi(1)). phi is the run's own task loss (the training objective ``task.loss_fn``) or its error.
* predictors along d = M Delta with phi''(s) = d^T H(theta(s)) d (second derivative in the scalar s, H never
  formed):
  B_H = -phi''(1/2) / 8;  B_g = (grad L(theta(0)) - grad L(theta(1)))^T d / 8;
  B_q = -sum_i w_i G_{1/2}(s_i) phi''(s_i) (Gauss-Legendre on [0, 1/2] and [1/2, 1], where the Green's function
  G_{1/2}(s) = s/2 resp. (1 - s)/2 is smooth), which equals the chord gap at a = 1/2 up to quadrature error.
* distance ||theta_A - theta_B|| and the displacement angle between theta_A - theta_k and theta_B - theta_k for
  the common spawn point theta_k.

Every grid is evaluated vectorised: ``jax.lax.map(..., batch_size=chunk)`` vmaps the task loss over ``chunk``
interpolation points at a time (merged parameters built inside the map), summing the task's metrics over a fixed
list of batches; no Python loop of model copies.

Runs: ``load_run(workdir, step)`` rebuilds any trainer workdir's parameters, task and batches
(``sqattn.sample.load_model``); ``compare(run_a, run_b, ...)`` measures everything above. Spawning:
``child_config(parent, step, data_seed)`` is an ordinary trainer config started from the parent's checkpoint
(``config.init.workdir/step``) with its own data-order seed ``config.data.seed``; the child copies the parent's
whole train state there (``init.state='full'``: step counter, parameters, Adam moments, so the schedule and
optimizer continue the parent's) and trains the parent's remaining steps. ``state='params'`` restarts the
optimizer instead (an ablation). ``train_parent`` trains a run in segments that stop at each spawn step, so a
checkpoint exists at every spawn point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Params = Any   # a pure parameter dict (nnx.to_pure_dict of the model's Params)
LossFn = Callable[[Params, dict], tuple[jax.Array, dict]]   # (params, batch) -> (mean loss, metrics with "weight")


# ----------------------------------------------------------------------------------------------- paths
def leaf_paths(params: Params) -> list[str]:
    """"/"-joined paths of the leaves ("layers/0/kernel", "blocks/1/mixer/q/kernel"), in leaf order."""
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def default_groups(params: Params, depth: int | None = None) -> dict[str, str]:
    """Layer groups: name -> regex matching its leaf paths. ``depth=None`` groups the leaves of one module
    (kernel + bias of a Dense: "layers/0"); ``depth=k`` groups by the first k path components ("blocks/0/mixer")."""
    names: list[str] = []
    for p in leaf_paths(params):
        parts = p.split("/")
        key = "/".join(parts[:-1] if depth is None else parts[:depth]) or parts[0]
        if key not in names:
            names.append(key)
    return {n: "^" + re.escape(n) + "(/|$)" for n in names}


def group_mask(params: Params, pattern: str | Sequence[str] | None) -> Params:
    """A float32 0/1 tree like ``params``: 1 on the leaves whose path matches ``pattern`` (a regex, ``re.search``,
    or a list of them); ``None`` = all ones.

    Raises:
      ValueError: the pattern matches no leaf (the message lists some paths).
    """
    paths = leaf_paths(params)
    if pattern is None:
        hits = [True] * len(paths)
    else:
        pats = [pattern] if isinstance(pattern, str) else list(pattern)
        rx = [re.compile(p) for p in pats]
        hits = [any(r.search(p) for r in rx) for p in paths]
        if not any(hits):
            raise ValueError(f"parameter group {pattern!r} matches no parameter; paths look like {paths[:6]}")
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [np.full(np.shape(x), float(h), np.float32)
                                        for x, h in zip(leaves, hits)])


def interpolate(pa: Params, pb: Params, alpha, mask: Params | None = None) -> Params:
    """theta_A + alpha * mask * (theta_B - theta_A), leaf by leaf (``mask=None``: the whole network). Leaves
    where the mask is 0 are returned exactly as in ``pa``."""
    if mask is None:
        return jax.tree.map(lambda a, b: a + alpha * (b - a), pa, pb)
    return jax.tree.map(lambda a, b, m: jnp.where(m > 0, a + alpha * m * (b - a), a), pa, pb, mask)


def _vdot(x: Params, y: Params) -> jax.Array:
    return sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in
               zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def _flat(tree: Params, mask: Params | None = None) -> np.ndarray:
    """All leaves as one float64 vector (host), multiplied by ``mask``."""
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    if mask is not None:
        leaves = [x * np.asarray(m, np.float64).ravel() for x, m in zip(leaves, jax.tree.leaves(mask))]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def distance(pa: Params, pb: Params, mask: Params | None = None) -> float:
    """||M (theta_A - theta_B)|| (float64 on the host)."""
    return float(np.linalg.norm(_flat(pa, mask) - _flat(pb, mask)))


def displacement_angle(pk: Params, pa: Params, pb: Params, mask: Params | None = None) -> float:
    """Angle (degrees) between M (theta_A - theta_k) and M (theta_B - theta_k) (nan when either is zero)."""
    k = _flat(pk, mask)
    da, db = _flat(pa, mask) - k, _flat(pb, mask) - k
    na, nb = np.linalg.norm(da), np.linalg.norm(db)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(da @ db / (na * nb), -1.0, 1.0))))


# ----------------------------------------------------------------------------------------------- barriers
def barrier(alphas, values) -> dict[str, float]:
    """Barriers of a curve phi(alpha) on a grid that includes 0 and 1 (first and last points).

    Returns:
      {"barrier" (chord form), "a_star" (its argmax), "barrier_mean" (max - endpoint mean), "barrier_max"
      (max - larger endpoint), "start", "end", "max"}.
    """
    a = np.asarray(alphas, np.float64)
    v = np.asarray(values, np.float64)
    if a.ndim != 1 or a.shape != v.shape or a.size < 2:
        raise ValueError(f"alphas and values must be 1-D of the same length >= 2, got {a.shape}, {v.shape}")
    if not (np.isclose(a[0], 0.0) and np.isclose(a[-1], 1.0) and np.all(np.diff(a) > 0)):
        raise ValueError(f"alphas must increase from 0 to 1, got {a[0]} .. {a[-1]}")
    gap = v - ((1 - a) * v[0] + a * v[-1])
    i = int(np.argmax(gap))
    return {"barrier": float(max(gap[i], 0.0)), "a_star": float(a[i]),
            "barrier_mean": float(v.max() - 0.5 * (v[0] + v[-1])),
            "barrier_max": float(v.max() - max(v[0], v[-1])),
            "start": float(v[0]), "end": float(v[-1]), "max": float(v.max())}


def _stack(batches: Sequence[dict]) -> dict:
    """A list of same-shaped batches -> one dict of arrays with a leading batch-index axis."""
    if not batches:
        raise ValueError("need at least one batch")
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *batches)


def _sum_metrics(loss_fn: LossFn, params: Params, stacked: dict) -> dict:
    """Weighted sums over the stacked batches (``lax.scan``) of the loss ("loss") and every scalar metric;
    "weight" = total weight."""
    def one(b):
        loss, m = loss_fn(params, b)
        w = m["weight"]
        cur = {k: (v * w if k != "weight" else v) for k, v in m.items() if jnp.ndim(v) == 0}
        cur["loss"] = loss * w
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), cur)

    first = jax.tree.map(lambda x: x[0], stacked)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, first))
    sums, _ = jax.lax.scan(lambda acc, b: (jax.tree.map(jnp.add, acc, one(b)), None), zeros, stacked)
    return sums


def _means(sums: dict) -> dict[str, np.ndarray]:
    w = np.maximum(np.asarray(sums["weight"], np.float64), 1.0)
    out = {k: np.asarray(v, np.float64) / w for k, v in sums.items() if k != "weight"}
    if "error" not in out and "accuracy" in out:
        out["error"] = 1.0 - out["accuracy"]
    return out


_COMPILED: dict = {}


def _compiled(kind: str, loss_fn: LossFn, chunk: int):
    """One jitted grid evaluator per (kind, loss_fn, chunk): parameters, mask, batches and grid are arguments,
    so every pair and every layer group of the same model reuses the compilation."""
    key = (kind, loss_fn, int(chunk))
    if key in _COMPILED:
        return _COMPILED[key]

    def bs(grid):     # chunk 0: the whole grid in one vmap (one body to compile, no remainder chunk)
        return grid.shape[0] if chunk <= 0 else max(1, min(int(chunk), grid.shape[0]))

    if kind == "curve":
        def fn(pa, pb, mask, stacked, grid):
            return jax.lax.map(lambda a: _sum_metrics(loss_fn, interpolate(pa, pb, a, mask), stacked), grid,
                               batch_size=bs(grid))
    else:
        def fn(pa, pb, mask, stacked, grid):
            def f(params):
                s = _sum_metrics(loss_fn, params, stacked)
                return s["loss"] / jnp.maximum(s["weight"], 1.0)
            d = jax.tree.map(lambda a, b, m: (b - a) * m, pa, pb, mask)

            def phi(t):
                return f(jax.tree.map(lambda a, dd: a + t * dd, pa, d))

            def curv(t):   # phi''(t) = d^T H(theta(t)) d: second derivative of a scalar function of the scalar t.
                # Reverse over reverse, not forward over forward: models with custom_vjp kernels (attention) have
                # no forward-mode rule; two reverse passes over one scalar cost about as much, and H is never formed.
                return jax.grad(jax.grad(phi))(t)

            c = jax.lax.map(curv, grid, batch_size=bs(grid))
            g0 = jax.grad(f)(pa)
            g1 = jax.grad(f)(jax.tree.map(jnp.add, pa, d))
            return c, _vdot(jax.tree.map(jnp.subtract, g0, g1), d) / 8.0
    _COMPILED[key] = jax.jit(fn)
    return _COMPILED[key]


def _ones(params: Params) -> Params:
    return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), jnp.float32), params)


def interpolation_curve(loss_fn: LossFn, pa: Params, pb: Params, batches: Sequence[dict], *,
                        alphas: int | Sequence[float] = 21, mask: Params | None = None,
                        chunk: int = 0) -> dict[str, np.ndarray]:
    """phi(a) for every metric of ``loss_fn`` along the (masked) path, vectorised over the grid.

    Args:
      loss_fn: (params, batch) -> (mean loss, metrics with "weight"); the task's own loss. Keep one function
        object per model (``Run.loss_fn``): the compiled evaluator is cached per function.
      batches: same-shaped batches; metrics are weighted sums over all of them.
      alphas: grid size (linspace(0, 1, n)) or the grid itself (increasing, from 0 to 1).
      mask: ``group_mask`` of a layer-wise path; None = the whole network.
      chunk: interpolation points evaluated together in one vmap (``lax.map(batch_size=chunk)``); 0 = all of
        them (one vmap: the cheapest to compile; a chunk bounds memory for big models).

    Returns:
      {"alpha": [n], "loss": [n], "error": [n] (when the task reports error or accuracy), and every other scalar
      metric's weighted mean: [n]}.
    """
    grid = np.linspace(0.0, 1.0, alphas) if isinstance(alphas, int) else np.asarray(alphas, np.float64)
    fn = _compiled("curve", loss_fn, chunk)
    sums = fn(pa, pb, _ones(pa) if mask is None else mask, _stack(batches), jnp.asarray(grid, jnp.float32))
    out = _means(jax.device_get(sums))
    out["alpha"] = grid
    return out


def evaluate(loss_fn: LossFn, params: Params, batches: Sequence[dict]) -> dict[str, float]:
    """Weighted means of the loss and every scalar metric of ``params`` over ``batches`` (same as the curve's
    values at a = 0)."""
    key = ("eval", loss_fn, 0)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda p, st: _sum_metrics(loss_fn, p, st))
    return {k: float(v) for k, v in _means(jax.device_get(_COMPILED[key](params, _stack(batches)))).items()}


def _gauss_half_nodes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes s and weights w on [0, 1] (n Gauss-Legendre nodes on each half) with w_i G_{1/2}(s_i) folded in."""
    x, w = np.polynomial.legendre.leggauss(n)
    s_lo, s_hi = 0.25 * (x + 1.0), 0.5 + 0.25 * (x + 1.0)
    w = 0.25 * w
    s = np.concatenate([s_lo, s_hi])
    g = np.where(s <= 0.5, s * 0.5, (1.0 - s) * 0.5)
    return s, np.concatenate([w, w]) * g


def predictors(loss_fn: LossFn, pa: Params, pb: Params, batches: Sequence[dict], *,
               mask: Params | None = None, nodes: int = 8, chunk: int = 0) -> dict[str, float]:
    """The barrier-height predictors of lmc.md along the (masked) path from theta_A to theta_B.

    Returns:
      {"B_H", "B_g", "B_q", "curv_mid" (phi''(1/2)), "curv_min" (min of phi'' over the quadrature nodes)}, with
      phi the mean task loss over ``batches``.
    """
    s, ws = _gauss_half_nodes(int(nodes))
    grid = np.concatenate([[0.5], s])
    fn = _compiled("predictors", loss_fn, chunk)
    c, bg = jax.device_get(fn(pa, pb, _ones(pa) if mask is None else mask, _stack(batches),
                              jnp.asarray(grid, jnp.float32)))
    c = np.asarray(c, np.float64)
    return {"B_H": float(-c[0] / 8.0), "B_g": float(bg), "B_q": float(-np.sum(ws * c[1:])),
            "curv_mid": float(c[0]), "curv_min": float(c[1:].min())}


# ----------------------------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Run:
    """A trainer run's parameters at one step, with what is needed to evaluate its own task loss.

    Attributes:
      workdir, step: where the parameters come from.
      params: pure parameter dict.
      graphdef: the model structure (``nnx.split``).
      config: the run's config (mesh of size 1).
      task: the run's task object, its datasets built (``make_datasets``).
      train_ds, eval_ds: the run's datasets (``batch(i)`` -> numpy dict).
    """
    workdir: str
    step: int
    params: Params
    graphdef: Any
    config: ml_collections.ConfigDict
    task: Any
    train_ds: Any
    eval_ds: Any

    def loss_fn(self) -> LossFn:
        """The task's loss as (params, batch) -> (loss, metrics); one object per (model, task settings)."""
        return task_loss_fn(self.graphdef, self.task)

    def batches(self, split: str, n: int, start: int = 0) -> list[dict]:
        """``n`` batches of ``split`` ("train" or "eval"): train batches from step ``start`` of this run's data
        order; eval batches ``start .. start + n - 1``."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        ds = self.train_ds if split == "train" else self.eval_ds
        return [ds.batch(start + i) for i in range(int(n))]


_TASK_FNS: dict = {}


def task_loss_fn(graphdef, task) -> LossFn:
    """``task.loss_fn`` on ``nnx.merge(graphdef, params)`` (deterministic rng), cached per model structure and
    task settings so that every run of one model shares the compiled grid evaluators."""
    from flax import nnx
    settings = tuple(sorted((k, v) for k, v in vars(task).items() if isinstance(v, (str, int, float, bool))))
    key = (graphdef, type(task), settings)
    if key not in _TASK_FNS:
        def fn(params, batch):
            return task.loss_fn(nnx.merge(graphdef, params), batch, jax.random.key(0))
        _TASK_FNS[key] = fn
    return _TASK_FNS[key]


def load_run(workdir: str, step: int | None = None, *, float32: bool = True, datasets: bool = True) -> Run:
    """Any trainer workdir's parameters at ``step`` (None = latest), on one device.

    ``float32=True`` rebuilds the graph with ``model.dtype = "float32"`` (when the model has that setting) so
    curvatures and small barriers are not lost to bfloat16 rounding; the parameters are the checkpoint's.
    """
    from flax import nnx
    from sqattn import sample
    from sqattn.train import state as state_lib
    from sqattn.train import tasks as tasks_lib
    model, config = sample.load_model(workdir, step)
    _, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    if float32 and "dtype" in config.model:
        config.model.dtype = "float32"
    graphdef, _ = state_lib.abstract_model(config)
    if step is None:
        from sqattn.train import checkpoint as ckpt_lib
        ck = ckpt_lib.Checkpointer(workdir)
        try:
            step = max(ck.all_steps())
        finally:
            ck.close()
    task = tasks_lib.get_task(config.task)
    train_ds = eval_ds = None
    if datasets:
        train_ds, eval_ds = task.make_datasets(config)
    return Run(workdir, int(step), params, graphdef, config, task, train_ds, eval_ds)


def compare(run_a: Run, run_b: Run, *, base: Run | None = None, split: str = "train", num_batches: int = 4,
            eval_split: str | None = "eval", eval_num_batches: int | None = None, alphas: int = 21,
            groups: Mapping[str, Any] | None = None, with_predictors: bool = True, nodes: int = 8,
            chunk: int = 0, layer_predictors: bool | None = None) -> dict[str, Any]:
    """Everything lmc.md measures for one pair of runs (same model), with ``run_a``'s task and batches.

    Args:
      base: the spawn point theta_k (for the displacement angle), or None.
      split, num_batches: the landscape batches (train loss); the predictors use them too.
      eval_split, eval_num_batches: a second curve for the functional (test error) barrier; None skips it.
      groups: layer groups for layer-wise paths: name -> regex or list of regexes (``default_groups``); None =
        whole network only.
      layer_predictors: the predictors on every layer path too (default: ``with_predictors``).

    Returns:
      {"distance", "angle" (with base), "train": {curve, barriers of loss and error}, "eval": {...},
       "predictors": {...}, "layers": {name: {"distance", "train": ..., "predictors": ...}}}.
    """
    fn = run_a.loss_fn()
    pa, pb = run_a.params, run_b.params
    if jax.tree.structure(pa) != jax.tree.structure(pb):
        raise ValueError(f"runs {run_a.workdir!r} and {run_b.workdir!r} have different parameter trees")
    land = run_a.batches(split, num_batches)
    out: dict[str, Any] = {"a": run_a.workdir, "b": run_b.workdir, "step_a": run_a.step, "step_b": run_b.step,
                           "distance": distance(pa, pb)}
    if base is not None:
        out["angle"] = displacement_angle(base.params, pa, pb)
        out["displacement_a"] = distance(pa, base.params)
        out["displacement_b"] = distance(pb, base.params)
    out["train"] = _curve_record(interpolation_curve(fn, pa, pb, land, alphas=alphas, chunk=chunk))
    if eval_split:
        ev = run_a.batches(eval_split, eval_num_batches or _eval_batches(run_a, num_batches))
        out["eval"] = _curve_record(interpolation_curve(fn, pa, pb, ev, alphas=alphas, chunk=chunk))
    if with_predictors:
        out["predictors"] = predictors(fn, pa, pb, land, nodes=nodes, chunk=chunk)
    if groups:
        out["layers"] = {}
        for name, pat in groups.items():
            mask = group_mask(pa, pat)
            rec = {"distance": distance(pa, pb, mask)}
            if base is not None:
                rec["angle"] = displacement_angle(base.params, pa, pb, mask)
            rec["train"] = _curve_record(interpolation_curve(fn, pa, pb, land, alphas=alphas, mask=mask,
                                                             chunk=chunk))
            if with_predictors if layer_predictors is None else layer_predictors:
                rec["predictors"] = predictors(fn, pa, pb, land, mask=mask, nodes=nodes, chunk=chunk)
            out["layers"][name] = rec
    return out


def _eval_batches(run: Run, default: int) -> int:
    n = getattr(run.eval_ds, "num_batches", None)
    return int(n) if n else default


def _curve_record(curve: dict[str, np.ndarray]) -> dict[str, Any]:
    rec: dict[str, Any] = {"alpha": curve["alpha"].tolist()}
    for key in ("loss", "error"):
        if key in curve:
            rec[key] = curve[key].tolist()
            rec[f"{key}_barrier"] = barrier(curve["alpha"], curve[key])
    return rec


# ----------------------------------------------------------------------------------------------- spawning
def _config_of(workdir: str) -> ml_collections.ConfigDict:
    from sqattn import sample
    return sample.load_config(workdir)


def child_config(parent_workdir: str, step: int, data_seed: int, *, extra_steps: int | None = None,
                 parent_config: ml_collections.ConfigDict | None = None,
                 state: str = "full") -> ml_collections.ConfigDict:
    """The config of a child of ``parent_workdir`` spawned at ``step`` with data-order seed ``data_seed``.

    An ordinary trainer config: the parent's (from its config.json unless ``parent_config`` is given) with
    ``init.workdir = parent``, ``init.step = step`` and ``data.seed = data_seed``; everything else (optimizer,
    batch, model) is the parent's. The child trains the parent's remaining steps (``extra_steps`` instead, e.g.
    for children of the final checkpoint).

    ``state="full"`` (lmc.md's protocol): the child copies the parent's whole train state at ``step``: step
    counter, parameters and optimizer moments (``init.state='full'``), so its learning-rate schedule and Adam
    state continue the parent's; ``num_steps = step + remaining``. ``state="params"``: parameters only, with a
    fresh optimizer (its own warmup) and ``num_steps = remaining``, ``data_offset = parent's + step`` (an
    ablation: a restarted optimizer is a perturbation of its own).
    """
    if state not in ("full", "params"):
        raise ValueError(f"state must be 'full' or 'params', got {state!r}")
    c = ml_collections.ConfigDict((parent_config or _config_of(parent_workdir)).to_dict())
    steps = int(c.num_steps) - int(step) if extra_steps is None else int(extra_steps)
    if steps < 1:
        raise ValueError(f"a child spawned at step {step} of a {c.num_steps}-step parent has nothing to train; "
                         f"pass extra_steps")
    c.init.workdir = os.path.abspath(parent_workdir)
    c.init.step = int(step)
    c.init.transfer = "same"
    c.init.state = state
    c.data.seed = int(data_seed)
    if state == "full":
        c.num_steps = int(step) + steps
    else:
        c.data_offset = int(c.get("data_offset", 0)) + int(step)
        c.num_steps = steps
    c.checkpoint_every = min(int(c.checkpoint_every), steps)
    if int(c.get("eval_every", 0)) > steps:
        c.eval_every = 0
    c.name = f"{c.get('name', '')}>child@{step}:data_seed={data_seed}"
    return c


def train_parent(config: ml_collections.ConfigDict, workdir: str, spawn_steps: Iterable[int], *,
                 progress: bool = False) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` so that a checkpoint exists at every step of ``spawn_steps``.

    Step 0 is the initial model written with ``sample.save_model`` (the trainer then resumes from it, which is
    the same as starting from ``config.seed``); the trainer is run with ``stop_after`` at each later spawn step,
    then to the end. Needs ``config.keep_checkpoints`` > the number of spawn steps. A finished parent returns at
    once (the trainer's rerun of a finished run), so this resumes.
    """
    from sqattn import sample
    from sqattn.train import checkpoint as ckpt_lib
    from sqattn.train import state as state_lib
    from sqattn.train import train_and_evaluate
    steps = sorted({int(s) for s in spawn_steps})
    if steps and (steps[0] < 0 or steps[-1] > config.num_steps):
        raise ValueError(f"spawn steps must lie in [0, num_steps={config.num_steps}], got {steps}")
    if len(steps) + 1 > int(config.keep_checkpoints):
        raise ValueError(f"keep_checkpoints={config.keep_checkpoints} would rotate away spawn checkpoints; "
                         f"need > {len(steps)}")
    if 0 in steps and not ckpt_lib.has_checkpoint(workdir):
        sample.save_model(workdir, state_lib.build_model(config), config, step=0)
    done = max(checkpoint_steps(workdir), default=-1) if ckpt_lib.has_checkpoint(workdir) else -1
    out: dict[str, Any] = {}
    for s in [s for s in steps if max(done, 0) < s < config.num_steps] + [config.num_steps]:
        out = train_and_evaluate(config, workdir, stop_after=s, progress=progress)
        if out.get("stopped_early") and out["step"] < s:      # SIGTERM: stop here, a rerun resumes
            break
    return out


def checkpoint_steps(workdir: str) -> list[int]:
    from sqattn.train import checkpoint as ckpt_lib
    ck = ckpt_lib.Checkpointer(workdir)
    try:
        return sorted(ck.all_steps())
    finally:
        ck.close()


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)
