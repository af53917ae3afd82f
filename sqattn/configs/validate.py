"""Checks a config before anything is built or compiled; every error names the offending field."""

from __future__ import annotations



import jax
import ml_collections

from sqattn.parallel import sharding


class ConfigError(ValueError):
    """A config that cannot run, with the field and the reason."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: ml_collections.ConfigDict, *, check_devices: bool = True) -> None:
    """Raises ``ConfigError`` for inconsistent sizes, unknown names, or a mesh larger than the devices present."""
    from sqattn import models, mixers  # noqa: F401 (imports the registries)
    from sqattn.train import tasks
    _check(cfg.batch_size > 0, f"batch_size must be > 0, got {cfg.batch_size}")
    _check(cfg.num_steps >= 0, f"num_steps must be >= 0, got {cfg.num_steps}")
    _check(cfg.get("data_offset", 0) >= 0, f"data_offset must be >= 0, got {cfg.get('data_offset')}")
    _validate_schedule(cfg)
    models.model_class(cfg.model_name)
    tasks.task_class(cfg.task)
    o = cfg.optim
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(o.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {o.grad_accum}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1 and optim.b2 must be in [0, 1), got {o.b1}, {o.b2}")
    _check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    if o.get("lr_scale"):
        from sqattn.train.optim import parse_lr_scale
        try:
            parse_lr_scale(o.lr_scale)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    init, peft = cfg.get("init"), cfg.get("peft")
    if init is not None:
        _check(init.transfer in ("same", "transplant"),
               f"init.transfer must be 'same' or 'transplant', got {init.transfer!r}")
        _check(not init.workdir or __import__("os").path.isdir(init.workdir),
               f"init.workdir {init.workdir!r} is not a directory (the run to start from)")
        transform = init.get("transform", "")
        _check(not transform or (":" in transform and all(transform.partition(":")[::2])),
               f"init.transform must be '' or 'module.path:function', got {transform!r}")
        _check(not transform or init.workdir, f"init.transform {transform!r} needs init.workdir (the source run)")
        state = init.get("state", "params")
        _check(state in ("params", "full"), f"init.state must be 'params' or 'full', got {state!r}")
        _check(state == "params" or init.workdir, "init.state='full' needs init.workdir (the run to continue)")
        _check(state == "params" or (init.transfer == "same" and not transform),
               f"init.state='full' continues the source run's train state, so it needs init.transfer='same' "
               f"and no init.transform (got transfer={init.transfer!r}, transform={transform!r})")
    if peft is not None:
        from sqattn.peft import METHODS
        _check(peft.method in ("", *METHODS), f"peft.method must be '' or one of {sorted(METHODS)}, "
                                              f"got {peft.method!r}")
        _check(not peft.method or (peft.rank >= 1 and any(t.strip() for t in peft.targets.split(","))),
               f"peft needs rank >= 1 and at least one target, got rank={peft.rank}, targets={peft.targets!r}")
    _check(cfg.batch_size % o.grad_accum == 0,
           f"batch_size={cfg.batch_size} is not divisible by optim.grad_accum={o.grad_accum}")
    sharding.mesh_rules(cfg.mesh.rules)
    if check_devices:
        sizes = sharding.mesh_shape(cfg.mesh)
        batch_ways = sizes["data"] * sizes["fsdp"]
        micro = cfg.batch_size // o.grad_accum
        _check(micro % batch_ways == 0,
               f"micro-batch {micro} (batch_size/grad_accum) is not divisible by the data*fsdp mesh axes "
               f"({sizes['data']}*{sizes['fsdp']}={batch_ways})")
        _check(micro % jax.process_count() == 0,
               f"micro-batch {micro} is not divisible by the {jax.process_count()} processes")
    if cfg.model_name == "lm":
        _validate_lm(cfg)


def _validate_schedule(cfg) -> None:
    """The trainer's cadence settings: every one is checked here, before anything is written."""
    for key in ("log_every", "checkpoint_every", "eval_batches"):
        val = cfg.get(key)
        _check(isinstance(val, int) and not isinstance(val, bool) and val >= 1,
               f"{key} must be an integer >= 1, got {val!r}")
    _check(isinstance(cfg.eval_every, int) and cfg.eval_every >= 0,
           f"eval_every must be an integer >= 0 (0: evaluate only at the end), got {cfg.eval_every!r}")
    _check(isinstance(cfg.keep_checkpoints, int) and cfg.keep_checkpoints >= 1,
           f"keep_checkpoints must be an integer >= 1 (the newest N checkpoints are kept; 0 would delete "
           f"every checkpoint), got {cfg.keep_checkpoints!r}")
    _check(isinstance(cfg.seed, int) and cfg.seed >= 0, f"seed must be an integer >= 0, got {cfg.seed!r}")


def _validate_lm(cfg) -> None:
    from sqattn import mixers
    from sqattn.models.lm import DTYPES
    m = cfg.model
    _check(m.d_model > 0 and m.num_layers > 0, f"model.d_model and model.num_layers must be > 0")
    _check(m.dtype in DTYPES, f"model.dtype {m.dtype!r} not in {sorted(DTYPES)}")
    _check(len(m.block_pattern) > 0, "model.block_pattern is empty")
    known = mixers.mixers()
    for letter in m.block_pattern:
        _check(letter in known, f"model.block_pattern {m.block_pattern!r}: unknown letter {letter!r}; "
               f"known: {', '.join(f'{k}={v.name}' for k, v in sorted(known.items()))}")
        name = known[letter].name
        _check(name in m.mixers, f"model.block_pattern uses {letter!r} ({name}) but model.mixers.{name} "
               f"is missing")
    att = m.mixers.get("attention")
    if att is not None and "A" in m.block_pattern:
        h = att.num_heads
        kv = att.get("num_kv_heads") or h
        _check(m.d_model % h == 0 or att.get("head_dim"),
               f"model.mixers.attention.num_heads={h} does not divide model.d_model={m.d_model}")
        _check(h % kv == 0, f"model.mixers.attention.num_heads={h} is not divisible by num_kv_heads={kv}")
        hd = att.get("head_dim") or m.d_model // h
        _check(hd % 2 == 0, f"attention head_dim={hd} must be even for RoPE")
        _check(att.window >= 0, f"model.mixers.attention.window must be >= 0, got {att.window}")
    if "vocab_size" in cfg.data:
        _check(cfg.data.vocab_size <= m.vocab_size,
               f"data vocabulary {cfg.data.vocab_size} exceeds model.vocab_size={m.vocab_size}")
