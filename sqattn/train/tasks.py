"""Tasks: what the trainer trains. A task supplies datasets and a loss; the trainer does the rest.

Interface (DESIGN.md): ``make_datasets(config) -> (train, eval)`` and
``loss_fn(model, batch, rng) -> (loss, metrics)``, where ``metrics["weight"]`` is the loss denominator (e.g.
the number of counted tokens) so gradient accumulation and evaluation can average exactly.
"""

from __future__ import annotations

import math
from typing import Protocol

import jax
import jax.numpy as jnp

from sqattn import data


class Task(Protocol):
    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1): ...
    def loss_fn(self, model, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]: ...
    def eval_metrics(self, sums: dict) -> dict: ...


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Returns (sum of weighted CE in nats, sum of weights, sum of weighted correct). logits f32 [b,t,V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]          # [b,t]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)


BYTE_LEVEL_SOURCES = ("text", "tfds")  # sources whose tokens are bytes


class LMTask:
    """Next-token prediction on a dataset of ``{"inputs", "targets", "weights"[, "segment_ids"]}`` batches.

    loss = mean weighted cross-entropy + the model's ``aux["aux_loss"]``. Eval reports loss, accuracy and, for
    byte-level data, bits per byte (= loss / ln 2, tokens are bytes).
    """

    byte_level = False

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        self.byte_level = config.data.name in BYTE_LEVEL_SOURCES
        kw = dict(shard_index=shard_index, shard_count=shard_count)
        train = data.make_dataset(config.data, batch_size=config.batch_size, split="train", **kw)
        evals = data.make_dataset(config.data, batch_size=config.batch_size, split="eval", **kw)
        return train, evals

    def loss_fn(self, model, batch, rng):
        del rng
        logits, aux = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
        nll, weight, correct = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
        denom = jnp.maximum(weight, 1.0)
        ce = nll / denom
        loss = ce + aux["aux_loss"]
        metrics = {"ce": ce, "aux_loss": aux["aux_loss"], "accuracy": correct / denom, "weight": weight}
        return loss, metrics

    def eval_metrics(self, sums: dict) -> dict:
        w = max(float(sums["weight"]), 1.0)
        loss = float(sums["ce"]) / w
        out = {"eval_loss": loss, "eval_accuracy": float(sums["accuracy"]) / w}
        out["eval_bits_per_token"] = loss / math.log(2)
        if self.byte_level:
            out["eval_bits_per_byte"] = out["eval_bits_per_token"]
        return out


# task name -> a Task class, or "module:Class" imported on first use (so a task that lives beside its models,
# e.g. in sqattn/science/bearing/, adds one line here and costs nothing until a config names it).
TASKS: dict[str, type | str] = {
    "lm": LMTask,
    "hamburger": "sqattn.models.hamburger_task:HAMburgerTask",
    "ctr": "sqattn.train.ctr_task:CTRTask",
    "bearing": "sqattn.science.bearing.task:BearingTask",
    "classify": "sqattn.train.classify_task:ClassifyTask",
    "lm_fade": "sqattn.growth.fade:FadeLMTask",
    "teacher": "sqattn.analysis.teacher:TeacherTask",
    "lm_shards": "sqattn.analysis.text_shards:ShardedTextTask",
    "rank_synth": "sqattn.peft.rank_task:RankSynthTask",
    "lm_adapt": "sqattn.peft.rank_task:AdaptiveLMTask",
    "diffusion": "sqattn.diffusion.tasks:DiffusionTask",
    "shapes_judge": "sqattn.diffusion.tasks:JudgeTask",
    "spm": "sqattn.diffusion.tasks:SPMTask",
}


def task_class(name: str) -> type:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    from sqattn.registry import resolve
    return resolve(TASKS[name], f"task {name!r}")


def get_task(name: str) -> Task:
    return task_class(name)()
