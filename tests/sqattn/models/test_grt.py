"""sqattn.models.grt: patches, the SSIM gate, K-frames, JSD merging, the bucketed encoder, reconstruction."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage
from scipy.spatial import distance

from sqattn.models import grt


def _texture(seed, size=64):
    rng = np.random.default_rng(seed)
    t = ndimage.zoom(rng.normal(0, 0.2, (8, 8, 3)), (size / 8, size / 8, 1), order=1) + 0.5
    return np.clip(t + rng.normal(0, 0.05, (size, size, 3)), 0, 1).astype(np.float32)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ssim_numpy(a, b, data_range=1.0):
    """Plain numpy SSIM of one patch pair (global window, population moments), averaged over channels."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64).ravel(), b[..., ch].astype(np.float64).ravel()
        mx, my = x.mean(), y.mean()
        vx, vy, cxy = ((x - mx) ** 2).mean(), ((y - my) ** 2).mean(), ((x - mx) * (y - my)).mean()
        out.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(out))


def _random_pairs(seed, h, w):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, (3, h, w, 3)).astype(np.float32)
    mix = np.array([0.0, 0.3, 0.9], np.float32)[:, None, None, None]    # from identical-ish to unrelated
    b = np.clip((1 - mix) * a + mix * rng.uniform(0, 1, a.shape) + rng.normal(0, 0.02, a.shape), 0, 1)
    return a, b.astype(np.float32)


def test_patchify_roundtrip_and_order():
    x = jnp.arange(2 * 16 * 24 * 3, dtype=jnp.float32).reshape(2, 16, 24, 3)
    p = grt.patchify(x, 8)
    assert p.shape == (2, 6, 192)
    np.testing.assert_array_equal(p[1, 4].reshape(8, 8, 3), x[1, 8:16, 8:16])         # patch 4 = row 1, col 1
    np.testing.assert_array_equal(grt.unpatchify(p, 8, 16, 24), x)
    with pytest.raises(ValueError, match="not divisible"):
        grt.patchify(x, 5)


def test_ssim_matches_numpy_reference_on_random_patches():
    a, b = _random_pairs(0, 16, 24)                                   # p = 8: 2 x 3 patches per frame
    got = np.asarray(grt.patch_ssim(a, b, 8))                         # [3, 6]
    pa, pb = np.asarray(grt.patchify(a, 8)), np.asarray(grt.patchify(b, 8))
    ref = np.array([[_ssim_numpy(pa[t, j].reshape(8, 8, 3), pb[t, j].reshape(8, 8, 3)) for j in range(6)]
                    for t in range(3)])
    assert ref.min() < 0.2 and ref.max() > 0.9                        # the pairs span the range
    assert _rel_err(got, ref) < 1e-5
    np.testing.assert_allclose(np.asarray(grt.patch_ssim(a, a, 8)), 1.0, rtol=1e-6)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="pip install scikit-image")
    a, b = _random_pairs(1, 14, 21)                                   # odd patch side p = 7 (skimage's window is odd)
    got = np.asarray(grt.patch_ssim(a, b, 7, data_range=1.0))         # [3, 6]
    pa, pb = np.asarray(grt.patchify(a, 7)), np.asarray(grt.patchify(b, 7))
    ref = np.array([[metrics.structural_similarity(
        pa[t, j].reshape(7, 7, 3).astype(np.float64), pb[t, j].reshape(7, 7, 3).astype(np.float64), win_size=7,
        data_range=1.0, channel_axis=-1, use_sample_covariance=False, gaussian_weights=False)
        for j in range(6)] for t in range(3)])
    assert ref.min() < 0.2 and ref.max() > 0.9
    assert _rel_err(got, ref) < 1e-5


def test_identical_frames_gate_no_patch():
    frames = np.stack([_texture(0)] * 5)
    for ref in grt.REFERENCES:
        plan = grt.grt_plan(frames, grt.GRTConfig(reference=ref, tau=0.999))
        assert plan.is_key.tolist() == [True, False, False, False, False]
        assert not plan.gate[1:].any() and plan.gate[0].all()
        assert plan.tokens == 64


