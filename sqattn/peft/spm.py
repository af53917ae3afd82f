"""SPM (Lyu et al., CVPR 2024; papers/spm.md): one-dimensional adapters that erase a concept from a
text-to-image diffusion model, with latent anchoring (training) and facilitated transport (inference).

* ``SPMDense``: a frozen ``Dense`` W plus K rank-1 adapters, y = W x + s * sum_k m_k U_k (D_k x), with
  D_k [in] kaiming-uniform(a = sqrt 5) and U_k [out] zero-initialised (the adapted model starts as the base
  model, bit for bit), s = alpha / rank = 1. K = 1 while training; ``combine`` stacks several trained SPMs.
* ``multiplier(m, form)``: a context that sets the per-adapter multipliers m of every ``SPMDense`` called inside
  it: a scalar, [b] (per example) or [b, K] (per example and SPM). Outside any context m = 1. ``m = 0`` gives
  the frozen base model (the erasing targets). ``form="paper"`` is the paper's W' = W + sum_i g_i dW_i;
  ``form="factor_sum"`` is the official inference code, which scales both factors of every SPM by g_i and sums
  them: W' = W + (sum_i g_i U_i)(sum_j g_j D_j) (g^2 dW for one SPM, plus cross terms U_i D_j).
* ``apply_spm`` / ``from_config`` (``config.peft.method = "spm"``): wraps the Dense layers named in
  ``targets`` inside the DiT's ``layers`` (self-attention q/k/v/o, cross-attention q/k/v/o, MLP fc1/fc2;
  never the text encoder or the timestep modulation).
* ``erase_loss``: L = L_era + lambda L_anc with
  - x_t from an n-step DDIM rollout (n ~ U{1..S-1}, CFG ``rollout_guidance``) of the current adapted model
    (a stop-gradient copy) from pure noise on the target prompt, at timestep t_n;
  - L_era = || eps_{theta+SPM}(x_t, c_tar, t) - [eps(x_t, c_sur, t) - eta (eps(x_t, c_tar, t) - eps(x_t, c_sur,
    t))] ||^2, both targets from the frozen model (m = 0, stop-gradient);
  - L_anc = || eps_{theta+SPM}(x_t, c_anc, t) - eps(x_t, c_anc, t) ||^2 over ``num_anchors`` anchors per
    example sampled in the continuous text-state space (``sample_anchors``).
* ``permeability``: facilitated transport's g_i = max(cos(E(c_p), E(c_i)), |T(c_p) & T(c_i)| / |T(c_i)|),
  clipped to [0, 1]; the cosine is over flattened padded text states (``cosine="flat"``, as the code) or
  over the mean of the non-padding states (``"mean"``), or left out (``"none"``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sqattn.diffusion.sampler import ddim_rollout
from sqattn.diffusion.schedule import Schedule
from sqattn.layers import Dense

__all__ = ["SPMDense", "SPMParam", "apply_spm", "combine", "erase_loss", "from_config", "multiplier",
           "permeability", "sample_anchors", "spm_params"]

FORMS = ("paper", "factor_sum")
DEFAULT_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


class SPMParam(nnx.Param):
    """An SPM adapter weight (a ``nnx.Param`` subtype, so filters can pick adapters alone)."""


# ----------------------------------------------------------------------------------------------- multiplier
_ACTIVE = threading.local()


@contextlib.contextmanager
def multiplier(m, form: str = "paper"):
    """Sets the multipliers of every ``SPMDense`` called inside (see the module docstring)."""
    if form not in FORMS:
        raise ValueError(f"SPM form {form!r} unknown; known: {FORMS}")
    stack = _ACTIVE.__dict__.setdefault("stack", [])
    stack.append((m, form))
    try:
        yield
    finally:
        stack.pop()


def _current():
    stack = getattr(_ACTIVE, "stack", None)
    return stack[-1] if stack else (None, "paper")


# ----------------------------------------------------------------------------------------------- adapter
def _kaiming_uniform_sqrt5(key, shape, fan_in):
    """torch's default Linear init (kaiming_uniform, a = sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class SPMDense(nnx.Module):
    """A frozen ``Dense`` plus K rank-1 adapters (see the module docstring).

    Attributes:
      base: the wrapped ``Dense``.
      spm_down: [K, in] SPMParam (D_k).   spm_up: [K, out] SPMParam (U_k, zeros at creation).
      scale: alpha / rank.
    """

    def __init__(self, base: Dense, *, num: int = 1, alpha: float = 1.0, rngs: nnx.Rngs):
        if num < 1:
            raise ValueError(f"SPM needs at least one adapter, got num={num}")
        d_in, d_out = base.kernel.shape
        self.base = base
        self.spm_down = SPMParam(_kaiming_uniform_sqrt5(rngs.params(), (num, d_in), d_in), axes=(None, None))
        self.spm_up = SPMParam(jnp.zeros((num, d_out), jnp.float32), axes=(None, None))
        self.scale = float(alpha)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)                                                              # [b, ..., out]
        dtype = y.dtype
        h = jnp.einsum("...i,ki->...k", x.astype(jnp.float32), self.spm_down[...])  # [b, ..., K]
        up = self.spm_up[...]                                                         # [K, out]
        m, form = _current()
        if m is None:                                                                 # m = 1: both forms agree
            delta = h @ up
        else:
            k = up.shape[0]
            m = jnp.asarray(m, jnp.float32)
            if m.ndim == 0:
                m = jnp.broadcast_to(m, (x.shape[0], k))
            elif m.ndim == 1:
                m = jnp.broadcast_to(m[:, None], (m.shape[0], k))
            if m.shape != (x.shape[0], k):
                raise ValueError(f"SPM multiplier of shape {m.shape} does not fit batch {x.shape[0]} and {k} "
                                 f"adapters (want a scalar, [b] or [b, K])")
            mb = m.reshape((m.shape[0],) + (1,) * (x.ndim - 2) + (k,))               # [b, 1.., K]
            if form == "paper":
                delta = (h * mb) @ up
            else:                                                                     # (sum g U)(sum g D) x
                up_sum = (m @ up).reshape((m.shape[0],) + (1,) * (x.ndim - 2) + (up.shape[1],))
                delta = jnp.sum(h * mb, axis=-1, keepdims=True) * up_sum
        return y + (delta * self.scale).astype(dtype)


