"""Trainer tasks of the SPM reproduction (papers/spm.md), each registered with one line in ``TASKS``:

* ``diffusion`` (``DiffusionTask``): eps-prediction on the shapes world (``sqattn.data.shapes``) for a
  text-conditioned model ``model(x_t, t, tokens)``. Batches ``{"images", "tokens", ...}``; caption dropout is in
  the data (``config.data.p_empty`` etc.). Eval: the same loss over ``eval_batches`` fixed batches with the
  eval step's fixed key (a deterministic number). Noise schedule from ``config.diffusion``.
* ``shapes_judge`` (``JudgeTask``): the judge CNN's two heads (shape, colour) on clean images; eval reports
  both accuracies.
* ``spm`` (``SPMTask``): SPM erasing (``sqattn.peft.spm.erase_loss``) of ``config.spm.concept``; data-free:
  a batch is only the target prompts (every prompt containing the concept, the other attribute drawn per row)
  and the surrogate prompt. Start it from a trained DiT run (``config.init.workdir``) with
  ``config.peft.method = "spm"`` and ``config.optim.trainable`` matching the adapters only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.data import shapes
from sqattn.diffusion.schedule import eps_loss, make_schedule, min_snr_weight


def _shapes_datasets(config, shard_index: int, shard_count: int, *, captions: bool):
    d = config.data
    drop = dict(p_empty=d.p_empty, p_shape_only=d.p_shape_only, p_colour_only=d.p_colour_only) if captions \
        else dict(p_empty=0.0, p_shape_only=0.0, p_colour_only=0.0)
    kw = dict(global_batch_size=config.batch_size, seed=d.seed, size=d.size, shard_index=shard_index,
              shard_count=shard_count, **drop)
    return (shapes.ShapesBatches("train", **kw),
            shapes.ShapesBatches("eval", eval_period=max(int(config.eval_batches), 1), **kw))


def schedule_of(config):
    return make_schedule(config.diffusion.schedule, int(config.diffusion.train_steps))


class DiffusionTask:
    """Text-conditioned eps-prediction (DDPM loss with uniform t) on the shapes world."""

    schedule = None
    min_snr_gamma = 0.0

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        self.schedule = schedule_of(config)
        self.min_snr_gamma = float(config.diffusion.get("min_snr_gamma", 0.0))
        return _shapes_datasets(config, shard_index, shard_count, captions=True)

    def loss_fn(self, model, batch, rng):
        """Training loss: the eps MSE, min-SNR weighted when ``config.diffusion.min_snr_gamma`` > 0; the
        reported ``eps_mse`` (and the eval loss) is always the unweighted MSE, comparable across recipes."""
        x0, tokens = batch["images"], batch["tokens"]
        per, t = eps_loss(lambda x, t: model(x, t, tokens), self.schedule, x0, rng)
        mse = jnp.mean(per)
        loss = jnp.mean(per * min_snr_weight(self.schedule, t, self.min_snr_gamma)) if self.min_snr_gamma else mse
        return loss, {"eps_mse": mse, "weight": jnp.asarray(x0.shape[0], jnp.float32)}

    def eval_metrics(self, sums: dict) -> dict:
        w = max(float(sums["weight"]), 1.0)
        return {"eval_loss": float(sums["eps_mse"]) / w}


def judge_logits_loss(out: dict, batch: dict):
    """(mean CE over both heads, shape accuracy, colour accuracy) of a judge's outputs on a labelled batch."""
    def ce(logits, y):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
    loss = ce(out["shape"], batch["shape"]) + ce(out["colour"], batch["colour"])
    acc_s = jnp.mean((jnp.argmax(out["shape"], -1) == batch["shape"]).astype(jnp.float32))
    acc_c = jnp.mean((jnp.argmax(out["colour"], -1) == batch["colour"]).astype(jnp.float32))
    return loss, acc_s, acc_c


