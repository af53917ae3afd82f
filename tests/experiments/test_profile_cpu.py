"""experiments/profile_cpu: the trace reader and the kinds it sums (a real trace is read in one small case)."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_cpu


def test_kinds():
    assert profile_cpu.kind_of("dot_general.41") == "matmul"
    assert profile_cpu.kind_of("ynn_fusion.6") == "matmul"
    assert profile_cpu.kind_of("add_convert_fusion.13") == "converts"
    assert profile_cpu.kind_of("copy_bitcast_fusion") == "copies"
    assert profile_cpu.kind_of("subtract_exponential_fusion.1") == "exp"
    assert profile_cpu.kind_of("broadcast_multiply_fusion") == "other"
    assert profile_cpu.kind_of("ThunkExecutor::Execute") is None
    assert profile_cpu.kind_of("$api.py:2479 block_until_ready") is None


def test_summary_of_a_written_trace(tmp_path):
    events = [{"ph": "X", "name": "dot_general.1", "dur": 600.0}, {"ph": "X", "name": "dot_general.1", "dur": 200.0},
              {"ph": "X", "name": "wrapped_convert.2", "dur": 150.0}, {"ph": "X", "name": "reduce.3", "dur": 50.0},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 5000.0}, {"ph": "i", "name": "dot_general.9"}]
    (tmp_path / "host").mkdir()
    with gzip.open(tmp_path / "host" / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = profile_cpu.summarize(profile_cpu.kernel_times(str(tmp_path)), calls=2, top=2)
    assert s["kernel_ms_per_call"] == pytest.approx(0.5)                 # (800 + 150 + 50) us / 2 calls
    assert s["share"] == {"matmul": 0.8, "converts": 0.15, "other": 0.05}
    assert s["kernels"] == 3 and s["converts"] == 1
    assert s["top"][0] == ["dot_general.1", 0.4]


def test_missing_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no perfetto trace"):
        profile_cpu.kernel_times(str(tmp_path))


def test_profiles_a_real_program(tmp_path):
    x = jnp.ones((64, 64), jnp.float32)
    f = jax.jit(lambda a: jnp.exp(a @ a).astype(jnp.bfloat16))
    s = profile_cpu.profile(lambda: jax.block_until_ready(f(x)), calls=2, trace_dir=str(tmp_path), top=3)
    assert s["kernels"] >= 1 and s["kernel_ms_per_call"] > 0
    assert "matmul" in s["share"]