def test_moved_sprite_gates_exactly_the_patches_it_touched():
    bg = _texture(1)
    for (y, x), (dy, dx) in [((13, 21), (3, 5)), ((30, 7), (1, 0)), ((40, 40), (-6, 2))]:
        f0, f1 = bg.copy(), bg.copy()
        f0[y:y + 8, x:x + 8] = (1.0, 1.0, 0.1)
        f1[y + dy:y + dy + 8, x + dx:x + dx + 8] = (1.0, 1.0, 0.1)
        changed = np.zeros((64, 64), bool)
        changed[y:y + 8, x:x + 8] = True
        changed[y + dy:y + dy + 8, x + dx:x + dx + 8] ^= True           # symmetric difference of the two squares
        expect = np.asarray(grt.patchify(changed[..., None], 8)).any(-1)   # [64]
        assert 2 <= expect.sum() <= 8
        for ref in grt.REFERENCES:
            plan = grt.grt_plan(np.stack([f0, f1]), grt.GRTConfig(reference=ref))
            np.testing.assert_array_equal(plan.gate[1], expect)


def test_key_frame_rule_and_scene_cut():
    a, b = _texture(2), _texture(3)
    frames = np.stack([a] * 4 + [b] * 6)
    plan = grt.grt_plan(frames, grt.GRTConfig(k_every=3))
    assert np.flatnonzero(plan.scene_start).tolist() == [0, 4]
    assert np.flatnonzero(plan.is_key).tolist() == [0, 3, 4, 7]
    assert plan.tokens == 4 * 64
    cut = np.zeros(10, bool)
    cut[5] = True
    is_key, start = grt.key_frames(cut, 2)
    assert np.flatnonzero(is_key).tolist() == [0, 2, 4, 5, 7, 9] and np.flatnonzero(start).tolist() == [0, 5]


def test_slow_drift_previous_misses_it_decoded_refreshes_kframe_resends():
    """The note's reference-frame pitfall: the right half blends 3%/frame towards another texture."""
    a, b = _texture(10), _texture(11)
    right = (np.arange(64) >= 32)[None, :, None]
    frames = np.stack([np.where(right, (1 - 0.03 * t) * a + 0.03 * t * b, a) for t in range(20)]).astype(np.float32)
    plans = {ref: grt.grt_plan(frames, grt.GRTConfig(reference=ref, k_every=100)) for ref in grt.REFERENCES}
    assert plans["previous"].gate[1:].sum() == 0                      # every step is small: drift never fires
    assert 0 < plans["decoded"].gate[1:].sum() < plans["kframe"].gate[1:].sum()
    for plan in plans.values():
        assert not plan.gate[1:, :].reshape(19, 8, 8)[:, :, :4].any()    # the static left half is never re-sent
    err = {ref: np.abs(grt.reconstruct(frames, p, 8)[-1] - frames[-1]).mean() for ref, p in plans.items()}
    assert err["decoded"] < 0.25 * err["previous"]


