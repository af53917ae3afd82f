"""CAD execution on 8 simulated devices: varlen attention, the shard_map program (outputs, gradients, counted
pairs) against single-device attention, and the attention mixer's ``cad`` switch inside an LM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sqattn.mixers.attention import Attention, attention_mask, dot_product_attention
from sqattn.parallel import cad, sharding
from tests.testing import assert_close

F32_MAX_ABS = 1e-5      # the exactness bar for f32


def _reference(q, k, v, doc, pos):
    """Single-device varlen attention of the flattened token stream (the mixer's dot_product_attention)."""
    n, length, h, d = q.shape
    dd, pp = jnp.asarray(doc).reshape(1, -1), jnp.asarray(pos).reshape(1, -1)
    mask = attention_mask(pp, pp, q_seg=dd, k_seg=dd)
    flat = lambda x: x.reshape(1, n * length, *x.shape[2:])  # noqa: E731
    return dot_product_attention(flat(q), flat(k), flat(v), mask).reshape(q.shape)


def _close(actual, expected, name):
    assert_close(actual, expected, jnp.float32, name)
    err = float(jnp.max(jnp.abs(actual - expected)))
    assert err < F32_MAX_ABS, f"{name}: max abs err {err:.2e}"


def test_varlen_attention_matches_dense_reference_in_any_row_order():
    rng = np.random.default_rng(0)
    n, h, g, d = 70, 4, 2, 8
    doc = np.sort(rng.integers(0, 4, n))
    pos = np.concatenate([np.arange(c) for c in np.bincount(doc)])
    qp, kp = rng.permutation(n), rng.permutation(n)           # queries and keys in different row orders
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(ks[i], (n, hh, d)) for i, hh in enumerate((h, g, g)))
    ct, ct_lse = jax.random.normal(ks[3], (n, h, d)), jax.random.normal(ks[4], (n, h))

    def ref(q, k, v):
        m = attention_mask(jnp.asarray(pos)[None], jnp.asarray(pos)[None], q_seg=jnp.asarray(doc)[None],
                           k_seg=jnp.asarray(doc)[None])
        s = jnp.einsum("qhd,khd->hqk", q, jnp.repeat(k, h // g, axis=1)) * d ** -0.5
        lse = jax.nn.logsumexp(jnp.where(m[0][None], s, -1e30), axis=-1).T                 # [q,h]
        return dot_product_attention(q[None], k[None], v[None], m)[0], lse

    def mine(q, k, v):
        o, lse = cad.varlen_attention(q[qp], k[kp], v[kp], doc[qp], pos[qp], doc[kp], pos[kp], q_block=16)
        inv = np.argsort(qp)
        return o[inv], lse[inv]

    @jax.jit
    def both(q, k, v):
        (o1, l1), vjp1 = jax.vjp(ref, q, k, v)
        (o2, l2), vjp2 = jax.vjp(mine, q, k, v)
        return (o1, l1, vjp1((ct, ct_lse))), (o2, l2, vjp2((ct, ct_lse)))

    (o1, l1, g1), (o2, l2, g2) = both(q, k, v)
    _close(o2, o1, "o")
    _close(l2, l1, "lse")
    for name, a, b in zip("qkv", g2, g1):
        _close(a, b, f"d{name}")
    # Padding rows (doc -1) stay finite and do not change the other rows.
    o3, _ = jax.jit(cad.varlen_attention)(jnp.concatenate([q, q[:3]]), k, v, np.r_[doc, [-1] * 3],
                                          np.r_[pos, [0] * 3], doc, pos)
    assert np.all(np.isfinite(o3)) and float(jnp.max(jnp.abs(o3[:n] - o1))) < F32_MAX_ABS
    assert int(cad.count_pairs(doc, pos, doc, pos, q_block=16)) == int(sum(pos + 1))


def _mesh():
    return jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def test_cad_program_is_exact_on_8_devices():
    """Outputs and gradients equal single-device attention (naive and balanced plans, ping-pong N=2), for a
    long-tailed pack with documents longer than a device's shard; counted pairs equal the planned loads."""
    n, length, h, g, d = 8, 128, 4, 2, 16
    axes = ("data", "fsdp")
    mesh = _mesh()
    lengths = cad.sample_doc_lengths(np.random.default_rng(4), n * length, scale=1 / 32)
    assert (lengths > length).sum() >= 1
    doc, pos = cad.pack_tokens(lengths, n, length)
    plans = {b: cad.plan_tokens(doc, pos, nano_batches=2, eps=0.1, balance=b, min_rows=4) for b in (False, True)}
    caps = tuple(max(p.caps[i] for p in plans.values()) for i in range(3))     # one compiled program
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (n, length, h, d))
    k = jax.random.normal(ks[1], (n, length, g, d))
    v = jax.random.normal(ks[2], (n, length, g, d))
    ct = jax.random.normal(ks[3], (n, length, h, d))
    o_ref, g_ref = jax.jit(lambda q, k, v: (lambda o, f: (o, f(ct)))(*jax.vjp(
        lambda q, k, v: _reference(q, k, v, doc, pos), q, k, v)))(q, k, v)
    sh = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(axes)))  # noqa: E731

    @jax.jit
    def run(q, k, v, doc, pos, arrays):
        f = lambda q, k, v: cad.cad_attention(q, k, v, doc, pos, arrays, mesh=mesh, axes=axes,  # noqa: E731
                                              count=True, q_block=64)
        (o, pairs), vjp = jax.vjp(f, q, k, v)
        return o, pairs, vjp((ct, jnp.zeros_like(pairs)))

    imbalance = {}
    for balanced, plan in plans.items():
        o, pairs, grads = run(sh(q), sh(k), sh(v), sh(doc), sh(pos), tuple(sh(a) for a in plan.padded(caps).arrays()))
        _close(o, o_ref, f"o (balanced={balanced})")
        for name, a, b in zip("qkv", grads, g_ref):
            _close(a, b, f"d{name} (balanced={balanced})")
        counted = np.asarray(pairs).T                                              # [N, n]
        np.testing.assert_array_equal(counted, plan.loads_after)
        total = counted.sum(0)
        imbalance[balanced] = total.max() / total.mean()
    assert imbalance[False] >= 1.5 and imbalance[True] <= 1.1, imbalance


