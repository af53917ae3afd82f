"""HAMburger (papers/hamburger.md): one base-model forward (one KV slot) covers 1..s_max tokens.

A pretrained ``LM`` is wrapped with
- a ``CompositionalEmbedder`` in front: the tokens a macro step emitted are "smashed" into one input slot
  (identity for a single token, mean + one-query cross-attention otherwise);
- a ``MicroStepDecoder`` behind: from the base model's taps at a slot it emits up to s_max tokens, the first
  being the base model's own prediction (skip connection), the rest self-drafted; a ``StopHead`` decides
  when the slot has absorbed enough.

Conventions (one for training and generation, tested for parity):
- Slot layout of a sequence ``x_0 .. x_{n-1}`` with prompt length P and response groups ``G_1 .. G_K``:
  slots ``0 .. P-1`` hold one prompt token each (position i), slot ``P-1+k`` holds group ``G_k`` and its
  RoPE position is the index of the group's **last** token. Padding slots follow the real ones.
- Group ``G_k`` is predicted from the taps of slot ``P-2+k`` (the slot that produced it; ``G_1`` from the
  last prompt slot), so slot j predicts the contents of slot j+1; no slot sees its own targets.
- Micro step 0 output = the last tap (the base model's final normed hidden): ``y_1`` is exactly the base
  model's next-token prediction. Micro step i >= 1 output = the decoder's output at sequence position
  ``n_taps - 1 + i`` of ``[taps ..., E(y_1), ..., E(y_{s_max-1})]``, then an RMSNorm (the reference feeds
  the raw decoder residual to the LM head; the norm is our choice, it keeps the tied head well scaled).
- Generation stops a macro step after emitting y when ``1 - p_stop(y) < c`` (confidence c), or at s_max
  tokens. ``c = 0.5`` is the reference's no-confidence rule ``p_stop > 0.5``.

Shapes: b batch, S slots, s = s_max, n taps, D d_model, V vocab, N = b * (S - 1) micro-decoded slots.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sqattn.layers import Dense, RMSNorm
from sqattn.models.lm import LM, Block

_MASK = -1e30  # finite: a row with no valid key gives a uniform softmax, never NaN


# ----------------------------------------------------------------------------------------------- segmentation
def segment_decreasing_v2(entropy: Sequence[float] | np.ndarray, *, s_max: int = 4, abs_thresh: float = 0.05,
                          rel_thresh: float = 0.3) -> np.ndarray:
    """Entropy segmentation ``decreasing_v2`` of a response into groups of 1..s_max tokens.

    Token i joins the current group iff the group holds fewer than ``s_max`` tokens and
    ``H_i < abs_thresh`` or ``H_i < rel_thresh * max(H of the group so far)``; otherwise it starts a new group.
    So each group starts with an informative token followed by near-deterministic ones.

    Args:
      entropy: ``[n]`` predictive entropy of the (frozen, original) base model at each response token.
      s_max: most tokens per group.
      abs_thresh: absolute entropy threshold (nats).
      rel_thresh: threshold relative to the largest entropy already in the group.

    Returns:
      int32 ``[K]`` group lengths, each in ``[1, s_max]``, summing to n.
    """
    if s_max < 1:
        raise ValueError(f"s_max must be >= 1, got {s_max}")
    h = np.asarray(entropy, np.float64).reshape(-1)
    lens: list[int] = []
    cur_len, cur_max = 0, -np.inf
    for x in h:
        if 0 < cur_len < s_max and (x < abs_thresh or x < rel_thresh * cur_max):
            cur_len += 1
            cur_max = max(cur_max, x)
        else:
            if cur_len:
                lens.append(cur_len)
            cur_len, cur_max = 1, x
    if cur_len:
        lens.append(cur_len)
    return np.asarray(lens, np.int32)


def slot_layout(tokens: Sequence[int] | np.ndarray, prompt_len: int, group_lens: Sequence[int] | np.ndarray, *,
                s_max: int = 4, num_slots: int | None = None) -> dict[str, np.ndarray]:
    """Static-shape slot layout of one sequence (module docstring): the prompt unmerged, one slot per group.

    Args:
      tokens: ``[n]`` the whole sequence (prompt then response).
      prompt_len: P >= 1 prompt tokens, one slot each.
      group_lens: ``[K]`` response group lengths in ``[1, s_max]``, summing to ``n - P``.
      s_max: most tokens per slot.
      num_slots: pad to this many slots (default ``P + K``, no padding).

    Returns:
      ``group_tokens`` int32 ``[S, s_max]`` (0-padded), ``group_len`` int32 ``[S]`` (0 on padding slots),
      ``slot_pos`` int32 ``[S]`` (position of the slot's last token; padding slots continue the count),
      ``response`` bool ``[S]`` (the slot holds a response group).
    """
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    lens = np.asarray(group_lens, np.int64).reshape(-1)
    n = tokens.shape[0]
    if not 1 <= prompt_len <= n:
        raise ValueError(f"prompt_len must be in [1, {n}], got {prompt_len}")
    if lens.size and (lens.min() < 1 or lens.max() > s_max):
        raise ValueError(f"group lengths must lie in [1, s_max={s_max}], got {lens.tolist()}")
    if int(lens.sum()) != n - prompt_len:
        raise ValueError(f"group lengths sum to {int(lens.sum())} but the response has {n - prompt_len} tokens")
    real = prompt_len + lens.size
    num_slots = real if num_slots is None else int(num_slots)
    if num_slots < real:
        raise ValueError(f"num_slots={num_slots} < {real} slots needed (prompt {prompt_len} + {lens.size} groups)")
    group_tokens = np.zeros((num_slots, s_max), np.int32)
    group_len = np.zeros((num_slots,), np.int32)
    slot_pos = np.zeros((num_slots,), np.int32)
    response = np.zeros((num_slots,), bool)
    group_tokens[:prompt_len, 0] = tokens[:prompt_len]
    group_len[:prompt_len] = 1
    slot_pos[:prompt_len] = np.arange(prompt_len)
    start = prompt_len
    for k, s in enumerate(lens):
        j = prompt_len + k
        group_tokens[j, :s] = tokens[start:start + s]
        group_len[j] = s
        slot_pos[j] = start + s - 1
        response[j] = True
        start += s
    slot_pos[real:] = n - 1 + np.arange(1, num_slots - real + 1)
    return {"group_tokens": group_tokens, "group_len": group_len, "slot_pos": slot_pos, "response": response}


def layout_batch(tokens: np.ndarray, prompt_len: int, group_lens: Sequence[Sequence[int]], *, s_max: int = 4,
                 num_slots: int | None = None) -> dict[str, np.ndarray]:
    """``slot_layout`` of every row of ``tokens [b, n]``, stacked to ``[b, S, ...]`` (S default: n)."""
    tokens = np.asarray(tokens)
    num_slots = tokens.shape[1] if num_slots is None else num_slots
    rows = [slot_layout(t, prompt_len, g, s_max=s_max, num_slots=num_slots) for t, g in zip(tokens, group_lens)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def micro_targets(batch: dict, s_max: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Targets of the teacher-forced forward: slot j predicts the group in slot j+1 (response groups only).

    Returns:
      ``targets`` int32 ``[b, S-1, s]``, ``mask`` f32 ``[b, S-1, s]`` (1 on real response tokens),
      ``stop_targets`` f32 ``[b, S-1, s]`` (1 at each group's last token).
    """
    targets = jnp.asarray(batch["group_tokens"])[:, 1:]                           # [b,S-1,s]
    n = jnp.where(jnp.asarray(batch["response"])[:, 1:], jnp.asarray(batch["group_len"])[:, 1:], 0)   # [b,S-1]
    i = jnp.arange(s_max)
    mask = (i < n[..., None]).astype(jnp.float32)
    stop = (i == n[..., None] - 1).astype(jnp.float32)
    return targets, mask, stop


# ----------------------------------------------------------------------------------------------- modules
class CompositionalEmbedder(nnx.Module):
    """Smashes the ordered tokens of a group into one input embedding.

    ``s = 1``: ``z = E(t_1)`` exactly. ``s > 1``: ``e_i = E(t_i)``, ``ē = mean_i e_i``,
    ``q = W_q ē``, ``k_i = W_k [e_i; p_i]``, ``v_i = W_v [e_i; p_i]``, one-query multi-head attention over the
    group's valid tokens, ``z = ē + W_o m``. ``p_i`` (width D/2, Xavier-normal) makes it order-sensitive.

    Attributes:
      pos: ``[s_max, D/2]`` in-group position vectors.  q, k, v, o: Linear layers with bias.
    """

    def __init__(self, d_model: int, s_max: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if d_model % num_heads or d_model % 2:
            raise ValueError(f"embedder: d_model={d_model} must be even and divisible by num_heads={num_heads}")
        half = d_model // 2
        self.pos = nnx.Param(jax.nn.initializers.glorot_normal()(rngs.params(), (s_max, half), jnp.float32),
                             axes=(None, "embed"))
        self.q = Dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs, use_bias=True, dtype=dtype)
        self.k = Dense(d_model + half, d_model, axes=("embed", "heads"), rngs=rngs, use_bias=True, dtype=dtype)
        self.v = Dense(d_model + half, d_model, axes=("embed", "heads"), rngs=rngs, use_bias=True, dtype=dtype)
        self.o = Dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs, use_bias=True, dtype=dtype)
        self.h, self.hd, self.s_max, self.dtype = num_heads, d_model // num_heads, s_max, dtype

    def __call__(self, emb: jax.Array, group_len: jax.Array) -> jax.Array:
        """``emb [..., s_max, D]`` token embeddings, ``group_len [...]`` valid count -> ``[..., D]``."""
        *lead, s, d = emb.shape
        valid = jnp.arange(s) < group_len[..., None]                              # [...,s]
        ef = emb.astype(jnp.float32)
        count = jnp.maximum(group_len, 1).astype(jnp.float32)[..., None]
        mean = jnp.sum(jnp.where(valid[..., None], ef, 0.0), axis=-2) / count      # [...,D] f32
        pos = jnp.broadcast_to(self.pos[...][:s].astype(emb.dtype), (*lead, s, d // 2))
        kv_in = jnp.concatenate([emb.astype(self.dtype), pos.astype(self.dtype)], axis=-1)   # [...,s,1.5D]
        q = self.q(mean).reshape(*lead, self.h, self.hd)                          # [...,h,k]
        k = self.k(kv_in).reshape(*lead, s, self.h, self.hd)                      # [...,s,h,k]
        v = self.v(kv_in).reshape(*lead, s, self.h, self.hd)                      # [...,s,h,k]
        logits = jnp.einsum("...hk,...shk->...hs", q, k, preferred_element_type=jnp.float32) * self.hd ** -0.5
        logits = jnp.where(valid[..., None, :], logits, _MASK)                    # [...,h,s]
        a = jax.nn.softmax(logits, axis=-1)
        m = jnp.einsum("...hs,...shk->...hk", a, v.astype(jnp.float32)).reshape(*lead, d)   # [...,D]
        z = mean + self.o(m).astype(jnp.float32)
        return jnp.where((group_len <= 1)[..., None], emb[..., 0, :], z.astype(emb.dtype))


class StopHead(nnx.Module):
    """``MLP D -> D -> D -> 1`` with SiLU: a stop logit per micro-step output."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = Dense(d_model, d_model, axes=("embed", "mlp"), rngs=rngs, use_bias=True, dtype=dtype)
        self.fc2 = Dense(d_model, d_model, axes=("mlp", "embed"), rngs=rngs, use_bias=True, dtype=dtype)
        self.out = Dense(d_model, 1, axes=("embed", None), rngs=rngs, use_bias=True, dtype=dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        """``h [..., D]`` -> stop logits ``[...]`` f32."""
        x = jax.nn.silu(self.fc1(h))
        x = jax.nn.silu(self.fc2(x))
        return self.out(x)[..., 0].astype(jnp.float32)


class MicroStepDecoder(nnx.Module):
    """Causal attention + SwiGLU blocks over ``[taps (n), E(y_1) .. E(y_{s_max-1})]`` (positions 0, 1, ...).

    Attributes:
      blocks: ``num_layers`` ``sqattn.models.lm.Block("A")``.  norm: RMSNorm on decoder outputs.
      stop: the ``StopHead``.
    """

    def __init__(self, d_model: int, *, num_taps: int, s_max: int, num_layers: int = 1, num_heads: int = 2,
                 mlp_dim: int = 0, rngs: nnx.Rngs, dtype=jnp.float32, norm_eps: float = 1e-6):
        if num_layers < 1:
            raise ValueError(f"micro decoder needs >= 1 layer, got {num_layers}")
        out_scale = 1.0 / (2 * num_layers) ** 0.5
        self.blocks = nnx.List([
            Block("A", d_model, mlp_dim, {"num_heads": num_heads, "out_scale": out_scale}, rngs=rngs, dtype=dtype,
                  norm_eps=norm_eps, out_scale=out_scale)
            for _ in range(num_layers)])
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.stop = StopHead(d_model, rngs=rngs, dtype=dtype)
        self.num_taps, self.s_max = num_taps, s_max

    def __call__(self, taps: jax.Array, token_emb: jax.Array) -> jax.Array:
        """``taps [N, n, D]`` (last = final normed hidden), ``token_emb [N, s-1, D]`` -> outputs ``[N, s, D]``.

        Output i = 0 is ``taps[:, -1]`` (skip connection); output i >= 1 is the normed decoder output at
        position ``n - 1 + i``, which has seen the taps and ``E(y_1) .. E(y_i)`` only (causal).
        """
        x = jnp.concatenate([taps, token_emb.astype(taps.dtype)], axis=1)       # [N, n+s-1, D]
        for blk in self.blocks:
            x = blk(x)
        out = self.norm(x[:, self.num_taps:])                                    # [N, s-1, D]
        return jnp.concatenate([taps[:, -1:], out.astype(taps.dtype)], axis=1)   # [N, s, D]


# ----------------------------------------------------------------------------------------------- the model
class HAMburger(nnx.Module):
    """A base ``LM`` with a compositional embedder, a micro-step decoder and a stop head grafted on.

    Attributes:
      base: the wrapped LM (its weights are fine-tuned too).  embedder, decoder: the grafted modules.
      s_max: most tokens per macro step.  taps: base block indices tapped (the last is the final block,
        passed through the final norm).  stop_weight: weight of the stop BCE in ``loss``.

    Batches (``layout_batch``): ``group_tokens [b,S,s]``, ``group_len [b,S]``, ``slot_pos [b,S]``,
    ``response [b,S]``.
    """

    def __init__(self, base: LM, *, s_max: int = 4, micro_layers: int = 1, taps: Sequence[int] | None = None,
                 micro_heads: int | None = None, micro_mlp_dim: int | None = None, embed_heads: int | None = None,
                 stop_weight: float = 0.5, rngs: nnx.Rngs):
        num_layers = len(base.blocks)
        d = base.embed.embedding.shape[1]
        taps = tuple(range(num_layers)) if taps is None else tuple(int(t) for t in taps)
        if not taps or taps[-1] != num_layers - 1 or any(a >= b for a, b in zip(taps, taps[1:])) or taps[0] < 0:
            raise ValueError(f"taps must be increasing block indices ending at the last block {num_layers - 1}, "
                             f"got {taps}")
        if s_max < 1:
            raise ValueError(f"s_max must be >= 1, got {s_max}")
        default_heads = max(1, d // 32)
        if micro_mlp_dim is None:
            mlp = base.blocks[-1].mlp
            micro_mlp_dim = mlp.gate.kernel.shape[1] if mlp is not None and hasattr(mlp, "gate") else 3 * d
        self.base = base
        self.s_max, self.taps, self.stop_weight = s_max, taps, stop_weight
        self.embedder = CompositionalEmbedder(d, s_max, embed_heads or default_heads, rngs=rngs, dtype=base.dtype)
        self.decoder = MicroStepDecoder(d, num_taps=len(taps), s_max=s_max, num_layers=micro_layers,
                                        num_heads=micro_heads or default_heads, mlp_dim=micro_mlp_dim, rngs=rngs,
                                        dtype=base.dtype)

    # --- pieces shared by training and generation
    def head(self, h: jax.Array) -> jax.Array:
        """The base model's output head without its final norm: ``[..., D]`` -> logits ``[..., V]`` f32."""
        if self.base.head is None:
            return self.base.embed.attend(h)
        return self.base.head(h).astype(jnp.float32)

    def slot_taps(self, group_tokens: jax.Array, group_len: jax.Array, slot_pos: jax.Array) -> jax.Array:
        """Smash each slot, run the base over the slots at their positions -> taps ``[b, S, n, D]``."""
        x = self.embedder(self.base.embed(group_tokens), group_len)              # [b,S,D]
        hs = self.base.hidden_states(x, positions=slot_pos)
        taps = [hs[i] for i in self.taps[:-1]] + [self.base.final_norm(hs[-1])]
        return jnp.stack(taps, axis=2)                                            # [b,S,n,D]

    def micro_outputs(self, taps: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced micro steps: ``taps [N, n, D]``, ``tokens [N, s]`` (the group predicted; its last
        token is never an input) -> (logits ``[N, s, V]`` f32, stop logits ``[N, s]`` f32)."""
        h = self.decoder(taps, self.base.embed(tokens[:, :-1]))                  # [N,s,D]
        return self.head(h), self.decoder.stop(h)

    # --- training
    def __call__(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced forward over the slot layout.

        Returns:
          ``logits [b, S-1, s, V]`` and ``stop_logits [b, S-1, s]``: entry ``[:, j, i]`` predicts token i of
          the group in slot j+1 (see ``micro_targets``), from the taps of slot j.
        """
        taps = self.slot_taps(batch["group_tokens"], batch["group_len"], batch["slot_pos"])[:, :-1]   # [b,S-1,n,D]
        tgt = jnp.asarray(batch["group_tokens"])[:, 1:]                           # [b,S-1,s]
        b, s1, n, d = taps.shape
        logits, stop = self.micro_outputs(taps.reshape(b * s1, n, d), tgt.reshape(b * s1, self.s_max))
        return logits.reshape(b, s1, self.s_max, -1), stop.reshape(b, s1, self.s_max)

    def loss(self, batch: dict) -> tuple[jax.Array, dict]:
        """``CE(response tokens) + stop_weight * BCE(stop)``, both means over response tokens.

        Metrics: ``ce``, ``bce``, ``accuracy``, ``step_accuracy [s]`` and ``step_weight [s]`` (per micro
        step), ``stop_accuracy``, ``weight`` (number of response tokens).
        """
        logits, stop = self(batch)
        targets, mask, stop_t = micro_targets(batch, self.s_max)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]    # [b,S-1,s]
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        bce = optax.sigmoid_binary_cross_entropy(stop, stop_t)
        weight = jnp.sum(mask)
        denom = jnp.maximum(weight, 1.0)
        ce = jnp.sum(nll * mask) / denom
        bce_mean = jnp.sum(bce * mask) / denom
        step_w = jnp.sum(mask, axis=(0, 1))                                       # [s]
        metrics = {
            "ce": ce, "bce": bce_mean, "accuracy": jnp.sum(correct * mask) / denom,
            "step_accuracy": jnp.sum(correct * mask, axis=(0, 1)) / jnp.maximum(step_w, 1.0),
            "step_weight": step_w,
            "stop_accuracy": jnp.sum(((stop > 0) == (stop_t > 0)) * mask) / denom,
            "weight": weight,
        }
        return ce + self.stop_weight * bce_mean, metrics

    # --- generation
    def generate(self, prompt_tokens: Sequence[int] | np.ndarray, max_new_tokens: int,
                 confidence: float = 0.9) -> tuple[np.ndarray, int]:
        """Greedy macro/micro-step generation (batch 1).

        Each macro step re-runs the base over the slot sequence so far (padded to a fixed bucket, explicit
        positions; one base forward = one KV slot), then up to s_max micro steps; the step stops after a
        token whose ``1 - p_stop < confidence``.

        Returns:
          ``(tokens int32 [max_new_tokens], n_macro_steps)``; KV compression = max_new_tokens / n_macro_steps.
        """
        prompt = _check_prompt(prompt_tokens, max_new_tokens)
        toks, n_macro, *_ = self._run(prompt[None], max_new_tokens, confidence, "free")
        return toks[0], int(n_macro[0])

    def generate_batch(self, prompts: np.ndarray, max_new_tokens: int,
                       confidence: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """``generate`` for ``k`` prompts of one length at once (the macro loop vmapped; each row is
        exactly what ``generate`` returns for it alone).

        Returns:
          ``(tokens int32 [k, max_new_tokens], n_macro_steps int [k])``.
        """
        toks, n_macro, *_ = self._run(_check_prompts(prompts, max_new_tokens), max_new_tokens, confidence, "free")
        return toks, n_macro

    def read_batch(self, prompts: np.ndarray, texts: np.ndarray,
                   confidence: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Reads given continuations the way generation would segment them: each macro step emits the *given*
        tokens, and the stop head decides (at ``confidence``) where the step ends.

        This measures the KV compression the model would reach on real text, and how often its micro-step
        argmax agrees with that text, free of what greedy decoding drifts into (e.g. runs of spaces).

        Args:
          prompts: ``[k, p]`` token ids.
          texts: ``[k, m]`` token ids that follow each prompt.

        Returns:
          ``(n_macro_steps int [k], hits bool [k, m])``: macro steps taken over the m tokens, and whether the
          micro-step argmax at each token equals it. At ``confidence=1`` every step is one token, so ``hits``
          is the base model's next-token accuracy on the text.
        """
        texts = np.asarray(texts)
        if texts.ndim != 2 or texts.shape[0] != np.shape(prompts)[0]:
            raise ValueError(f"texts must be [k, m] with k = {np.shape(prompts)[0]} prompts, got {texts.shape}")
        prompts = _check_prompts(prompts, texts.shape[1])
        _, n_macro, _, _, hits = self._run(prompts, texts.shape[1], confidence, "tokens", tokens=texts)
        return n_macro, hits

    def forced_decode(self, prompt_tokens: Sequence[int] | np.ndarray, response_tokens: Sequence[int] | np.ndarray,
                      group_lens: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The generation path with its tokens and group lengths forced (argmax and stop head ignored).

        Returns:
          ``logits [K, s, V]`` and ``stop_logits [K, s]`` of every macro step; row k predicts group k+1 and
          equals the teacher-forced forward's slot ``P-1+k`` (entries past the group length are unused).
        """
        response = np.asarray(response_tokens, np.int32).reshape(-1)
        lens = np.asarray(group_lens, np.int32).reshape(-1)
        prompt = _check_prompt(prompt_tokens, response.size)
        if lens.size == 0 or lens.min() < 1 or lens.max() > self.s_max or lens.sum() != response.size:
            raise ValueError(f"group_lens {lens.tolist()} must lie in [1, {self.s_max}] and sum to "
                             f"{response.size}")
        _, n_macro, logits, stop, _ = self._run(prompt[None], response.size, 0.5, "forced", tokens=response[None],
                                                lens=lens[None])
        n_macro = int(n_macro[0])
        assert n_macro == lens.size, (n_macro, lens.size)
        return logits[0, :n_macro], stop[0, :n_macro]

    def _run(self, prompts: np.ndarray, max_new: int, confidence: float, mode: str, *, tokens=None, lens=None):
        """``_decode_batch`` on numpy inputs: ``prompts [k, p]``; ``tokens [k, max_new]`` for modes "tokens" and
        "forced", ``lens [k, <= max_new]`` for "forced".

        Returns numpy ``(tokens [k, max_new], n_macro [k], logits [k, M, s, V], stop [k, M, s], hits [k,
        max_new])``; logits and stop are recorded in mode "forced" only (M = 0 otherwise).
        """
        graphdef, state = nnx.split(self)
        k, p = prompts.shape
        ft = np.zeros((k, max_new + self.s_max), np.int32)
        fl = np.zeros((k, max_new), np.int32)
        if tokens is not None:
            ft[:, :max_new] = tokens
        if lens is not None:
            fl[:, :lens.shape[1]] = lens
        num_slots = -(-(p + max_new) // 16) * 16          # bucket: one compile per 16 slots
        out = _decode_batch(graphdef, state, jnp.asarray(prompts, jnp.int32), jnp.float32(confidence),
                            jnp.asarray(ft), jnp.asarray(fl), max_new_tokens=max_new, num_slots=num_slots,
                            mode=mode)
        toks, n_macro, logits, stop, hits = jax.device_get(out)
        return (np.asarray(toks, np.int32), np.asarray(n_macro, np.int64), np.asarray(logits), np.asarray(stop),
                np.asarray(hits, bool))


def _check_prompts(prompts, max_new_tokens: int) -> np.ndarray:
    """``prompts [k, p]`` as int32, each row checked like one ``prompt_tokens``."""
    prompts = np.asarray(prompts)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [k, prompt_len], got shape {prompts.shape}")
    return np.stack([_check_prompt(row, max_new_tokens) for row in prompts])


def _check_prompt(prompt_tokens, max_new_tokens: int) -> np.ndarray:
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be a non-empty 1-D integer sequence, got shape {prompt.shape} "
                         f"dtype {prompt.dtype}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return prompt.astype(np.int32)


def _decode_one(graphdef, state, prompt: jax.Array, confidence: jax.Array, forced_tokens: jax.Array,
                forced_lens: jax.Array, *, max_new_tokens: int, num_slots: int, mode: str):
    """Macro-step loop (``lax.while_loop``) with a fixed s_max-iteration micro loop inside.

    ``mode``: "free" (argmax tokens, the stop head ends each step), "forced" (``forced_tokens`` and
    ``forced_lens`` both given) or "tokens" (``forced_tokens`` given, the stop head ends each step).

    Returns tokens ``[max_new_tokens]``, the number of macro steps, per-macro-step logits ``[M, s, V]`` and
    stop logits ``[M, s]`` (M = max_new_tokens, the most macro steps possible, in mode "forced"; M = 0 in the
    other modes, which need neither), and ``hits [max_new_tokens]``: whether the micro-step argmax equals the
    emitted token.
    """
    if mode not in ("free", "forced", "tokens"):
        raise ValueError(f"mode must be 'free', 'forced' or 'tokens', got {mode!r}")
    model: HAMburger = nnx.merge(graphdef, state)
    s = model.s_max
    p = prompt.shape[0]
    vocab = model.base.embed.embedding.shape[0]
    gt = jnp.zeros((num_slots, s), jnp.int32).at[:p, 0].set(prompt)
    gl = jnp.zeros((num_slots,), jnp.int32).at[:p].set(1)
    pos = jnp.arange(num_slots, dtype=jnp.int32)     # slots past the current one are causally invisible
    record = max_new_tokens if mode == "forced" else 0
    init = (jnp.int32(0), jnp.int32(0), gt, gl, pos, jnp.zeros((max_new_tokens + s,), jnp.int32),
            jnp.zeros((record, s, vocab), jnp.float32), jnp.zeros((record, s), jnp.float32),
            jnp.zeros((max_new_tokens + s,), bool))

    def cond(carry):
        return carry[1] < max_new_tokens

    def body(carry):
        m, emitted, gt, gl, pos, out, rec_logits, rec_stop, hits = carry
        slot = p - 1 + m                                                           # the producing slot
        taps = model.slot_taps(gt[None], gl[None], pos[None])[0]                   # [S,n,D]
        taps = jax.lax.dynamic_index_in_dim(taps, slot, axis=0, keepdims=True)    # [1,n,D]
        forced_group = jax.lax.dynamic_slice_in_dim(forced_tokens, emitted, s)    # [s]
        toks = jnp.zeros((1, s), jnp.int32)
        step_logits, step_stop, step_hit = [], [], []
        for i in range(s):                                                         # fixed micro loop
            h = model.decoder(taps, model.base.embed(toks[:, :-1]))[:, i]         # [1,D]: sees toks[:i] only
            lg = model.head(h)[0]                                                  # [V]
            best = jnp.argmax(lg).astype(jnp.int32)
            tok = best if mode == "free" else forced_group[i]
            toks = toks.at[0, i].set(tok)
            step_hit.append(best == tok)
            step_logits.append(lg)
            step_stop.append(model.decoder.stop(h)[0])
        stop_logits = jnp.stack(step_stop)                                         # [s]
        if mode == "forced":
            n_emit = forced_lens[m]
        else:
            go_on = (1.0 - jax.nn.sigmoid(stop_logits[:-1])) >= confidence         # [s-1]: continue after i
            n_emit = 1 + jnp.sum(jnp.cumprod(go_on.astype(jnp.int32)))            # done mask
        n_emit = jnp.minimum(n_emit, max_new_tokens - emitted)
        valid = jnp.arange(s) < n_emit
        group = jnp.where(valid, toks[0], 0)
        gt = jax.lax.dynamic_update_slice(gt, group[None], (slot + 1, 0))
        gl = gl.at[slot + 1].set(n_emit)
        pos = pos.at[slot + 1].set(p - 1 + emitted + n_emit)                      # index of its last token
        out = jax.lax.dynamic_update_slice_in_dim(out, toks[0], emitted, axis=0)  # extras get overwritten
        hits = jax.lax.dynamic_update_slice_in_dim(hits, jnp.stack(step_hit), emitted, axis=0)
        if record:
            rec_logits = rec_logits.at[m].set(jnp.stack(step_logits))
            rec_stop = rec_stop.at[m].set(stop_logits)
        return m + 1, emitted + n_emit, gt, gl, pos, out, rec_logits, rec_stop, hits

    m, _, _, _, _, out, rec_logits, rec_stop, hits = jax.lax.while_loop(cond, body, init)
    return out[:max_new_tokens], m, rec_logits, rec_stop, hits[:max_new_tokens]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_slots", "mode"))
def _decode_batch(graphdef, state, prompts, confidence, forced_tokens, forced_lens, *, max_new_tokens: int,
                  num_slots: int, mode: str):
    """``_decode_one`` over a batch of prompts ``[k, p]`` (a vmapped while loop: it runs until every row is
    done; finished rows are left unchanged)."""
    def one(prompt, ft, fl):
        return _decode_one(graphdef, state, prompt, confidence, ft, fl, max_new_tokens=max_new_tokens,
                           num_slots=num_slots, mode=mode)
    return jax.vmap(one)(prompts, forced_tokens, forced_lens)
