"""HAMburger: decreasing_v2 segmentation, slot layout, compositional embedder, train/infer parity on a fixed
segmentation, no label leak, and generation against the base model's own greedy decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from sqattn import sample
from sqattn.models import hamburger as hb
from sqattn.models.lm import LM
from tests.testing import assert_close

S_MAX = 3
P = 4
LENS = [2, 1, 3, 3, 1]                          # response of 10 tokens; every group size occurs
N = P + sum(LENS)


@functools.lru_cache(maxsize=None)
def _model() -> hb.HAMburger:
    base = LM(vocab_size=32, d_model=32, num_layers=2, block_pattern="A", mlp_dim=64,
              mixers={"attention": {"num_heads": 2}}, rngs=nnx.Rngs(0))
    return hb.HAMburger(base, s_max=S_MAX, micro_layers=1, rngs=nnx.Rngs(1))


@jax.jit
def _forward(state, batch):
    model = nnx.merge(nnx.graphdef(_model()), state)
    return model(batch)


def forward(model, batch):
    return _forward(nnx.state(model), {k: jnp.asarray(v) for k, v in batch.items()})


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 32, N).astype(np.int32)


# ----------------------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("entropy,kw,expected", [
    # 0.01 < 0.05 (abs); 0.5, 0.1 < 0.3 * 2.0 (rel); then the group is full; 3.0, 1.0, 0.8 are informative
    ([2.0, 0.01, 0.5, 0.1, 0.02, 3.0, 1.0, 0.8], {}, [4, 1, 1, 1, 1]),
    ([2.0, 0.5, 0.55], {}, [3]),                          # relative to the group's max, not the last token
    ([1.0, 0.3], {}, [1, 1]),                             # 0.3 < 0.3 * 1.0 is false: strict
    ([1.0, 0.2999], {}, [2]),
    ([0.1, 0.05], {}, [1, 1]),                            # 0.05 < 0.05 is false: strict
    ([0.1, 0.0499], {}, [2]),
    ([0.0] * 5, {"s_max": 2}, [2, 2, 1]),                 # s_max respected
    ([0.0] * 9, {}, [4, 4, 1]),
    ([1.0, 0.5], {"rel_thresh": 0.6}, [2]),
    ([1.0, 0.1], {"abs_thresh": 0.2, "rel_thresh": 0.0}, [2]),
    ([], {}, []),
])
def test_segment_decreasing_v2(entropy, kw, expected):
    got = hb.segment_decreasing_v2(np.asarray(entropy), **kw)
    assert got.dtype == np.int32
    assert got.tolist() == expected


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=30), st.integers(1, 5))
def test_segment_partitions_and_each_group_starts_informative(entropy, s_max):
    lens = hb.segment_decreasing_v2(entropy, s_max=s_max)
    assert lens.sum() == len(entropy) and lens.min() >= 1 and lens.max() <= s_max
    start = 0
    for s in lens:                                        # every joiner passed a threshold when it joined
        for i in range(start + 1, start + s):
            group_max = max(entropy[start:i])
            assert entropy[i] < 0.05 or entropy[i] < 0.3 * group_max
        start += s


def test_slot_layout():
    toks = np.arange(10, 20)
    lay = hb.slot_layout(toks, 3, [2, 1, 4], s_max=4, num_slots=8)
    np.testing.assert_array_equal(lay["group_tokens"], [[10, 0, 0, 0], [11, 0, 0, 0], [12, 0, 0, 0],
                                                        [13, 14, 0, 0], [15, 0, 0, 0], [16, 17, 18, 19],
                                                        [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(lay["group_len"], [1, 1, 1, 2, 1, 4, 0, 0])
    np.testing.assert_array_equal(lay["slot_pos"], [0, 1, 2, 4, 5, 9, 10, 11])   # last token of each slot
    np.testing.assert_array_equal(lay["response"], [0, 0, 0, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="sum to"):
        hb.slot_layout(toks, 3, [2, 2], s_max=4)
    with pytest.raises(ValueError, match="num_slots"):
        hb.slot_layout(toks, 3, [2, 1, 4], s_max=4, num_slots=5)
    with pytest.raises(ValueError, match="lie in"):
        hb.slot_layout(toks, 2, [4, 4], s_max=3)


def test_micro_targets_shift_by_one_slot():
    lay = hb.layout_batch(_tokens()[None], P, [LENS], s_max=S_MAX, num_slots=N + 2)
    targets, mask, stop = hb.micro_targets(lay, S_MAX)
    # slot P-1 (last prompt token) predicts group 1, ..., slot P-2+K predicts group K; no other slot counts
    assert np.asarray(mask).sum() == sum(LENS)
    for k, s in enumerate(LENS):
        np.testing.assert_array_equal(np.asarray(mask[0, P - 1 + k]), np.arange(S_MAX) < s)
        np.testing.assert_array_equal(np.asarray(stop[0, P - 1 + k]), np.arange(S_MAX) == s - 1)
        np.testing.assert_array_equal(np.asarray(targets[0, P - 1 + k, :s]), lay["group_tokens"][0, P + k, :s])


# ----------------------------------------------------------------------------------------------- embedder
def test_embedder_bypass_and_order_sensitivity():
    emb_mod = hb.CompositionalEmbedder(32, 4, 4, rngs=nnx.Rngs(0))
    e = jax.random.normal(jax.random.key(0), (3, 4, 32))
    lens = jnp.array([1, 3, 3])
    z = emb_mod(e, lens)
    np.testing.assert_array_equal(np.asarray(z[0]), np.asarray(e[0, 0]))         # s = 1: exactly E(t_1)
    perm = e.at[1, :3].set(e[1, jnp.array([2, 0, 1])])
    z_perm = emb_mod(perm, lens)
    assert float(jnp.max(jnp.abs(z_perm[1] - z[1]))) > 1e-3                       # order matters
    pad = e.at[1, 3].set(100.0)                                                    # beyond the group: ignored
    assert_close(emb_mod(pad, lens)[1], z[1], jnp.float32, "padding ignored")
    assert float(jnp.max(jnp.abs(z[1] - jnp.mean(e[1, :3], axis=0)))) > 1e-3     # not the plain mean


def test_embedder_bf16_bypass_exact():
    emb_mod = hb.CompositionalEmbedder(32, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    e = jax.random.normal(jax.random.key(1), (2, 4, 32)).astype(jnp.bfloat16)
    z = emb_mod(e, jnp.array([1, 2]))
    assert z.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(z[0], np.float32), np.asarray(e[0, 0], np.float32))


# ----------------------------------------------------------------------------------------------- parity
def test_train_infer_parity_on_fixed_segmentation():
    model = _model()
    toks = _tokens(0)
    batch = hb.layout_batch(toks[None], P, [LENS], s_max=S_MAX, num_slots=N + 3)   # with padding slots
    logits, stop = forward(model, batch)
    gen_logits, gen_stop = model.forced_decode(toks[:P], toks[P:], LENS)
    assert gen_logits.shape == (len(LENS), S_MAX, 32)
    for k, s in enumerate(LENS):
        assert_close(gen_logits[k, :s], logits[0, P - 1 + k, :s], jnp.float32, f"logits of group {k + 1}")
        assert_close(gen_stop[k, :s], stop[0, P - 1 + k, :s], jnp.float32, f"stop logits of group {k + 1}")
    # micro step 0 of group 1 is the base model's own prediction after the (unmerged) prompt
    base_logits, _ = model.base(jnp.asarray(toks[None, :P]))
    assert_close(logits[0, P - 1, 0], base_logits[0, -1], jnp.float32, "skip connection")


def test_no_label_leak():
    model = _model()
    toks = _tokens(1)
    g = 3                                                  # change group 3 and everything after it
    start = P + sum(LENS[:g - 1])
    changed = toks.copy()
    changed[start:] = (changed[start:] + 7) % 32
    la, _ = forward(model, hb.layout_batch(toks[None], P, [LENS], s_max=S_MAX, num_slots=N + 3))
    lb, _ = forward(model, hb.layout_batch(changed[None], P, [LENS], s_max=S_MAX, num_slots=N + 3))
    slot = P - 2 + g                                       # the slot that predicts group g
    assert_close(lb[0, :slot], la[0, :slot], jnp.float32, "earlier groups")
    assert_close(lb[0, slot, 0], la[0, slot, 0], jnp.float32, "first token of group g")
    # not vacuous: step 1 of group g consumes its (changed) first token, and later slots see the change
    assert float(jnp.max(jnp.abs(lb[0, slot, 1] - la[0, slot, 1]))) > 1e-4
    assert float(jnp.max(jnp.abs(lb[0, slot + 1, 0] - la[0, slot + 1, 0]))) > 1e-4


def test_loss_and_gradients_reach_every_module():
    model = _model()
    batch = {k: jnp.asarray(v) for k, v in hb.layout_batch(
        np.stack([_tokens(0), _tokens(2)]), P, [LENS, [3, 3, 2, 1, 1]], s_max=S_MAX).items()}
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_and_grad(state):
        def f(st):
            return nnx.merge(graphdef, st).loss(batch)
        return jax.value_and_grad(f, has_aux=True)(state)

    (loss, metrics), grads = loss_and_grad(state)
    assert float(metrics["weight"]) == 2 * sum(LENS)
    np.testing.assert_allclose(float(loss), float(metrics["ce"]) + 0.5 * float(metrics["bce"]), rtol=1e-6)
    assert abs(float(metrics["ce"]) - np.log(32)) < 1.5      # fresh init: near uniform
    np.testing.assert_array_equal(np.asarray(metrics["step_weight"]), [10, 6, 4])
    for name in ("embedder", "decoder", "base"):
        norm = sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(grads[name]))
        assert norm > 0, name


# ----------------------------------------------------------------------------------------------- generation
def test_generation_limits_of_confidence():
    model = _model()
    prompt = _tokens(3)[:P]
    n_new = sum(LENS)                                      # same static shapes as the parity test: one compile
    # c = 1: every macro step stops after its first (base) token -> exactly the base model's greedy decoding
    toks, n_macro = model.generate(prompt, n_new, confidence=1.0)
    np.testing.assert_array_equal(toks, sample.generate(model.base, prompt, n_new))
    assert n_macro == n_new
    # c = 0: never stops early -> s_max tokens per macro step (the last one cut at n_new)
    toks0, n_macro0 = model.generate(prompt, n_new, confidence=0.0)
    assert n_macro0 == 4 and toks0.shape == (n_new,)
    np.testing.assert_array_equal(toks0[0], toks[0])      # each step's first token is the base's prediction
    # the forced path on the generated tokens reproduces the argmax choices
    logits, _ = model.forced_decode(prompt, toks0, [3, 3, 3, 1])
    chosen = np.concatenate([np.argmax(logits[k, :s], -1) for k, s in enumerate([3, 3, 3, 1])])
    np.testing.assert_array_equal(chosen, toks0)


@pytest.mark.parametrize("confidence", [0.0, 0.5, 1.0])
def test_generate_batch_rows_equal_single_prompt_generation(confidence):
    model = _model()
    prompts = np.stack([_tokens(seed)[:P] for seed in (3, 4, 5)])
    n_new = sum(LENS)
    toks, n_macro = model.generate_batch(prompts, n_new, confidence=confidence)
    assert toks.shape == (3, n_new) and n_macro.shape == (3,)
    for row, prompt in enumerate(prompts):
        single, n_single = model.generate(prompt, n_new, confidence=confidence)
        np.testing.assert_array_equal(toks[row], single)
        assert n_macro[row] == n_single


def test_generate_batch_rejects_bad_prompts():
    with pytest.raises(ValueError, match=r"\[k, prompt_len\]"):
        _model().generate_batch(np.zeros((4,), np.int32), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _model().generate_batch(np.zeros((2, 4), np.int32), 0)


def test_read_batch_segments_given_text_like_generation():
    model = _model()
    prompts = np.stack([_tokens(seed)[:P] for seed in (3, 4, 5)])
    n_new = sum(LENS)
    # reading its own greedy output back reproduces generation's segmentation, every token a hit
    for c in (0.0, 0.5):
        toks, n_macro = model.generate_batch(prompts, n_new, confidence=c)
        n_read, hits = model.read_batch(prompts, toks, confidence=c)
        np.testing.assert_array_equal(n_read, n_macro)
        assert hits.shape == (3, n_new) and hits.all()
    texts = np.stack([_tokens(seed)[P:] for seed in (6, 7, 8)])          # random text: few hits
    n_read, hits = model.read_batch(prompts, texts, confidence=0.0)
    np.testing.assert_array_equal(n_read, -(-n_new // S_MAX))                 # never stops early
    # c = 1: one token per step, so hits are the base model's next-token argmax accuracy on the text
    n_read, hits = model.read_batch(prompts, texts, confidence=1.0)
    np.testing.assert_array_equal(n_read, n_new)
    seq = np.concatenate([prompts, texts], axis=1)
    logits = np.asarray(model.base(jnp.asarray(seq))[0])                     # [k, P + n, V]
    np.testing.assert_array_equal(hits, np.argmax(logits[:, P - 1:-1], -1) == texts)
    assert not hits.all()                                                   # random text is not all hits
    with pytest.raises(ValueError, match=r"texts must be \[k, m\]"):
        model.read_batch(prompts, texts[:2])
