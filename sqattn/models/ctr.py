"""Click-through-rate models (Flax NNX): LR, DNN, the DCN family (DCNv1 vector, DCNv2 matrix, DCNMix) and FCN.

Every model embeds F categorical fields (``ids: int32 [B, F]``) through one concatenated table
``[sum(vocab_sizes) rounded up to 64, width]`` with logical axes ("vocab", "embed"), so the trainer shards it
over the mesh like any weight (default rules: columns over ``fsdp``, rows over ``tensor``). Tables start at
N(0, 1e-4^2) (FuxiCTR / deepctr-torch ``init_std``).

``model(ids, rng=None) -> {"logit": [B] f32, ...}`` (``rng`` given = training: dropout on). The training
objective is ``model.objective(out, label) -> (loss, metrics)``: mean BCE on the logit plus
``emb_l2 * sum(table^2)`` over the whole table (FuxiCTR's whole-table embedding L2), and for FCN the Tri-BCE
terms.

Cross layers, as pure functions on the flattened embedding ``x0: [..., D]`` (tested by hand in
tests/sqattn/models/test_ctr.py):

* DCNv1 (vector): ``x' = x0 * (x . w) + b + x``                     (deepctr-torch ``CrossNet('vector')``)
* DCNv2 (matrix): ``x' = x0 * (x W + b) + x``                       (``CrossNet('matrix')``, W: [D, D])
* DCNMix:  ``x' = sum_i softmax_i(x g) * x0 * (U_i tanh(C_i tanh(V_i^T x)) + b) + x``  (``CrossNetMix``)
* FCN (arXiv 2407.13349, official code): ``h = x W`` (W: [D, D/2]); ``c = [h || agg(h)]``;
  ``x' = anchor * (c + b) + x``, anchor = x1 in LCN (order grows linearly), anchor = x in ECN (order doubles).
  agg: "mask" (v7 Self-Mask ``h * relu(LN(h))``), "ln" (v8 ``LN(h)``), "affine" (v8 ``gamma*h + beta``), or
  "full" (the Self-Mask ablation: W: [D, D], ``c = h``). b ~ U(0, 1). FCN's input is the multi-head,
  half-split layout of the note (step 2): [B, H, D] = [first halves of all fields || second halves].
  Logits are averaged over heads, and the fused logit is the mean of the ECN and LCN logits. Tri-BCE:
  ``L + w_E L_E + w_L L_L`` with ``w = relu(L_branch - L)``, not detached unless ``tri_stop_grad``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.layers import param

EMBED_INIT_STD = 1e-4
_ROW_PAD = 64          # table rows are padded to a multiple of this so row sharding divides evenly


def xavier_normal(in_axis: int = -2, out_axis: int = -1):
    return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal", in_axis=in_axis, out_axis=out_axis)


def bce(logit: jax.Array, label: jax.Array) -> jax.Array:
    """Per-row binary cross-entropy of a logit (numerically stable), f32."""
    z = logit.astype(jnp.float32)
    return jnp.maximum(z, 0) - z * label + jnp.log1p(jnp.exp(-jnp.abs(z)))


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate <= 0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def layer_norm(h: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis (torch's default eps), f32."""
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + eps) * scale + bias


