"""SEMA (sqattn/models/sema.py) and the continual-learning stream driver (sqattn/train/stream.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn import configs, sample
from sqattn.data import images
from sqattn.models import sema
from sqattn.train import stream


def _configs(**data):
    """A tiny SEMA config (2 blocks, width 32, 2 expandable) and the matching ViT config."""
    c = configs.get("sema_digits:runlocal")
    v = configs.get("vit_digits:runlocal")
    c.data.update(data)
    return c, v


def _vit(v_cfg):
    from sqattn.train import state as state_lib
    return nnx.jit(lambda: state_lib.build_base_model(v_cfg))()


def _digits(cfg, split="train", domain_task=0):
    c = cfg.data.copy_and_resolve_references()
    c.task = domain_task
    return images.ImageBatches(c, split, global_batch_size=1).all_images()


def test_start_and_new_adapters_leave_outputs_unchanged():
    c, v = _configs()
    vit = _vit(v)
    model = sema.start(vit, v, c)                        # every block gets slot 0 (up = 0)
    x = _digits(c)[:16]
    _, feats, _ = sema.run_model(model, x, batch=16)
    np.testing.assert_array_equal(feats, np.asarray(nnx.jit(lambda m, a: m.features(a))(vit, jnp.asarray(x))))
    # a newly activated slot's adapter is exactly zero whatever its input (zero-initialised up-projection)
    layer = model.sema[1]
    shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    sema.activate(model, 1, 2, task=1)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param))) == shapes   # no new shapes
    out = layer.adapters(jax.random.normal(jax.random.key(0), (3, 17, 32)), jnp.ones(layer.num_slots))
    assert np.all(np.asarray(out[:, 2]) == 0.0) and np.any(np.asarray(out[:, 0]) == 0.0)
    assert sema.adapter_counts(model) == [1, 2]
    with pytest.raises(ValueError, match="already active"):
        sema.activate(model, 1, 2, task=1)


def test_frozen_slots_get_exactly_zero_gradient():
    c, v = _configs()
    model = sema.start(_vit(v), v, c)
    sema.freeze(model, v)                                 # (a func-phase source) every TRAIN flag -> 0
    for layer in model.sema:                              # slot 0 "trained": a non-zero up-projection
        up = layer.adapters.up[...]
        layer.adapters.up[...] = up.at[0].set(0.1 * jax.random.normal(jax.random.key(3), up.shape[1:]))
    sema.activate(model, 1, 1, task=1)                    # only this slot trains
    x = jnp.asarray(_digits(c)[:8])
    grads = nnx.to_pure_dict(nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2) + m(x)[1]["aux_loss"]))(model))
    g = grads["sema"][1]
    for name in ("up", "up_bias"):                        # (down gets none through a zero up-projection)
        a = np.asarray(g["adapters"][name])
        assert np.all(a[0] == 0) and np.any(a[1] != 0), name
    assert np.all(np.asarray(g["adapters"]["down"]) == 0)
    assert np.any(np.asarray(g["router"]["kernel"])[1] != 0) and np.all(np.asarray(g["router"]["kernel"])[0] == 0)
    assert np.any(np.asarray(g["rds"]["enc"])[1] != 0) and np.all(np.asarray(g["rds"]["enc"])[0] == 0)
    for name in ("up", "down"):                           # the frozen layer-0 adapter
        assert np.all(np.asarray(grads["sema"][0]["adapters"][name]) == 0)
    assert np.all(np.asarray(g["status"]) == 0)
    assert np.any(np.asarray(grads["head"]["kernel"]) != 0)


def test_trigger_fires_on_a_shift_and_not_on_a_fresh_sample():
    c, v = _configs(stream="0,1;2,3;4-9@invert_noise")
    model = sema.start(_vit(v), v, c)
    clean = _digits(c, domain_task=0)                     # digits 0/1, clean
    # "train" each slot-0 RD on 200 clean examples: a linear autoencoder's optimum is the PCA projection
    bb, x = model.backbone, model.backbone.tokens(jnp.asarray(clean[:200]))
    for layer, block in enumerate(bb.blocks):
        x_a = block.attend(x)
        if layer in model.expandable:
            xb = np.asarray(jnp.mean(x_a, axis=1))                                 # [200, d] token means
            mu = xb.mean(0)
            v = np.linalg.svd(xb - mu, full_matrices=False)[2][:c.model.rd_dim].T  # [d, m]
            rds = model.sema[layer].rds
            rds.enc[...] = rds.enc[...].at[0].set(v)
            rds.enc_bias[...] = rds.enc_bias[...].at[0].set(-mu @ v)
            rds.dec[...] = rds.dec[...].at[0].set(v.T)
            rds.dec_bias[...] = rds.dec_bias[...].at[0].set(mu)
        x = x_a + block.feed_forward(x_a)
    # record the slot-0 RD statistics on those examples, as freeze() does after an rd run
    _, _, rd = sema.run_model(model, clean[:200])
    for j, layer in enumerate(model.expandable):
        s = sema.statuses(model)[layer]
        s[0, [sema.MU, sema.SIGMA, sema.COUNT]] = [rd[j, 0].mean(), rd[j, 0].std(ddof=1), 200]
        s[:, sema.TRAIN] = 0
        sema.set_status(model, layer, s)
    fresh = clean[200:]                                   # the same distribution, unseen examples
    shifted = _digits(c, domain_task=2)[:120]             # inverted + noise
    scores_fresh = sema.task_scores(model, fresh)
    scores_shift = sema.task_scores(model, shifted)
    assert max(scores_fresh) < 1.5 and min(scores_shift) > 4.0, (scores_fresh, scores_shift)
    assert sema.detect(model, fresh, 1, threshold=2.0, batch=32).layer is None
    det = sema.detect(model, shifted, 1, threshold=2.0, batch=32)
    assert (det.layer, det.slot, det.batch) == (0, 1, 0)  # the lowest expandable layer, first free slot
    # a layer that already expanded in this task is skipped; the next one fires
    sema.activate(model, 0, 1, task=1, train=False)
    assert sema.detect(model, shifted, 1, threshold=2.0, batch=32).layer == 1


def test_z_scores_follow_the_official_rules():
    st = np.zeros((3, sema.NUM_STATUS), np.float32)
    st[:, sema.ACTIVE] = [1, 1, 0]
    st[:, sema.MU] = [1.0, 2.0, 0.0]
    st[:, sema.SIGMA] = [0.5, 1.0, 1.0]
    st[:, sema.COUNT] = [100, 2, 0]                       # slot 1 has too few recorded losses: z = 0
    losses = np.array([[0.0, 2.0], [9.0, 9.0], [5.0, 5.0]], np.float32)
    z = sema.z_scores(losses, st)
    np.testing.assert_allclose(z[0], [2.0, 2.0])          # |l - mu| / sigma, also below the mean
    np.testing.assert_array_equal(z[1], [0.0, 0.0])
    assert np.all(np.isnan(z[2]))                         # inactive
    assert sema.layer_score(losses, st) == 0.0            # min over active RDs


def test_bad_stream_args_are_clear_errors():
    c, _ = _configs()
    c.init.args.method = "lwf"
    with pytest.raises(ValueError, match="init.args.method 'lwf' unknown"):
        sema.stream_args(c)
    c, _ = _configs(stream="0,1;1,2")
    with pytest.raises(ValueError, match="class 1 overlaps with task 0"):
        stream.run_stream(c, "/nonexistent", backbone="/nonexistent")


def _params(workdir):
    model, _ = sample.load_model(workdir)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_resumed_stream_equals_an_uninterrupted_one(tmp_path):
    c, v = _configs(stream="0,1;2,3@invert_noise")
    c.init.args.z_threshold = -1.0                        # always fires: task 1 expands (a joint run)
    c.model.num_expandable = 1
    c.batch_size = 16
    backbone = str(tmp_path / "vit")
    sample.save_model(backbone, _vit(v), v)
    kw = dict(backbone=backbone, func_epochs=0.15, rd_epochs=0.05)   # func 3 steps, rd 1 step
    full = stream.run_stream(c, str(tmp_path / "full"), **kw)
    assert [r["name"] for r in full["runs"]] == ["t0_0_func", "t0_0_rd", "t1_0_joint", "t1_1_detect"]
    assert full["tasks"][1]["adapters"] == [1, 2] and full["tasks"][1]["expansions"] == [[1, 1]]
    cut = str(tmp_path / "cut")
    with pytest.raises(stream.StreamStopped, match="t1_0_joint stopped at step 1"):
        stream.run_stream(c, cut, stop_after_run=(2, 1), **kw)           # killed inside task 1's run
    assert os.path.isfile(os.path.join(cut, "t0_0_rd", "result.json"))
    again = stream.run_stream(c, cut, **kw)
    assert again["tasks"] == full["tasks"]
    jax.tree.map(np.testing.assert_array_equal, _params(os.path.join(cut, "t1_0_joint")),
                 _params(os.path.join(str(tmp_path / "full"), "t1_0_joint")))
