"""experiments/adaptive_rank.py: every arm is a valid trainer config with a working allocator; the table's
mean/std and Spearman columns come from the records."""

import math

import pytest

from sqattn.configs import adaptive_rank as cfg_lib
from sqattn.configs.validate import validate
from sqattn.peft import adaptive, allocator


@pytest.mark.parametrize("arm", sorted(cfg_lib.ARMS))
def test_every_arm_is_a_valid_config_with_an_allocator(arm):
    c = cfg_lib.synth_run_config(arm, seed=1, steps=1000, sens_every=1)
    validate(c, check_devices=False)
    assert c.optim.trainable == adaptive.TRAINABLE and c.log_every == 1
    hook = adaptive.make_hook(c)
    if arm == "lora":
        assert hook is None
        return
    s = allocator.settings(c)
    assert hook.every in (s["interval"], s["sens_every"]) and s["measure_jump"]
    assert s["warmup"] == 100 and s["final"] == 200
    assert (s["schedule"] == "exp") == (arm == "triadapt_exp")


def test_unknown_arm():
    with pytest.raises(ValueError, match="unknown arm 'dora'"):
        cfg_lib.synth_run_config("dora", seed=0, steps=100, sens_every=1)


def test_synth_table_aggregates_seeds():
    from experiments.adaptive_rank import synth_table
    rec = lambda rel, sp, r: dict(rel_mse=rel, eval_accuracy=0.5, spearman=sp, ranks=dict(zip("abcd", r)),  # noqa
                                  alloc_ms_per_event=2.0, jump_mean=0.01, jump_max=0.02, active_params=100)
    table, summary = synth_table({"x": [rec(0.2, 0.5, [1, 2, 3, 4]), rec(0.4, 1.0, [3, 2, 1, 4])],
                                  "lora": [rec(0.3, float("nan"), [4, 4, 4, 4])]})
    assert summary["x"]["rel_mse"][0] == pytest.approx(0.3)
    assert summary["x"]["rel_mse"][1] == pytest.approx(math.sqrt(0.02))      # sample std
    assert summary["x"]["mean_ranks"] == [2.0, 2.0, 2.0, 4.0]
    assert summary["x"]["spearman"][0] == pytest.approx(0.75)
    assert "| lora | 0.300 ± 0.000 | 0.500 ± 0.000 | - |" in table


def test_peft_anchor_runs_and_meets_the_budget():
    """experiments/bench_peft_anchor.py's peft side on a tiny config: the final rank pattern is read back (total
    rank below the start's 3 x 4) and within AdaLoRA's budget (target_r x modules)."""
    pytest.importorskip("torch", reason="pip install torch (extra 'peers')")
    pytest.importorskip("peft", reason="pip install peft (extra 'peers')")
    import numpy as np
    from sqattn import configs
    from sqattn.train import state as state_lib
    from experiments.bench_peft_anchor import run_peft
    c = configs.get("rank_synth:method=adalora,runlocal")
    model = state_lib.build_model(c)
    init = {p: (np.asarray(m.ada_a[...]), np.asarray(m.ada_b[...])) for p, m in adaptive.adapter_modules(model)}
    out = run_peft(c, init, ["fc1", "fc2", "fc3", "head"])
    # peft's threshold (kthvalue, pruning every score <= it) can prune past the budget on tied scores
    assert 0 < sum(out["ranks"].values()) <= c.peft.rank * 4 and max(out["ranks"].values()) <= c.peft.init_rank
    assert np.isfinite(out["eval_mse"])
