"""Decoder-only LM whose layers follow a block pattern of mixer letters.

``block_pattern="SSSSSA"`` repeated to ``num_layers``: each letter picks a mixer from ``sqattn.mixers``
(A attention, G gla, M mamba, ...), configured by ``mixers[<mixer name>]``. Each block is
``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` (the MLP is skipped when ``mlp_dim == 0``, Mamba-style).

Returns ``(logits[b,t,V] f32, aux)`` where ``aux`` holds named intermediates for probing and
``aux["aux_loss"]``, the sum of every auxiliary loss a layer sowed (e.g. SSE partition balance), which the
LM task adds to the cross-entropy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sqattn import mixers as mixer_registry
from sqattn.layers import Embed, RMSNorm, SwiGLU, Dense
from sqattn.parallel.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PAD_LOGIT = -1e9  # logit of a padding vocabulary column: finite (0 * PAD_LOGIT is 0, never NaN), exp() is 0


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (the rows of the embedding / output head)."""
    if vocab_size < 1 or multiple < 1:
        raise ValueError(f"vocab_size and vocab_multiple must be >= 1, got {vocab_size}, {multiple}")
    return -(-vocab_size // multiple) * multiple


def expand_pattern(block_pattern: str, num_layers: int) -> str:
    """Repeats ``block_pattern`` cyclically to ``num_layers`` letters."""
    if not block_pattern:
        raise ValueError("block_pattern must be a non-empty string of mixer letters")
    return "".join(block_pattern[i % len(block_pattern)] for i in range(num_layers))


def as_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


class Block(nnx.Module):
    def __init__(self, letter: str, d_model: int, mlp_dim: int, mixer_cfg: dict, *, rngs: nnx.Rngs,
                 dtype, norm_eps: float, out_scale: float, moe_cfg: dict | None = None):
        spec = mixer_registry.get(letter)
        self.letter = letter
        self.norm1 = RMSNorm(d_model, eps=norm_eps)
        self.mixer = spec.factory(d_model, rngs=rngs, dtype=dtype, **mixer_cfg)
        if moe_cfg is not None:  # a mixture of experts replaces the MLP (sqattn.moe)
            from sqattn.moe import MoE
            self.norm2 = RMSNorm(d_model, eps=norm_eps)
            self.mlp = MoE(d_model, rngs=rngs, dtype=dtype, out_scale=out_scale, **moe_cfg)
            return
        self.norm2 = RMSNorm(d_model, eps=norm_eps) if mlp_dim else None
        self.mlp = SwiGLU(d_model, mlp_dim, rngs=rngs, dtype=dtype, out_scale=out_scale) if mlp_dim else None

    def __call__(self, x, segment_ids=None, positions=None):
        kw = {} if positions is None else {"positions": positions}   # only position-aware mixers take it
        x = x + self.mixer(self.norm1(x), segment_ids=segment_ids, **kw)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return constrain(x, ("act_batch", "act_seq", "act_embed"))

    def step(self, x_t, cache):
        y, cache = self.mixer.step(self.norm1(x_t), cache)
        x_t = x_t + y
        if self.mlp is not None:
            x_t = x_t + self.mlp(self.norm2(x_t))
        return x_t, cache


class LM(nnx.Module):
    """Decoder LM.

    Attributes:
      vocab_size, d_model, num_layers: sizes.  block_pattern: mixer letters, repeated to num_layers.
      mlp_dim: SwiGLU hidden width (0 = no MLP).  tie_embeddings: output head = embedding^T.
      dtype: compute dtype name ("float32" | "bfloat16"); parameters are always float32.
      mixers: {mixer name: kwargs} for each mixer the pattern uses.  remat: rematerialise each block.
      vocab_multiple: the embedding and the output head get ``padded_vocab_size(vocab_size, vocab_multiple)``
        rows, so the vocabulary dimension divides every mesh axis that shards it (MaxText-style; e.g. 128 for
        GPT-2's 50,257 -> 50,304). Logits keep the padded width (still sharded over ``act_vocab``) with the
        padding columns set to ``PAD_LOGIT``, so the loss, argmax and sampling never pick them and tokens stay
        ``< vocab_size``. 1 (default) = no padding: the same parameters as before the option existed.
      scan_layers: compile each distinct block once: runs of identical consecutive blocks (same structure,
        e.g. the three S of "SSSA") go through one ``lax.scan``, and when every repetition of
        ``block_pattern`` is identical the repetitions are scanned too (``sse_h_2b``: 3 x [5 S scanned, A]).
        The parameters keep their per-block layout (checkpoints, growth and adapters see the same tree); they
        are stacked inside the step, and gradients flow back to each block. Same function as the loop, to
        rounding. It halves tracing, but on XLA:CPU it makes the XLA compile slower, not faster (XLA:CPU
        already compiles identical kernels once; measured in ``experiments/profile_cpu.py``); it is meant for
        deep models on TPU/GPU, where compile time grows with the unrolled depth (not measured here).
      moe: None (no MoE) or ``sqattn.moe.MoE`` kwargs plus ``every``/``layers`` choosing the blocks whose MLP
        it replaces (``sqattn.moe.moe_layer_indices``; e.g. ``every=2``: blocks 1, 3, ...).
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, block_pattern: str = "A",
                 mlp_dim: int = 0, tie_embeddings: bool = True, dtype: str = "float32",
                 mixers: dict[str, dict[str, Any]] | None = None, norm_eps: float = 1e-6,
                 remat: bool = False, moe: dict[str, Any] | None = None, vocab_multiple: int = 1,
                 scan_layers: bool = False, rngs: nnx.Rngs):
        mixers = dict(mixers or {})
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, vocab_multiple)
        moe_layers, moe_kwargs = (), None
        if moe is not None:
            from sqattn import moe as moe_lib
            moe_layers, moe_kwargs = moe_lib.moe_layer_indices(num_layers, moe), moe_lib.layer_kwargs(moe)
        self.pattern = expand_pattern(block_pattern, num_layers)
        self.dtype = as_dtype(dtype)
        self.remat = remat
        self.scan_layers = scan_layers
        self.period = len(block_pattern)
        self.embed = Embed(self.padded_vocab, d_model, rngs=rngs, dtype=self.dtype)
        out_scale = 1.0 / (2 * num_layers) ** 0.5  # GPT-2 style residual-branch scaling
        blocks = []
        for i, letter in enumerate(self.pattern):
            name = mixer_registry.get(letter).name
            cfg = dict(mixers.get(name, {}))
            if "out_scale" in _init_args(letter):
                cfg.setdefault("out_scale", out_scale)
            blocks.append(Block(letter, d_model, mlp_dim, cfg, rngs=rngs, dtype=self.dtype,
                                norm_eps=norm_eps, out_scale=out_scale,
                                moe_cfg=moe_kwargs if i in moe_layers else None))
        self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(d_model, eps=norm_eps)
        self.head = None if tie_embeddings else Dense(d_model, self.padded_vocab, axes=("embed", "vocab"),
                                                      rngs=rngs, dtype=self.dtype)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None):
        x = self.embed(tokens)                                           # [b,t,d]
        x = self.hidden_states(x, segment_ids=segment_ids)[-1]
        logits = self.logits(x)                                          # [b,t,V] f32
        aux = {"aux_loss": _collect_aux_losses(self), "final_hidden": x}
        return logits, aux

    def hidden_states(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None) -> list[jax.Array]:
        """Runs the blocks on input embeddings ``x [b,t,d]``; returns every block's output (pre final norm).

        ``positions [b,t]`` overrides the RoPE positions of position-aware mixers (attention; default: the
        index within each packed segment), e.g. for models whose slots skip positions (HAMburger). Causality
        stays by slot order.
        """
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        if self.scan_layers:
            out, aux = scan_blocks(list(self.blocks), x, segment_ids, positions, remat=self.remat,
                                   period=self.period)
            self.sow(nnx.Intermediate, "aux_loss", aux)   # what the scanned blocks sowed, summed
            return out
        out = []
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(lambda blk, h: blk(h, segment_ids, positions))(block, x)
            else:
                x = block(x, segment_ids, positions)
            out.append(x)
        return out

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and output head: hidden ``[..., d]`` -> logits ``[..., V]`` f32."""
        logits = self._logits(self.final_norm(h))
        if logits.ndim == 3:
            logits = constrain(logits, ("act_batch", "act_seq", "act_vocab"))
        return logits

    def _logits(self, h):
        logits = self.embed.attend(h) if self.head is None else self.head(h).astype(jnp.float32)
        if self.padded_vocab == self.vocab_size:
            return logits
        # An elementwise mask (not a slice), so the vocabulary dimension keeps its sharding.
        real = jnp.arange(self.padded_vocab) < self.vocab_size
        return jnp.where(real, logits, jnp.asarray(PAD_LOGIT, logits.dtype))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list:
        return [blk.mixer.init_cache(batch, max_len, dtype) for blk in self.blocks]

    def step(self, token_t: jax.Array, cache: list):
        """One decoding step: token_t [b] int -> (logits [b,V] f32, cache)."""
        x = self.embed(token_t)                                          # [b,d]
        new_cache = []
        for blk, c in zip(self.blocks, cache):
            x, c = blk.step(x, c)
            new_cache.append(c)
        return self._logits(self.final_norm(x)), new_cache


def _call_block(graphdef, state, x, segment_ids, positions):
    """Runs one block rebuilt from ``(graphdef, state)``; returns its output and the aux losses it sowed."""
    block = nnx.merge(graphdef, state)
    y = block(x, segment_ids, positions)
    return y, _collect_aux_losses(block)


def _stack(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _runs(keys: list) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of equal consecutive ``keys``."""
    runs, i = [], 0
    while i < len(keys):
        j = i + 1
        while j < len(keys) and keys[j] == keys[i]:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _block_key(graphdef, state):
    """What must be equal for two blocks to share one compiled body: structure, shapes and dtypes."""
    shapes = tuple((jax.tree_util.keystr(p), v.shape, v.dtype)
                   for p, v in jax.tree_util.tree_leaves_with_path(state))
    return graphdef, shapes


def _run_segment(graphdefs, states, keys, x, segment_ids, positions, remat):
    """Blocks in order; each run of identical consecutive blocks is one ``lax.scan``."""
    call = _call_block
    if remat:
        call = jax.checkpoint(_call_block, static_argnums=(0,))
    outs, aux = [], jnp.zeros((), jnp.float32)
    for i, j in _runs(keys):
        if j - i == 1:
            x, a = call(graphdefs[i], states[i], x, segment_ids, positions)
            outs.append(x)
            aux = aux + a
            continue
        gd = graphdefs[i]

        def body(h, st, gd=gd):
            h, a = call(gd, st, h, segment_ids, positions)
            return h, (h, a)

        x, (hs, a) = jax.lax.scan(body, x, _stack(states[i:j]))
        outs.extend(hs[k] for k in range(j - i))
        aux = aux + jnp.sum(a)
    return outs, aux


def scan_blocks(blocks: list, x, segment_ids, positions, *, remat: bool, period: int):
    """``LM.hidden_states`` with each distinct block compiled once (``LM(scan_layers=True)``).

    Two levels: if the blocks are ``n > 1`` identical repetitions of ``period`` blocks, one ``lax.scan`` runs
    over the repetitions; within a repetition (or the whole stack otherwise) each run of identical consecutive
    blocks is one inner ``lax.scan``. Returns (every block's output, the sum of the aux losses they sowed).
    """
    split = [nnx.split(b) for b in blocks]
    graphdefs, states = [g for g, _ in split], [s for _, s in split]
    keys = [_block_key(g, s) for g, s in split]
    n = len(blocks) // period
    if n > 1 and n * period == len(blocks) and all(keys[r * period:(r + 1) * period] == keys[:period]
                                                    for r in range(n)):
        per_rep = [_stack(states[j::period]) for j in range(period)]    # block j of every repetition

        def body(h, rep_states):
            outs, a = _run_segment(graphdefs[:period], list(rep_states), keys[:period], h, segment_ids,
                                   positions, remat)
            return outs[-1], (jnp.stack(outs), a)

        _, (hs, a) = jax.lax.scan(body, x, tuple(per_rep))            # hs [n, period, b, t, d]
        return [hs[r, j] for r in range(n) for j in range(period)], jnp.sum(a)
    return _run_segment(graphdefs, states, keys, x, segment_ids, positions, remat)


def _init_args(letter: str) -> tuple[str, ...]:
    import inspect
    return tuple(inspect.signature(mixer_registry.get(letter).factory.__init__).parameters)


def _collect_aux_losses(model: nnx.Module) -> jax.Array:
    """Pops every ``aux_loss`` a submodule sowed (``self.sow(nnx.Intermediate, "aux_loss", v)``) and sums them."""
    total = jnp.zeros((), jnp.float32)
    sown = nnx.pop(model, nnx.Intermediate)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(sown)):
        if any(getattr(p, "key", None) == "aux_loss" for p in path):
            total = total + jnp.sum(leaf).astype(jnp.float32)
    return total
