"""experiments/ctr_benchmark.py: the table helpers, and the deepctr-torch peers built as the cross-only models
our DCN matches parameter for parameter."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from experiments import ctr_benchmark as cb
from sqattn.models import ctr


def _run(lib, model, seed, auc):
    return dict(lib=lib, model=model, variant="high", seed=seed, test_auc=auc, test_logloss=0.4,
                non_embedding_params=10, rows_per_s=100.0 + seed, seconds_per_epoch=2.0)


def test_summarize_means_and_sample_std_per_model():
    runs = [_run("sqattn", "fcn", s, a) for s, a in enumerate((0.70, 0.72, 0.74))] + [
        _run("deepctr-torch", "deepctr_dcn_matrix", 0, 0.69)]
    rows = {r["model"]: r for r in cb.summarize(runs)}
    assert rows["fcn"]["auc_mean"] == pytest.approx(0.72) and rows["fcn"]["auc_std"] == pytest.approx(0.02)
    assert rows["deepctr_dcn_matrix"]["seeds"] == 1 and rows["deepctr_dcn_matrix"]["auc_std"] == 0.0
    table = cb.format_table(cb.summarize(runs))
    assert "| high | sqattn | fcn | 0.7200 ± 0.0200 |" in table
    assert cb.throughput(runs)["sqattn:fcn"] == {"min": 100.0, "median": 101.0, "n": 3}


@pytest.mark.parametrize("cross", ["vector", "matrix"])
def test_deepctr_cross_only_dcn_has_our_parameter_count(cross):
    pytest.importorskip("deepctr_torch", reason=f"optional peer: {cb.INSTALL_HINT}")
    import torch
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DCN
    vocab = [5, 9, 4]
    cols = [SparseFeat(f"f{j}", vocabulary_size=v, embedding_dim=16) for j, v in enumerate(vocab)]
    theirs = cb._cross_only(DCN(cols, cols, cross_num=3, cross_parameterization=cross, dnn_hidden_units=(1,),
                                device="cpu"), cols)
    emb = sum(p.numel() for n, p in theirs.named_parameters() if "embedding_dict" in n)
    ours = nnx.eval_shape(lambda: ctr.DCN(vocab, cross=cross, num_cross=3, rngs=nnx.Rngs(params=0)))
    assert sum(p.numel() for p in theirs.parameters()) - emb == ctr.non_embedding_params(ours)
    out = theirs(torch.as_tensor(np.array([[1, 2, 3], [0, 8, 0]], np.float32)))
    assert out.shape == (2, 1) and bool(torch.all((out > 0) & (out < 1)))


def test_records_are_reused_and_settings_must_match(tmp_path):
    a = dict(workdir=str(tmp_path), rows=1000, epochs=1, batch=64, data_dir="/d")
    calls = []

    def fn():
        calls.append(1)
        return _run("sqattn", "fcn", 0, 0.7)

    first = cb._cached(a, "sqattn", "fcn", "high", 0, fn)
    again = cb._cached(a, "sqattn", "fcn", "high", 0, fn)
    assert len(calls) == 1 and again == first
    cb._cached(a, "deepctr-torch", "deepctr_dcn_matrix", "high", 0,
               lambda: _run("deepctr-torch", "deepctr_dcn_matrix", 0, 0.69))
    assert [r["model"] for r in cb.collect(a)] == ["fcn", "deepctr_dcn_matrix"]
    other = dict(a, rows=2000)
    assert cb.collect(other) == []           # another size's records are not mixed in
    with pytest.raises(ValueError, match="settings"):
        cb._cached(dict(a, epochs=3), "sqattn", "fcn", "high", 0, fn)
