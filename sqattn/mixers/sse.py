"""Sparse State Expansion (SSE) over gated linear attention (Pan et al. 2025, arXiv 2507.16577;
papers/sse.md §3.3-3.6).

One always-on *shared* GLA state ``S^0`` plus ``N`` sparse partitions ``S^1..S^N`` that share every
projection. A router picks the top-K partitions per token; the router probability ``e_t[i]``
scales the key on write and the query on read, and a partition a token does not select is neither
written nor decayed::

    q1, k1, v = x W_q, x W_k, x W_v                      (shared branch)
    q2 = q1 + x A_q B_q,  k2 = k1 + x A_k B_k            (sparse branch: low-rank deltas, rank d)
    q <- silu(q), k <- softmax_c(k) (f32), v <- silu(v);  two low-rank gates logsigmoid(.)/16
    e_t = softmax(x W_e) (f32),  T_t = top-K(e_t) (ties: lowest index)
    S^0_t = diag(a0_t) S^0_{t-1} + k1^T v                o_t = q1 S^0_t
    i in T_t:  S^i_t = diag(a_t) S^i_{t-1} + e_t[i] k2^T v,   o_t += e_t[i] q2 S^i_t
    i not in T_t:  S^i_t = S^i_{t-1}
    y_t = W_o (RMSNorm_head(o_t) * silu(x Wg1 Wg2))      (scores scaled by c^-1/2 like GLA)

Partition balance loss (FLA code): ``L_aux = coef * (N/K) * sum_i p_i f_i`` with ``p_i`` the mean
router probability and ``f_i`` the fraction of tokens selecting ``i``; sown as ``aux_loss`` (the
LM adds it to the task loss), together with ``partition_prob`` (p) and ``partition_usage`` (f)
for probing.

Parallel forms (``form``), all equal up to float rounding:

* ``"mask"``: shared branch ``kernels.gla.gla`` + sparse branch ``kernels.sse.sse`` (the masked
  recurrence over N partitions; its Pallas kernel never replicates q/k/v). Cost ~ (1+N) GLA.
* ``"sorted"``: per row, the K*T (token, partition) entries are stable-sorted by
  ``partition * T + t``; one ``gla`` over length K*T with a segment reset at every
  (partition, document) start; outputs scatter-added back. Cost ~ (1+K) GLA, flat in N.
* ``"recurrent"``: a per-token ``lax.scan`` over the (1+N) states (the reference; also what
  ``step`` runs one token of).

Shapes: b batch, t time, h heads, c key dim, d value dim, n partitions, k top-K.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.gla import gla, gla_step
from kernels.gla.ref import document_index
from kernels.sse import sse, sse_step, topk_indices, topk_mask
from sqattn import mixers
from sqattn.layers import Dense, RMSNorm, ShortConv
from sqattn.mixers.gla import LowRankGate, feature_map

FORMS = ("mask", "sorted", "recurrent")
_TINY = float(jnp.finfo(jnp.float32).tiny)


class _LowRank(nnx.Module):
    """``x A B``: [.., d_model] -> [.., out] through ``rank``."""

    def __init__(self, d_model: int, out: int, *, rank: int, rngs: nnx.Rngs, dtype,
                 init_scale: float = 1.0):
        self.a = Dense(d_model, rank, axes=("embed", "lowrank"), rngs=rngs, dtype=dtype)
        self.b = Dense(rank, out, axes=("lowrank", "heads"), rngs=rngs, dtype=dtype,
                       init_scale=init_scale)

    def __call__(self, x):
        return self.b(self.a(x))


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router probabilities, top-K selection and routing weights.

    Args:
      logits: ``[..., n]`` router logits (float32).
      top_k: partitions per token.

    Returns:
      ``(e, mask, w)``: ``[..., n]`` float32 softmax, bool top-K mask (ties to the lowest index),
      and float32 weights ``w = e`` on selected entries, 0 elsewhere. A selected weight is clamped
      to the smallest normal float32 so that "selected" and ``w != 0`` always agree.
    """
    e = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [..., n]
    mask = topk_mask(e, top_k)  # [..., n]
    return e, mask, jnp.where(mask, jnp.maximum(e, _TINY), 0.0)


