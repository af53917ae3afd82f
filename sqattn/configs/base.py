"""Shared defaults for every run; family modules start from ``base_config()`` and change what differs."""

from __future__ import annotations

import ml_collections


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=3e-3,              # peak learning rate
        warmup_steps=50,      # linear warmup from 0
        min_lr_ratio=0.1,     # cosine decays to lr * min_lr_ratio at num_steps
        weight_decay=0.1,     # AdamW decoupled decay (not applied to norms/biases/1-D params)
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,        # global-norm clip; 0 disables
        grad_accum=1,         # micro-batches per step (batch_size is the full step batch)
        trainable="",         # regex over parameter paths ("blocks/0/mixer/q/lora_a"); "" = all. Others frozen
        lr_scale="",          # "regex=factor,...": the updates (lr and decay) of matching paths scaled; first wins
    ))


def init_config() -> ml_collections.ConfigDict:
    """Start a run's parameters from another run's checkpoint (fine-tuning, conversion, growth)."""
    return ml_collections.ConfigDict(dict(
        workdir="",           # the source run's workdir; "" = initialise from config.seed
        step=-1,              # its checkpoint step; -1 = the latest
        transfer="same",      # "same": identical parameter tree; "transplant": copy every path/shape both
                              # models share, the rest stays initialised (e.g. attention -> Liger)
        transform="",         # "module:function"(src_model, src_config, config) -> model of this config
                              # (growth, expansion); replaces `transfer` when set
        args=ml_collections.ConfigDict(),   # free-form arguments of `transform` (set by its configs)
        state="params",       # "params": the source's parameters, a fresh optimizer, step 0; "full": the source
                              # checkpoint's whole train state (step, parameters, optimizer moments), so the run
                              # continues the source's trajectory in its own workdir (a spawned child, lmc.md)
    ))


def peft_config() -> ml_collections.ConfigDict:
    """Adapters applied after the model is built and initialised (and loaded from ``init``)."""
    return ml_collections.ConfigDict(dict(
        method="",            # "" (none) or a key of sqattn.peft.METHODS ("lora", ...)
        targets="q,k,v",      # comma-separated Dense attribute names to adapt
        rank=8,
        alpha=8.0,
    ))


def mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        data=1,               # data-parallel axis size
        fsdp=-1,              # fully-sharded data-parallel axis size; -1 = all remaining devices
        tensor=1,             # tensor-parallel axis size
        expert=1,             # expert-parallel axis size
        rules="default",      # logical-axis rule set in sqattn.parallel.sharding.LOGICAL_AXIS_RULES
    ))


# Settings added to a config family (not to the base config) after runs of it were saved, with the value those
# runs implicitly used: resuming such a run compares its saved config as if it had them (flat dotted keys; a key
# absent from both sides of a comparison, e.g. in another family's config, stays absent).
ADDED_FAMILY_SETTINGS = {
    "diffusion.min_snr_gamma": 0.0,      # 2026-12-03: min-SNR weighting of the DiT's loss (configs/diffusion.py)
    "data.repeat_fraction": 0.0,         # 2026-12-03: repeated rows of the "text" source (data/text.py)
    "model.pos_embed": "learned",        # 2026-12-03: the DiT's fixed sincos positions (models/dit.py)
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = ""                  # set by configs.get
    c.model_name = "lm"          # key in sqattn.models.MODELS
    c.task = "lm"                # key in sqattn.train.tasks.TASKS
    c.seed = 0                   # parameter init seed (data has its own seed in data.seed)
    c.data_offset = 0            # train batch of step s is data batch s + data_offset (continue another run)
    c.batch_size = 16            # global batch (sequences per step)
    c.num_steps = 1000           # total optimizer steps
    c.log_every = 10             # steps between metrics.jsonl records
    c.eval_every = 200           # steps between evaluations (0: only at the end)
    c.eval_batches = 8           # eval batches per evaluation
    c.checkpoint_every = 200     # steps between checkpoints (and at the end, and on SIGTERM)
    c.keep_checkpoints = 3       # orbax max_to_keep
    c.optim = optim_config()
    c.init = init_config()
    c.peft = peft_config()
    c.mesh = mesh_config()
    return c


def tiny_byte_lm(c: ml_collections.ConfigDict, data_name: str) -> None:
    """The 2-CPU training recipe shared by the tiny byte-level LMs (lm_tiny, sse_h_tiny): data source
    ``data_name`` at 128 bytes, batch 16, 600 steps, AdamW 3e-3 with 50 warmup steps, eval every 200."""
    from sqattn import data
    c.data = data.default_config(data_name)
    c.data.seq_len = 128
    c.batch_size = 16
    c.num_steps = 600
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.eval_every = 200


def runlocal(c: ml_collections.ConfigDict) -> None:
    """The ``runlocal`` variant of any config: a few small steps, for smoke tests on a laptop or CI.

    Families shrink their model on top of this (e.g. fewer layers), keeping its structure.
    """
    c.batch_size = 8
    c.num_steps = 4
    c.log_every = 1
    c.eval_every = 0
    c.eval_batches = 1
    c.checkpoint_every = 2
    c.optim.warmup_steps = 1
    if "seq_len" in c.get("data", {}):
        c.data.seq_len = min(c.data.seq_len, 64)
