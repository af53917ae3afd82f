"""Tasks of the adaptive-rank adapters: the note's synthetic heterogeneous-rank task, and LM + regulariser.

``RankSynthTask`` (``TASKS["rank_synth"]``; spec: ``shared/papers/triadaptlora.md``, "Small-scale
reproduction"): a teacher MLP A (``teacher_weights``: widths ``sizes``, GELU, weights N(0, 1/fan_in) from
``teacher_seed``) stands for the pretrained network; the model to adapt (``RankMLP``) IS teacher A (its base
weights are built from the same seed, whatever ``config.seed``), so the residual of task B is exactly what we
plant: teacher B = teacher A with ``W_l + D_l``, ``D_l`` of rank ``true_ranks[l]`` (orthonormal factors, every
singular value ``gamma * rms_sv(W_l)``, ``rms_sv = ||W||_F / sqrt(min(i, o))``). Inputs N(0, I); a fixed train
set of ``n_train`` rows (batches drawn with replacement, a pure function of (data.seed, step)) and a test set of
``n_test`` rows (eval batches in order, zero-weight padding). Loss: mean squared error against teacher B's
outputs relative to the unadapted base's (see ``RankSynthTask``), plus the adapters' orthogonality regulariser
(``adaptive.regularizer``). Eval: ``eval_loss`` (relative MSE), ``eval_mse``, ``eval_accuracy`` (argmax
agreement with teacher B).

``AdaptiveLMTask`` (``TASKS["lm_adapt"]``): ``LMTask`` plus the orthogonality regulariser.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.layers import Dense
from sqattn.peft import adaptive
from sqattn.train.tasks import LMTask

__all__ = ["AdaptiveLMTask", "RankMLP", "RankSynthTask", "SynthBatches", "layer_names", "perturbations",
           "run_summary", "teacher_weights"]


def layer_names(num_layers: int) -> list[str]:
    """``fc1 .. fc{n-1}, head``: the attribute names (peft targets) of the MLP's linears."""
    return [f"fc{i + 1}" for i in range(num_layers - 1)] + ["head"]


def teacher_weights(sizes, teacher_seed: int) -> list[np.ndarray]:
    """Teacher A's kernels [in, out] (float32, N(0, 1/fan_in)); biases are zero."""
    rng = np.random.default_rng([int(teacher_seed), 1])
    return [(rng.standard_normal((a, b)) / math.sqrt(a)).astype(np.float32) for a, b in zip(sizes[:-1], sizes[1:])]


def perturbations(weights: list[np.ndarray], true_ranks, gamma: float, seed: int) -> list[np.ndarray]:
    """``D_l`` [in, out] of rank ``true_ranks[l]`` with every singular value ``gamma * rms_sv(W_l)``."""
    if len(true_ranks) != len(weights):
        raise ValueError(f"true_ranks has {len(true_ranks)} entries for {len(weights)} layers")
    rng = np.random.default_rng([int(seed), 2])
    out = []
    for w, r in zip(weights, true_ranks):
        i, o = w.shape
        if not 0 <= r <= min(i, o):
            raise ValueError(f"true rank {r} impossible for a [{i}, {o}] layer")
        sv = gamma * np.linalg.norm(w) / math.sqrt(min(i, o))
        u = np.linalg.qr(rng.standard_normal((i, max(r, 1))))[0][:, :r]
        v = np.linalg.qr(rng.standard_normal((o, max(r, 1))))[0][:, :r]
        out.append((sv * u @ v.T).astype(np.float32))
    return out


def _mlp(weights, x: np.ndarray) -> np.ndarray:
    h = x
    for k, w in enumerate(weights):
        h = h @ w
        if k < len(weights) - 1:
            h = np.asarray(jax.nn.gelu(h))
    return h


