"""HAMburger fine-tuning as a task of the one trainer (papers/hamburger.md).

The model (``MODELS["hamburger"]`` = ``build_hamburger``) is a byte ``LM`` (``config.model.base``, an ``lm``
model config) with the compositional embedder, micro-step decoder and stop head grafted on. A run starts from a
trained LM run: ``config.init.workdir`` = that run, ``config.init.transform =
"sqattn.models.hamburger_task:graft"`` (its weights become ``base``; the grafted modules are initialised from
``config.seed``). Every weight is fine-tuned; ``optim.lr_scale`` gives the base its lower learning rate.

Data: rows of the base run's byte text; each row is segmented with ``decreasing_v2`` on the entropies of the
*frozen* source LM (loaded once from ``init.workdir``) and laid out in slots (``layout_batch``). A batch is a
pure function of (data seed, step), so a fine-tune killed mid-way resumes exactly. Without ``init.workdir``
(smoke configs) the base and the segmenting LM are initialised from ``config.seed``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.models import hamburger as hb


def build_hamburger(*, base: dict, s_max: int = 4, micro_layers: int = 1, prompt_len: int = 16,
                    rngs: nnx.Rngs) -> hb.HAMburger:
    """A fresh ``HAMburger`` over a fresh ``LM(**base)`` (``prompt_len`` is the data layout's; unused here)."""
    from sqattn.models.lm import LM
    del prompt_len
    return hb.HAMburger(LM(**_plain(base), rngs=rngs), s_max=s_max, micro_layers=micro_layers, rngs=rngs)


def graft(src, src_config, config) -> hb.HAMburger:
    """``init.transform``: the source run's LM becomes the base; the grafted modules start from ``config.seed``.

    Raises:
      ValueError: the source run's model is not the LM that ``config.model.base`` describes.
    """
    want, have = _plain(config.model.base), _plain(src_config.model)
    if src_config.get("model_name", "lm") != "lm" or want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ValueError(f"init.workdir {config.init.workdir!r} holds another model than config.model.base "
                         f"(differs in {diff}); build the config with configs.hamburger.config_for(workdir)")
    m = config.model
    return hb.HAMburger(src, s_max=int(m.s_max), micro_layers=int(m.micro_layers), rngs=nnx.Rngs(config.seed))


def _plain(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def make_base_stats(base):
    """Jitted ``tokens [b, n] -> (entropy [b, n], nll [b, n-1], correct [b, n-1])`` of a frozen LM (numpy out).

    ``entropy[:, t]`` is the entropy of the prediction made at position t (for token t+1); ``nll[:, t]`` and
    ``correct[:, t]`` score token t+1.
    """
    graphdef, state = nnx.split(base)

    @jax.jit
    def stats(tokens):
        logits, _ = nnx.merge(graphdef, state)(tokens)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)        # [b,n,V]
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        correct = jnp.argmax(logp[:, :-1], axis=-1) == tokens[:, 1:]
        return entropy, nll, correct

    return lambda tokens: tuple(np.asarray(x) for x in jax.device_get(stats(jnp.asarray(tokens, jnp.int32))))


def segment_rows(entropy: np.ndarray, prompt_len: int, s_max: int) -> list[np.ndarray]:
    """decreasing_v2 group lengths of each row's response (tokens ``prompt_len ..``), from the base entropies."""
    n = entropy.shape[1]
    return [hb.segment_decreasing_v2(h[prompt_len - 1:n - 1], s_max=s_max) for h in entropy]


class SegmentedText:
    """Byte rows segmented by a frozen LM's entropies, in HAMburger's slot layout: ``batch(step)`` -> dict."""

    def __init__(self, text, base_stats, *, prompt_len: int, s_max: int):
        self.text, self.base_stats, self.prompt_len, self.s_max = text, base_stats, prompt_len, s_max
        self.seq_len = text.seq_len
        self.vocab_size = getattr(text, "vocab_size", 256)

    def segments(self, step: int) -> tuple[np.ndarray, list[np.ndarray]]:
        toks = self.text.batch(step)["inputs"]
        return toks, segment_rows(self.base_stats(toks)[0], self.prompt_len, self.s_max)

    def batch(self, step: int) -> dict:
        toks, lens = self.segments(step)
        return hb.layout_batch(toks, self.prompt_len, lens, s_max=self.s_max)

    def oracle_compression(self, steps: Sequence[int]) -> float:
        """Response tokens / groups over the rows of ``steps`` (the mean group size: the oracle KV saving)."""
        tokens = groups = 0
        for s in steps:
            lens = self.segments(s)[1]
            tokens += sum(int(x.sum()) for x in lens)
            groups += sum(len(x) for x in lens)
        return tokens / max(groups, 1)


def segmenting_lm(config):
    """The frozen LM whose entropies segment the text: ``init.workdir``'s, else one from ``config.seed``."""
    from sqattn import sample
    from sqattn.models.lm import LM
    init = config.get("init") or {}
    if init.get("workdir"):
        return sample.load_model(init.workdir, None if int(init.get("step", -1)) < 0 else int(init.step))[0]
    return LM(**_plain(config.model.base), rngs=nnx.Rngs(params=config.seed))


class HAMburgerTask:
    """Fine-tunes a HAMburger model: ``loss = CE(response) + stop_weight * BCE(stop)`` (``HAMburger.loss``)."""

    def make_datasets(self, config, *, shard_index: int = 0, shard_count: int = 1):
        from sqattn import data
        stats = make_base_stats(segmenting_lm(config))
        m = config.model
        out = []
        for split in ("train", "eval"):
            text = data.make_dataset(config.data, batch_size=config.batch_size, split=split,
                                     shard_index=shard_index, shard_count=shard_count)
            out.append(SegmentedText(text, stats, prompt_len=int(m.prompt_len), s_max=int(m.s_max)))
        return tuple(out)

    def loss_fn(self, model, batch, rng):
        del rng
        loss, metrics = model.loss(batch)
        return loss, metrics

    def eval_metrics(self, sums: dict) -> dict:
        """Means over response tokens (per-micro-step accuracy: ``experiments.hamburger.teacher_forced_eval``)."""
        w = max(float(sums["weight"]), 1.0)
        ce = float(sums["ce"]) / w
        return {"eval_loss": ce, "eval_bits_per_byte": ce / float(np.log(2)), "eval_bce": float(sums["bce"]) / w,
                "eval_accuracy": float(sums["accuracy"]) / w,
                "eval_stop_accuracy": float(sums["stop_accuracy"]) / w}
