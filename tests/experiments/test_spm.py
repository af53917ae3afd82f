"""experiments/spm.py helpers, and a diffusion run that resumes after a kill like any run."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import spm as spm_exp
from sqattn import configs, sample
from sqattn.train.trainer import train_and_evaluate


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert abs(spm_exp.frechet_distance(a, a)) < 1e-8
    shifted = spm_exp.frechet_distance(a, a + np.array([2.0, 0, 0]))
    assert abs(shifted - 4.0) < 1e-6                                       # |d mu|^2, same covariance


def _tiny(name):
    c = configs.get(name)
    c.model.image_size = 8
    c.data.size = 8
    c.num_steps = 4
    c.checkpoint_every = 4
    return c


def test_diffusion_run_resumes_after_a_kill(tmp_path):
    c = _tiny("dit_shapes:runlocal")
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train_and_evaluate(c, full, progress=False)
    first = train_and_evaluate(c, cut, progress=False, stop_after=2)       # as if SIGTERM arrived at step 2
    assert first["stopped_early"] and first["step"] == 2
    train_and_evaluate(c, cut, progress=False)
    a, _ = sample.load_model(full)
    b, _ = sample.load_model(cut)
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    losses = lambda wd: [json.loads(l)["loss"] for l in open(os.path.join(wd, "metrics.jsonl"))  # noqa
                         if '"loss"' in l]
    assert losses(full) == losses(cut)


def test_spm_runs_take_the_dit_runs_shape(tmp_path):
    """SPM runs build the DiT run's structure (patch, width, depth, positions), whatever spm_shapes' defaults:
    a run saved before ``pos_embed`` existed has learned positions."""
    d = tmp_path / "dit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model": {"patch": 4, "d_model": 96, "depth": 3}}))
    args = spm_exp.dit_shape_args(str(d))
    assert args == ",patch=4,width=96,depth=3,pos=learned"
    c = configs.get(f"spm_shapes:init={d},concept=star{args}")
    assert (c.model.patch, c.model.d_model, c.model.depth, c.model.pos_embed) == (4, 96, 3, "learned")
    (d / "config.json").write_text(json.dumps({"model": {"patch": 2, "d_model": 64, "depth": 4,
                                                         "pos_embed": "sincos"}}))
    assert spm_exp.dit_shape_args(str(d)) == ",patch=2,width=64,depth=4,pos=sincos"
    with pytest.raises(ValueError, match="cannot read the DiT's model shape"):
        spm_exp.dit_shape_args(str(tmp_path / "missing"))
