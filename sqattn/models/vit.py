"""A small Vision Transformer built from sqattn's layers and attention projections.

``ViT``: patch embedding (a ``Dense`` over flattened ``patch x patch x C`` patches), a learned CLS token and
learned position embeddings, then ``num_layers`` pre-norm encoder blocks

    x_a = x + Attn(Norm1(x));  x_out = x_a + MLP(Norm2(x_a))

with ``RMSNorm`` norms, a ``SwiGLU`` MLP and ``EncoderAttention``: the attention mixer's q/k/v/o projections
(``sqattn.mixers.attention.init_qkvo``, same names and shapes) and its reference core
(``dot_product_attention``) with a full bidirectional mask and no RoPE. The output is the final-normed CLS token
(``features``) and, when ``num_classes > 0``, a linear head on it.

Shapes: b batch, S image side, C channels, p patch side, n = (S / p)^2 patches, t = n + 1 tokens, d width.

API for other models (video tokenisers, SEMA): ``tokens(images) -> [b,t,d]``, ``encode(x [b,t,d]) -> [b,t,d]``
(the blocks), ``features(images) -> [b,d]``, ``__call__(images) -> (logits [b,K] f32, aux)`` with
``aux = {"features", "aux_loss"}``. Each ``EncoderBlock`` also exposes its two halves, ``attend(x) -> x_a`` and
``feed_forward(x_a) -> MLP branch``, so a model can add branches beside the MLP (``sqattn.models.sema``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sqattn.layers import Dense, RMSNorm, SwiGLU
from sqattn.layers.core import param
from sqattn.mixers.attention import dot_product_attention, init_qkvo
from sqattn.models.lm import as_dtype
from sqattn.parallel.sharding import constrain


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[b, S, S, C] -> [b, n, p*p*C] in row-major patch order."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)           # [b, H, p, W, p, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)                                       # [b, H, W, p, p, C]
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class EncoderAttention(nnx.Module):
    """Bidirectional multi-head attention: the attention mixer's projections and core, every key visible."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32, num_heads: int = 4,
                 out_scale: float = 1.0):
        if d_model % num_heads:
            raise ValueError(f"EncoderAttention: num_heads={num_heads} does not divide d_model={d_model}")
        self.h, self.hd = num_heads, d_model // num_heads
        init_qkvo(self, d_model, num_heads, num_heads, self.hd, rngs=rngs, dtype=dtype, out_scale=out_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.h, self.hd)                        # [b,t,h,k]
        k = self.k(x).reshape(b, t, self.h, self.hd)
        v = self.v(x).reshape(b, t, self.h, self.hd)
        o = dot_product_attention(q, k, v, jnp.ones((b, t, t), bool))       # [b,t,h,k]
        return self.o(o.reshape(b, t, self.h * self.hd))

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of QK^T and PV (every token sees all ``seq_len`` keys)."""
        return 4.0 * self.h * self.hd * float(seq_len)


class EncoderBlock(nnx.Module):
    """Pre-norm encoder block; ``__call__(x) = attend(x) + feed_forward(attend(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype, norm_eps: float,
                 out_scale: float):
        self.norm1 = RMSNorm(d_model, eps=norm_eps)
        self.mixer = EncoderAttention(d_model, rngs=rngs, dtype=dtype, num_heads=num_heads, out_scale=out_scale)
        self.norm2 = RMSNorm(d_model, eps=norm_eps)
        self.mlp = SwiGLU(d_model, mlp_dim, rngs=rngs, dtype=dtype, out_scale=out_scale)

    def attend(self, x: jax.Array) -> jax.Array:
        return x + self.mixer(self.norm1(x))

    def feed_forward(self, x_a: jax.Array) -> jax.Array:
        return self.mlp(self.norm2(x_a))

    def __call__(self, x: jax.Array) -> jax.Array:
        x_a = self.attend(x)
        return constrain(x_a + self.feed_forward(x_a), ("act_batch", "act_seq", "act_embed"))


class ViT(nnx.Module):
    """Vision Transformer classifier.

    Attributes:
      image_size, patch_size, channels: input geometry (image_size % patch_size == 0).
      d_model, num_layers, num_heads, mlp_dim: encoder sizes (SwiGLU hidden width ``mlp_dim``).
      num_classes: head outputs; 0 = no head (``__call__`` then returns the features as logits).
      dtype: compute dtype name; parameters are float32.
    """

    def __init__(self, *, image_size: int = 16, patch_size: int = 4, channels: int = 1, d_model: int = 64,
                 num_layers: int = 4, num_heads: int = 4, mlp_dim: int = 128, num_classes: int = 10,
                 dtype: str = "float32", norm_eps: float = 1e-6, rngs: nnx.Rngs):
        if image_size % patch_size:
            raise ValueError(f"ViT: image_size={image_size} is not divisible by patch_size={patch_size}")
        if min(image_size, patch_size, channels, d_model, num_layers, num_heads, mlp_dim) < 1 or num_classes < 0:
            raise ValueError("ViT: sizes must be >= 1 (num_classes >= 0)")
        self.patch_size, self.image_size, self.channels = patch_size, image_size, channels
        self.num_patches = (image_size // patch_size) ** 2
        self.dtype = as_dtype(dtype)
        d = d_model
        self.patch_embed = Dense(patch_size * patch_size * channels, d, axes=(None, "embed"), rngs=rngs,
                                 use_bias=True, dtype=self.dtype)
        self.cls = param(rngs, jax.nn.initializers.normal(0.02), (d,), ("embed",))
        self.pos = param(rngs, jax.nn.initializers.normal(0.02), (self.num_patches + 1, d), (None, "embed"))
        out_scale = 1.0 / (2 * num_layers) ** 0.5
        self.blocks = nnx.List([EncoderBlock(d, num_heads, mlp_dim, rngs=rngs, dtype=self.dtype,
                                             norm_eps=norm_eps, out_scale=out_scale) for _ in range(num_layers)])
        self.final_norm = RMSNorm(d, eps=norm_eps)
        self.head = (Dense(d, num_classes, axes=("embed", None), rngs=rngs, use_bias=True, dtype=self.dtype)
                     if num_classes else None)

    def tokens(self, images: jax.Array) -> jax.Array:
        """images [b,S,S,C] -> tokens [b, 1+n, d]: CLS first, then the patches, plus position embeddings."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, self.channels):
            raise ValueError(f"ViT expects images [b, {self.image_size}, {self.image_size}, {self.channels}], "
                             f"got {images.shape}")
        x = self.patch_embed(patchify(images.astype(self.dtype), self.patch_size))      # [b,n,d]
        cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...].astype(self.dtype)         # [b,t,d]
        return constrain(x, ("act_batch", "act_seq", "act_embed"))

    def encode(self, x: jax.Array) -> jax.Array:
        """The encoder blocks on tokens [b,t,d] -> [b,t,d] (before the final norm)."""
        for block in self.blocks:
            x = block(x)
        return x

    def pool(self, x: jax.Array) -> jax.Array:
        """Final norm of the CLS token: [b,t,d] -> [b,d]."""
        return self.final_norm(x[:, 0])

    def features(self, images: jax.Array) -> jax.Array:
        return self.pool(self.encode(self.tokens(images)))

    def __call__(self, images: jax.Array):
        feats = self.features(images)                                                  # [b,d]
        logits = feats.astype(jnp.float32) if self.head is None else self.head(feats).astype(jnp.float32)
        return logits, {"features": feats, "aux_loss": jnp.zeros((), jnp.float32)}
