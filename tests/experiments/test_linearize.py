"""Linearisation experiment end to end on a tiny budget: teacher trained then reused, variants fine-tuned,
merged and evaluated, results.json / linearize.png written, finished variants not rerun."""

import json
import os

import pytest

from experiments import linearize
from sqattn import sample


def test_run_end_to_end_and_resume(tmp_path, monkeypatch):
    workdir = str(tmp_path / "lin")
    kw = dict(teacher_steps=2, teacher_d_model=32, teacher_layers=2, teacher_seq_len=32, steps=3,
              finetune_seq_len=32, variants=["liger", "fresh_gate"], window=4, eval_lengths=[32, 64],
              eval_tokens=512, batch_size=8, chunk_size=16, progress=False)
    out = linearize.run(workdir, **kw)
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert os.path.getsize(os.path.join(workdir, "linearize.png")) > 1000
    assert set(saved) == {"settings", "teacher", "variants", "table", "delta_vs_teacher", "plot", "wall_s"}
    assert saved["teacher"]["trained_here"] and saved["teacher"]["steps"] == 2
    assert set(saved["table"]) == {"teacher", "liger", "fresh_gate"}
    for name, rec in saved["variants"].items():
        # A byte LM after 2 + 3 steps is still close to uniform over 256 bytes, i.e. 8 bits/byte: a value in
        # nats (x ln 2) or per some other unit would fall outside.
        assert set(rec["bpb"]) == {"32", "64"} and all(6.5 < v < 8.5 for v in rec["bpb"].values()), rec["bpb"]
        assert rec["block_pattern"] == "LL" and rec["lora_paths"] == 6 and rec["finetune"]["steps"] == 3
        assert rec["merge_check"]["ok"], rec["merge_check"]
        assert saved["delta_vs_teacher"][name]["32"] == pytest.approx(rec["bpb"]["32"] - saved["teacher"]["bpb"]["32"])
    fresh, liger = saved["variants"]["fresh_gate"], saved["variants"]["liger"]
    assert fresh["new_params"] == ["blocks/0/mixer/gate/kernel", "blocks/1/mixer/gate/kernel"]
    d = 32                                                               # teacher_d_model
    assert fresh["trainable_params"] == liger["trainable_params"] + 2 * d * d // 2   # + the gate (g*hd = d/2)
    assert "| liger |" in linearize.format_table(out)
    # The merged students were saved as runs: loaded back, they score what the experiment measured.
    student, cfg = sample.load_model(os.path.join(workdir, "models", "liger"))
    assert cfg.model.block_pattern == "LL" and cfg.model.mixers.liger.window == 4
    again_bpb = linearize.eval_bpb(student, cfg.data, seq_len=32, eval_tokens=512, batch_size=8)
    assert again_bpb == pytest.approx(liger["bpb"]["32"], rel=1e-6)
    # Rerun: the teacher is loaded (not retrained) and finished variants are read back.
    monkeypatch.setattr("sqattn.train.train_and_evaluate", lambda *a, **k: pytest.fail("teacher retrained"))
    monkeypatch.setattr(linearize, "run_variant", lambda *a, **k: pytest.fail("variant rerun"))
    again = linearize.run(workdir, **kw)
    assert not again["teacher"]["trained_here"]
    assert again["variants"] == out["variants"]
    assert again["teacher"]["bpb"] == pytest.approx(out["teacher"]["bpb"])


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'hedgehog'"):
        linearize.run("/nonexistent", variants=["hedgehog"])
