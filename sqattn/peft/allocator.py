"""Host rank allocators of the adaptive adapters (``sqattn.peft.adaptive``): trainer hooks between jitted steps.

A hook (protocol in ``sqattn.train.trainer``) reads the adapters of the train state, decides new ranks on the
host (numpy), and returns the state with new mask VALUES (and, where the method says so, a few adapter values):
no shape changes, so nothing recompiles. Each allocation appends a ``rank_allocation`` event (per-module ranks,
total, what changed, wall time of scoring and of the allocation) that the trainer writes to ``metrics.jsonl``;
``state_dict``/``load_state_dict`` carry the scores and EMAs through checkpoints so a resumed run allocates
exactly like an uninterrupted one (the masks themselves are train-state parameters).

Settings (``config.peft``; ``sqattn.configs.adaptive_rank.peft_config`` has them all, absent keys take these
defaults): ``interval`` (steps between allocations, 10), ``warmup`` (t_w: no allocation at t <= t_w, 0),
``final`` (t_f: the schedule must be complete at T - t_f, 0), ``schedule`` ("linear" | "exp", TriAdaptLoRA),
``rescale`` (TriAdaptLoRA: multiply C by r_new / r_old at growth so dW is continuous), ``sens_every``
(steps between sensitivity samples, AdaLoRA/IncreLoRA, 1), ``beta1``/``beta2`` (EMAs, 0.85/0.85),
``top_h`` (IncreLoRA modules grown per allocation, 1), ``measure_jump`` (each event also carries
``loss_before``/``loss_after``: the task loss, without the regulariser, on the next step's batch with the old
and the new adapters, two extra forward passes, for the loss-smoothness measurement; False).

- ``triadapt`` (TriAdaptLoRA, hook every ``interval``): importance ``s_k = ||C_k||_F / n_k - prev_k`` (n_k the
  number of active growth blocks; no gradient); ``n = floor(gap p)`` (linear) or ``floor(gap^p)`` (exp) modules
  grow, ``p = (t - t_w) / (T_end - t_w)``, ``n`` clipped to [1, M]; the top-n by ``s`` grow by ``grow_rank``.
- ``adalora`` (hook every ``sens_every``): per-component sensitivity ``I = |lambda g_lambda|``,
  ``mean_i |P g_P|``, ``mean_o |Q g_Q|`` from a gradient of the task loss on the step's train batch, smoothed
  (``Ibar``, beta1) with uncertainty ``Ubar = EMA_beta2 |I - Ibar|``; score ``sum Ibar Ubar``; at every
  ``interval`` after t_w the top ``b(t)`` components stay active, ``b(t)`` the cubic schedule from ``M init_rank``
  to the budget (reached at ``t >= T - t_f``, then frozen). Pruned lambdas are set to 0 (as AdaLoRA does).
  Deviation: AdaLoRA smooths per element and then averages over a row; we average the sensitivities over the
  row first (identical for ``Ibar``, which is linear; ``Ubar`` sees the row mean's fluctuation) so the state
  stays O(total rank) and fits a checkpoint's JSON metadata.
- ``increlora`` (hook every ``sens_every``): module importance ``sum |dW * dL/dW| / sqrt(numel)`` (dL/dW from a
  gradient through the frozen base kernel, which receives exactly dL/d(dW)), smoothed the same way; every
  ``interval`` after t_w the ``top_h`` modules grow by ``grow_rank``.

Exactness (a deviation from the paper code, which can overshoot through ties and whole quanta): growth never
passes the budget (the last quantum is cut) and ties are broken by module order; from ``T_end = T - t_f`` on,
growth methods grow whatever is still missing at the next allocation, so the budget is met exactly at the end
of the schedule. ``make_allocator`` refuses schedules that cannot reach it.

The scoring gradient of AdaLoRA/IncreLoRA is computed by the hook itself (a jitted ``jax.grad`` of the task
loss on ``ctx.train_batch(step)``, the batch the next step trains on): one extra forward+backward per
``sens_every`` steps, reported as ``score_wall_s`` in the events. TriAdaptLoRA needs only the parameters.
Single-process only (the hook reads the adapters with ``jax.device_get``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.peft import adaptive

__all__ = ["AdaLoRAAllocator", "IncreLoRAAllocator", "TriAdaptAllocator", "cubic_budget", "grow_ranks",
           "make_allocator", "num_to_grow", "settings"]

DEFAULTS = dict(interval=10, warmup=0, final=0, schedule="linear", rescale=False, sens_every=1, beta1=0.85,
                beta2=0.85, top_h=1, measure_jump=False)


def settings(config) -> dict:
    """The allocator settings of ``config.peft`` (DEFAULTS for absent keys) plus the resolved adapter shape
    (``adaptive.resolve_settings``)."""
    peft = config.peft
    out = {k: type(v)(peft.get(k, v)) for k, v in DEFAULTS.items()}
    out["rescale"] = bool(peft.get("rescale", False))
    out["measure_jump"] = bool(peft.get("measure_jump", False))
    out.update(adaptive.resolve_settings(peft.method, int(peft.rank), int(peft.get("init_rank", -1)),
                                         int(peft.get("max_rank", -1)), int(peft.get("grow_rank", -1)),
                                         float(peft.get("orth_reg", -1.0))))
    out.update(method=peft.method, rank=int(peft.rank), budget=int(peft.get("budget", 0)),
               total_steps=int(config.num_steps))
    return out


# ------------------------------------------------------------------------------------------ pure schedule math
def num_to_grow(gap: int, p: float, schedule: str, num_modules: int) -> int:
    """TriAdaptLoRA's module count: ``floor(gap p)`` (linear) or ``floor(gap^p)`` (exp), clipped to [1, M]."""
    if schedule == "linear":
        n = int(math.floor(gap * p))
    elif schedule == "exp":
        n = int(math.floor(math.exp(p * math.log(max(gap, 1)))))
    else:
        raise ValueError(f"schedule must be 'linear' or 'exp', got {schedule!r}")
    return min(max(n, 1), num_modules)


