"""bench_train: the record a run prints (structure and consistency; no timing assertions)."""

from sqattn import configs


def test_run_benchmark_record():
    from experiments.bench_train import run_benchmark
    rec = run_benchmark(configs.get("lm_tiny:runlocal"), warmup=1, steps=2)
    for key in ("step_time_s", "tokens_per_s", "flops_per_token", "peak_flops_per_s", "mfu"):
        assert rec[key] > 0, key
    tokens = rec["tokens_per_s"] * rec["step_time_s"]
    assert abs(tokens - 8 * 64) / (8 * 64) < 1e-6      # runlocal: batch 8 x seq 64 per step
    assert abs(rec["mfu"] - rec["flops_per_token"] * rec["tokens_per_s"] / rec["peak_flops_per_s"]) < 1e-9
