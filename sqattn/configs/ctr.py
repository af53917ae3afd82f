"""CTR runs (papers/fcn.md): FCN, its branches and ablations, and the DCN family, on the synthetic CTR data or
a Criteo/Avazu-format file, trained by the one trainer through the "ctr" task.

Commands:
  python -m experiments.train --config=fcn_synth --workdir=/tmp/fcn      # FCN on the high-order synthetic set
  python -m experiments.train --config=dcnv2_synth:variant=low           # DCNv2 on the low-order set
  python -m experiments.train --config=fcn_criteo:path=/data/criteo/train.txt   # a real Criteo-format file
  python -m experiments.train --config=fcn_criteo                        # ... or a generated 20k-row sample
  python -m experiments.ctr_benchmark --workdir=/tmp/ctr                 # the table (+ deepctr-torch peers)

Args: ``arch`` (see ARCHS: lr, dnn, dcnv1, dcnv2, dcnv2_dnn, dcnmix, lcn, ecn, fcn, fcn_bce (Tri-BCE
ablation), fcn_full (Self-Mask ablation: W is D x D, no mask), fcn_v8 (v8 LayerNorm aggregation)),
``source`` (synthetic | criteo | avazu), ``variant`` (low | high, synthetic), ``path`` (the data file; "" = a
generated sample in data_dir), ``rows`` (synthetic rows), ``epochs``, ``batch``, ``seed`` (init and shuffling;
the data stay fixed), ``runlocal`` (a few steps on ~2k rows).

Recipe (the note's CPU reproduction): E = 16, H = 1, Adam lr 1e-3 (b2 0.999, constant, no clipping, no weight
decay), batch 1024, 3 epochs, embedding L2 1e-5 on the whole table, 300k synthetic rows split 240k/30k/30k,
16 fields. Model vocabularies are read from the data when the config is built (for a file this builds and
saves its vocabulary beside it, once), so a file must be named with ``path=`` in the config arg, not with
``--config.data.path``. The eval AUC/logloss cover the whole valid split (see sqattn/train/ctr_task.py).
Measured results are in experiments/ctr_benchmark.py's docstring.
"""

from __future__ import annotations

import ml_collections

from sqattn.configs import base, parse_arg
from sqattn.data import ctr as ctr_data

# arch -> (model_name, model kwargs); vocab_sizes and emb_l2 are added from the data / recipe.
ARCHS = {
    "lr": ("ctr_lr", {}),
    "dnn": ("ctr_dnn", dict(embed_dim=16, hidden=(256, 128), dropout=0.0)),
    "dcnv1": ("dcn", dict(embed_dim=16, cross="vector", num_cross=3, hidden=(), linear=True)),
    "dcnv2": ("dcn", dict(embed_dim=16, cross="matrix", num_cross=3, hidden=(), linear=True)),
    "dcnv2_dnn": ("dcn", dict(embed_dim=16, cross="matrix", num_cross=3, hidden=(256, 128), linear=True)),
    "dcnmix": ("dcn", dict(embed_dim=16, cross="mix", num_cross=3, hidden=(), linear=True, low_rank=32,
                           num_experts=4)),
    "lcn": ("fcn", dict(embed_dim=16, num_heads=1, num_exp_layers=0, num_lin_layers=4)),
    "ecn": ("fcn", dict(embed_dim=16, num_heads=1, num_exp_layers=3, num_lin_layers=0)),
    "fcn": ("fcn", dict(embed_dim=16, num_heads=1, num_exp_layers=3, num_lin_layers=4)),
    "fcn_bce": ("fcn", dict(embed_dim=16, num_heads=1, num_exp_layers=3, num_lin_layers=4, tri_bce=False)),
    "fcn_full": ("fcn", dict(embed_dim=16, num_heads=1, num_exp_layers=3, num_lin_layers=4, aggregation="full")),
    "fcn_v8": ("fcn", dict(embed_dim=16, num_heads=1, num_exp_layers=3, num_lin_layers=4, aggregation="ln")),
}

EMB_L2 = 1e-5


def optim_config(c: ml_collections.ConfigDict) -> None:
    """Adam 1e-3 as in deepctr-torch / FuxiCTR: constant rate, b2 0.999, no clipping, no decay."""
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 1.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 0.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CTR run ``arg`` = ``"arch=fcn,source=synthetic,variant=high,epochs=3,batch=1024,seed=0[,runlocal]"``."""
    a = parse_arg(arg, arch="fcn", source="synthetic", variant="high", path="", rows=300_000, epochs=3,
                  batch=1024, seed=0, data_dir="/tmp/sqattn/ctr", runlocal=False)
    if a.arch not in ARCHS:
        raise ValueError(f"ctr configs: unknown arch {a.arch!r}; known: {sorted(ARCHS)}")
    model_name, kw = ARCHS[a.arch]
    c = base.base_config()
    c.task = "ctr"
    c.model_name = model_name
    c.seed = a.seed
    c.data = ctr_data.default_config()
    c.data.source = a.source
    c.data.variant = a.variant
    c.data.path = a.path
    c.data.num_rows = a.rows
    c.data.data_dir = a.data_dir
    if a.source != "synthetic":
        c.data.min_count = 10 if a.path else 2
    c.batch_size = a.batch
    optim_config(c)
    model = dict(kw)
    if a.runlocal:
        base.runlocal(c)
        c.data.num_rows = 2_000
        c.data.num_fields = 6
        c.data.vocab_max = 40
        c.data.high_max_order = 5
        c.data.sample_rows = 400
        c.batch_size = 8
        if "embed_dim" in model:
            model["embed_dim"] = 4
        if "hidden" in model and model["hidden"]:
            model["hidden"] = (16,)
        if "low_rank" in model:
            model["low_rank"] = 4
        model.update({k: min(v, 2) for k, v in model.items() if k in ("num_exp_layers", "num_lin_layers",
                                                                       "num_cross") and v})
    model["vocab_sizes"] = list(ctr_data.vocab_sizes(c.data))
    model["emb_l2"] = EMB_L2
    c.model = ml_collections.ConfigDict(model)
    if not a.runlocal:
        n_train = int(round(_num_rows(c.data) * c.data.split_fractions[0]))
        steps_per_epoch = max(n_train // c.batch_size, 1)
        c.num_steps = a.epochs * steps_per_epoch
        c.log_every = 50
        c.eval_every = steps_per_epoch
        c.checkpoint_every = c.num_steps
        c.keep_checkpoints = 1
        n_eval = int(round(_num_rows(c.data) * c.data.split_fractions[1]))   # the valid split
        c.eval_batches = max(1, -(-n_eval // c.batch_size))
    return c


def _num_rows(d) -> int:
    if d.source == "synthetic":
        return int(d.num_rows)
    return sum(len(v["label"]) for v in ctr_data.load_splits(d).values())
