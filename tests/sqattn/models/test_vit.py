"""ViT (sqattn/models/vit.py), image data (sqattn/data/images.py) and the classify task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn.data import images
from sqattn.models.vit import ViT, patchify
from sqattn.train.classify_task import MASK, ClassifyTask


def _vit(**kw):
    cfg = dict(image_size=12, patch_size=4, channels=2, d_model=16, num_layers=2, num_heads=2, mlp_dim=16,
               num_classes=3)
    cfg.update(kw)
    return nnx.jit(lambda: ViT(**cfg, rngs=nnx.Rngs(0)))()


def test_patchify_matches_a_loop():
    x = np.random.default_rng(0).normal(size=(2, 12, 8, 3)).astype(np.float32)
    got = np.asarray(patchify(jnp.asarray(x), 4))                       # [2, 6, 48]
    want = np.stack([np.stack([x[b, i:i + 4, j:j + 4].reshape(-1) for i in range(0, 12, 4)
                               for j in range(0, 8, 4)]) for b in range(2)])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="not divisible by patch_size=5"):
        patchify(jnp.asarray(x), 5)


def test_vit_shapes_and_bidirectional_attention():
    model = _vit()
    x = jax.random.normal(jax.random.key(1), (3, 12, 12, 2))
    logits, aux = nnx.jit(lambda m, x: m(x))(model, x)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32 and aux["features"].shape == (3, 16)
    # The CLS token comes first: only bidirectional attention lets the last patch change it.
    y = x.at[:, -4:, -4:].add(1.0)
    f0, f1 = (np.asarray(nnx.jit(lambda m, v: m.features(v))(model, v)) for v in (x, y))
    assert np.abs(f0 - f1).max() > 1e-3
    with pytest.raises(ValueError, match=r"expects images \[b, 12, 12, 2\]"):
        model(jnp.zeros((1, 12, 12, 1)))


def test_encoder_attention_matches_numpy():
    model = _vit(num_layers=1)
    att = model.blocks[0].mixer
    x = np.random.default_rng(2).normal(size=(2, 5, 16)).astype(np.float32)
    got = np.asarray(att(jnp.asarray(x)))
    q, k, v = (x @ np.asarray(getattr(att, n).kernel[...]) for n in "qkv")
    q, k, v = (a.reshape(2, 5, 2, 8) for a in (q, k, v))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", p, v).reshape(2, 5, 16) @ np.asarray(att.o.kernel[...])
    np.testing.assert_allclose(got, o, rtol=1e-4, atol=1e-5 * np.abs(o).max())


def _cfg(**kw):
    c = images.default_config()
    c.update(kw)
    return c


def test_digits_and_glyphs_sources():
    d = images.load_source(_cfg())
    assert d.images.shape == (1797, 16, 16, 1) and d.num_classes == 10
    assert 0.0 <= d.images.min() and d.images.max() <= 1.0
    assert abs(d.is_test.mean() - 0.2) < 0.01
    g1 = images.load_source(_cfg(source="glyphs", glyph_classes=3, glyph_per_class=10, image_size=8))
    g2 = images._glyphs.__wrapped__(8, 3, 10, 0.2)                     # uncached: same pixels
    np.testing.assert_array_equal(g1.images, g2.images)
    assert g1.images.shape == (30, 8, 8, 1) and g1.images.max() > 0.5


def test_stream_splits_and_batches():
    c = _cfg(stream="0,1;2,3@invert_noise", task=1)
    tr = images.ImageBatches(c, "train", global_batch_size=8)
    ev = images.ImageBatches(c, "eval", global_batch_size=8)
    assert set(tr._y.tolist()) == {2, 3} and set(ev._y.tolist()) == {0, 1, 2, 3}
    b = tr.batch(5)
    np.testing.assert_array_equal(b["images"], tr.batch(5)["images"])   # a pure function of the step
    assert b["logit_mask"][0].tolist() == [False, False, True, True] + [False] * 6
    assert ev.batch(0)["logit_mask"][0, :4].all() and not ev.batch(0)["logit_mask"][0, 4:].any()
    last = ev.batch(ev.num_batches - 1)
    assert last["weights"].sum() == ev.num_rows - (ev.num_batches - 1) * 8
    half = images.ImageBatches(c, "train", global_batch_size=8, shard_index=1, shard_count=2).batch(5)
    np.testing.assert_array_equal(half["images"], b["images"][4:])
    # the shifted domain: inverted (dark strokes on white) with noise
    clean = images.examples(_cfg(stream="0,1;2,3", task=1), "train").images
    shifted = images.examples(c, "train").images
    assert clean.mean() < 0.4 < 0.6 < shifted.mean()


@pytest.mark.parametrize("spec,message", [
    ("0,1;1,2", "task 1: class 1 overlaps with task 0"),
    ("0,1;;2", "task 1 is empty"),
    ("0,1;@invert", "task 1 is empty"),
    ("0,1;2@blur", "unknown domain 'blur'"),
    ("0,1;12", "class 12 is outside the source's classes"),
    ("0,x", "'x' is not a class id"),
    ("", "stream spec is empty"),
])
def test_bad_stream_spec_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        images.parse_stream(spec, 10)


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="pip install tensorflow-datasets")
    c = _cfg(source="tfds", tfds_name="mnist", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not prepared .* never downloads"):
        images.load_source(c)


class _FixedLogits(nnx.Module):
    def __init__(self, logits):
        self.logits = nnx.Param(jnp.asarray(logits))

    def __call__(self, x):
        return jnp.broadcast_to(self.logits[...], (x.shape[0], self.logits.shape[-1])), {}


def test_masked_old_classes_never_win_and_get_no_gradient():
    # classes 0-1 are old (masked) and carry the largest logits; 2-3 are the current task's
    logits = np.array([50.0, 40.0, 1.0, 2.0, 30.0], np.float32)
    batch = {"images": np.zeros((2, 4, 4, 1), np.float32), "labels": np.array([2, 3], np.int32),
             "weights": np.ones(2, np.float32), "task_onehot": np.ones((2, 1), np.float32),
             "logit_mask": np.array([[False, False, True, True, False]] * 2)}
    task = ClassifyTask()
    model = _FixedLogits(logits)
    loss, m = task.loss_fn(model, batch, None)
    assert float(m["accuracy"]) == 0.5                               # argmax is class 3 for both rows
    grads = nnx.grad(lambda mdl: task.loss_fn(mdl, batch, None)[0])(model)
    g = np.asarray(grads.logits[...])
    assert np.all(g[[0, 1, 4]] == 0.0) and np.all(g[[2, 3]] != 0.0)
    ce = -np.log(np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum())     # CE over the two allowed classes only
    np.testing.assert_allclose(float(loss), ce.mean(), rtol=1e-6)
    assert MASK < -1e29