def test_stateless_servers_give_the_same_gradients():
    n, length, h, d = 8, 32, 2, 8
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))        # one axis, one nano-batch
    doc, pos = cad.pack_tokens(cad.sample_doc_lengths(np.random.default_rng(2), n * length, scale=1 / 256), n,
                               length)
    arrays = tuple(jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("data")))
                   for a in cad.plan_tokens(doc, pos, nano_batches=1).arrays())
    ks = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(kk, (n, length, h, d)) for kk in ks)

    def grads(resend):
        f = lambda q, k, v: jnp.sum(jnp.sin(cad.cad_attention(  # noqa: E731
            q, k, v, doc, pos, arrays, mesh=mesh, axes="data", resend_in_backward=resend)[0]))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    ref = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(_reference(q, k, v, doc, pos))),
                           argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", grads(True), ref):
        _close(a, b, f"d{name} (resend_in_backward)")


def test_doc_pos_from_segments_matches_mixer_mask():
    seg = jnp.array([[0, 0, 1, 1, 0, 2, 2, 1], [5, 5, 5, 5, 5, 3, 3, 5]])    # ids may repeat non-contiguously
    doc, pos = cad.doc_pos_from_segments(seg, row_offset=3)
    idx = jnp.broadcast_to(jnp.arange(8), (2, 8))
    want = attention_mask(idx, idx, q_seg=seg, k_seg=seg)                      # [b,t,s]
    got = (doc[:, :, None] == doc[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(np.asarray(doc))) == 5 and int(doc.min()) >= 3 * 8   # documents of other rows differ


def test_mixer_switch_is_inert_without_a_data_parallel_mesh():
    """The LM training equivalence with ``cad`` on is tested in tests/experiments/test_cad_balance.py (part C)."""
    mixer = Attention(16, rngs=nnx.Rngs(0), num_heads=2, cad=True)
    assert mixer.cad == cad.CADConfig()
    q = jnp.ones((2, 4, 2, 8))
    assert cad.core_attention(q, q, q, None, mixer.cad) is None                # no active mesh
    one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1))
    with sharding.activation_sharding(one, sharding.mesh_rules("default")):
        assert cad.core_attention(q, q, q, None, mixer.cad) is None            # batch not sharded
    tensor_only = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8, expert=1))
    with sharding.activation_sharding(tensor_only, sharding.mesh_rules("default")):
        assert cad.core_attention(q, q, q, None, mixer.cad) is None            # no data-parallel axis


def test_cad_config_errors():
    with pytest.raises(ValueError, match="window"):
        Attention(16, rngs=nnx.Rngs(0), num_heads=2, window=4, cad=True)
    with pytest.raises(ValueError, match="unknown option"):
        cad.CADConfig.from_arg({"epsilon": 0.1})
    assert cad.CADConfig.from_arg(False) is None and cad.CADConfig.from_arg(True) == cad.CADConfig()
