"""Configs: registry, overrides, validation errors (asserted on their messages), dry run."""

import json

import pytest

from sqattn import configs
from sqattn.configs import cli
from sqattn.configs.validate import ConfigError, validate
from sqattn.train.dryrun import dry_run, format_report


def test_unknown_config_lists_known_names():
    with pytest.raises(ValueError, match="unknown config 'nope'; known configs: .*lm_tiny"):
        configs.get("nope")


def test_unknown_config_arg():
    with pytest.raises(ValueError, match="unknown config arg 'bogus'"):
        configs.get("lm_tiny:bogus=1")


@pytest.mark.parametrize("name", configs.names())
def test_every_registered_config_validates(name):
    validate(configs.get(name), check_devices=False)


def test_overrides_apply_with_types():
    cfg, rest = cli.config_from_argv(
        ["--config=lm_tiny", "--config.model.d_model=96", "--config.optim.lr=1", "--config.model.dtype=bfloat16",
         "--config.model.tie_embeddings=false", "--workdir=/x"], default="lm_tiny")
    assert cfg.model.d_model == 96 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.dtype == "bfloat16" and cfg.model.tie_embeddings is False
    assert rest == ["--workdir=/x"]


@pytest.mark.parametrize("override,message", [
    ("model.d_modl=3", "unknown key 'd_modl' under model"),
    ("modle.d_model=3", "unknown key 'modle' under <root>"),
    ("model.d_model=abc", "model.d_model: cannot parse 'abc' as int"),
    ("model.d_model=1.5", "model.d_model: expected int"),
    ("model.tie_embeddings=maybe", "expected a bool"),
    ("model=3", "is a section"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        cli.config_from_argv([f"--config.{override}"], default="lm_tiny")


@pytest.mark.parametrize("override,message", [
    ("model.mixers.attention.num_heads=3", "num_heads=3 does not divide model.d_model=128"),
    ("model.mixers.attention.num_kv_heads=3", "not divisible by num_kv_heads=3"),
    ("model.block_pattern='AZ'", "unknown letter 'Z'"),
    ("mesh.data=16", "needs 16 devices but only 8 are present"),
    ("mesh.tensor=3", "8 devices are not divisible by the fixed axes"),
    ("mesh.fsdp=3", r"micro-batch 16 .* not divisible by the data\*fsdp mesh axes"),
    ("optim.grad_accum=3", "not divisible by optim.grad_accum=3"),
    ("model.dtype=float8", "model.dtype 'float8'"),
    ("mesh.rules=nope", "unknown sharding rules"),
])
def test_inconsistent_configs_are_rejected(override, message):
    cfg, _ = cli.config_from_argv([f"--config.{override}"], default="lm_tiny")
    with pytest.raises((ConfigError, ValueError), match=message):
        validate(cfg)


def test_dry_run_reports_without_allocating():
    rep = dry_run(configs.get("lm_tiny"))
    text = format_report(rep)
    last = json.loads(text.splitlines()[-1])
    assert last["params"] == rep["params"] > 0
    assert last["bytes_per_device"] >= 3 * 4 * rep["params"] / 8   # params + 2 Adam moments, f32, <= 8-way
    assert last["flops_per_token"] > 6 * rep["params"] * 0.9


def test_dry_run_shards_bytes_over_fsdp():
    one, _ = cli.config_from_argv(["--config.mesh.fsdp=1"], default="lm_tiny")
    eight, _ = cli.config_from_argv(["--config.mesh.fsdp=8"], default="lm_tiny")
    b1, b8 = dry_run(one)["bytes_per_device"], dry_run(eight)["bytes_per_device"]
    assert b8 < b1 / 4
