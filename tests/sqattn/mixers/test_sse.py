"""SSE mixer: recurrent == mask == sorted (forward and parameter gradients), decode == parallel,
packed documents isolated, unselected partitions untouched by a token, the balance loss, the LM.

Every form of a case is compiled once (module-scoped fixture); the other tests reuse its outputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn.mixers.gla import GLA
from sqattn.mixers.sse import SSE
from sqattn.models.lm import LM
from tests.testing import assert_close

D, T_A, T_B = 32, 13, 11
FORMS = ("recurrent", "mask", "sorted")


@dataclasses.dataclass(frozen=True)
class Case:
    partitions: int
    top_k: int
    length: int
    short_conv: bool
    tie: tuple[int, int] | None  # router column (dst, src): dst copies src, so they always tie
    chunk: int
    impl: str  # of the ops under the mask and sorted forms


CASES = {
    "n3k2-conv": Case(3, 2, T_A, True, None, 8, "chunked"),
    "n4k1-ties": Case(4, 1, T_B, False, (3, 1), 16, "ref"),  # ref: cheaper to compile
}
DOC_A = 5  # row 0 packs [doc a (5 tokens), doc b]; row 1 = doc b alone, row 2 = doc a alone


def _mixer(case: Case, form: str) -> SSE:
    m = SSE(D, rngs=nnx.Rngs(0), num_heads=2, num_partitions=case.partitions, top_k=case.top_k,
            form=form, chunk_size=case.chunk, impl=case.impl, short_conv=case.short_conv)
    if case.tie is not None:
        dst, src = case.tie
        kernel = m.router.kernel[...]
        m.router.kernel[...] = kernel.at[:, dst].set(kernel[:, src])
    return m


def _batch(case: Case):
    """x [3, T, D] and segment ids: row 0 = [a, b] packed, row 1 = [b, junk], row 2 = [a, junk]
    (rows 1 and 2 are single documents; causality makes the junk irrelevant to a and b)."""
    t = case.length
    r = jax.random.split(jax.random.key(1), 3)
    a = jax.random.normal(r[0], (DOC_A, D))
    b = jax.random.normal(r[1], (t - DOC_A, D))
    junk = jax.random.normal(r[2], (t, D))
    x = jnp.stack([jnp.concatenate([a, b]), jnp.concatenate([b, junk[:DOC_A]]),
                   jnp.concatenate([a, junk[:t - DOC_A]])])  # [3, t, D]
    seg = jnp.asarray([[0] * DOC_A + [1] * (t - DOC_A), [0] * t, [0] * t], jnp.int32)
    return x, seg


@nnx.jit
def _forward_and_grads(mixer, x, seg):
    def loss(m):
        y = m(x, segment_ids=seg)
        return jnp.sum(jnp.sin(y)), y
    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(mixer)
    return y, grads


def _sown(mixer) -> dict:
    """Pops the intermediates the last call sowed (so later calls see the same state structure)."""
    return {k: v[0] for k, v in nnx.to_pure_dict(nnx.pop(mixer, nnx.Intermediate)).items()}


@pytest.fixture(scope="module")
def results():
    out = {}
    for name, case in CASES.items():
        x, seg = _batch(case)
        for form in FORMS:
            m = _mixer(case, form)
            y, grads = _forward_and_grads(m, x, seg)
            out[name, form] = dict(y=y, grads=jax.tree.leaves(nnx.to_pure_dict(grads)),
                                   sown=_sown(m), mixer=m, x=x, seg=seg)
    return out


@pytest.mark.parametrize("name", CASES)
def test_forms_agree_forward_and_grads(results, name):
    ref = results[name, "recurrent"]
    for form in ("mask", "sorted"):
        got = results[name, form]
        assert_close(got["y"], ref["y"], jnp.float32, f"{form} y")
        assert len(got["grads"]) == len(ref["grads"])
        for i, (a, b) in enumerate(zip(got["grads"], ref["grads"])):
            assert_close(a, b, jnp.float32, f"{form} grad {i}")
        assert_close(got["sown"]["aux_loss"], ref["sown"]["aux_loss"], jnp.float32, "aux")
    # Every parameter gets a gradient (router through e on q and k; deltas; both gates).
    assert all(float(jnp.abs(g).max()) > 0 for g in ref["grads"])


@pytest.mark.parametrize("name", CASES)
def test_packed_documents_are_isolated(results, name):
    for form in FORMS:
        y = results[name, form]["y"]
        assert_close(y[0, :DOC_A], y[2, :DOC_A], jnp.float32, f"{form} doc a")
        assert_close(y[0, DOC_A:], y[1, :-DOC_A], jnp.float32, f"{form} doc b")


@nnx.jit
def _step(mixer, x_t, cache):
    return mixer.step(x_t, cache)


def test_decode_equals_parallel(results):
    """Rows 1 and 2 hold one document each: step-by-step decoding from ``init_cache`` reproduces
    the parallel form, so decoding selects the same partitions."""
    res = results["n3k2-conv", "mask"]
    m, x = res["mixer"], res["x"]
    cache, ys = m.init_cache(x.shape[0], x.shape[1]), []
    for t in range(x.shape[1]):
        y_t, cache = _step(m, x[:, t], cache)
        ys.append(y_t)
    assert_close(jnp.stack(ys, 1)[1:], res["y"][1:], jnp.float32, "decode vs parallel")


def _numpy_routing(mixer: SSE, x) -> tuple[np.ndarray, np.ndarray]:
    """Router probabilities and top-K mask by hand (float64; stable sort = lowest index on ties)."""
    logits = np.asarray(x, np.float64) @ np.asarray(mixer.router.kernel[...], np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    e /= e.sum(-1, keepdims=True)
    order = np.argsort(-e, axis=-1, kind="stable")[..., :mixer.top_k]
    mask = np.zeros(e.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return e, mask


@pytest.mark.parametrize("name", CASES)
def test_balance_loss_by_hand(results, name):
    res = results[name, "mask"]
    m = res["mixer"]
    e, mask = _numpy_routing(m, res["x"])
    n, k = m.num_partitions, m.top_k
    p, f = e.reshape(-1, n).mean(0), mask.reshape(-1, n).mean(0)
    expected = 0.01 * (n / k) * np.sum(p * f)
    np.testing.assert_allclose(res["sown"]["aux_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(res["sown"]["partition_prob"], p, rtol=1e-5)
    np.testing.assert_allclose(res["sown"]["partition_usage"], f, rtol=1e-6)
    if CASES[name].tie is not None:  # the copied column always ties with a lower index: never used
        assert res["sown"]["partition_usage"][CASES[name].tie[0]] == 0.0


def test_unselected_partitions_keep_their_state(results):
    """One decoding step from a random cache: exactly the selected partitions (and the shared
    state) change; the others neither decay nor receive a write."""
    m = results["n3k2-conv", "mask"]["mixer"]
    b = 3  # the batch of test_decode_equals_parallel: same compiled step
    r = jax.random.split(jax.random.key(7), 4)
    cache = m.init_cache(b, 16)
    cache = dict(cache, shared=jax.random.normal(r[0], cache["shared"].shape),
                 sparse=jax.random.normal(r[1], cache["sparse"].shape))
    x_t = jax.random.normal(r[2], (b, D))
    _, new = _step(m, x_t, cache)
    _, mask = _numpy_routing(m, x_t)
    old_s, new_s = np.asarray(cache["sparse"]), np.asarray(new["sparse"])
    assert mask.sum() == b * m.top_k and (~mask).any()
    np.testing.assert_array_equal(new_s[~mask], old_s[~mask])
    changed = np.abs(new_s - old_s).reshape(b, m.num_partitions, -1).max(-1) > 0  # [b, n]
    np.testing.assert_array_equal(changed, mask)
    assert np.abs(np.asarray(new["shared"]) - np.asarray(cache["shared"])).min() > 0


def test_registered_in_lm():
    lm = LM(vocab_size=32, d_model=D, num_layers=2, block_pattern="SA", mlp_dim=64,
            mixers={"sse": dict(num_heads=2, num_partitions=4, top_k=1, chunk_size=8),
                    "attention": dict(num_heads=2)}, rngs=nnx.Rngs(0))
    assert isinstance(lm.blocks[0].mixer, SSE) and lm.blocks[0].mixer.top_k == 1
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
    logits, aux = nnx.jit(lambda model, t: model(t))(lm, tokens)
    assert logits.shape == (2, 9, 32) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(aux["aux_loss"]) > 0.0
    # n4k1 balance loss is 0.01 * 4 * sum p_i f_i, which is 0.01 when routing is uniform and at
    # most 0.04 when it collapses onto one partition.
    assert 0.0 < float(aux["aux_loss"]) <= 0.04 + 1e-6


def test_flops_and_config_errors():
    sse = SSE(D, rngs=nnx.Rngs(0), num_heads=2, num_partitions=4, top_k=2, chunk_size=8)
    gla = GLA(D, rngs=nnx.Rngs(0), num_heads=2, chunk_size=8)
    assert sse.extra_flops_per_token(64) == 3 * gla.extra_flops_per_token(64)
    with pytest.raises(ValueError, match="unknown form 'dense'"):
        SSE(D, rngs=nnx.Rngs(0), form="dense")
    with pytest.raises(ValueError, match="need 1 <= top_k <= num_partitions"):
        SSE(D, rngs=nnx.Rngs(0), num_partitions=2, top_k=3)


def test_sse_h_2b_layout():
    """The registered 2B hybrid: 18 layers with attention at layers 6, 12, 18, ~2e9 parameters
    (abstract build, nothing allocated); ``runlocal`` keeps one period of the same pattern."""
    from sqattn import configs
    from sqattn.models.lm import expand_pattern
    from sqattn.train.dryrun import dry_run
    cfg = configs.get("sse_h_2b")
    pattern = expand_pattern(cfg.model.block_pattern, cfg.model.num_layers)
    assert [i + 1 for i, c in enumerate(pattern) if c == "A"] == [6, 12, 18]
    assert (cfg.model.mixers.sse.num_partitions, cfg.model.mixers.sse.top_k) == (4, 1)
    assert 1.7e9 <= dry_run(cfg, check_devices=False)["params"] <= 2.3e9
    small = configs.get("sse_h_2b:runlocal").model
    assert expand_pattern(small.block_pattern, small.num_layers) == "SSSSSA"


@pytest.mark.parametrize("placement", ["shared", "both"])
def test_short_conv_placement(placement):
    """The authors' placement (fla's SSE layer): the conv feeds only the shared branch, and the sparse branch
    adds its low-rank delta to the raw projection; "both" convolves before the delta. No conv bias by default."""
    m = SSE(16, rngs=nnx.Rngs(3), num_heads=2, num_partitions=3, top_k=1, short_conv=True,
            conv_placement=placement, chunk_size=4, impl="ref")
    assert m.conv_q.bias is None and m.conv_k.bias is None
    x = jax.random.normal(jax.random.key(4), (2, 7, 16))
    q_raw, k_raw = m.q(x), m.k(x)
    q_conv, k_conv = m.conv_q(q_raw), m.conv_k(k_raw)
    f = m._features(x, q_conv, k_conv, q_raw, k_raw)
    heads = lambda y: y.reshape(2, 7, 2, 8)  # noqa: E731
    base_q, base_k = (q_raw, k_raw) if placement == "shared" else (q_conv, k_conv)
    np.testing.assert_array_equal(f["q1"], heads(m.query_map(q_conv)))
    np.testing.assert_array_equal(f["k1"], m.key_map(heads(k_conv)))
    np.testing.assert_array_equal(f["q2"], heads(m.query_map(base_q + m.q_delta(x))))
    np.testing.assert_array_equal(f["k2"], m.key_map(heads(base_k + m.k_delta(x))))
    assert float(jnp.max(jnp.abs(q_conv - q_raw))) > 1e-2      # the two placements do differ
    with pytest.raises(ValueError, match="conv_placement"):
        SSE(16, rngs=nnx.Rngs(0), short_conv=True, conv_placement="before")
