"""The text-conditioned DiT (sqattn/models/dit.py) and the judge CNN (sqattn/models/judge.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn.models.dit import DiT, sincos_2d
from sqattn.models.judge import ShapeJudge
from tests.testing import assert_close


def test_dit_shapes_paths_and_errors():
    m = DiT(image_size=8, patch=4, d_model=16, depth=2, num_heads=2, text_layers=1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    assert np.array_equal(np.asarray(m._unpatchify(m._patchify(x))), np.asarray(x))   # patch layout round trip
    tok = jnp.array([[1, 2, 5, 0, 0, 0]] * 3, jnp.int32)
    eps = m(x, jnp.array([0, 10, 999]), tok)
    assert eps.shape == x.shape and float(jnp.max(jnp.abs(eps))) == 0.0   # adaLN-Zero + zero output layer
    m.out.kernel.value = jax.random.normal(jax.random.key(1), m.out.kernel.value.shape)
    for i, blk in enumerate(m.layers):                                    # adaLN weights: t matters
        blk.ada.bias.value = jnp.full_like(blk.ada.bias.value, 0.5)
        blk.ada.kernel.value = 0.3 * jax.random.normal(jax.random.key(2 + i), blk.ada.kernel.value.shape)
    a = m(x, jnp.array([0, 10, 999]), tok)
    assert_close(m(x, jnp.array([0, 10, 999]), context=m.encode_text(tok)), a, name="context path")
    other = m(x, jnp.array([0, 10, 999]), jnp.array([[1, 4, 8, 0, 0, 0]] * 3, jnp.int32))
    assert float(jnp.max(jnp.abs(other - a))) > 1e-3                     # the prompt conditions the output
    assert float(jnp.max(jnp.abs(m(x, jnp.array([500, 10, 999]), tok)[0] - a[0]))) > 1e-3   # and the timestep
    with pytest.raises(ValueError, match="exactly one of tokens and context"):
        m(x, 0, tok, context=m.encode_text(tok))
    with pytest.raises(ValueError, match=r"images have shape \(4, 4, 3\)"):
        m(jnp.zeros((1, 4, 4, 3)), 0, tok[:1])
    with pytest.raises(ValueError, match="text tokens have length 3"):
        m(x, 0, tok[:, :3])
    with pytest.raises(ValueError, match="patch=3 does not divide image_size=8"):
        DiT(image_size=8, patch=3, rngs=nnx.Rngs(0))


def test_dit_sincos_positions():
    pe = np.asarray(sincos_2d(4, 16))                                   # 4 x 4 tokens, row-major
    assert pe.shape == (16, 16)
    # first half of the channels is the row's code, second half the column's; values independent of the other
    assert np.array_equal(pe[1, :8], pe[0, :8]) and np.array_equal(pe[4, 8:], pe[0, 8:])
    assert not np.array_equal(pe[4, :8], pe[0, :8])
    assert_close(pe[5, :8], np.concatenate([np.sin(1.0 / 10000.0 ** (np.arange(4) / 4)),
                                            np.cos(1.0 / 10000.0 ** (np.arange(4) / 4))]), name="row 1")
    assert len({tuple(np.round(r, 6)) for r in pe}) == 16                 # every token has its own code
    m = DiT(image_size=8, patch=2, d_model=16, depth=1, num_heads=2, text_layers=1, pos_embed="sincos",
            rngs=nnx.Rngs(0))
    assert not hasattr(m, "pos")                                         # fixed: no parameter to train or save
    learned = DiT(image_size=8, patch=2, d_model=16, depth=1, num_heads=2, text_layers=1, rngs=nnx.Rngs(0))
    assert learned.pos.value.shape == (16, 16)
    with pytest.raises(ValueError, match="pos_embed must be"):
        DiT(image_size=8, patch=2, d_model=16, pos_embed="rope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(image_size=8, patch=2, d_model=18, num_heads=2, pos_embed="sincos", rngs=nnx.Rngs(0))


def test_judge_heads_and_features():
    j = ShapeJudge(width=8, rngs=nnx.Rngs(0))
    out = j(jnp.zeros((2, 16, 16, 3)))
    assert out["shape"].shape == (2, 4) and out["colour"].shape == (2, 3) and out["features"].shape == (2, 32)