def test_jensen_shannon_properties():
    rng = np.random.default_rng(0)
    p, q = rng.uniform(0, 1, (5, 12)), rng.uniform(0, 1, (5, 12))
    q[:, :3] = 0.0                                                    # zeros in the support
    pq, qp = np.asarray(grt.jensen_shannon(p, q)), np.asarray(grt.jensen_shannon(q, p))
    np.testing.assert_allclose(pq, qp, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grt.jensen_shannon(p, p)), 0.0, atol=1e-7)
    assert np.all(pq > 0) and np.all(pq <= math.log(2))
    ref = np.array([distance.jensenshannon(p[i], q[i]) ** 2 for i in range(5)])   # scipy: sqrt of JSD, nats
    assert _rel_err(pq, ref) < 1e-5
    disjoint = np.asarray(grt.jensen_shannon(np.array([1.0, 1, 0, 0]), np.array([0.0, 0, 2, 1])))
    np.testing.assert_allclose(disjoint, math.log(2), rtol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        grt.jensen_shannon(np.array([1.0, -1.0]), np.array([1.0, 1.0]))


def test_scene_merge_by_colour_histogram():
    a, b = _texture(5), np.clip(_texture(6)[..., ::-1] * 0.6, 0, 1)
    a2 = a.copy()
    a2[10:18, 10:18] = 1.0                                            # scene 3 = scene 1 plus a sprite
    frames = np.stack([a, a, b, b, a2, a2])
    cfg = grt.GRTConfig(merge=True, merge_delta=0.05)
    plan = grt.grt_plan(frames, cfg)
    assert np.flatnonzero(plan.scene_start).tolist() == [0, 2, 4]
    assert plan.jsd[0, 2] < 0.05 < plan.jsd[0, 1]
    assert plan.key_group.tolist() == [0, -1, -1, -1, 0, -1]
    assert plan.encoded == 3 * 64 and plan.tokens == 2 * 64           # scene 3's keys are not passed on again
    fused = grt.reconstruct(frames, plan, 8)
    np.testing.assert_allclose(fused[0], (a + a2) / 2, atol=1e-6)     # "mean" fusion of the group's keys


def test_dense_and_uniform_counts():
    assert grt.dense_plan(37, 64).tokens == 37 * 64
    uni = grt.uniform_plan(37, 64, budget=8)
    assert uni.tokens == 8 * 64 and uni.gate[0].all()
    assert grt.uniform_plan(5, 64, budget=8).tokens == 5 * 64


def test_reconstruction_psnr_and_recall():
    frames = np.stack([_texture(7)] * 2 + [_texture(8)] * 2)
    rec = grt.reconstruct(frames, grt.dense_plan(4, 64), 8)
    np.testing.assert_allclose(rec, frames, atol=1e-7)
    uni = grt.uniform_plan(4, 64, budget=1)                           # frame 0 held for every frame
    rec = grt.reconstruct(frames, uni, 8)
    np.testing.assert_allclose(rec[3], frames[0], atol=1e-7)
    native = (frames * 255).round().astype(np.uint8)
    assert grt.native_psnr(rec, np.array([0, 1, 2, 3]), native) < 30
    plan = grt.dense_plan(4, 64)
    plan.emitted[2:, 5] = False
    assert grt.change_recall(plan, np.arange(4.0), np.array([0.5, 1.5, 2.5]), np.array([5])) == pytest.approx(1 / 3)
    assert grt.patches_touching((57, 62, 26, 29), 8, 64).tolist() == [59]
    assert grt.patches_touching((6, 10, 6, 10), 8, 64).tolist() == [0, 1, 8, 9]


def _encoder(n=16, p=4):
    return grt.GRTEncoder(patch_dim=p * p * 3, num_patches=n, d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
                          time_embed=True, rngs=nnx.Rngs(0))


def test_encoder_padding_and_order_invariance():
    model = jax.jit(_encoder())                                       # one compile per shape, not one per op
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (1, 3, 48)).astype(np.float32)           # shapes [1, 3] and [1, 16]: as the test below
    pos = np.array([[3, 0, 15]], np.int32)
    t = np.array([1.25], np.float32)
    y = model(x, pos, t, np.ones((1, 3), bool))
    pad = 13
    xp = np.concatenate([x, rng.uniform(0, 1, (1, pad, 48)).astype(np.float32)], 1)   # garbage in the padding
    yp = model(xp, np.concatenate([pos, np.zeros((1, pad), np.int32)], 1), t,
               np.arange(16)[None] < 3)
    assert _rel_err(yp[:, :3], y) < 1e-5 and float(jnp.abs(yp[:, 3:]).max()) == 0.0
    perm = np.array([2, 0, 1])
    yperm = model(x[:, perm], pos[:, perm], t, np.ones((1, 3), bool))
    assert _rel_err(yperm, y[:, perm]) < 1e-5                       # a set: permutation-equivariant
    other = model(x, pos, t + 1.0, np.ones((1, 3), bool))
    assert _rel_err(other, y) > 1e-3                                 # tokens carry their time


def test_bucketed_encoder_matches_per_frame_calls_and_limits_shapes(caplog):
    model = _encoder()
    enc = grt.BucketedEncoder(model, batch_rows=4)
    assert enc.buckets == (8, 16)
    rng = np.random.default_rng(1)
    patches = rng.uniform(0, 1, (7, 16, 48)).astype(np.float32)
    gate = rng.uniform(0, 1, (7, 16)) < np.array([0.1, 0.3, 0.9, 0.0, 1.0, 0.5, 0.2])[:, None]
    gate[3] = False
    times = np.arange(7) * 0.5
    with caplog.at_level("INFO"):
        out = enc.encode(patches, gate, times)
    assert out["tokens"].shape == (gate.sum(), 32)
    assert sorted(enc.compiled_shapes) == [(4, 8), (4, 16)]
    assert sum("new compiled shape" in r.message for r in caplog.records) == 2
    for t in range(7):
        idx = np.flatnonzero(gate[t])
        sel = out["frame"] == t
        np.testing.assert_array_equal(out["patch"][sel], idx)
        if t in (4, 6):                                               # one frame per bucket (eager calls are slow)
            ref = jax.jit(model)(patches[t, idx][None], idx[None].astype(np.int32), times[t:t + 1],
                        np.ones((1, len(idx)), bool))[0]
            assert _rel_err(out["tokens"][sel], ref) < 1e-5
    enc.encode(patches[:2], gate[:2], times[:2])
    assert len(enc.compiled_shapes) == 2                              # no new shapes
    means = grt.key_token_means(out, 7)
    assert means.shape == (7, 32) and np.all(means[3] == 0)
    with pytest.raises(ValueError, match="largest bucket"):
        grt.BucketedEncoder(model, buckets=(8,))
