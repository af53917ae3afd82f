"""Conversion: linearize_config rewrites the pattern and mixer config; transplant copies a teacher into a
Liger student bit-exactly; SWA-only Liger with a window covering the sequence reproduces the teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn import configs, models
from sqattn.models.convert import linearize_config, transplant

T = 12


def _teacher_cfg():
    cfg = configs.get("lm_tiny").model
    cfg.update(d_model=32, num_layers=2, mlp_dim=48, dtype="float32", vocab_size=64)
    cfg.mixers.attention.update(num_heads=4, num_kv_heads=2)
    return cfg


@nnx.jit
def _logits(model, tokens):
    return model(tokens)[0]


def _flat(model):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_linearize_config():
    teacher = _teacher_cfg()
    teacher.mixers.attention.window = 8
    student = linearize_config(teacher, mixer_cfg=dict(window=4, gate="mamba2", chunk_size=4))
    assert student.block_pattern == "LL"
    assert teacher.block_pattern == "A" and "liger" not in teacher.mixers        # the input is not modified
    assert student.mixers.liger.to_dict() == dict(num_heads=4, num_kv_heads=2, rope_theta=10000.0,
                                                  qk_norm=False, window=4, gate="mamba2", chunk_size=4)
    hybrid = teacher.to_dict()
    hybrid.update(block_pattern="GA", num_layers=5)
    assert linearize_config(hybrid, mixer_cfg={})["block_pattern"] == "GLGLG"    # expanded, then replaced
    with pytest.raises(ValueError, match="no attention layer"):
        linearize_config(dict(hybrid, block_pattern="G"), mixer_cfg={})


def test_transplant_copies_every_teacher_weight():
    teacher = models.build("lm", _teacher_cfg(), nnx.Rngs(0))
    student = models.build("lm", linearize_config(_teacher_cfg(), mixer_cfg=dict(window=4, chunk_size=4)),
                           nnx.Rngs(1))
    report = transplant(teacher, student)
    src, dst = _flat(teacher), _flat(student)
    assert report["copied"] == sorted(src) and report["missing_in_src"] == [] and report["unused_in_src"] == []
    assert "blocks/1/mixer/q/kernel" in report["copied"] and "embed/embedding" in report["copied"]
    for path, value in src.items():
        np.testing.assert_array_equal(dst[path], value, err_msg=path)
    fresh = models.build("lm", linearize_config(_teacher_cfg(), mixer_cfg=dict(gate="fresh")), nnx.Rngs(1))
    assert transplant(teacher, fresh)["missing_in_src"] == ["blocks/0/mixer/gate/kernel",
                                                            "blocks/1/mixer/gate/kernel"]


def test_swa_only_with_full_window_reproduces_teacher():
    teacher = models.build("lm", _teacher_cfg(), nnx.Rngs(0))
    student = models.build("lm", linearize_config(_teacher_cfg(), mixer_cfg=dict(window=T, recurrent=False)),
                           nnx.Rngs(1))
    transplant(teacher, student)
    tokens = jax.random.randint(jax.random.key(2), (2, T), 0, 64)
    np.testing.assert_array_equal(np.asarray(_logits(student, tokens)), np.asarray(_logits(teacher, tokens)))


def test_shape_mismatch_raises():
    teacher = models.build("lm", _teacher_cfg(), nnx.Rngs(0))
    cfg = linearize_config(_teacher_cfg(), mixer_cfg={})
    cfg.mlp_dim = 40
    student = models.build("lm", cfg, nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"blocks/0/mlp/up/kernel: \(32, 48\) vs \(32, 40\)"):
        transplant(teacher, student)