def _adapt_sites(model: nnx.Module, targets: Sequence[str]) -> list[tuple[object, str]]:
    """(parent module, attribute) of every Dense named in ``targets`` inside ``model.layers``."""
    if not hasattr(model, "layers"):
        raise ValueError(f"SPM adapts a DiT's `layers`; {type(model).__name__} has none")
    sites = []
    for _, node in nnx.iter_graph(model.layers):
        if isinstance(node, nnx.Module) and not isinstance(node, (Dense, SPMDense)):
            for name in targets:
                if isinstance(getattr(node, name, None), Dense):
                    sites.append((node, name))
    if not sites:
        raise ValueError(f"SPM targets {list(targets)} match no Dense layer inside model.layers")
    return sites


def apply_spm(model: nnx.Module, targets: Sequence[str] = DEFAULT_TARGETS, *, num: int = 1,
              alpha: float = 1.0, rngs: nnx.Rngs) -> nnx.Module:
    """Wraps the ``targets`` Dense layers inside ``model.layers`` in ``SPMDense`` (in place); returns model."""
    for parent, name in _adapt_sites(model, targets):
        setattr(parent, name, SPMDense(getattr(parent, name), num=num, alpha=alpha, rngs=rngs))
    return model


def from_config(model: nnx.Module, peft, rngs: nnx.Rngs) -> nnx.Module:
    """``config.peft.method = "spm"``: rank 1 (``peft.rank`` must be 1), alpha ``peft.alpha``, ``peft.targets``
    a comma-separated list of Dense attribute names (default all of ``DEFAULT_TARGETS``)."""
    if int(peft.get("rank", 1)) != 1:
        raise ValueError(f"SPM adapters are one-dimensional: set peft.rank=1 (got {peft.get('rank')})")
    targets = tuple(t for t in str(peft.get("targets", "")).split(",") if t) or DEFAULT_TARGETS
    return apply_spm(model, targets, alpha=float(peft.get("alpha", 1.0)), rngs=rngs)


def spm_params(model: nnx.Module) -> dict:
    """The adapters of ``model`` as a pure dict (paths -> {"spm_down", "spm_up"} arrays)."""
    return nnx.to_pure_dict(nnx.state(model, SPMParam))