# ----------------------------------------------------------------------------------------------- cross layers
def cross_vector(x0: jax.Array, x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """DCNv1 cross layer: ``x0 * (x . w) + b + x``. x0, x: [..., D]; w, b: [D]."""
    return x0 * jnp.sum(x * w, axis=-1, keepdims=True) + b + x


def cross_matrix(x0: jax.Array, x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """DCNv2 cross layer: ``x0 * (x W + b) + x``. W: [D, D] (in, out); b: [D]."""
    return x0 * (x @ w + b) + x


def cross_mix(x0, x, u, v, c, gate, b):
    """DCNMix cross layer. u, v: [K, D, r]; c: [K, r, r]; gate: [D, K]; b: [D].

    ``x' = sum_k softmax_k(x gate) * x0 * (u_k tanh(c_k tanh(v_k^T x)) + b) + x``.
    """
    z = jnp.tanh(jnp.einsum("...d,kdr->...kr", x, v))              # [..., K, r]
    z = jnp.tanh(jnp.einsum("...kr,kqr->...kq", z, c))             # [..., K, r]  (c_k z)
    e = x0[..., None, :] * (jnp.einsum("...kr,kdr->...kd", z, u) + b)   # [..., K, D]
    g = jax.nn.softmax(x @ gate, axis=-1)                          # [..., K]
    return jnp.einsum("...kd,...k->...d", e, g) + x


def fcn_cross(anchor: jax.Array, x: jax.Array, w: jax.Array, b: jax.Array, aggregation: str,
              ln_scale: jax.Array | None = None, ln_bias: jax.Array | None = None) -> jax.Array:
    """One FCN cross layer: ``anchor * ([h || agg(h)] + b) + x`` with ``h = x W``.

    Args:
      anchor: x1 (LCN) or x itself (ECN), [..., D].
      x: current state [..., D].
      w: [D, D/2] ([D, D] for "full").
      b: [D].
      aggregation: "mask" (h * relu(LN(h))), "ln" (LN(h)), "affine" (ln_scale * h + ln_bias), "full" (c = h).
      ln_scale, ln_bias: [D/2] LayerNorm / affine parameters (unused for "full").
    """
    h = x @ w
    if aggregation == "full":
        c = h
    elif aggregation == "mask":
        c = jnp.concatenate([h, h * jax.nn.relu(layer_norm(h, ln_scale, ln_bias))], axis=-1)
    elif aggregation == "ln":
        c = jnp.concatenate([h, layer_norm(h, ln_scale, ln_bias)], axis=-1)
    elif aggregation == "affine":
        c = jnp.concatenate([h, h * ln_scale + ln_bias], axis=-1)
    else:
        raise ValueError(f"unknown FCN aggregation {aggregation!r}; known: mask, ln, affine, full")
    return anchor * (c + b) + x


def head_split_layout(e: jax.Array, num_heads: int) -> jax.Array:
    """[B, F, H*E] field embeddings -> [B, H, D] (D = F*E): per head, all fields' first halves, then all
    fields' second halves (the FCN note's step 2)."""
    bsz, f, he = e.shape
    k = he // num_heads
    e = e.reshape(bsz, f, num_heads, k).transpose(0, 2, 1, 3)       # [B, H, F, E]
    first = e[..., : k // 2].reshape(bsz, num_heads, f * (k // 2))   # [B, H, F*E/2]
    second = e[..., k // 2:].reshape(bsz, num_heads, f * (k // 2))
    return jnp.concatenate([first, second], axis=-1)                 # [B, H, D]


# ----------------------------------------------------------------------------------------------- building blocks
class FieldEmbedding(nnx.Module):
    """One table for all fields: field f's id i is row ``offset_f + i``. ``__call__(ids [B, F]) -> [B, F, width]``."""

    def __init__(self, vocab_sizes: Sequence[int], width: int, *, rngs: nnx.Rngs,
                 init_std: float = EMBED_INIT_STD):
        vocab_sizes = tuple(int(v) for v in vocab_sizes)
        if not vocab_sizes or min(vocab_sizes) < 1:
            raise ValueError(f"vocab_sizes must be a non-empty list of positive sizes, got {vocab_sizes}")
        self.vocab_sizes = vocab_sizes
        self.offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(vocab_sizes)[:-1]]))
        rows = -(-sum(vocab_sizes) // _ROW_PAD) * _ROW_PAD
        self.table = param(rngs, jax.nn.initializers.normal(init_std), (rows, width), ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = ids.astype(jnp.int32) + jnp.asarray(self.offsets, jnp.int32)   # [B, F]
        return jnp.take(self.table[...], rows, axis=0)                        # [B, F, width]

    def sq_norm(self) -> jax.Array:
        return jnp.sum(jnp.square(self.table[...]))


class Linear(nnx.Module):
    """``x W + b`` with xavier-normal W [in, out] and zero bias."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = True,
                 axes=("embed", "mlp"), init=None):
        self.kernel = param(rngs, init or xavier_normal(), (d_in, d_out), axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32), axes=(axes[1],)) if use_bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class MLP(nnx.Module):
    """ReLU tower: Linear -> ReLU -> dropout, per hidden width (He-normal init, zero bias)."""

    def __init__(self, d_in: int, hidden: Sequence[int], *, rngs: nnx.Rngs, dropout: float = 0.0):
        dims = [d_in, *hidden]
        he = jax.nn.initializers.he_normal()
        self.layers = nnx.List([Linear(a, b, rngs=rngs, init=he) for a, b in zip(dims[:-1], dims[1:])])
        self.rate = float(dropout)
        self.d_out = dims[-1]

    def __call__(self, x, rng=None):
        for i, layer in enumerate(self.layers):
            x = dropout(jax.nn.relu(layer(x)), self.rate, None if rng is None else jax.random.fold_in(rng, i))
        return x


class CTRModel(nnx.Module):
    """Shared parts: the embedding L2 and the default objective (mean BCE + L2)."""

    emb_l2: float = 0.0

    def embedding_tables(self) -> list[FieldEmbedding]:
        return [m for _, m in nnx.iter_graph(self) if isinstance(m, FieldEmbedding)]

    def regularization(self) -> jax.Array:
        if not self.emb_l2:
            return jnp.zeros((), jnp.float32)
        return self.emb_l2 * sum(t.sq_norm() for t in self.embedding_tables())

    def objective(self, out: dict, label: jax.Array) -> tuple[jax.Array, dict]:
        loss = jnp.mean(bce(out["logit"], label))
        return loss + self.regularization(), {"bce": loss}


# ----------------------------------------------------------------------------------------------- models
class LR(CTRModel):
    """Logistic regression: ``b + sum_f w_f[x_f]``."""

    def __init__(self, vocab_sizes: Sequence[int], *, emb_l2: float = 0.0, rngs: nnx.Rngs):
        self.embed = FieldEmbedding(vocab_sizes, 1, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((), jnp.float32), axes=())
        self.emb_l2 = float(emb_l2)

    def __call__(self, ids, rng=None):
        return {"logit": jnp.sum(self.embed(ids)[..., 0], axis=-1) + self.bias[...]}


class DNN(CTRModel):
    """Embeddings flattened -> ReLU MLP -> logit."""

    def __init__(self, vocab_sizes: Sequence[int], *, embed_dim: int = 16, hidden: Sequence[int] = (400, 400, 400),
                 dropout: float = 0.0, emb_l2: float = 0.0, rngs: nnx.Rngs):
        self.embed = FieldEmbedding(vocab_sizes, embed_dim, rngs=rngs)
        self.mlp = MLP(len(vocab_sizes) * embed_dim, hidden, rngs=rngs, dropout=dropout)
        self.out = Linear(self.mlp.d_out, 1, rngs=rngs, axes=("mlp", None))
        self.emb_l2 = float(emb_l2)

    def __call__(self, ids, rng=None):
        x = self.embed(ids).reshape(ids.shape[0], -1)                     # [B, F*E]
        return {"logit": self.out(self.mlp(x, rng))[..., 0]}


class DCN(CTRModel):
    """The DCN family as in deepctr-torch: ``logit = LR(x) + w^T [cross(x0) || dnn(x0)] + b``.

    Args:
      vocab_sizes: per-field vocabulary sizes.
      embed_dim: E.
      cross: "vector" (DCNv1), "matrix" (DCNv2 / DCN-M), "mix" (DCNMix).
      num_cross: cross layers (0: DNN only).
      hidden: DNN widths in parallel with the cross network (() = cross only).
      dropout: DNN dropout.
      low_rank, num_experts: DCNMix expert rank and count (deepctr-torch defaults 32, 4).
      linear: add the first-order LR term (deepctr-torch's ``linear_model``).
      emb_l2: whole-table embedding L2.
    """

    def __init__(self, vocab_sizes: Sequence[int], *, embed_dim: int = 16, cross: str = "matrix", num_cross: int = 3,
                 hidden: Sequence[int] = (), dropout: float = 0.0, low_rank: int = 32, num_experts: int = 4,
                 linear: bool = True, emb_l2: float = 0.0, rngs: nnx.Rngs):
        if cross not in ("vector", "matrix", "mix"):
            raise ValueError(f"DCN cross must be 'vector', 'matrix' or 'mix', got {cross!r}")
        if num_cross == 0 and not hidden:
            raise ValueError("DCN needs cross layers (num_cross > 0) or a DNN (hidden)")
        d = len(vocab_sizes) * embed_dim
        self.embed = FieldEmbedding(vocab_sizes, embed_dim, rngs=rngs)
        self.lr = FieldEmbedding(vocab_sizes, 1, rngs=rngs) if linear else None
        self.cross, self.num_cross = cross, int(num_cross)
        xn = xavier_normal()
        if cross == "vector":
            self.w = param(rngs, xn, (num_cross, d, 1), (None, "embed", None))
        elif cross == "matrix":
            self.w = param(rngs, xn, (num_cross, d, d), (None, "embed", "mlp"))
        else:
            self.u = param(rngs, xn, (num_cross, num_experts, d, low_rank), (None, None, "embed", "lowrank"))
            self.v = param(rngs, xn, (num_cross, num_experts, d, low_rank), (None, None, "embed", "lowrank"))
            self.c = param(rngs, xn, (num_cross, num_experts, low_rank, low_rank), (None, None, "lowrank", None))
            self.gate = param(rngs, xn, (d, num_experts), ("embed", None))
        self.b = nnx.Param(jnp.zeros((num_cross, d), jnp.float32), axes=(None, "norm"))
        self.mlp = MLP(d, hidden, rngs=rngs, dropout=dropout) if hidden else None
        d_out = (d if num_cross else 0) + (self.mlp.d_out if hidden else 0)
        self.out = Linear(d_out, 1, rngs=rngs, axes=("mlp", None))
        self.emb_l2 = float(emb_l2)

    def cross_net(self, x0):
        x = x0
        for i in range(self.num_cross):
            if self.cross == "vector":
                x = cross_vector(x0, x, self.w[i, :, 0], self.b[i])
            elif self.cross == "matrix":
                x = cross_matrix(x0, x, self.w[i], self.b[i])
            else:
                x = cross_mix(x0, x, self.u[i], self.v[i], self.c[i], self.gate[...], self.b[i])
        return x

    def __call__(self, ids, rng=None):
        x0 = self.embed(ids).reshape(ids.shape[0], -1)                    # [B, D]
        parts = ([self.cross_net(x0)] if self.num_cross else []) + ([self.mlp(x0, rng)] if self.mlp else [])
        logit = self.out(jnp.concatenate(parts, axis=-1))[..., 0]
        if self.lr is not None:
            logit = logit + jnp.sum(self.lr(ids)[..., 0], axis=-1)
        return {"logit": logit}


class CrossStack(nnx.Module):
    """A stack of FCN cross layers (ECN if ``exponential`` else LCN) ending in a per-head Linear(D -> 1)."""

    def __init__(self, d: int, num_layers: int, *, exponential: bool, aggregation: str, dropout: float,
                 rngs: nnx.Rngs):
        if aggregation not in ("mask", "ln", "affine", "full"):
            raise ValueError(f"unknown FCN aggregation {aggregation!r}; known: mask, ln, affine, full")
        if d % 2:
            raise ValueError(f"FCN width D = F*E must be even, got {d}")
        out_w = d if aggregation == "full" else d // 2
        self.w = param(rngs, xavier_normal(), (num_layers, d, out_w), (None, "embed", "mlp"))
        self.b = param(rngs, jax.nn.initializers.uniform(1.0), (num_layers, d), (None, "norm"))
        if aggregation != "full":
            self.ln_scale = nnx.Param(jnp.ones((num_layers, d // 2), jnp.float32), axes=(None, "norm"))
            self.ln_bias = nnx.Param(jnp.zeros((num_layers, d // 2), jnp.float32), axes=(None, "norm"))
        self.head = Linear(d, 1, rngs=rngs, axes=("embed", None))
        self.num_layers, self.exponential, self.aggregation = int(num_layers), bool(exponential), aggregation
        self.rate = float(dropout)

    def __call__(self, x1, rng=None):
        x = x1
        full = self.aggregation == "full"
        for i in range(self.num_layers):
            anchor = x if self.exponential else x1
            x = fcn_cross(anchor, x, self.w[i], self.b[i], self.aggregation,
                          None if full else self.ln_scale[i], None if full else self.ln_bias[i])
            x = dropout(x, self.rate, None if rng is None else jax.random.fold_in(rng, i))
        return jnp.mean(self.head(x)[..., 0], axis=-1)                    # [B, H] -> mean over heads: [B]


class FCN(CTRModel):
    """FCN: ECN (exponential) || LCN (linear) cross networks on the multi-head half-split embedding.

    Args:
      vocab_sizes: per-field vocabulary sizes.
      embed_dim: E (even).
      num_heads: H (the table is H*E wide; cross parameters are shared across heads).
      num_exp_layers: ECN depth (0 = LCN only).
      num_lin_layers: LCN depth (0 = ECN only).
      aggregation: "mask" (v7 Self-Mask), "ln" / "affine" (v8 low-cost aggregation), "full" (ablation).
      exp_dropout, lin_dropout: dropout on each layer's output, per branch.
      tri_bce: train with Tri-BCE (else plain BCE on the fused logit).
      tri_stop_grad: detach the Tri-BCE weights (the official code does not).
      emb_l2: whole-table embedding L2.
    """

    def __init__(self, vocab_sizes: Sequence[int], *, embed_dim: int = 16, num_heads: int = 1,
                 num_exp_layers: int = 3, num_lin_layers: int = 4, aggregation: str = "mask",
                 exp_dropout: float = 0.0, lin_dropout: float = 0.0, tri_bce: bool = True,
                 tri_stop_grad: bool = False, emb_l2: float = 0.0, rngs: nnx.Rngs):
        if embed_dim % 2:
            raise ValueError(f"FCN needs an even embed_dim (each field is split in halves), got {embed_dim}")
        if num_exp_layers < 0 or num_lin_layers < 0 or num_exp_layers + num_lin_layers == 0:
            raise ValueError(f"FCN needs at least one ECN or LCN layer, got {num_exp_layers} and {num_lin_layers}")
        d = len(vocab_sizes) * embed_dim
        self.embed = FieldEmbedding(vocab_sizes, num_heads * embed_dim, rngs=rngs)
        self.num_heads = int(num_heads)
        self.ecn = (CrossStack(d, num_exp_layers, exponential=True, aggregation=aggregation, dropout=exp_dropout,
                               rngs=rngs) if num_exp_layers else None)
        self.lcn = (CrossStack(d, num_lin_layers, exponential=False, aggregation=aggregation, dropout=lin_dropout,
                               rngs=rngs) if num_lin_layers else None)
        self.tri_bce, self.tri_stop_grad = bool(tri_bce), bool(tri_stop_grad)
        self.emb_l2 = float(emb_l2)

    def __call__(self, ids, rng=None):
        x1 = head_split_layout(self.embed(ids), self.num_heads)            # [B, H, D]
        out = {}
        if self.ecn is not None:
            out["logit_exp"] = self.ecn(x1, None if rng is None else jax.random.fold_in(rng, 1))
        if self.lcn is not None:
            out["logit_lin"] = self.lcn(x1, None if rng is None else jax.random.fold_in(rng, 2))
        out["logit"] = sum(out.values()) / len(out)                       # mean of the branch logits
        return out

    def objective(self, out, label):
        loss, branches = tri_bce(out, label, enabled=self.tri_bce, stop_grad=self.tri_stop_grad)
        return loss + self.regularization(), branches


def tri_bce(out: dict, label: jax.Array, *, enabled: bool = True, stop_grad: bool = False):
    """Tri-BCE: ``L + sum_b relu(L_b - L) * L_b`` over the branch logits present (batch-mean BCEs).

    Returns (loss, metrics) with the fused "bce" and each branch's "bce_exp" / "bce_lin".
    """
    fused = jnp.mean(bce(out["logit"], label))
    metrics = {"bce": fused}
    loss = fused
    for name in ("exp", "lin"):
        if f"logit_{name}" not in out:
            continue
        lb = jnp.mean(bce(out[f"logit_{name}"], label))
        metrics[f"bce_{name}"] = lb
        if enabled and len(out) > 2:               # two branches + the fused logit
            w = jax.nn.relu(lb - fused)
            loss = loss + (jax.lax.stop_gradient(w) if stop_grad else w) * lb
    return loss, metrics


def non_embedding_params(model: nnx.Module) -> int:
    """Parameters outside the embedding tables (the note's "non-embedding parameters")."""
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    emb = sum(math.prod(t.table.shape) for t in model.embedding_tables())
    return int(total - emb)