def cubic_budget(t: int, *, total: int, init_budget: int, target: int, warmup: int, final: int) -> tuple[int, bool]:
    """AdaLoRA's budget at step t: ``init_budget`` until t_w, then ``target + (init - target) (1 - (t - t_w) /
    (T - t_f - t_w))^3``, and ``target`` from ``T - t_f`` on. Returns (budget, final_phase)."""
    if t >= total - final:
        return target, True
    if t <= warmup:
        return init_budget, False
    frac = 1.0 - (t - warmup) / max(total - final - warmup, 1)
    return int((init_budget - target) * frac ** 3 + target), False


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties by index (stable)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def grow_ranks(ranks: np.ndarray, scores: np.ndarray, n: int, quantum: int, max_rank: int, gap: int,
               fill: bool = False) -> np.ndarray:
    """New ranks: the ``n`` highest-scoring modules below ``max_rank`` grow by ``quantum`` (cut so the total
    never passes ``gap`` more than now, nor a module ``max_rank``). ``fill``: repeat rounds over every module by
    score until ``gap`` is used up or nothing can grow (the end-of-schedule completion)."""
    ranks = np.asarray(ranks, np.int64).copy()
    left = int(gap)
    while left > 0:
        grown = 0
        for k in _order(scores):
            if left <= 0 or (not fill and grown >= n):
                break
            add = min(quantum, max_rank - ranks[k], left)
            if add > 0:
                ranks[k] += add
                left -= add
                grown += 1
        if not fill or grown == 0:
            break
    return ranks


# ------------------------------------------------------------------------------------------ state access
def _find(params, path=()) -> list[tuple[tuple, dict]]:
    """(path, sub-dict) of every adaptive adapter in a pure parameter dict (sub-dicts holding ``ada_mask``)."""
    if not isinstance(params, dict):
        return []
    if "ada_mask" in params:
        return [(path, params)]
    out = []
    for k, v in params.items():
        out += _find(v, path + (k,))
    return out