def combine(model: nnx.Module, spms: Sequence[nnx.Module]) -> nnx.Module:
    """Loads K trained single-SPM models' adapters, stacked, into ``model`` (already wrapped with
    ``apply_spm(num=K)`` on the same targets; its base weights are used). Nothing is retrained."""
    states = [nnx.state(m, SPMParam) for m in spms]
    mine = nnx.state(model, SPMParam)
    pure = [nnx.to_pure_dict(s) for s in states]
    flat_mine = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(mine)))
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *pure)
    flat_new = dict(jax.tree_util.tree_leaves_with_path(stacked))
    if set(flat_mine) != set(flat_new):
        raise ValueError("combine: the SPMs and the model adapt different layers")
    for path, v in flat_new.items():
        if v.shape != flat_mine[path].shape:
            raise ValueError(f"combine: {jax.tree_util.keystr(path)} has shape {flat_mine[path].shape}, the "
                             f"stacked SPMs give {v.shape} (wrap the model with apply_spm(num={len(spms)}))")
    nnx.replace_by_pure_dict(mine, stacked)
    nnx.update(model, mine)
    return model


# ----------------------------------------------------------------------------------------------- FT
def _cos(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity of rows: a [n, F], b [m, F] -> [n, m] (0 where a row is zero)."""
    na = jnp.linalg.norm(a, axis=-1, keepdims=True)
    nb = jnp.linalg.norm(b, axis=-1, keepdims=True)
    return (a @ b.T) / jnp.maximum(na * nb.T, 1e-12)


def permeability(encode, prompt_tokens: jax.Array, concept_tokens: jax.Array, *, pad_id: int = 0,
                 cosine: str = "flat") -> jax.Array:
    """Facilitated-transport weights g [b, K] in [0, 1] of b prompts for K erased concepts.

    Args:
      encode: tokens [n, L] -> text states [n, L, d] (the frozen text encoder).
      prompt_tokens: [b, L] int; concept_tokens: [K, L] int (each concept's own prompt, e.g. "star").
      pad_id: the padding id (left out of the token sets, and of the states under ``cosine="mean"``).
      cosine: "flat" (flattened padded states, as the official code), "mean" (mean of non-padding states),
        or "none" (token overlap only).
    """
    if cosine not in ("flat", "mean", "none"):
        raise ValueError(f"FT cosine {cosine!r} unknown; known: 'flat', 'mean', 'none'")
    p_ok = prompt_tokens != pad_id                                               # [b, L]
    c_ok = concept_tokens != pad_id                                              # [K, L]
    # token overlap |T(p) & T(c)| / |T(c)| over distinct non-padding ids
    same = (concept_tokens[None, :, :, None] == prompt_tokens[:, None, None, :]) & p_ok[:, None, None, :]
    present = jnp.any(same, axis=-1) & c_ok[None]                                # [b, K, L]
    distinct = _first_occurrence(concept_tokens) & c_ok                          # [K, L]
    overlap = jnp.sum(present & distinct[None], -1) / jnp.maximum(jnp.sum(distinct, -1), 1)[None]
    if cosine == "none":
        cos = jnp.zeros_like(overlap)
    else:
        ep = encode(prompt_tokens).astype(jnp.float32)                           # [b, L, d]
        ec = encode(concept_tokens).astype(jnp.float32)                          # [K, L, d]
        if cosine == "flat":
            cos = _cos(ep.reshape(ep.shape[0], -1), ec.reshape(ec.shape[0], -1))
        else:
            mp = jnp.sum(ep * p_ok[..., None], 1) / jnp.maximum(jnp.sum(p_ok, 1), 1)[:, None]
            mc = jnp.sum(ec * c_ok[..., None], 1) / jnp.maximum(jnp.sum(c_ok, 1), 1)[:, None]
            cos = _cos(mp, mc)
    return jnp.clip(jnp.maximum(cos, overlap.astype(jnp.float32)), 0.0, 1.0)


def _first_occurrence(tokens: jax.Array) -> jax.Array:
    """[K, L] bool: position j holds the first occurrence of its id in the row."""
    eq = tokens[:, :, None] == tokens[:, None, :]                                # [K, L, L]
    earlier = jnp.tril(jnp.ones(eq.shape[1:], bool), k=-1)                       # [j, i]: i < j
    return ~jnp.any(eq & earlier[None], axis=-1)


# ----------------------------------------------------------------------------------------------- training
def sample_anchors(rng: jax.Array, c_tar: jax.Array, num: int, candidates: int = 4) -> jax.Array:
    """Latent-anchoring anchors [b * num, L, d] for target text states c_tar [b, L, d] (the official sampler).

    Per example, ``candidates * num`` Gaussian directions g are drawn and normalised; each is accepted with
    probability 1 - cos(g, c_tar) (flattened); the first ``num`` accepted ones are kept (if fewer are accepted,
    rejected ones fill up: with cos ~ 0 in L*d dimensions this practically never happens), then rescaled to
    ||c_tar|| * U(0.8, 1.2). Row i * num + j is example i's j-th anchor.
    """
    b = c_tar.shape[0]
    flat = c_tar.reshape(b, -1).astype(jnp.float32)                              # [b, F]
    m = candidates * num
    k_g, k_u, k_s = jax.random.split(rng, 3)
    g = jax.random.normal(k_g, (b, m, flat.shape[1]), jnp.float32)
    g = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
    cos = jnp.einsum("bmf,bf->bm", g, flat) / jnp.maximum(jnp.linalg.norm(flat, axis=-1), 1e-12)[:, None]
    accept = jax.random.uniform(k_u, (b, m)) < 1.0 - cos
    order = jnp.argsort(jnp.where(accept, 0, 1) * m + jnp.arange(m)[None], axis=-1)[:, :num]   # accepted first
    pick = jnp.take_along_axis(g, order[..., None], axis=1)                      # [b, num, F]
    norm = jnp.linalg.norm(flat, axis=-1)[:, None, None] * jax.random.uniform(k_s, (b, num, 1), minval=0.8,
                                                                                   maxval=1.2)
    return (pick * norm).reshape(b * num, *c_tar.shape[1:]).astype(c_tar.dtype)


def _frozen_copy(model: nnx.Module) -> nnx.Module:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


def erase_loss(model: nnx.Module, target_tokens: jax.Array, surrogate_tokens: jax.Array, rng: jax.Array, *,
               schedule: Schedule, image_shape: tuple[int, int, int], rollout_steps: int = 20,
               rollout_guidance: float = 3.0, eta: float = 1.0, la_strength: float = 1000.0,
               num_anchors: int = 4) -> tuple[jax.Array, dict]:
    """SPM's training loss for a DiT with SPM adapters (see the module docstring); returns (loss, metrics).

    Args:
      model: the adapted DiT (``model(x, t, context=states)``, ``model.encode_text(tokens)``).
      target_tokens: [b, L] prompts containing the concept; surrogate_tokens: [b, L] (c_sur, usually "").
      rng: randomness of this step (rollout length, initial noise, anchors).
      schedule: the DiT's training noise schedule; image_shape: (H, W, C).
      rollout_steps: S, the DDIM steps of a full generation (n ~ U{1 .. S-1}).
      rollout_guidance: CFG scale of the rollout (unconditional prompt: all padding).
      eta: the erasing guidance scale.  la_strength: lambda (0 disables latent anchoring).
      num_anchors: anchors per example.
    """
    b = target_tokens.shape[0]
    k_n, k_x, k_a = jax.random.split(rng, 3)
    frozen = _frozen_copy(model)
    c_tar = frozen.encode_text(target_tokens)                                    # text encoder: never adapted
    c_sur = frozen.encode_text(surrogate_tokens)
    c_unc = frozen.encode_text(jnp.zeros_like(target_tokens))

    def eps(mdl):
        return lambda x, t, ctx: mdl(x, t, context=ctx)

    n = jax.random.randint(k_n, (), 1, rollout_steps)
    noise = jax.random.normal(k_x, (b, *image_shape), jnp.float32)
    x_t, t = ddim_rollout(eps(frozen), schedule, noise, c_tar, c_unc, n, num_steps=rollout_steps,
                          guidance=rollout_guidance)                              # current adapted model, m = 1
    x_t = jax.lax.stop_gradient(x_t)
    tb = jnp.broadcast_to(t, (b,))
    with multiplier(0.0):                                                        # the frozen base model
        e_tar = frozen(x_t, tb, context=c_tar)
        e_sur = frozen(x_t, tb, context=c_sur)
    target = jax.lax.stop_gradient(e_sur - eta * (e_tar - e_sur))
    e_spm = model(x_t, tb, context=c_tar)
    l_era = jnp.mean(jnp.square(e_spm - target))
    metrics = {"loss_erase": l_era, "rollout_n": n.astype(jnp.float32)}
    loss = l_era
    if la_strength > 0 and num_anchors > 0:
        anchors = jax.lax.stop_gradient(sample_anchors(k_a, c_tar, num_anchors))   # [b * A, L, d]
        x_rep = jnp.repeat(x_t, num_anchors, axis=0)
        t_rep = jnp.repeat(tb, num_anchors, axis=0)
        with multiplier(0.0):
            e_anc_base = jax.lax.stop_gradient(frozen(x_rep, t_rep, context=anchors))
        e_anc = model(x_rep, t_rep, context=anchors)
        l_anc = jnp.mean(jnp.square(e_anc - e_anc_base))
        loss = loss + la_strength * l_anc
        metrics["loss_anchor"] = l_anc
    return loss, metrics
