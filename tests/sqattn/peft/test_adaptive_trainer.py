"""Adaptive adapters through the trainer: adapter-only updates, allocation events in metrics.jsonl, and a run
stopped mid-schedule resumes to the same ranks, losses and parameters as an uninterrupted one."""

import json
import os

import numpy as np
import pytest

from sqattn import configs
from sqattn.peft import adaptive
from sqattn.peft.rank_task import layer_names, teacher_weights
from sqattn.sample import load_model
from sqattn.train.trainer import train_and_evaluate


def _cfg(method):
    c = configs.get(f"rank_synth:method={method},runlocal")
    c.num_steps = 10
    c.checkpoint_every = 100
    c.peft.update(warmup=1, final=2, interval=2, sens_every=1)
    return c


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    events = [(r["step"], r["ranks"]) for r in recs if r.get("event") == "rank_allocation"]
    return losses, events


@pytest.mark.parametrize("method", ["triadapt"])   # adalora/increlora hook state: test_adaptive.py
def test_resume_mid_schedule_equals_uninterrupted(method, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r_full = train_and_evaluate(_cfg(method), full, progress=False)
    r_stop = train_and_evaluate(_cfg(method), part, progress=False, stop_after=5)
    assert r_stop["stopped_early"] and r_stop["step"] == 5
    _, ev_stop = _records(part)
    assert ev_stop and ev_stop[-1][0] <= 5                              # stopped inside the schedule
    r_part = train_and_evaluate(_cfg(method), part, progress=False)
    losses_full, events_full = _records(full)
    losses_part, events_part = _records(part)
    assert losses_part == losses_full                                   # every step's loss, exactly
    assert events_part == events_full                                   # same allocations, same ranks
    assert events_full[-1][1] and sum(events_full[-1][1].values()) == 8  # the budget (rank 2 x 4 layers)
    assert r_part["eval_loss"] == r_full["eval_loss"]
    if method == "triadapt":
        assert any(e[0] > 5 for e in events_full)                         # allocations after the resume point
    model, cfg = load_model(full)
    for name, w in zip(layer_names(4), teacher_weights(cfg.model.sizes, cfg.model.teacher_seed)):
        np.testing.assert_array_equal(np.asarray(getattr(model, name).base.kernel[...]), w)   # base untouched
    ranks = {p: int(np.asarray(m.ada_mask[...]).sum()) for p, m in adaptive.adapter_modules(model)}
    assert ranks == events_full[-1][1]                                   # the checkpoint holds the final masks