def _replace_leaves(params: dict, updates: dict[tuple, Any]) -> dict:
    """A copy of the nested dict ``params`` with the leaves at ``updates``' paths replaced (others shared)."""
    if not updates:
        return params
    heads: dict = {}
    for path, value in updates.items():
        heads.setdefault(path[0], {})[path[1:]] = value
    out = dict(params)
    for k, sub in heads.items():
        out[k] = sub[()] if () in sub else _replace_leaves(params[k], sub)
    return out


def _node(model, path: tuple):
    node = model
    for k in path:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def _name(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _prefix_mask(rank: int, max_rank: int) -> np.ndarray:
    return (np.arange(max_rank) < rank).astype(np.float32)


class RankAllocator:
    """Shared machinery: module discovery, budget, events, and the jitted scoring gradient."""

    method = ""

    def __init__(self, s: dict):
        self.s = s
        self.events: list[dict] = []
        self.every = 1
        self._score_fn = None
        self._score_wall = 0.0
        self._score_calls = 0
        self.compile_s = 0.0
        self._loss_fn = None

    # --- helpers
    def modules(self, state) -> list[tuple[tuple, dict]]:
        mods = _find(state["params"])
        if not mods:
            raise ValueError(f"{type(self).__name__}: the train state holds no adaptive adapter (peft.method="
                             f"{self.method!r} applied to nothing?)")
        return mods

    def budget(self, num_modules: int) -> int:
        return self.s["budget"] or self.s["rank"] * num_modules

    def read(self, state) -> tuple[list, np.ndarray, np.ndarray, int]:
        """(modules, masks [M, R], ranks [M], budget) of the train state."""
        mods = self.modules(state)
        masks = self.masks(mods)
        return mods, masks, masks.sum(1).astype(np.int64), self.budget(len(mods))

    @staticmethod
    def masks(mods) -> np.ndarray:
        return np.stack([np.asarray(jax.device_get(sub["ada_mask"]), np.float32) for _, sub in mods])   # [M, R]

    def _event(self, step: int, mods, before: np.ndarray, after: np.ndarray, wall: float, **extra) -> None:
        names = [_name(p) for p, _ in mods]
        self.events.append(dict(
            event="rank_allocation", method=self.method, ranks=dict(zip(names, map(int, after))),
            total_rank=int(after.sum()),
            changed={n: [int(b), int(a)] for n, b, a in zip(names, before, after) if a != b},
            alloc_wall_s=wall, score_wall_s=self._score_wall, score_calls=self._score_calls,
            score_compile_s=self.compile_s, **extra))
        self._score_wall, self._score_calls = 0.0, 0

    def _scores(self, state, ctx, step: int, mods) -> list[np.ndarray]:
        """Runs the jitted scoring function on the train batch of ``step``."""
        batch = ctx.train_batch(step)
        if self._score_fn is None:        # compiled once (ahead of time, so the compile is not scoring time)
            t0 = time.perf_counter()
            fn = jax.jit(self._make_score_fn(ctx, [p for p, _ in mods]))
            self._score_fn = fn.lower(state["params"], batch).compile()
            self.compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.device_get(self._score_fn(state["params"], batch))
        self._score_wall += time.perf_counter() - t0
        self._score_calls += 1
        return [np.asarray(o, np.float64) for o in out]

    def finish(self, step: int, state: dict, ctx, updates: dict, mods, before, after, t0: float, **extra) -> dict:
        """The new state with ``updates`` applied, and the allocation event (with the same-batch loss before
        and after when ``measure_jump``)."""
        new_state = dict(state, params=_replace_leaves(state["params"], updates))
        wall = time.perf_counter() - t0
        if self.s["measure_jump"]:
            if self._loss_fn is None:
                def task_loss(p, b):     # the loss without the orthogonality regulariser (which growth changes)
                    loss, metrics = ctx.task.loss_fn(nnx.merge(ctx.graphdef, p), b, jax.random.key(0))
                    return loss - metrics.get("orth_reg", 0.0)
                self._loss_fn = jax.jit(task_loss)
            batch = ctx.train_batch(step)
            extra.update(loss_before=float(self._loss_fn(state["params"], batch)),
                         loss_after=float(self._loss_fn(new_state["params"], batch)))
        self._event(step, mods, before, after, wall, **extra)
        return new_state

    def _make_score_fn(self, ctx, paths):  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def _loss_with(ctx, keys):
        """``f(sub, params, batch)``: the task loss with the leaves at ``keys`` replaced by ``sub``."""
        def loss(sub, params, batch):
            full = _replace_leaves(params, dict(zip(keys, sub)))
            value, _ = ctx.task.loss_fn(nnx.merge(ctx.graphdef, full), batch, jax.random.key(0))
            return value
        return loss

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        del d


# ------------------------------------------------------------------------------------------ TriAdaptLoRA
class TriAdaptAllocator(RankAllocator):
    method = "triadapt"

    def __init__(self, s: dict):
        super().__init__(s)
        self.every = s["interval"]
        self.prev: list[float] | None = None
        self.bids = adaptive.block_ids(s["max_rank"], s["init_rank"], s["grow_rank"])

    def importance(self, low: np.ndarray, up: np.ndarray, mask: np.ndarray) -> float:
        """``||C||_F / n_blocks`` of one module's active core (host, float64)."""
        b = self.bids
        c = (b[:, None] >= b[None, :]) * low + (b[:, None] <= b[None, :]) * up
        mm = (mask[:, None] > 0) & (mask[None, :] > 0)
        nblocks = max(len(np.unique(b[mask > 0])), 1)
        return float(np.linalg.norm(np.where(mm, c, 0.0))) / nblocks

    def __call__(self, step: int, state: dict, ctx) -> dict | None:
        s = self.s
        mods, masks, ranks, budget = self.read(state)
        if step <= s["warmup"] or ranks.sum() >= budget:
            return None
        t0 = time.perf_counter()
        nf = np.array([self.importance(np.asarray(jax.device_get(sub["ada_core_low"]), np.float64),
                                       np.asarray(jax.device_get(sub["ada_core_up"]), np.float64), m)
                       for (_, sub), m in zip(mods, masks)])
        prev = np.zeros_like(nf) if self.prev is None else np.asarray(self.prev)
        score = nf - prev
        self.prev = [float(x) for x in nf]
        t_end = s["total_steps"] - s["final"]
        p = min(1.0, (step - s["warmup"]) / max(t_end - s["warmup"], 1))
        gap = int(budget - ranks.sum())
        growable = ranks < s["max_rank"]
        fill = step >= t_end
        n = num_to_grow(gap, p, s["schedule"], int(growable.sum()) or 1)
        new = grow_ranks(ranks, np.where(growable, score, -np.inf), n, s["grow_rank"], s["max_rank"], gap, fill)
        updates = {}
        for (path, sub), r0, r1 in zip(mods, ranks, new):
            if r1 == r0:
                continue
            updates[path + ("ada_mask",)] = _prefix_mask(int(r1), s["max_rank"])
            if s["rescale"] and r0 > 0:
                for key in ("ada_core_low", "ada_core_up"):
                    updates[path + (key,)] = jax.device_get(sub[key]) * np.float32(r1 / r0)
        grown = score[new > ranks]
        return self.finish(step, state, ctx, updates, mods, ranks, new, t0, progress=p, modules_grown=int(n),
                           threshold=float(grown.min()) if grown.size else None)

    def state_dict(self) -> dict:
        return {"prev": self.prev}

    def load_state_dict(self, d: dict) -> None:
        self.prev = d.get("prev")


# ------------------------------------------------------------------------------------------ sensitivity EMAs
class _SensitivityAllocator(RankAllocator):
    """Keeps ``Ibar`` and ``Ubar`` EMAs of a score array per module."""

    def __init__(self, s: dict):
        super().__init__(s)
        self.every = s["sens_every"]
        self.ipt: list | None = None
        self.unc: list | None = None

    def update_ema(self, raw: list[np.ndarray]) -> np.ndarray:
        b1, b2 = self.s["beta1"], self.s["beta2"]
        if self.ipt is None:
            ipt, unc = [np.zeros_like(r) for r in raw], [np.zeros_like(r) for r in raw]
        else:
            ipt, unc = [np.asarray(x, np.float64) for x in self.ipt], [np.asarray(x, np.float64) for x in self.unc]
        ipt = [b1 * i + (1 - b1) * r for i, r in zip(ipt, raw)]
        unc = [b2 * u + (1 - b2) * np.abs(r - i) for u, r, i in zip(unc, raw, ipt)]
        self.ipt, self.unc = [x.tolist() for x in ipt], [x.tolist() for x in unc]
        return np.stack([i * u for i, u in zip(ipt, unc)])

    def state_dict(self) -> dict:
        return {"ipt": self.ipt, "unc": self.unc}

    def load_state_dict(self, d: dict) -> None:
        self.ipt, self.unc = d.get("ipt"), d.get("unc")


class AdaLoRAAllocator(_SensitivityAllocator):
    method = "adalora"

    def __init__(self, s: dict):
        super().__init__(s)
        self.frozen = False

    def _make_score_fn(self, ctx, paths):
        keys = [p + (k,) for p in paths for k in ("ada_a", "ada_e", "ada_b")]
        loss = self._loss_with(ctx, keys)

        def fn(params, batch):
            sub = [_get_leaf(params, k) for k in keys]
            grads = jax.grad(loss)(sub, params, batch)
            out = []
            for j in range(len(paths)):
                (a, e, b), (ga, ge, gb) = sub[3 * j:3 * j + 3], grads[3 * j:3 * j + 3]
                out.append(jnp.stack([jnp.abs(e * ge), jnp.mean(jnp.abs(a * ga), 0),
                                      jnp.mean(jnp.abs(b * gb), 1)]))                        # [3, R]
            return out
        return fn

    def __call__(self, step: int, state: dict, ctx) -> dict | None:
        if self.frozen:
            return None
        s = self.s
        mods = self.modules(state)
        score = self.update_ema(self._scores(state, ctx, step, mods)).sum(1)                  # [M, R]
        budget = self.budget(len(mods))
        b, final = cubic_budget(step, total=s["total_steps"], init_budget=len(mods) * s["init_rank"],
                                target=budget, warmup=s["warmup"], final=s["final"])
        if not (final or (step > s["warmup"] and step % s["interval"] == 0)):
            return None
        t0 = time.perf_counter()
        masks = self.masks(mods)
        flat = score.ravel()
        keep = np.zeros(flat.size, bool)
        keep[_order(flat)[:b]] = True
        new_masks = keep.reshape(masks.shape).astype(np.float32)
        self.frozen = final
        if np.array_equal(new_masks, masks) and not final:
            return None
        updates = {}
        for j, (path, sub) in enumerate(mods):
            if np.array_equal(new_masks[j], masks[j]):
                continue
            updates[path + ("ada_mask",)] = new_masks[j]
            e = np.asarray(jax.device_get(sub["ada_e"]))
            updates[path + ("ada_e",)] = np.where(new_masks[j] > 0, e, 0.0).astype(e.dtype)
        return self.finish(step, state, ctx, updates, mods, masks.sum(1), new_masks.sum(1), t0, budget_now=int(b),
                           final=bool(final))

    def state_dict(self) -> dict:
        return dict(super().state_dict(), frozen=self.frozen)

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.frozen = bool(d.get("frozen", False))


class IncreLoRAAllocator(_SensitivityAllocator):
    method = "increlora"

    def _make_score_fn(self, ctx, paths):
        keys = [p + ("base", "kernel") for p in paths]
        loss = self._loss_with(ctx, keys)

        def fn(params, batch):
            sub = [_get_leaf(params, k) for k in keys]
            grads = jax.grad(loss)(sub, params, batch)
            model = nnx.merge(ctx.graphdef, params)
            out = []
            for p, g in zip(paths, grads):
                d = _node(model, p).delta_kernel()
                out.append(jnp.sum(jnp.abs(d * g)) / math.sqrt(d.size))
            return out
        return fn

    def __call__(self, step: int, state: dict, ctx) -> dict | None:
        s = self.s
        mods, masks, ranks, budget = self.read(state)
        gap = int(budget - ranks.sum())
        if gap <= 0:
            return None
        score = self.update_ema([r[None] for r in self._scores(state, ctx, step, mods)])[:, 0]   # [M]
        t_end = s["total_steps"] - s["final"]
        fill = step >= t_end
        if not (fill or (step > s["warmup"] and step % s["interval"] == 0)):
            return None
        t0 = time.perf_counter()
        growable = ranks < s["max_rank"]
        new = grow_ranks(ranks, np.where(growable, score, -np.inf), s["top_h"], s["grow_rank"], s["max_rank"],
                         gap, fill)
        updates = {path + ("ada_mask",): _prefix_mask(int(r1), s["max_rank"])
                   for (path, _), r0, r1 in zip(mods, ranks, new) if r1 != r0}
        return self.finish(step, state, ctx, updates, mods, ranks, new, t0)


def _get_leaf(params: dict, key: tuple):
    node = params
    for k in key:
        node = node[k]
    return node


# ------------------------------------------------------------------------------------------ factory
def _hook_steps(every: int, lo: int, hi: int) -> bool:
    """Whether some multiple of ``every`` lies in [lo, hi]."""
    return (hi // every) * every >= lo


def make_allocator(config) -> RankAllocator:
    """The allocator of ``config.peft.method``, after checking that its schedule can meet the budget.

    Raises:
      ValueError: a bad setting (named), or a schedule with no allocation step left to finish the budget.
    """
    s = settings(config)
    T = s["total_steps"]
    for k in ("interval", "sens_every", "top_h"):
        if s[k] < 1:
            raise ValueError(f"peft.{k} must be >= 1, got {s[k]}")
    if s["schedule"] not in ("linear", "exp"):
        raise ValueError(f"peft.schedule must be 'linear' or 'exp', got {s['schedule']!r}")
    if s["warmup"] < 0 or s["final"] < 0 or s["warmup"] + s["final"] >= T:
        raise ValueError(f"need peft.warmup >= 0, peft.final >= 0 and warmup + final < num_steps ({T}), got "
                         f"{s['warmup']}, {s['final']}")
    for k in ("beta1", "beta2"):
        if not 0.0 <= s[k] < 1.0:
            raise ValueError(f"peft.{k} must be in [0, 1), got {s[k]}")
    method = s["method"]
    if method == "triadapt":
        if not _hook_steps(s["interval"], T - s["final"], T):
            raise ValueError(f"triadapt: no allocation step (every peft.interval={s['interval']}) between T_end = "
                             f"{T - s['final']} and num_steps {T}: the budget could not be completed")
        return TriAdaptAllocator(s)
    if s["interval"] % s["sens_every"]:
        raise ValueError(f"peft.interval ({s['interval']}) must be a multiple of peft.sens_every "
                         f"({s['sens_every']}): allocations happen on sensitivity steps")
    lo = T - s["final"]
    if not _hook_steps(s["sens_every"], lo, T):
        raise ValueError(f"{method}: no sensitivity step (every peft.sens_every={s['sens_every']}) between "
                         f"T - final = {lo} and num_steps {T}: the budget could not be completed")
    if method == "adalora":
        return AdaLoRAAllocator(s)
    if method == "increlora":
        return IncreLoRAAllocator(s)
    raise ValueError(f"no allocator for peft.method {method!r}")
