"""``ClassifyTask``: image classification for the one trainer (registered as ``"classify"``).

Data: ``sqattn.data.images`` (``config.data``; digits, procedural glyphs, prepared TFDS; class-incremental
streams). The model is called as ``model(images) -> (logits [b,K] f32, aux)``; ``aux["aux_loss"]`` (if any) is
added to the loss, as in the LM task (SEMA's representation-descriptor loss lives there).

Logit masking: the batch's ``logit_mask`` [b,K] sets the logits of classes outside the current task (train) or
outside the classes seen so far (eval) to ``MASK`` before the softmax and the argmax, so old classes get no
gradient while a new task trains and a masked class never wins the prediction. Eval reports loss, accuracy over
all seen classes and the accuracy on each stream task's classes (``eval_accuracy_task<t>``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.data import images

MASK = -1e30   # finite: a fully masked row stays NaN-free


def masked_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``logits`` [b,K] with the entries where ``mask`` is False set to ``MASK``."""
    return jnp.where(mask, logits.astype(jnp.float32), MASK)


class ClassifyTask:
    """Masked cross-entropy classification of images; see the module docstring."""

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        k = images.num_classes(config.data)
        model_k = config.model.get("num_classes")
        if model_k is not None and model_k != k:
            raise ValueError(f"data source {config.data.source!r} has {k} classes but model.num_classes="
                             f"{model_k}")
        kw = dict(global_batch_size=config.batch_size, shard_index=shard_index, shard_count=shard_count)
        return (images.ImageBatches(config.data, "train", **kw), images.ImageBatches(config.data, "eval", **kw))

    def loss_fn(self, model, batch, rng):
        del rng
        logits, aux = model(batch["images"])
        logits = masked_logits(logits, batch["logit_mask"])                             # [b,K]
        y, w = batch["labels"], batch["weights"]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        weight = jnp.sum(w)
        denom = jnp.maximum(weight, 1.0)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32) * w
        ce = jnp.sum(nll * w) / denom
        aux_loss = jnp.asarray(aux.get("aux_loss", 0.0), jnp.float32)
        task = batch["task_onehot"]                                                     # [b,T]
        metrics = {"ce": ce, "aux_loss": aux_loss, "accuracy": jnp.sum(correct) / denom, "weight": weight,
                   # per-task sums / denom: the eval sums (x weight) turn them back into counts
                   "task_correct": correct @ task / denom, "task_count": w @ task / denom}
        return ce + aux_loss, metrics

    def eval_metrics(self, sums: dict) -> dict:
        w = max(float(sums["weight"]), 1.0)
        out = {"eval_loss": float(sums["ce"]) / w, "eval_accuracy": float(sums["accuracy"]) / w,
               "eval_aux_loss": float(sums["aux_loss"]) / w}
        correct, count = np.asarray(sums["task_correct"]), np.asarray(sums["task_count"])
        for t in range(count.shape[0]):
            if count[t] > 0.5:
                out[f"eval_accuracy_task{t}"] = float(correct[t] / count[t])
        return out
