"""The SCOUT associative-recall probe (papers/scout.md, experiments/scout.py part (b)) as a config of the LM
task: 2 SCOUT layers ([SWA(16) + MLP, X + MLP] x 2, d 64, 2 heads, SwiGLU 256, f32) on the "recall" source.

  python -m experiments.train --config=scout_recall:model=scout_L16,seed=0 --workdir=/tmp/recall

Args: ``model=swa_only|full|scout_L<L>`` (X = SWA(16) again, full attention, or checkpoint attention with
segments of L), ``seed`` (init and data), ``steps`` (default 2000, warmup min(100, steps/10), lr 3e-3 cosine to
3e-4, AdamW (0.9, 0.95) wd 0.1 clip 1, batch 16), ``runlocal``. Eval: 160 held-out sequences (640 queries);
``eval_accuracy`` is the query accuracy. Measured results: ``experiments/scout.py``'s docstring.
"""

from __future__ import annotations

import ml_collections

from sqattn import data
from sqattn.configs import base, parse_arg

WINDOW = 16


def model_layout(model: str) -> tuple[str, int, int]:
    """(block pattern, attention window, SCOUT segment length) of a probe model name."""
    if model == "swa_only":
        return "AA", WINDOW, 1
    if model == "full":
        return "AA", 0, 1
    if model.startswith("scout_L") and model[7:].isdigit() and int(model[7:]) >= 1:
        return "AC", WINDOW, int(model[7:])
    raise ValueError(f"unknown recall model {model!r}; expected swa_only, full or scout_L<L>")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, model="scout_L16", seed=0, steps=2000, runlocal=False)
    pattern, window, seg_len = model_layout(a.model)
    from sqattn.data.synthetic import recall_vocab_size
    c = base.base_config()
    c.seed = a.seed
    c.data = data.default_config("recall")
    c.data.seed = a.seed
    c.batch_size = 16
    c.num_steps = a.steps
    c.optim.lr = 3e-3
    c.optim.warmup_steps = max(min(100, a.steps // 10), 1)
    c.eval_every = 0
    c.eval_batches = 10                     # 160 sequences, 640 queries
    c.log_every = 50
    c.checkpoint_every = max(1, min(500, a.steps))
    c.keep_checkpoints = 1
    c.mesh.fsdp = 1
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=recall_vocab_size(c.data), d_model=64, num_layers=4, block_pattern=pattern, mlp_dim=256,
        dtype="float32",
        mixers={"attention": dict(num_heads=2, window=window), "scout": dict(num_heads=2, segment_len=seg_len)}))
    if a.runlocal:
        base.runlocal(c)
        c.data.seq_len = 64                 # fixed by the layout
    return c
