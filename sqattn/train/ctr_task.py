"""CTR task: click-through-rate prediction on the fixed splits of ``sqattn.data.ctr``, trained by the one trainer.

Batches are ``{"ids": int32 [b, F], "label": float32 [b]}``; eval batches also carry ``"row_weight"`` (1 for a
real row, 0 for padding), which is also how ``loss_fn`` knows it is evaluating (no dropout, metrics below).
The training loss is the model's ``objective`` (mean BCE + embedding L2, Tri-BCE for FCN).

Evaluation covers the whole eval split (``config.data.eval_split``, default "valid") exactly once: the split is
cut into ``config.eval_batches`` equal batches (padded with zero-weight rows), and every eval metric is a sum
over rows that the trainer adds up over batches:

* logloss: the exact sum of per-row BCE (divided by the row count at the end);
* AUC: two histograms of the predicted logit, one of positives and one of negatives, over ``AUC_BINS`` = 2^16
  equal bins on [-16, 16] (a monotone map of the score, so ranks are kept). AUC = P(score_pos > score_neg) +
  P(tie)/2 is computed from the histograms, counting two rows in the same bin as a tie. This equals the exact
  AUC (``sklearn.metrics.roc_auc_score``) up to pairs inside one bin: the error is at most
  ``eval_auc_tie_bound`` = sum_b pos_b * neg_b / (2 P N), reported with every eval (typically < 1e-4 for
  30k rows; the tests check it against sklearn). Counts are summed in float32 (exact below 2^24 per bin).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.data import ctr as ctr_data
from sqattn.models.ctr import bce

log = logging.getLogger("sqattn.train")

AUC_BINS = 1 << 16
AUC_RANGE = 16.0           # logits are binned on [-AUC_RANGE, AUC_RANGE] (clipped outside)
MAX_EVAL_BATCH = 1 << 16   # rows per eval batch at most; raise config.eval_batches for bigger eval splits


def score_histograms(logit: jax.Array, label: jax.Array, weight: jax.Array, bins: int = AUC_BINS):
    """(positives, negatives) weighted histograms of ``logit`` over ``bins`` equal bins of [-16, 16]."""
    z = jnp.clip(logit.astype(jnp.float32), -AUC_RANGE, AUC_RANGE)
    idx = jnp.clip(jnp.floor((z + AUC_RANGE) * (bins / (2 * AUC_RANGE))).astype(jnp.int32), 0, bins - 1)
    pos = jnp.zeros((bins,), jnp.float32).at[idx].add(weight * label)
    neg = jnp.zeros((bins,), jnp.float32).at[idx].add(weight * (1.0 - label))
    return pos, neg


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUC with in-bin pairs counted as ties, bound on its distance to the exact AUC)."""
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        return float("nan"), float("nan")
    neg_below = np.cumsum(neg) - neg
    auc = float(np.sum(pos * (neg_below + 0.5 * neg)) / (p * n))
    return auc, float(0.5 * np.sum(pos * neg) / (p * n))


class CTRTask:
    """Binary click prediction; ``config.model`` is a ``sqattn.models.ctr`` model, ``config.data`` a CTR data
    config (``sqattn.data.ctr.default_config``)."""

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        from sqattn.parallel import sharding
        data = config.data
        sizes = ctr_data.vocab_sizes(data)
        want = tuple(int(v) for v in config.model.vocab_sizes)
        if sizes != want:
            raise ValueError(f"config.model.vocab_sizes {list(want)} do not match the data's field vocabularies "
                             f"{list(sizes)} (source {data.source!r}); build the config with sqattn.configs.ctr "
                             f"(it reads them from the data), or set --config.model.vocab_sizes")
        splits = ctr_data.load_splits(data)
        eval_split = data.get("eval_split", "valid")
        if eval_split not in splits:
            raise ValueError(f"data.eval_split must be one of {tuple(splits)}, got {eval_split!r}")
        shuffle_seed = int(np.random.SeedSequence([int(data.seed), int(config.seed)]).generate_state(1)[0])
        train = ctr_data.CTRSplit(splits["train"], global_batch_size=config.batch_size, shard_index=shard_index,
                                  shard_count=shard_count, shuffle=True, seed=shuffle_seed)
        sizes_mesh = sharding.mesh_shape(config.mesh)
        ways = math.lcm(sizes_mesh["data"] * sizes_mesh["fsdp"], shard_count)
        n_eval = len(splits[eval_split]["label"])
        per = -(-n_eval // max(int(config.eval_batches), 1))
        eval_batch = -(-per // ways) * ways
        if eval_batch > MAX_EVAL_BATCH:
            need = -(-n_eval // MAX_EVAL_BATCH)
            raise ValueError(f"the {eval_split} split has {n_eval} rows: config.eval_batches="
                             f"{config.eval_batches} would need {eval_batch} rows per eval batch (at most "
                             f"{MAX_EVAL_BATCH}); set --config.eval_batches={need} or more")
        evals = ctr_data.CTRSplit(splits[eval_split], global_batch_size=eval_batch, shard_index=shard_index,
                                  shard_count=shard_count, shuffle=False)
        log.info("CTR data: train %d rows, %s %d rows in %d eval batches of %d", train.num_rows, eval_split,
                 n_eval, config.eval_batches, eval_batch)
        return train, evals

    def loss_fn(self, model, batch, rng):
        if "row_weight" not in batch:                 # training
            out = model(batch["ids"], rng=rng)
            loss, metrics = model.objective(out, batch["label"])
            return loss, dict(metrics, weight=jnp.asarray(batch["label"].shape[0], jnp.float32))
        w = batch["row_weight"]
        y = batch["label"]
        out = model(batch["ids"], rng=None)
        n = jnp.sum(w)
        denom = jnp.maximum(n, 1.0)                   # the trainer multiplies every metric back by n
        ll = jnp.sum(bce(out["logit"], y) * w) / denom
        pos, neg = score_histograms(out["logit"], y, w)
        return ll, {"logloss": ll, "auc_pos": pos / denom, "auc_neg": neg / denom, "weight": n}

    def eval_metrics(self, sums: dict) -> dict:
        n = max(float(sums["weight"]), 1.0)
        pos, neg = np.rint(np.asarray(sums["auc_pos"])), np.rint(np.asarray(sums["auc_neg"]))
        auc, bound = auc_from_histograms(pos, neg)
        ll = float(sums["logloss"]) / n
        return {"eval_loss": ll, "eval_logloss": ll, "eval_auc": auc, "eval_auc_tie_bound": bound,
                "eval_rows": float(sums["weight"]), "eval_ctr": float(pos.sum()) / n}