class JudgeTask:
    """Shape and colour classification of clean shapes-world images (the judge of the SPM evaluation)."""

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        return _shapes_datasets(config, shard_index, shard_count, captions=False)

    def loss_fn(self, model, batch, rng):
        del rng
        loss, acc_s, acc_c = judge_logits_loss(model(batch["images"]), batch)
        return loss, {"ce": loss, "acc_shape": acc_s, "acc_colour": acc_c,
                      "weight": jnp.asarray(batch["images"].shape[0], jnp.float32)}

    def eval_metrics(self, sums: dict) -> dict:
        w = max(float(sums["weight"]), 1.0)
        return {"eval_loss": float(sums["ce"]) / w, "eval_acc_shape": float(sums["acc_shape"]) / w,
                "eval_acc_colour": float(sums["acc_colour"]) / w}


def concept_prompts(concept: str) -> list[str]:
    """Every prompt of the shapes world that names ``concept`` (a shape or a colour), with and without the
    other attribute: "star" -> "a red star", "a green star", "a blue star", "a star"."""
    if concept in shapes.SHAPES:
        return [shapes.prompt(c, concept) for c in shapes.COLOURS] + [shapes.prompt(None, concept)]
    if concept in shapes.COLOURS:
        return [shapes.prompt(concept, s) for s in shapes.SHAPES] + [shapes.prompt(concept, None)]
    raise ValueError(f"SPM concept {concept!r} is neither a shape {shapes.SHAPES} nor a colour {shapes.COLOURS}")


class PromptBatches:
    """SPM's data-free batches: ``{"target": i32 [b, L], "surrogate": i32 [b, L]}`` of step ``step``."""

    def __init__(self, concept: str, surrogate: str, *, global_batch_size: int, seed: int, split: str,
                 shard_index: int = 0, shard_count: int = 1):
        if global_batch_size % shard_count:
            raise ValueError(f"batch_size {global_batch_size} is not divisible by shard_count {shard_count}")
        self.targets = np.stack([shapes.tokenize(p) for p in concept_prompts(concept)])
        self.surrogate = shapes.tokenize(surrogate)
        self.global_batch_size, self.seed = int(global_batch_size), int(seed)
        self.batch_size = self.global_batch_size // shard_count
        self.shard_index = int(shard_index)
        self.split_id = {"train": 0, "eval": 1}[split]
        self.seq_len = 1

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, int(step)])
        rows = rng.integers(0, len(self.targets), self.global_batch_size)
        mine = rows[self.shard_index * self.batch_size:(self.shard_index + 1) * self.batch_size]
        return {"target": self.targets[mine],
                "surrogate": np.broadcast_to(self.surrogate, (len(mine), self.surrogate.shape[0])).copy()}


class SPMTask:
    """SPM erasing of ``config.spm.concept`` (see ``sqattn.peft.spm.erase_loss`` for every setting)."""

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        s = config.spm
        self.schedule = schedule_of(config)
        m = config.model
        self.image_shape = (int(m.image_size), int(m.image_size), int(m.channels))
        self.kw = dict(rollout_steps=int(s.rollout_steps), rollout_guidance=float(s.rollout_guidance),
                       eta=float(s.eta), la_strength=float(s.la_strength), num_anchors=int(s.num_anchors))
        kw = dict(global_batch_size=config.batch_size, seed=config.data.seed, shard_index=shard_index,
                  shard_count=shard_count)
        return (PromptBatches(s.concept, s.surrogate, split="train", **kw),
                PromptBatches(s.concept, s.surrogate, split="eval", **kw))

    def loss_fn(self, model, batch, rng):
        from sqattn.peft import spm
        loss, metrics = spm.erase_loss(model, batch["target"], batch["surrogate"], rng, schedule=self.schedule,
                                       image_shape=self.image_shape, **self.kw)
        return loss, dict(metrics, weight=jnp.asarray(batch["target"].shape[0], jnp.float32))

    def eval_metrics(self, sums: dict) -> dict:
        w = max(float(sums["weight"]), 1.0)
        out = {"eval_loss_erase": float(sums["loss_erase"]) / w}
        if "loss_anchor" in sums:
            out["eval_loss_anchor"] = float(sums["loss_anchor"]) / w
        out["eval_loss"] = out["eval_loss_erase"] + self.kw["la_strength"] * out.get("eval_loss_anchor", 0.0)
        return out