def balance_loss(e: jax.Array, mask: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array,
                                                                     jax.Array]:
    """``(N/K) * sum_i p_i f_i`` over all tokens, with ``p`` and ``f`` (``[n]`` each)."""
    n = e.shape[-1]
    p = jnp.mean(e.reshape(-1, n), axis=0)  # [n]
    f = jnp.mean(mask.reshape(-1, n).astype(jnp.float32), axis=0)  # [n]
    return (n / top_k) * jnp.sum(p * f), p, f


@mixers.register("S", "sse", "sparse state expansion over GLA (shared + top-K of N partitions)")
class SSE(nnx.Module):
    """SSE-GLA mixer.

    Attributes:
      num_heads: h.  head_k_dim: c (default d_model // h).  head_v_dim: d (default d_model // h).
      num_partitions: N sparse partitions.  top_k: K partitions per token (1 <= K <= N).
      aux_loss_coef: weight of the partition balance loss (0.01 in the paper's code).
      form: "mask" | "sorted" | "recurrent" (see module docstring).
      chunk_size, impl: passed to the ops (impl: auto|ref|chunked|interpret|pallas).
      short_conv: depthwise causal conv (width 4) on the q and k projections.
      conv_placement: where the conv's output goes. "shared" (the authors' placement, fla's SSE layer): only the
        shared branch reads conv(q), conv(k); the sparse branch is the raw projection plus its low-rank delta.
        "both": conv(q), conv(k) feed both branches (sparse = conv(q) + delta), i.e. the sparse partitions also
        see the local mixing; an option for ablations, not the paper's model.
      conv_bias: a bias in the conv (the authors' default: none).
      gate_rank / gate_norm: the two low-rank gates.  delta_rank: rank of the sparse q/k deltas
        (default d, as in FLA).
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32, num_heads: int = 4,
                 head_k_dim: int | None = None, head_v_dim: int | None = None,
                 num_partitions: int = 4, top_k: int = 1, aux_loss_coef: float = 0.01,
                 form: str = "mask", chunk_size: int = 64, impl: str = "auto",
                 short_conv: bool = False, conv_placement: str = "shared", conv_bias: bool = False,
                 gate_rank: int = 16, gate_norm: float = 16.0, delta_rank: int | None = None,
                 out_scale: float = 1.0):
        if form not in FORMS:
            raise ValueError(f"sse: unknown form {form!r}; expected one of {FORMS}")
        if conv_placement not in ("shared", "both"):
            raise ValueError(f"sse: conv_placement must be 'shared' or 'both', got {conv_placement!r}")
        if not 1 <= top_k <= num_partitions:
            raise ValueError(f"sse: need 1 <= top_k <= num_partitions, got top_k={top_k}, "
                             f"num_partitions={num_partitions}")
        c = head_k_dim or d_model // num_heads
        d = head_v_dim or d_model // num_heads
        hc, hd = num_heads * c, num_heads * d
        self.h, self.c, self.d = num_heads, c, d
        self.num_partitions, self.top_k = num_partitions, top_k
        self.aux_loss_coef, self.form = aux_loss_coef, form
        self.chunk_size, self.impl, self.dtype = chunk_size, impl, dtype
        self.key_map, self.query_map = feature_map("softmax"), feature_map("silu")
        self.q = Dense(d_model, hc, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.k = Dense(d_model, hc, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v = Dense(d_model, hd, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        # Sparse-branch deltas start at ~1/3 of the shared projections (FLA's N(0, 0.02) ratio).
        rank = delta_rank or d
        self.q_delta = _LowRank(d_model, hc, rank=rank, rngs=rngs, dtype=dtype, init_scale=0.3)
        self.k_delta = _LowRank(d_model, hc, rank=rank, rngs=rngs, dtype=dtype, init_scale=0.3)
        self.gate_shared = LowRankGate(d_model, hc, rank=gate_rank, norm=gate_norm, rngs=rngs,
                                       dtype=dtype)
        self.gate_sparse = LowRankGate(d_model, hc, rank=gate_rank, norm=gate_norm, rngs=rngs,
                                       dtype=dtype)
        self.router = Dense(d_model, num_partitions, axes=("embed", None), rngs=rngs,
                            dtype=jnp.float32)
        self.g = _LowRank(d_model, hd, rank=d, rngs=rngs, dtype=dtype)
        self.o_norm = RMSNorm(d)
        self.o = Dense(hd, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                       init_scale=out_scale)
        self.conv_placement = conv_placement
        self.conv_q = ShortConv(hc, rngs=rngs, dtype=dtype, use_bias=conv_bias) if short_conv else None
        self.conv_k = ShortConv(hc, rngs=rngs, dtype=dtype, use_bias=conv_bias) if short_conv else None

    # ---- features shared by every form and by ``step`` (x: [..., d_model])
    def _features(self, x, q1, k1, q_raw, k_raw) -> dict:
        """``q1, k1``: the shared branch's projections (after the conv, if any); ``q_raw, k_raw``: the
        projections the sparse branch adds its deltas to (see ``conv_placement``)."""
        shape = x.shape[:-1]
        if self.conv_placement == "both":
            q_raw, k_raw = q1, k1
        q2, k2 = q_raw + self.q_delta(x), k_raw + self.k_delta(x)  # [..., h*c]

        def heads(y, dim):
            return y.reshape(*shape, self.h, dim)  # [..., h, dim]

        qmap = lambda y: heads(self.query_map(y), self.c).astype(self.dtype)
        kmap = lambda y: self.key_map(heads(y, self.c)).astype(self.dtype)  # softmax over c, f32
        e, mask, w = route(self.router(x), self.top_k)  # [..., n]
        return dict(q1=qmap(q1), k1=kmap(k1), q2=qmap(q2), k2=kmap(k2),
                    v=heads(jax.nn.silu(self.v(x)), self.d),
                    g0=heads(self.gate_shared(x), self.c), g=heads(self.gate_sparse(x), self.c),
                    e=e, mask=mask, w=w)

    def _output(self, o, x):
        shape = o.shape[:-2]
        gate = jax.nn.silu(self.g(x)).reshape(*shape, self.h, self.d)  # [..., h, d]
        o = self.o_norm(o) * gate  # [..., h, d]
        return self.o(o.reshape(*shape, self.h * self.d))

    def _sow(self, name: str, value) -> None:
        with warnings.catch_warnings():  # sow outside nnx.capture is deprecated, still supported
            warnings.simplefilter("ignore", DeprecationWarning)
            self.sow(nnx.Intermediate, name, value)

    # ---- parallel forms
    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        q_raw, k_raw = self.q(x), self.k(x)
        q1, k1 = q_raw, k_raw
        if self.conv_q is not None:
            q1, k1 = self.conv_q(q_raw, segment_ids), self.conv_k(k_raw, segment_ids)
        f = self._features(x, q1, k1, q_raw, k_raw)
        loss, p, usage = balance_loss(f["e"], f["mask"], self.top_k)
        self._sow("aux_loss", self.aux_loss_coef * loss)
        self._sow("partition_prob", p)
        self._sow("partition_usage", usage)
        if self.form == "recurrent":
            o = self._recurrent(f, segment_ids)
        else:
            o0, _ = gla(f["q1"], f["k1"], f["v"], f["g0"], segment_ids=segment_ids,
                        chunk_size=self.chunk_size, impl=self.impl)  # [b, t, h, d]
            if self.form == "mask":
                o1, _ = sse(f["q2"], f["k2"], f["v"], f["g"], f["w"], segment_ids=segment_ids,
                            chunk_size=self.chunk_size, impl=self.impl)  # [b, t, h, d]
            else:
                o1 = self._sorted(f, segment_ids)
            o = o0.astype(jnp.float32) + o1.astype(jnp.float32)
        return self._output(o, x)

    def _sorted(self, f: dict, segment_ids) -> jax.Array:
        """Sparse branch, sorted form: one GLA over the K*T entries grouped by partition."""
        b, t = f["w"].shape[:2]
        kt = self.top_k * t
        part = topk_indices(f["e"], self.top_k)  # [b, t, k]  the selected partitions
        w_e = jnp.take_along_axis(f["w"], part, axis=-1)  # [b, t, k]
        key = (part * t + jnp.arange(t, dtype=jnp.int32)[:, None]).reshape(b, kt)  # [b, k*t]
        perm = jnp.argsort(key, axis=1, stable=True)  # [b, k*t]  entry = token * k + slot
        tok = perm // self.top_k  # [b, k*t]  token of each sorted entry
        rows = jnp.arange(b)[:, None]  # [b, 1]
        w_s = w_e.reshape(b, kt)[rows, perm][..., None, None]  # [b, k*t, 1, 1]
        doc = document_index(segment_ids, b, t)[rows, tok]  # [b, k*t]
        seg = part.reshape(b, kt)[rows, perm] * t + doc  # [b, k*t]  (partition, document) id
        q_s = (f["q2"][rows, tok] * w_s).astype(f["q2"].dtype)  # [b, k*t, h, c]
        k_s = (f["k2"][rows, tok] * w_s).astype(f["k2"].dtype)  # [b, k*t, h, c]
        o_s, _ = gla(q_s, k_s, f["v"][rows, tok], f["g"][rows, tok], segment_ids=seg,
                     chunk_size=self.chunk_size, impl=self.impl)  # [b, k*t, h, d]
        out = jnp.zeros((b, t, self.h, self.d), jnp.float32)
        return out.at[rows, tok].add(o_s.astype(jnp.float32))  # [b, t, h, d]

    def _recurrent(self, f: dict, segment_ids) -> jax.Array:
        """Reference form: a per-token scan over the (1 + N) states."""
        b, t = f["w"].shape[:2]
        doc = document_index(segment_ids, b, t)
        reset = jnp.concatenate([jnp.zeros((b, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
        names = ("q1", "k1", "q2", "k2", "v", "g0", "g", "w")

        def body(states, xs):
            r_t, *feats = xs
            states = jax.tree.map(
                lambda s: jnp.where(r_t.reshape((b,) + (1,) * (s.ndim - 1)), 0.0, s), states)
            o_t, states = self._token(dict(zip(names, feats)), states)
            return states, o_t

        xs = (reset,) + tuple(f[k] for k in names)
        xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)  # time-major
        _, o = jax.lax.scan(body, self._zero_states(b), xs)
        return jnp.moveaxis(o, 0, 1)  # [b, t, h, d]

    # ---- recurrent step shared by ``_recurrent`` and ``step``
    def _zero_states(self, batch: int) -> dict:
        shape = (batch, self.h, self.c, self.d)
        return {"shared": jnp.zeros(shape, jnp.float32),  # S^0      [b, h, c, d]
                "sparse": jnp.zeros((batch, self.num_partitions) + shape[1:],
                                    jnp.float32)}  # S^1..S^N  [b, n, h, c, d]

    def _token(self, f: dict, states: dict) -> tuple[jax.Array, dict]:
        o0, s0 = gla_step(f["q1"], f["k1"], f["v"], f["g0"], states["shared"])  # [b, h, d]
        o1, s1 = sse_step(f["q2"], f["k2"], f["v"], f["g"], f["w"], states["sparse"])
        return o0.astype(jnp.float32) + o1.astype(jnp.float32), {"shared": s0, "sparse": s1}

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        del max_len  # constant-size state: (1 + N) * h * c * d floats
        cache = self._zero_states(batch)
        if self.conv_q is not None:
            cache["conv_q"] = self.conv_q.init_cache(batch, dtype)
            cache["conv_k"] = self.conv_k.init_cache(batch, dtype)
        return cache

    def step(self, x_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        q_raw, k_raw = self.q(x_t), self.k(x_t)  # [b, h*c]
        q1, k1 = q_raw, k_raw
        new = dict(cache)
        if self.conv_q is not None:
            q1, new["conv_q"] = self.conv_q.step(q_raw, cache["conv_q"])
            k1, new["conv_k"] = self.conv_k.step(k_raw, cache["conv_k"])
        f = self._features(x_t, q1, k1, q_raw, k_raw)
        o, states = self._token(f, {"shared": cache["shared"], "sparse": cache["sparse"]})
        new.update(states)
        return self._output(o, x_t), new

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Parameter-free forward FLOPs per token of the shared and the K selected partitions
        (GLA's chunked estimate, times 1 + K). The algorithmic cost: the mask form additionally
        spends (N - K) GLA-equivalents on masked zeros, which is not counted as useful work."""
        per_state = (4.0 * self.h * self.c * self.d
                     + 4.0 * self.h * (self.c + self.d) * min(self.chunk_size, seq_len) / 2)
        return (1 + self.top_k) * per_state
