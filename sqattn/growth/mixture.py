"""MixtureGrowth (papers/mixturegrowth.md): width growth by recombining learned templates.

``TemplateDense``: a weight assembled from templates, ``W_b = sum_j c_b[j] T_{s(b)}[j]`` for each block ``b``
(``jnp.tensordot(c_b, T_s, 1)``), two template sets ``s``, ``K`` templates each, blocks in ``[in, out]`` layout:

  split "both" (hidden):   W = [[W_0, W_3],        W_0 = member 0 (set 0), W_1 = member 1 (set 1),
                                [W_2, W_1]]        W_2 = input half 1 -> output half 0 (set 0, new at growth),
                                                   W_3 = input half 0 -> output half 1 (set 1, new at growth)
  split "out" (input layer): W = [W_0, W_1] along outputs;  split "in" (classifier): W = [W_0; W_1] along
  inputs and the grown bias is b_0 + b_1, so the grown logits with zero cross blocks are the two members'
  logits summed.

Coefficients are one 1-D ``nnx.Param`` per block, so the optimizer's decay mask (matrices only) never decays
them; templates are decayed like any matrix.

``TemplateMLP`` (model ``"template_mlp"``): ``in -> hidden -> hidden -> out`` with ReLU and no normalisation
(so the zero-coefficient grown net is exactly the logit-sum ensemble; the note's BN concatenation has no
LayerNorm analogue). ``stage`` selects member 0, member 1 or the grown net; the parameter tree is the same in
every stage, and member stages freeze the other member (``member_trainable``).

Growth (init.transform, each a run of the trainer):
* ``grow``: stage m1 -> stage grown; new coefficients ``c_2, c_3`` by ``init.args.coef_init``:
  ``orthogonal`` (the right singular vector of the existing coefficients of that set with the smallest singular
  value, unit norm, times ``coef_scale``), ``zero``, ``copy`` (c_0 / c_1 plus ``0.01 coef_scale`` times a random
  unit vector), ``random`` (U[0, 1) x ``coef_scale``).
* ``grow_dense``: a plain ``mlp`` of the grown width whose cross blocks are fresh random weights (random-weight
  growth: the mlp's own init) and whose diagonal blocks are the members' assembled weights.
* ``net2net``: member ``init.args.member`` as a plain ``mlp`` widened by Net2Net splitting (``width.grow_params``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.growth import paths

STAGES = ("m0", "m1", "grown")
SPLITS = ("both", "out", "in")
COEF_INITS = ("orthogonal", "zero", "copy", "random")
SETS = (0, 1, 0, 1)           # template set of each block (the note's --member_template_sets 0,1,0,1)


class TemplateDense(nnx.Module):
    """``x @ W + b`` with ``W`` assembled from templates (module docstring).

    Args:
      in_b, out_b: block sizes: the member's input and output widths (for split "out" ``in_b`` is the full
        input, for split "in" ``out_b`` is the full output).
      split: "both" | "out" | "in".  num_templates: K per set.  stage: "m0" | "m1" | "grown".
    """

    def __init__(self, in_b: int, out_b: int, *, split: str, num_templates: int = 2, stage: str = "grown",
                 rngs: nnx.Rngs):
        if split not in SPLITS or stage not in STAGES:
            raise ValueError(f"TemplateDense: split must be in {SPLITS} and stage in {STAGES}, got {split!r}, "
                             f"{stage!r}")
        k = int(num_templates)
        self.split, self.stage, self.k = split, stage, k
        std = (2.0 / in_b) ** 0.5                                            # Kaiming for one block
        self.templates = nnx.List([nnx.Param(std * jax.random.normal(rngs.params(), (k, in_b, out_b)),
                                             axes=(None, None, None)) for _ in range(2)])
        nb = 4 if split == "both" else 2
        q = jnp.linalg.qr(jax.random.normal(rngs.params(), (max(nb, k), max(nb, k))))[0][:nb, :k]
        q = q / jnp.linalg.norm(q, axis=1, keepdims=True)                    # unit-norm coefficient rows
        self.coefs = nnx.List([nnx.Param(q[b].astype(jnp.float32), axes=(None,)) for b in range(nb)])
        self.bias = nnx.List([nnx.Param(jnp.zeros((out_b,), jnp.float32), axes=(None,)) for _ in range(2)])

    def block(self, b: int) -> jax.Array:
        """``W_b`` [in_b, out_b]."""
        return jnp.tensordot(self.coefs[b][...], self.templates[SETS[b]][...], axes=1)

    def weight(self) -> tuple[jax.Array, jax.Array]:
        """(W, bias) of the current stage."""
        if self.stage != "grown":
            m = STAGES.index(self.stage)
            return self.block(m), self.bias[m][...]
        if self.split == "both":
            w = jnp.block([[self.block(0), self.block(3)], [self.block(2), self.block(1)]])
            return w, jnp.concatenate([self.bias[0][...], self.bias[1][...]])
        if self.split == "out":
            return jnp.concatenate([self.block(0), self.block(1)], 1), jnp.concatenate(
                [self.bias[0][...], self.bias[1][...]])
        return jnp.concatenate([self.block(0), self.block(1)], 0), self.bias[0][...] + self.bias[1][...]

    def __call__(self, x: jax.Array) -> jax.Array:
        w, b = self.weight()
        return x.astype(jnp.float32) @ w + b


class TemplateMLP(nnx.Module):
    """``in_features -> hidden -> hidden -> out_features`` of TemplateDense layers (members: ``hidden / 2``)."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 256, num_templates: int = 2,
                 stage: str = "grown", *, rngs: nnx.Rngs):
        if hidden % 2:
            raise ValueError(f"TemplateMLP: hidden must be even (two members of hidden/2), got {hidden}")
        h = hidden // 2
        kw = dict(num_templates=num_templates, stage=stage, rngs=rngs)
        self.in_features = in_features
        self.layers = nnx.List([TemplateDense(in_features, h, split="out", **kw),
                                TemplateDense(h, h, split="both", **kw)])
        self.out = TemplateDense(h, out_features, split="in", **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        for layer in self.layers:
            h = jax.nn.relu(layer(h))
        return self.out(h)


def member_trainable(member: int) -> str:
    """``optim.trainable`` regex of member ``member``'s parameters (its template set, coefficients, biases)."""
    return rf"(templates/{member}|coefs/{member}|bias/{member})$"


def _new_coef(existing: np.ndarray, mode: str, scale: float, rng: np.random.Generator, k: int) -> np.ndarray:
    if mode == "zero":
        return np.zeros(k, np.float32)
    if mode == "random":
        return (rng.random(k) * scale).astype(np.float32)
    if mode == "copy":
        u = rng.standard_normal(k)
        return (existing[0] + 0.01 * scale * u / np.linalg.norm(u)).astype(np.float32)
    # orthogonal: the least-aligned direction with the set's existing coefficient vectors
    v = np.linalg.svd(np.atleast_2d(existing), full_matrices=True)[2][-1]
    return (scale * v / np.linalg.norm(v)).astype(np.float32)


def grow_params(params: dict, *, coef_init: str, coef_scale: float = 1.0, seed: int = 0) -> dict:
    """A TemplateMLP's params with the cross-block coefficients (blocks 2, 3 of every "both" layer) set."""
    if coef_init not in COEF_INITS:
        raise ValueError(f"mixturegrowth: coef_init must be one of {COEF_INITS}, got {coef_init!r}")
    rng = np.random.default_rng(seed)
    out = jax.tree.map(np.asarray, params)
    for layer in out["layers"].values():
        if len(layer["coefs"]) != 4:
            continue
        c = {b: np.asarray(layer["coefs"][b]) for b in range(4)}
        for b in (2, 3):
            layer["coefs"][b] = _new_coef(np.stack([c[b - 2]]), coef_init, coef_scale, rng, c[0].shape[0])
    return out


def _with_stage(config, stage: str):
    c = config.copy_and_resolve_references()
    c.model.stage = stage
    return c


def grow(src_model, src_config, config):
    """init.transform: a trained member-stage TemplateMLP -> the grown TemplateMLP of ``config``."""
    from sqattn.train import state as state_lib
    if config.model_name != "template_mlp" or config.model.stage != "grown":
        raise ValueError("mixturegrowth.grow: the config must be a template_mlp at stage 'grown'")
    if int(src_config.model.hidden) != int(config.model.hidden):
        raise ValueError(f"mixturegrowth.grow: the source template_mlp has hidden={src_config.model.hidden}, this "
                         f"config {config.model.hidden}: the members' widths are fixed by the templates")
    args = config.init.get("args") or {}
    params = grow_params(paths.pure_params(src_model), coef_init=str(args.get("coef_init", "orthogonal")),
                         coef_scale=float(args.get("coef_scale", 1.0)), seed=int(args.get("seed", config.seed)))
    return paths.load(state_lib.build_base_model(config), params)


def member_dense(model: TemplateMLP, member: int) -> dict:
    """Member ``member`` as the pure params of a plain ``mlp`` (hidden = hidden/2)."""
    out = {"layers": {}, "out": {}}
    for i, layer in enumerate(model.layers):
        out["layers"][i] = {"kernel": layer.block(member), "bias": layer.bias[member][...]}
    out["out"] = {"kernel": model.out.block(member), "bias": model.out.bias[member][...]}
    return out


def grow_dense(src_model, src_config, config):
    """init.transform: TemplateMLP -> plain ``mlp`` of the grown width, cross blocks from the mlp's fresh init."""
    from sqattn.train import state as state_lib
    tgt = state_lib.build_base_model(config)
    fresh = paths.pure_params(tgt)
    grown = _with_stage(src_config, "grown")
    model = state_lib.build_base_model(grown)
    paths.load(model, paths.pure_params(src_model))
    h = int(src_config.model.hidden) // 2
    params = jax.tree.map(np.asarray, fresh)
    for i, layer in enumerate(model.layers):
        w, b = (np.array(a) for a in layer.weight())
        if layer.split == "both":
            w[:h, h:] = params["layers"][i]["kernel"][:h, h:]              # cross blocks: random-weight growth
            w[h:, :h] = params["layers"][i]["kernel"][h:, :h]
        params["layers"][i] = {"kernel": w, "bias": b}
    w, b = (np.asarray(a) for a in model.out.weight())
    params["out"] = {"kernel": w, "bias": b}
    return paths.load(tgt, params)


def net2net(src_model, src_config, config):
    """init.transform: member ``init.args.member`` of a TemplateMLP, Net2Net-widened into ``config``'s mlp."""
    from sqattn.growth import width
    from sqattn.train import state as state_lib
    args = config.init.get("args") or {}
    member = int(args.get("member", 0))
    small = config.copy_and_resolve_references()
    small.model.hidden = int(src_config.model.hidden) // 2
    src = paths.load(state_lib.build_base_model(small), member_dense(src_model, member))
    tgt = state_lib.build_base_model(config)
    axes = paths.param_axes(tgt)
    for p in axes:       # sqattn.models.mlp names only the outputs of its hidden layers; their inputs are hidden too
        if p[0] == "layers" and p[1] > 0 and p[-1] == "kernel":
            axes[p] = ("mlp", "mlp")
    grown = width.grow_params(paths.pure_params(src), paths.pure_params(tgt), axes,
                              op="net2net", seed=int(args.get("seed", config.seed)))
    return paths.load(tgt, grown)
