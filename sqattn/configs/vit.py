"""Small ViTs on offline images (``sqattn.models.vit``, task ``classify``) and SEMA continual-learning runs
(``sqattn.models.sema``; papers/sema.md).

Registered names:
  vit_digits   ViT (16x16, patch 4, d 64, 4 blocks) on the 10 sklearn digits (one task).
  vit_glyphs   the same ViT on 20 procedural glyph classes: the backbone SEMA streams start from.
  sema_digits  SEMAViT at task 0 (func phase) of the digits5 stream; ``sqattn.train.stream`` runs the whole
               stream from it (``experiments/sema.py``).

Commands (2 shared CPU cores, load average 14-30 from other agents' jobs):
  python -m experiments.train --config=vit_glyphs --workdir=/tmp/vit_glyphs      # 600 steps, 164 s: eval acc 0.941
  python -m experiments.train --config=vit_digits:stream=digits_transposed --workdir=/tmp/vit_dt
                                                                  # 600 steps, 246 s: eval acc 0.986 (SEMA's backbone)
  python -m experiments.sema --workdir=/tmp/sema                                  # the whole comparison

Args (``NAME:a=1,b``): ``model`` (vit | sema), ``source`` (digits | glyphs | tfds), ``stream`` (a name of
``STREAMS``; ``--config.data.stream=...`` takes any spec), ``task``, ``size``, ``patch``, ``width``, ``layers``,
``heads``, ``steps``, ``batch``, ``lr``, ``seed``, SEMA: ``method``, ``phase``, ``z`` (threshold),
``max_adapters``, ``bottleneck``, ``rd_dim``, ``expandable``, ``temperature``; ``runlocal``.
"""

from __future__ import annotations

import math

import ml_collections

from sqattn.configs import base, parse_arg

# Named task streams (class spec ; task separator, @domain); see sqattn.data.images.
STREAMS = {
    "all": "0-9",
    "glyphs": "0-19",
    # 5 tasks x 2 digit classes; tasks 4-5 (indices 3, 4) inverted + Gaussian noise (sigma data.noise)
    "digits5": "0,1;2,3;4,5;6,7@invert_noise;8,9@invert_noise",
    "digits5_rot": "0,1;2,3;4,5;6,7@rot90;8,9@rot90",
    "digits5_clean": "0,1;2,3;4,5;6,7;8,9",
    # backbone pretext: every digit, transposed (a domain no stream task uses)
    "digits_transposed": "0-9@transpose",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, model="vit", source="digits", stream="", task=0, size=16, patch=4, width=64, layers=4,
                  heads=4, steps=0, batch=32, lr=0.0, seed=0, method="sema", phase="func", z=2.0,
                  max_adapters=4, bottleneck=8, rd_dim=16, expandable=2, temperature=1.0, runlocal=False)
    if a.model not in ("vit", "sema"):
        raise ValueError(f"vit config: model must be 'vit' or 'sema', got {a.model!r}")
    stream = a.stream or ("glyphs" if a.source == "glyphs" else "all")
    if stream not in STREAMS:
        raise ValueError(f"vit config: unknown stream {stream!r}; known: {sorted(STREAMS)}")
    from sqattn.data import images
    c = base.base_config()
    c.task = "classify"
    c.seed = a.seed
    c.data = images.default_config()
    c.data.update(dict(source=a.source, image_size=a.size, seed=a.seed, stream=STREAMS[stream], task=a.task))
    c.batch_size = a.batch
    c.mesh.update(data=1, fsdp=1)          # a ~0.2M-parameter model: one device
    c.log_every = 10
    c.keep_checkpoints = 1
    c.optim.update(warmup_steps=20, min_lr_ratio=0.05, weight_decay=0.05, grad_clip=1.0)
    vit = dict(image_size=a.size, patch_size=a.patch, channels=1, d_model=a.width, num_layers=a.layers,
               num_heads=a.heads, mlp_dim=2 * a.width)
    if a.runlocal:                          # smoke tests: a 2-block, width-32 model on few glyphs
        c.data.glyph_per_class = 20
        vit.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=32)
    num_classes = images.num_classes(c.data)
    if a.model == "vit":
        c.model_name = "vit"
        c.model = ml_collections.ConfigDict(dict(vit, num_classes=num_classes))
        c.num_steps = a.steps or 600
        c.optim.lr = a.lr or 2e-3
        c.eval_every = 200
    else:
        c.model_name = "vit_sema"
        c.model = ml_collections.ConfigDict(dict(
            vit, num_classes=num_classes, bottleneck=a.bottleneck, max_adapters=a.max_adapters, rd_dim=a.rd_dim,
            num_expandable=min(a.expandable, vit["num_layers"]), router_temperature=a.temperature))
        c.num_steps = a.steps or 45
        c.optim.update(lr=a.lr or 3e-3, warmup_steps=5, weight_decay=0.0)   # no decay: frozen slots stay put
        c.optim.trainable = _trainable(a.method, a.phase)
        c.eval_every = 0
        c.init.args = ml_collections.ConfigDict(dict(method=a.method, phase=a.phase, z_threshold=a.z,
                                                     detect_batch=64, buffer_size=200))
    c.checkpoint_every = c.num_steps
    if a.runlocal:
        base.runlocal(c)
    c.eval_batches = eval_batches(c)
    return c


def _trainable(method: str, phase: str) -> str:
    from sqattn.models import sema
    if phase not in sema.PHASES or method not in sema.METHODS:
        raise ValueError(f"vit config: method must be one of {sema.METHODS} and phase one of {sema.PHASES}, "
                         f"got {method!r}, {phase!r}")
    return sema.trainable_regex(method, phase)


def eval_batches(c: ml_collections.ConfigDict) -> int:
    """Batches that cover the eval split of ``c.data`` once at ``c.batch_size``."""
    from sqattn.data import images
    return math.ceil(images.examples(c.data, "eval").labels.size / c.batch_size)