class RankMLP(nnx.Module):
    """x [B, sizes[0]] -> [B, sizes[-1]]: ``fc1 .. head`` Dense layers (with bias) and GELU, base weights =
    ``teacher_weights(sizes, teacher_seed)`` (the 'pretrained' teacher A; ``rngs`` only feeds ``Dense``)."""

    def __init__(self, sizes=(64, 256, 256, 256, 10), teacher_seed: int = 0, *, rngs: nnx.Rngs):
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"RankMLP sizes must be >= 2 positive widths, got {sizes}")
        self.names = layer_names(len(sizes) - 1)
        for name, w in zip(self.names, teacher_weights(sizes, teacher_seed)):
            layer = Dense(w.shape[0], w.shape[1], axes=(None, None), rngs=rngs, use_bias=True)
            layer.kernel[...] = jnp.asarray(w)
            setattr(self, name, layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        for k, name in enumerate(self.names):
            h = getattr(self, name)(h)
            if k < len(self.names) - 1:
                h = jax.nn.gelu(h)
        return h


class SynthBatches:
    """Batches ``{"x": f32 [b, d_in], "y": f32 [b, d_out], "weights": f32 [b]}`` of one split and shard."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, split: str, global_batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1):
        if global_batch_size % shard_count:
            raise ValueError(f"batch_size {global_batch_size} is not divisible by shard_count {shard_count}")
        self.x, self.y, self.split, self.seed = x, y, split, int(seed)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // shard_count
        self.shard_index = int(shard_index)
        self.num_rows = x.shape[0]
        self.num_batches = None if split == "train" else math.ceil(self.num_rows / self.global_batch_size)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = self.global_batch_size
        if self.split == "train":
            rows = np.random.default_rng([self.seed, 3, step]).integers(0, self.num_rows, g)
            weights = np.ones(g, np.float32)
        else:
            step %= self.num_batches
            rows = np.arange(step * g, (step + 1) * g)
            weights = (rows < self.num_rows).astype(np.float32)
            rows = np.minimum(rows, self.num_rows - 1)
        mine = slice(self.shard_index * self.batch_size, (self.shard_index + 1) * self.batch_size)
        return {"x": self.x[rows[mine]], "y": self.y[rows[mine]], "weights": weights[mine]}


def build_data(model_cfg, data_cfg) -> dict[str, np.ndarray]:
    """Teacher B and the train/test arrays of ``config.model`` / ``config.data`` (numpy, deterministic)."""
    sizes = tuple(int(s) for s in model_cfg.sizes)
    w = teacher_weights(sizes, int(model_cfg.teacher_seed))
    ranks = [int(r) for r in str(data_cfg.true_ranks).split(",")]
    d = perturbations(w, ranks, float(data_cfg.gamma), int(data_cfg.seed))
    wb = [a + b for a, b in zip(w, d)]
    rng = np.random.default_rng([int(data_cfg.seed), 4])
    x_train = rng.standard_normal((int(data_cfg.n_train), sizes[0])).astype(np.float32)
    x_test = rng.standard_normal((int(data_cfg.n_test), sizes[0])).astype(np.float32)
    y_train = _mlp(wb, x_train).astype(np.float32)
    return {"x_train": x_train, "y_train": y_train,
            "x_test": x_test, "y_test": _mlp(wb, x_test).astype(np.float32),
            "base_train_mse": float(np.mean((_mlp(w, x_train) - y_train) ** 2)),
            "base_test_mse": float(np.mean((_mlp(w, x_test) - _mlp(wb, x_test)) ** 2)), "true_ranks": ranks}


class RankSynthTask:
    """Task ``rank_synth``: regression on teacher B (see the module docstring).

    The loss is the MSE relative to the unadapted base's train MSE (``1 / base_train_mse`` x MSE: 1 at the
    start, like a cross-entropy of order 1), so the orthogonality regulariser's weights (0.5, 0.1, set for NLU
    losses of order 1) keep their intended balance; with the raw MSE (~6e-3) the regulariser dominated and the
    adaptive adapters barely trained (measured: experiments/adaptive_rank.py's docstring).
    """

    loss_scale = 1.0

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        d = build_data(config.model, config.data)
        self.loss_scale = 1.0 / max(d["base_train_mse"], 1e-12)
        kw = dict(global_batch_size=config.batch_size, seed=int(config.data.seed), shard_index=shard_index,
                  shard_count=shard_count)
        return (SynthBatches(d["x_train"], d["y_train"], split="train", **kw),
                SynthBatches(d["x_test"], d["y_test"], split="eval", **kw))

    def loss_fn(self, model, batch, rng):
        del rng
        pred = model(batch["x"])                                                          # [b, o] f32
        w = batch["weights"]
        per_row = jnp.mean(jnp.square(pred - batch["y"]), axis=-1)
        weight = jnp.sum(w)
        mse = jnp.sum(per_row * w) / jnp.maximum(weight, 1.0)
        reg = adaptive.regularizer(model)
        rel = mse * self.loss_scale
        agree = (jnp.argmax(pred, -1) == jnp.argmax(batch["y"], -1)).astype(jnp.float32)
        return rel + reg, {"mse": mse, "rel_mse": rel, "orth_reg": reg,
                           "accuracy": jnp.sum(agree * w) / jnp.maximum(weight, 1.0), "weight": weight}

    def eval_metrics(self, sums: dict) -> dict:
        """``eval_loss``: test MSE relative to the base's train MSE; ``eval_mse``: raw test MSE."""
        w = max(float(sums["weight"]), 1.0)
        return {"eval_loss": float(sums["rel_mse"]) / w, "eval_mse": float(sums["mse"]) / w,
                "eval_accuracy": float(sums["accuracy"]) / w}


class AdaptiveLMTask(LMTask):
    """``LMTask`` whose loss adds the adapters' orthogonality regulariser (metric ``orth_reg``)."""

    def loss_fn(self, model, batch, rng):
        loss, metrics = super().loss_fn(model, batch, rng)
        reg = adaptive.regularizer(model)
        return loss + reg, dict(metrics, orth_reg=reg)


def run_summary(workdir: str, true_ranks=None) -> dict:
    """Final ranks, allocation timings and loss jumps from a run's metrics.jsonl, active params from its
    checkpoint."""
    from sqattn import sample
    from sqattn.peft import lora
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    events = [r for r in recs if r.get("event") == "rank_allocation"]
    model, _ = sample.load_model(workdir)
    mods = adaptive.adapter_modules(model)
    if mods:
        ranks = {p: int(sum(float(v) for v in m.ada_mask[...])) for p, m in mods}
        params = sum(m.active_params() for _, m in mods)
    else:
        ranks = {lora._path_str(p): int(n.rank) for p, n in lora._modules(model, lora.LoRADense)}
        params = lora.count_params(model, lora.LoRAParam)
    changed = [e for e in events if e["changed"]]
    jumps = [(e["loss_after"] - e["loss_before"]) / max(e["loss_before"], 1e-12) for e in changed
             if "loss_before" in e]
    out = {"ranks": ranks, "active_params": int(params), "events": len(changed),
           "alloc_ms_per_event": (1e3 * sum(e["alloc_wall_s"] + e["score_wall_s"] for e in events)
                                  / max(len(changed), 1)) if events else 0.0,
           "host_alloc_ms_per_event": (1e3 * sum(e["alloc_wall_s"] for e in events) / max(len(changed), 1))
           if events else 0.0,
           "score_compile_s": events[-1]["score_compile_s"] if events else 0.0,
           "jump_mean": float(sum(jumps) / len(jumps)) if jumps else 0.0,
           "jump_max": float(max(jumps)) if jumps else 0.0,
           "last_event_step": events[-1]["step"] if events else 0}
    if true_ranks is not None:
        import numpy as np
        from scipy import stats
        final = [ranks[n] for n in layer_names(len(true_ranks))]
        out["spearman"] = (float(stats.spearmanr(final, true_ranks).statistic)
                           if len(set(final)) > 1 else float("nan"))
        out["rank_error"] = float(np.abs(np.array(final) - np.array(true_ranks)).sum())
    return out
