"""RoPE (sqattn.layers.apply_rope): the half-split rotation, written without concatenates."""

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.layers import apply_rope, rope_frequencies
from tests.testing import assert_close


def test_rope_is_the_half_split_rotation_and_relative():
    x = jax.random.normal(jax.random.key(0), (2, 9, 3, 16))
    pos = jnp.stack([jnp.arange(9), jnp.arange(9) * 7 + 3])                       # [2, 9]
    ang = pos[..., None].astype(jnp.float32) * rope_frequencies(16)                # [2, 9, 8]
    sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
    x1, x2 = np.split(np.asarray(x), 2, axis=-1)
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    assert_close(apply_rope(x, pos), want, jnp.float32, "rope")
    # q . k after RoPE depends only on the position offset.
    q, k = x[:1, :1], x[1:, 1:2]
    dots = [float(jnp.sum(apply_rope(q, jnp.full((1, 1), p + 5)) * apply_rope(k, jnp.full((1, 1), p))))
            for p in (0, 11, 40)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
    y = apply_rope(x.astype(jnp.bfloat16), pos)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
