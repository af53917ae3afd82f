"""A small text-conditioned diffusion transformer (DiT, Peebles & Xie 2023) for the SPM reproduction.

``DiT(x[b,H,W,C], t[b], tokens[b,L])`` -> predicted noise eps [b,H,W,C]. Pieces:

* text encoder (``TextEncoder``): token embedding + learned positions + ``text_layers`` bidirectional
  pre-norm transformer layers (``sqattn.mixers.attention`` projections and reference attention with an
  all-true mask), final RMSNorm -> text states [b, L, d]. Trained jointly with the denoiser; SPM never adapts
  it. ``DiT.encode_text(tokens)`` exposes the states, and ``DiT(x, t, context=states)`` takes them directly
  (latent anchoring samples anchors in this continuous space);
* patch tokens: ``patch`` x ``patch`` pixels -> Dense -> + positions, T = (H / patch)^2 tokens. Positions are
  fixed 2-D sine-cosine embeddings (``pos_embed="sincos"``, as DiT; unit amplitude from the first step) or
  learned ones initialised at N(0, 0.02) (``"learned"``, the default of runs saved before 2026-12-03 23:00; they
  start ~50x smaller than the patch embedding). Same recipe, 6000 steps: judge shape accuracy 0.72 (sincos) vs
  0.64 (learned), 192 samples each (~1.7 std apart); level at 1500 steps (experiments/spm.py);
* ``depth`` blocks (``DiTBlock``): adaLN-Zero modulated self-attention, cross-attention to the text states
  (queries from patches, keys/values from text) and a GELU MLP; the timestep embedding
  (sinusoidal -> 2-layer MLP) gives each block 9 modulation vectors (shift, scale, gate per sub-layer);
* final adaLN + Dense back to pixels (zero-initialised, so the untrained model predicts eps = 0).

Dense layers that SPM adapts sit inside ``layers`` (not named ``blocks``: the trainer's FLOP count reads
``blocks[i].mixer`` of LMs): ``attn.{q,k,v,o}``, ``cross.{q,k,v,o}``, ``mlp.{fc1,fc2}``
(``ada`` is the timestep modulation, like the time-embedding projections of SD's ResNets, which SPM leaves).
Shapes: b batch, H/W image size, C channels, T patch tokens, L text tokens, d width, h heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sqattn.layers import Dense, Embed, RMSNorm, param
from sqattn.mixers.attention import dot_product_attention, init_qkvo


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [b, dim] of (possibly fractional) timesteps t [b]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)   # [dim/2]
    ang = t.astype(jnp.float32)[:, None] * freqs[None]                                   # [b, dim/2]
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def sincos_2d(grid: int, dim: int) -> jax.Array:
    """Fixed 2-D sine-cosine position embeddings [grid * grid, dim] (row-major tokens): the first half of the
    channels encodes the row, the second the column, each with ``dim // 4`` frequencies (DiT / MAE)."""
    if dim % 4:
        raise ValueError(f"DiT: sincos positions need d_model divisible by 4, got {dim}")
    q = dim // 4
    freqs = 1.0 / (10000.0 ** (jnp.arange(q, dtype=jnp.float32) / q))                   # [d/4]
    pos = jnp.arange(grid, dtype=jnp.float32)[:, None] * freqs[None]                      # [g, d/4]
    one = jnp.concatenate([jnp.sin(pos), jnp.cos(pos)], axis=-1)                          # [g, d/2]
    rows = jnp.broadcast_to(one[:, None, :], (grid, grid, dim // 2))
    cols = jnp.broadcast_to(one[None, :, :], (grid, grid, dim // 2))
    return jnp.concatenate([rows, cols], axis=-1).reshape(grid * grid, dim)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Parameter-free LayerNorm over the last axis (the adaLN modulation supplies scale and shift)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps)


def _full_attention(q, k, v):
    """Bidirectional attention: q [b,t,h,k], k/v [b,s,h,k] -> [b,t,h,k] (the reference op, no mask)."""
    mask = jnp.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
    return dot_product_attention(q, k, v, mask)


class MultiHeadAttention(nnx.Module):
    """Bidirectional multi-head attention with projections ``q/k/v/o``: self-attention ``attn(x)``, or
    cross-attention ``attn(x, c)`` with queries from x [b,t,d] and keys/values from c [b,L,d]."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if d_model % num_heads:
            raise ValueError(f"DiT: num_heads={num_heads} does not divide d_model={d_model}")
        self.h, self.hd = num_heads, d_model // num_heads
        init_qkvo(self, d_model, num_heads, num_heads, self.hd, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, c: jax.Array | None = None) -> jax.Array:
        c = x if c is None else c
        b, t, _ = x.shape
        s = c.shape[1]
        q = self.q(x).reshape(b, t, self.h, self.hd)                          # [b,t,h,k]
        k = self.k(c).reshape(b, s, self.h, self.hd)                          # [b,s,h,k]
        v = self.v(c).reshape(b, s, self.h, self.hd)
        return self.o(_full_attention(q, k, v).reshape(b, t, self.h * self.hd))


class MLP(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = Dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype, use_bias=True)
        self.fc2 = Dense(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def _zero_dense(d_in: int, d_out: int, rngs: nnx.Rngs, dtype) -> Dense:
    layer = Dense(d_in, d_out, axes=("embed", None), rngs=rngs, dtype=dtype, use_bias=True)
    layer.kernel.value = jnp.zeros_like(layer.kernel.value)
    return layer


class TextEncoder(nnx.Module):
    """Token embedding + positions + bidirectional transformer layers -> text states [b, L, d]."""

    def __init__(self, vocab_size: int, text_len: int, d_model: int, num_layers: int, num_heads: int, *,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.embed = Embed(vocab_size, d_model, rngs=rngs, dtype=dtype)
        self.pos = param(rngs, jax.nn.initializers.normal(0.02), (text_len, d_model), (None, "embed"))
        self.norms1 = nnx.List([RMSNorm(d_model) for _ in range(num_layers)])
        self.attns = nnx.List([MultiHeadAttention(d_model, num_heads, rngs=rngs, dtype=dtype)
                               for _ in range(num_layers)])
        self.norms2 = nnx.List([RMSNorm(d_model) for _ in range(num_layers)])
        self.mlps = nnx.List([MLP(d_model, 4 * d_model, rngs=rngs, dtype=dtype) for _ in range(num_layers)])
        self.final = RMSNorm(d_model)
        self.text_len = text_len

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.shape[-1] != self.text_len:
            raise ValueError(f"text tokens have length {tokens.shape[-1]}, the model expects {self.text_len}")
        h = self.embed(tokens) + self.pos[...]                                # [b, L, d]
        for n1, attn, n2, mlp in zip(self.norms1, self.attns, self.norms2, self.mlps):
            h = h + attn(n1(h))
            h = h + mlp(n2(h))
        return self.final(h)


class DiTBlock(nnx.Module):
    """adaLN-Zero block: x += g1 * attn(mod(x)); x += g2 * cross(mod(x), c); x += g3 * mlp(mod(x))."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attn = MultiHeadAttention(d_model, num_heads, rngs=rngs, dtype=dtype)
        self.cross = MultiHeadAttention(d_model, num_heads, rngs=rngs, dtype=dtype)
        self.mlp = MLP(d_model, mlp_ratio * d_model, rngs=rngs, dtype=dtype)
        self.ada = _zero_dense(d_model, 9 * d_model, rngs, dtype)

    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array) -> jax.Array:
        mod = self.ada(jax.nn.silu(temb))[:, None, :]                         # [b, 1, 9d]
        s1, b1, g1, s2, b2, g2, s3, b3, g3 = jnp.split(mod, 9, axis=-1)
        x = x + g1 * self.attn(layer_norm(x) * (1 + s1) + b1)
        x = x + g2 * self.cross(layer_norm(x) * (1 + s2) + b2, c)
        x = x + g3 * self.mlp(layer_norm(x) * (1 + s3) + b3)
        return x


class DiT(nnx.Module):
    """Text-conditioned DiT predicting eps; see the module docstring.

    Args:
      image_size, channels, patch: image geometry (image_size % patch == 0).
      d_model, depth, num_heads, mlp_ratio: denoiser width, blocks, heads, MLP expansion.
      vocab_size, text_len, text_layers: the text encoder (width d_model).
      pos_embed: ``"learned"`` or ``"sincos"`` patch positions (module docstring).
    """

    def __init__(self, *, image_size: int = 16, channels: int = 3, patch: int = 2, d_model: int = 64,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: int = 4, vocab_size: int = 9, text_len: int = 6,
                 text_layers: int = 2, pos_embed: str = "learned", rngs: nnx.Rngs, dtype: str = "float32"):
        if image_size % patch:
            raise ValueError(f"DiT: patch={patch} does not divide image_size={image_size}")
        dt = jnp.dtype(dtype)
        self.image_size, self.channels, self.patch, self.d_model = image_size, channels, patch, d_model
        n = (image_size // patch) ** 2
        pdim = patch * patch * channels
        self.text = TextEncoder(vocab_size, text_len, d_model, text_layers, num_heads, rngs=rngs, dtype=dt)
        self.patch_in = Dense(pdim, d_model, axes=(None, "embed"), rngs=rngs, dtype=dt, use_bias=True)
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"DiT: pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        self.pos_embed = pos_embed
        if pos_embed == "learned":
            self.pos = param(rngs, jax.nn.initializers.normal(0.02), (n, d_model), (None, "embed"))
        else:                                      # fixed sincos: a constant of the program, not a parameter
            sincos_2d(image_size // patch, d_model)   # validates d_model % 4 at construction
        self.t1 = Dense(d_model, d_model, axes=("embed", "mlp"), rngs=rngs, dtype=dt, use_bias=True)
        self.t2 = Dense(d_model, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dt, use_bias=True)
        self.layers = nnx.List([DiTBlock(d_model, num_heads, mlp_ratio, rngs=rngs, dtype=dt)
                                for _ in range(depth)])
        self.final_ada = _zero_dense(d_model, 2 * d_model, rngs, dt)
        self.out = _zero_dense(d_model, pdim, rngs, dt)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Text states [b, L, d] of token ids [b, L]."""
        return self.text(tokens)

    def _patchify(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        p = self.patch
        x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)   # [b, H/p, W/p, p, p, C]
        return x.reshape(b, (hh // p) * (ww // p), p * p * c)                      # [b, T, p p C]

    def _unpatchify(self, y: jax.Array) -> jax.Array:
        b = y.shape[0]
        p, g, c = self.patch, self.image_size // self.patch, self.channels
        y = y.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)               # [b, H/p, p, W/p, p, C]
        return y.reshape(b, g * p, g * p, c)

    def __call__(self, x: jax.Array, t: jax.Array, tokens: jax.Array | None = None, *,
                 context: jax.Array | None = None) -> jax.Array:
        """eps [b,H,W,C] for noisy images x [b,H,W,C] at timesteps t [b] (or a scalar), conditioned on
        ``tokens`` [b,L] or directly on text states ``context`` [b,L,d] (exactly one of the two)."""
        if (tokens is None) == (context is None):
            raise ValueError("DiT: pass exactly one of tokens and context")
        if x.shape[1:] != (self.image_size, self.image_size, self.channels):
            raise ValueError(f"DiT: images have shape {x.shape[1:]}, the model expects "
                             f"{(self.image_size, self.image_size, self.channels)}")
        b = x.shape[0]
        c = self.encode_text(tokens) if context is None else context              # [b, L, d]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        temb = self.t2(jax.nn.silu(self.t1(timestep_embedding(t, self.d_model))))   # [b, d]
        pos = (self.pos[...] if self.pos_embed == "learned"
               else sincos_2d(self.image_size // self.patch, self.d_model).astype(temb.dtype))
        h = self.patch_in(self._patchify(x)) + pos                                 # [b, T, d]
        for block in self.layers:
            h = block(h, c, temb)
        shift, scale = jnp.split(self.final_ada(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
        y = self.out(layer_norm(h) * (1 + scale) + shift)                          # [b, T, p p C]
        return self._unpatchify(y.astype(jnp.float32))
