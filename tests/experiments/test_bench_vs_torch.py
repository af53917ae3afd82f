"""experiments.bench_vs_torch: a tiny interleaved run (workers in their own processes, JSON record) and the
PyTorch twin's shape (same parameter count as our model, one optimizer step runs)."""

import json

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch side needs torch: pip install -e '.[torch]'")

from experiments import bench_vs_torch  # noqa: E402


def test_tiny_attention_run_interleaves_and_reports():
    record = bench_vs_torch.run_benchmark(rounds=2, parts=["attention"], configs=["lm_tiny"], seq_lens=[40],
                                          attn_tokens=80, warmup=1, log=lambda m: None)
    names = [r["name"] for r in record["rows"]]
    assert names == ["attention T=40 ours", "attention T=40 torch"]
    for r in record["rows"]:
        assert r["reps"] == 2 and 0 < r["min_s"] <= r["median_s"]
    assert record["attention_speedup_vs_torch_sdpa"] == pytest.approx(
        record["rows"][1]["median_s"] / record["rows"][0]["median_s"])
    assert len(record["loadavg_start"]) == 3
    json.loads(json.dumps(record))                                   # JSON-able as printed


def test_torch_twin_has_our_shape_and_steps():
    from flax import nnx
    from experiments.bench_train import bench_config
    from sqattn.train import state as state_lib
    config = bench_config(["--config=lm_tiny:runlocal"])
    assert bench_vs_torch._torch_twin_ok(config)
    _, abstract = state_lib.abstract_model(config)
    shape = bench_vs_torch._lm_shape(config)
    run, info = bench_vs_torch._torch_step(dict(shape=shape, compile=False, dtype="bfloat16"))
    assert info["params"] == state_lib.param_count(abstract)
    run()                                                            # forward, backward, clip, AdamW
    swa = bench_config(["--config=swa_tiny"])
    assert not bench_vs_torch._torch_twin_ok(swa)                   # a window: no twin, ours only
