"""CTR models: cross layers against hand-computed values, the FCN layout, Tri-BCE against its formula, parameter
counts against the FCN paper, and the histogram AUC against sklearn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn import models
from sqattn.models import ctr
from sqattn.train import ctr_task


def _a(x):
    return jnp.asarray(x, jnp.float32)


def _close(got, want, rel=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def test_cross_vector_by_hand():
    # x.w = 3*0.5 + 4*(-1) = -2.5 ; x0*(-2.5) + b + x = [-2.5+0.1+3, -5+0.2+4]
    out = ctr.cross_vector(_a([1, 2]), _a([3, 4]), _a([0.5, -1]), _a([0.1, 0.2]))
    _close(out, [0.6, -0.8])


def test_cross_matrix_by_hand():
    # x W = [3*1 + 4*0, 3*2 + 4*(-1)] = [3, 2] ; + b = [3.1, 2.2] ; * x0 = [3.1, 4.4] ; + x
    out = ctr.cross_matrix(_a([1, 2]), _a([3, 4]), _a([[1, 2], [0, -1]]), _a([0.1, 0.2]))
    _close(out, [6.1, 8.4])


def test_cross_mix_by_hand():
    # one expert, rank 1: v^T x = 0.25 -> tanh -> * c=2 -> tanh -> u = [1, -1] -> * x0 -> + x
    t = np.tanh(2 * np.tanh(0.25))
    out = ctr.cross_mix(_a([1, 2]), _a([0.5, -0.25]), _a([[[1], [-1]]]), _a([[[1], [1]]]), _a([[[2]]]),
                        _a([[0.3], [0.7]]), _a([0, 0]))
    _close(out, [t + 0.5, -2 * t - 0.25])


def test_cross_mix_gating_weights_experts():
    # two experts; the gate logits x.g_k = [0.5*1, 0.5*(-1)] -> softmax weights [e/(e+1/e)..]
    x0, x = np.array([1.0, 2.0]), np.array([0.5, 0.0])
    u = np.array([[[1.0], [0.0]], [[0.0], [1.0]]])
    v = np.array([[[1.0], [0.0]], [[1.0], [0.0]]])
    c = np.array([[[1.0]], [[1.0]]])
    g = np.array([[1.0, -1.0], [0.0, 0.0]])
    t = np.tanh(np.tanh(0.5))
    e1, e2 = x0 * np.array([t, 0.0]), x0 * np.array([0.0, t])
    w = np.exp([0.5, -0.5]) / np.exp([0.5, -0.5]).sum()
    out = ctr.cross_mix(_a(x0), _a(x), _a(u), _a(v), _a(c), _a(g), _a([0, 0]))
    _close(out, w[0] * e1 + w[1] * e2 + x)


@pytest.mark.parametrize("aggregation,want", [
    # h = x W = [1+3, 2+4] = [4, 6]; b = [0, 1, 0, 1]; anchor = [1, 1, 2, 2]; out = anchor * (c + b) + x
    ("affine", [5, 9, 21, 10]),                    # c = [4, 6, 2*4+1, 0.5*6-1] = [4, 6, 9, 2]
    ("mask", [5, 9, 3, 4 + 2 * (6 / np.sqrt(1 + 1e-5) + 1)]),  # c = [4, 6, 4*0, 6*relu(1/sqrt(1+eps))]
    ("ln", [5, 9, 3 + 2 * (-1 / np.sqrt(1 + 1e-5)), 4 + 2 * (1 / np.sqrt(1 + 1e-5) + 1)]),  # LN(h)=[-1,1]/s
])
def test_fcn_cross_by_hand(aggregation, want):
    w = _a([[1, 0], [0, 1], [1, 0], [0, 1]])
    scale, bias = (_a([2, 0.5]), _a([1, -1])) if aggregation == "affine" else (_a([1, 1]), _a([0, 0]))
    out = ctr.fcn_cross(_a([1, 1, 2, 2]), _a([1, 2, 3, 4]), w, _a([0, 1, 0, 1]), aggregation, scale, bias)
    _close(out, want)


def test_fcn_cross_full_by_hand():
    # W = I: h = x = [1, 2, 3, 4]; + b = [1, 3, 3, 5]; * anchor = [1, 3, 6, 10]; + x
    out = ctr.fcn_cross(_a([1, 1, 2, 2]), _a([1, 2, 3, 4]), jnp.eye(4), _a([0, 1, 0, 1]), "full")
    _close(out, [2, 5, 9, 14])


def test_fcn_cross_rejects_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown FCN aggregation 'bogus'"):
        ctr.fcn_cross(_a([1, 1]), _a([1, 1]), _a([[1], [1]]), _a([0, 0]), "bogus")


def test_head_split_layout():
    e = jnp.arange(16, dtype=jnp.float32).reshape(1, 2, 8)     # 2 fields, 2 heads x E=4
    out = ctr.head_split_layout(e, 2)
    np.testing.assert_array_equal(out[0], [[0, 1, 8, 9, 2, 3, 10, 11], [4, 5, 12, 13, 6, 7, 14, 15]])


def test_ecn_doubles_and_lcn_keeps_the_anchor():
    """CrossStack = the cross layers composed with anchor x (ECN) or x1 (LCN), then the head, head-mean."""
    rngs = nnx.Rngs(params=0)
    x1 = jax.random.normal(jax.random.key(1), (3, 2, 8))
    for exponential in (True, False):
        s = ctr.CrossStack(8, 3, exponential=exponential, aggregation="mask", dropout=0.0, rngs=rngs)
        x = x1
        for i in range(3):
            x = ctr.fcn_cross(x if exponential else x1, x, s.w[i], s.b[i], "mask", s.ln_scale[i], s.ln_bias[i])
        want = jnp.mean((x @ s.head.kernel[...])[..., 0] + s.head.bias[0], axis=-1)
        _close(s(x1), want, rel=1e-5)


def test_ecn_order_doubles_per_layer():
    """With the affine aggregation every layer is polynomial: along an input scaled by t, the output of L
    ECN layers is a polynomial in t of degree 2^L, that of L LCN layers of degree L + 1."""
    d, layers = 4, 2
    x1 = jnp.ones((1, 1, d))
    for exponential, degree in ((True, 2 ** layers), (False, layers + 1)):
        s = ctr.CrossStack(d, layers, exponential=exponential, aggregation="affine", dropout=0.0,
                           rngs=nnx.Rngs(params=0))
        ts = np.linspace(0.5, 4.0, 12)
        ys = np.asarray(jax.jit(lambda x: s(x))(x1 * jnp.asarray(ts, jnp.float32)[:, None, None]), np.float64)
        # float32 evaluation: fit noise ~1e-6 relative; the separation asked for is 1e-4 either way
        fit = np.polyfit(ts, ys, degree + 1)
        assert abs(fit[0]) < 1e-4 * np.abs(fit).max()          # no term above the expected degree
        low = np.polyfit(ts, ys, degree - 1)
        assert np.max(np.abs(np.polyval(low, ts) - ys)) > 1e-4 * np.max(np.abs(ys))   # degree - 1 is not enough


def _bce(z, y):
    p = 1 / (1 + np.exp(-z))
    return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))


@pytest.mark.parametrize("stop_grad", [False, True])
def test_tri_bce_formula_and_gradient(stop_grad):
    y = np.array([1.0, 0.0, 1.0, 0.0])
    z = np.array([1.0, -1.0, 0.5, -0.2])              # fused
    ze = np.array([0.1, 0.3, -0.2, 0.4])              # a worse ECN branch: gets extra weight
    zl = np.array([2.0, -2.0, 1.5, -1.0])             # a better LCN branch: weight relu(<0) = 0
    lf, le, ll = _bce(z, y), _bce(ze, y), _bce(zl, y)
    assert le > lf > ll
    loss, m = ctr.tri_bce({"logit": _a(z), "logit_exp": _a(ze), "logit_lin": _a(zl)}, _a(y), stop_grad=stop_grad)
    _close(loss, lf + (le - lf) * le)
    _close(m["bce_exp"], le)
    # d/dze of L + (LE - L) LE is (2 LE - L) dLE/dze undetached, (LE - L) dLE/dze detached; dLE/dze = (p - y)/B
    g = jax.grad(lambda e: ctr.tri_bce({"logit": _a(z), "logit_exp": e, "logit_lin": _a(zl)}, _a(y),
                                       stop_grad=stop_grad)[0])(_a(ze))
    dle = (1 / (1 + np.exp(-ze)) - y) / 4
    _close(g, ((le - lf) if stop_grad else (2 * le - lf)) * dle, rel=1e-4)
    # plain BCE when disabled, and a single branch reduces to its own BCE
    _close(ctr.tri_bce({"logit": _a(z), "logit_exp": _a(ze), "logit_lin": _a(zl)}, _a(y), enabled=False)[0], lf)
    _close(ctr.tri_bce({"logit": _a(ze), "logit_exp": _a(ze)}, _a(y))[0], le)


def test_fcn_parameter_count_matches_the_paper():
    """Criteo: F = 39, E = 16 -> D = 624; ECN 4 layers ~0.78M, FCN (3 + 4) ~1.37M non-embedding params."""
    vocab = [10] * 39

    def count(**kw):
        return ctr.non_embedding_params(nnx.eval_shape(lambda: ctr.FCN(vocab, rngs=nnx.Rngs(params=0), **kw)))
    d = 39 * 16
    layer = d * d // 2 + d + d                   # W [D, D/2], bias [D], LayerNorm scale + bias [D/2] each
    ecn4, fcn = count(num_exp_layers=4, num_lin_layers=0), count(num_exp_layers=3, num_lin_layers=4)
    assert ecn4 == 4 * layer + (d + 1) and fcn == 7 * layer + 2 * (d + 1)
    assert abs(ecn4 - 0.78e6) < 0.01e6 and abs(fcn - 1.37e6) < 0.01e6
    full = count(num_exp_layers=3, num_lin_layers=4, aggregation="full")
    assert full == 7 * (d * d + d) + 2 * (d + 1)            # the Self-Mask ablation: W [D, D], no LayerNorm


@pytest.mark.parametrize("name,kw", [
    # (dnn, dcnv1, dcnv2, dcnmix, ecn and fcn also train one step as registered configs in test_train)
    ("ctr_lr", {}),
    ("dcn", dict(embed_dim=4, cross="matrix", num_cross=1, hidden=(8,))),
    ("fcn", dict(embed_dim=4, num_heads=2, num_exp_layers=1, num_lin_layers=1, aggregation="mask",
                 exp_dropout=0.1)),
    ("fcn", dict(embed_dim=4, num_exp_layers=0, num_lin_layers=1, aggregation="full")),
])
def test_every_model_runs_and_learns_a_step(name, kw):
    """Registered models: finite logits [B] with dropout on and off, and one gradient step on a batch lowers
    its loss. (Built and run under jit: eager initialisation costs one dispatch per op.)"""
    vocab = [5, 7, 3]

    def make():
        return models.build(name, dict(vocab_sizes=vocab, emb_l2=1e-5, **kw), nnx.Rngs(params=0))
    graphdef, _ = nnx.split(nnx.eval_shape(make), nnx.Param)
    ids = jax.random.randint(jax.random.key(0), (32, 3), 0, 3)
    y = (ids[:, 0] > 1).astype(jnp.float32)

    def loss(p):
        m = nnx.merge(graphdef, p)
        return m.objective(m(ids), y)[0]

    @jax.jit
    def run():
        p = nnx.split(make(), nnx.Param)[1]
        m = nnx.merge(graphdef, p)
        logits = (m(ids, rng=jax.random.key(1))["logit"], m(ids)["logit"])
        l0, g = jax.value_and_grad(loss)(p)
        gn = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
        return logits, l0, loss(jax.tree.map(lambda a, d: a - 1e-3 * d / gn, p, g))
    logits, l0, l1 = run()
    for z in logits:
        assert z.shape == (32,) and bool(jnp.all(jnp.isfinite(z)))
    assert float(l1) < float(l0)


def test_bad_model_arguments_are_rejected():
    with pytest.raises(ValueError, match="even embed_dim"):
        ctr.FCN([3, 4], embed_dim=5, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="cross must be"):
        ctr.DCN([3, 4], cross="diag", rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="vocab_sizes"):
        ctr.LR([], rngs=nnx.Rngs(params=0))


# ------------------------------------------------------------------------------------------- AUC
def test_histogram_auc_matches_sklearn_on_random_scores():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    n = 20_000
    y = (rng.random(n) < 0.2).astype(np.float32)
    z = (rng.normal(size=n) * 2 + y * 0.8).astype(np.float32)
    hist = jax.jit(ctr_task.score_histograms)
    pos, neg = hist(jnp.asarray(z), jnp.asarray(y), jnp.ones(n))
    auc, bound = ctr_task.auc_from_histograms(np.asarray(pos), np.asarray(neg))
    exact = roc_auc_score(y, z)
    assert abs(auc - exact) <= bound + 1e-12
    assert bound < 2e-4 and abs(auc - exact) / exact < 1e-4
    # summing the histograms of batches (what the trainer does) gives the same AUC as the whole split
    parts = [hist(jnp.asarray(z[i:i + 4000]), jnp.asarray(y[i:i + 4000]), jnp.ones(4000))
             for i in range(0, n, 4000)]
    p2 = sum(np.asarray(p) for p, _ in parts)
    n2 = sum(np.asarray(q) for _, q in parts)
    np.testing.assert_array_equal(p2, np.asarray(pos))
    assert ctr_task.auc_from_histograms(p2, n2)[0] == auc


def test_histogram_auc_is_exact_on_distinct_bins_and_ties():
    from sklearn.metrics import roc_auc_score
    z = np.array([-3.0, -1.0, 0.0, 0.0, 2.0, 5.0], np.float32)   # a genuine tie at 0 counts 1/2 in both
    y = np.array([0, 1, 0, 1, 0, 1], np.float32)
    w = np.array([1, 1, 1, 1, 1, 1], np.float32)
    hist = jax.jit(ctr_task.score_histograms)
    pos, neg = hist(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w))
    auc, _ = ctr_task.auc_from_histograms(np.asarray(pos), np.asarray(neg))
    assert auc == pytest.approx(roc_auc_score(y, z), rel=1e-12)
    # zero-weight (padding) rows do not count
    pos2, neg2 = hist(jnp.asarray(np.r_[z, 9.0]), jnp.asarray(np.r_[y, 0.0]),
                                           jnp.asarray(np.r_[w, 0.0]))
    assert ctr_task.auc_from_histograms(np.asarray(pos2), np.asarray(neg2))[0] == auc
