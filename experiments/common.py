"""Pieces shared by the experiment binaries: the small base LM they start from, "train it here unless it is
already there", and finished-record caching.

The small base LM is ``lm_tiny`` shrunk to the 2-CPU size of the reproduction plans in hamburger.md and
liger.md (d 64, 4 blocks, bytes of Python at T 128, batch 16): 500 steps train in ~80 s on two quiet cores.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import ml_collections


def small_lm_config(*, steps: int, d_model: int = 64, layers: int = 4, seq_len: int = 128,
                    batch_size: int = 16, seed: int = 0) -> ml_collections.ConfigDict:
    """``lm_tiny`` at width ``d_model`` (heads of 16, kv heads of 32, SwiGLU 3·d) and depth ``layers``,
    trained ``steps`` steps on rows of ``seq_len`` bytes; one checkpoint at the end, no periodic eval."""
    from sqattn import configs
    if d_model < 16 or d_model % 16:
        raise ValueError(f"d_model must be a positive multiple of 16 (heads of 16), got {d_model}")
    if steps < 1 or layers < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"need steps, layers, batch_size >= 1 and seq_len >= 2; got steps={steps}, "
                         f"layers={layers}, seq_len={seq_len}, batch_size={batch_size}")
    cfg = configs.get("lm_tiny")
    cfg.num_steps = steps
    cfg.seed = seed
    cfg.batch_size = batch_size
    cfg.data.seq_len = seq_len
    cfg.model.d_model = d_model
    cfg.model.num_layers = layers
    cfg.model.mlp_dim = 3 * d_model
    cfg.model.mixers.attention.num_heads = d_model // 16
    cfg.model.mixers.attention.num_kv_heads = max(1, d_model // 32)
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps // 10, 1))
    cfg.eval_every = 0
    cfg.eval_batches = 4
    cfg.log_every = max(1, min(10, steps))
    cfg.checkpoint_every = steps
    cfg.mesh.fsdp = 1                      # one device: the model is tiny
    return cfg


def train_or_load(workdir: str, cfg: ml_collections.ConfigDict, *, progress: bool = True):
    """Loads the model in ``workdir``, training ``cfg`` there first when it holds no checkpoint.

    A workdir that already holds a checkpoint is loaded whatever config it was trained with (``cfg`` is then
    unused): pass any finished run of ``experiments.train``.

    Returns:
      ``(model, config, info)``: the model on one device, the run's config, and ``{"workdir", "trained_here",
      "steps", "d_model", "num_layers", "seq_len", "dtype"}`` plus, when trained here, ``train_wall_s``,
      ``final_loss``, ``eval_loss`` and ``eval_bits_per_byte``.
    """
    from sqattn import sample
    from sqattn.train import train_and_evaluate
    from sqattn.train.checkpoint import has_checkpoint
    info: dict[str, Any] = {"workdir": workdir, "trained_here": False}
    if not has_checkpoint(workdir):
        t0 = time.perf_counter()
        out = train_and_evaluate(cfg, workdir, progress=progress)
        if out.get("stopped_early"):
            raise RuntimeError(f"training in {workdir} stopped early at step {out['step']}; rerun to resume it")
        info.update(trained_here=True, train_wall_s=time.perf_counter() - t0, final_loss=float(out["loss"]))
        for key in ("eval_loss", "eval_bits_per_byte"):
            if key in out:
                info[key] = float(out[key])
    model, config = sample.load_model(workdir)
    info.update(steps=int(config.num_steps), d_model=int(config.model.d_model),
                num_layers=int(config.model.num_layers), seq_len=int(config.data.seq_len),
                dtype=str(config.model.dtype))
    return model, config, info


def cached_record(path: str, key: Any, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The record saved at ``path`` for settings ``key``, or ``compute()`` saved there.

    A file written with other settings is recomputed and overwritten, so a finished piece of a long run is
    reused exactly when the flags that shaped it are the same.

    Returns:
      ``(record, reused)``.
    """
    key = json.loads(json.dumps(key))     # as it reads back (tuples become lists)
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError):
            saved = {}                    # a truncated file from a killed run: recompute it
        if saved.get("settings") == key and "record" in saved:
            return saved["record"], True
    record = compute()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"settings": key, "record": record}, f, indent=2)
    os.replace(tmp, path)
    return record, False


def quiet_logging() -> None:
    """Progress bars and results only: sqattn and absl loggers at WARNING."""
    import logging
    from absl import logging as absl_logging
    logging.getLogger("sqattn").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
