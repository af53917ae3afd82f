"""G_learn, depth form (LiGO; papers/gstack.md): a learned linear map from the base's layers to the target's.

The grown model's layer ``i`` has, for every parameter path ``p`` of a block (``mixer/q/kernel``,
``mlp/down/kernel``, ``norm1/scale``, ...), the weight ``sum_j W_p[i, j] * base_layer_j[p]``: one ``[L_t, L_s]``
map per path, mixing only layers of the same kind (``paths.signature``: mixer letter and MoE/dense MLP). Maps
start as vertically stacked identities in G_stack's order (``depth.layer_map(order="by_kind")``: target layer
``i`` <- base layer ``i mod L_s`` when the pattern allows it), so at the start the model *is* G_stack's grown
model. A short phase trains only the maps, then ``fold`` writes the mixed weights into a plain LM.

* ``LiGOLM`` (model ``"ligo_lm"``): ``base`` = the base LM (``config.model`` with ``ligo.source_layers`` layers
  and ``ligo.source_pattern``), frozen by ``optim.trainable = TRAINABLE`` (zero updates, no optimizer state:
  bit-identical through the phase); ``maps/k<g>/<path>`` = the trainable maps of kind group ``g``. Its forward
  builds the target LM (``config.model`` as it is: ``num_layers`` = L_t) with the mixed weights and runs it, so
  the LM task trains it unchanged. Embedding, final norm and head are the base's, frozen: LiGO's depth operator
  maps only layers, and leaving them alone keeps the phase a pure "learn the operator" step (they train again
  after the fold).
* ``start`` (``init.transform`` of the learn run): puts the base run's trained weights into ``base``.
* ``fold`` (``init.transform`` of the continued run): the LiGO run's model -> a plain ``lm`` of the target config
  with exactly the weights the LiGO forward used.

``sqattn.configs.growth.grown_config(op="learn")`` and ``(op="fold")`` make the two runs. FLOPs: a step trains
the target LM's forward and backward (the weight gradients feed the maps), so it costs the target's
``flops_per_token``; ``LiGOLM.flops_per_token`` is that, and the trainer's estimate
(``sqattn.train.state.flops_per_token``) uses a model's own ``flops_per_token`` when it has one. The map
contraction, once per step (``4 L_t L_s`` x a layer's parameters, forward and the maps' gradient), is not counted: ``2 L_s / (3 x tokens per step)`` of a step, 0.07% at L_s = 1 and 1024 tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.growth import depth, field_diff, model_fields, paths
from sqattn.models.lm import LM

MODEL = "ligo_lm"
MAPS = "maps"
TRAINABLE = r"^maps/"          # optim.trainable of the learn run: the maps only
START = "sqattn.growth.learn:start"
FOLD = "sqattn.growth.learn:fold"


def _abstract_lm(kwargs: dict) -> LM:
    return nnx.eval_shape(lambda: LM(**kwargs, rngs=nnx.Rngs(params=0)))


@functools.lru_cache(maxsize=8)
def _target_view(key: "_Frozen") -> LM:
    """The abstract target LM for FLOP counting only (shared: never written to)."""
    return _abstract_lm(key.value)


def kind_groups(src_sigs: list, tgt_sigs: list) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(target layers, base layers) of each kind, in the order kinds first appear in the target.

    Raises:
      ValueError: a target kind no base layer has, a base kind the target lacks, or a kind whose target count is
        not a multiple of its base count (the stacked-identity start needs whole copies).
    """
    groups: dict = {}
    for i, s in enumerate(tgt_sigs):
        groups.setdefault(s, ([], []))[0].append(i)
    for j, s in enumerate(src_sigs):
        if s not in groups:
            raise ValueError(f"G_learn: base layer {j} is of a kind the target has no layer of (the target's "
                             f"kinds come from its block pattern and MoE layers); its parameters: "
                             f"{[p for p, _ in s][:4]}")
        groups[s][1].append(j)
    out = []
    for s, (ti, si) in groups.items():
        if not si:
            raise ValueError(f"G_learn: target layer {ti[0]} is of a kind no base layer has; its parameters: "
                             f"{[p for p, _ in s][:4]}")
        if len(ti) % len(si):
            raise ValueError(f"G_learn: the target has {len(ti)} layers of a kind the base has {len(si)} of "
                             f"(target layers {ti}, base layers {si}); the map starts as stacked identities, so "
                             f"the target's count must be a multiple of the base's")
        out.append((tuple(ti), tuple(si)))
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    groups: tuple        # ((target layers, base layers), ...)
    rels: tuple          # per group: the block-relative parameter paths


class LiGOLM(nnx.Module):
    """A frozen base LM and trainable depth maps; computes as the target LM with the mixed weights.

    Args:
      ligo: ``{"source_layers": L_s, "source_pattern": the base's block pattern ("" = the target's)}``.
      **lm_kwargs: the target LM's fields (``sqattn.models.lm.LM``), ``num_layers`` = L_t.
    """

    def __init__(self, *, ligo: dict, rngs: nnx.Rngs, **lm_kwargs):
        ligo = dict(ligo)
        unknown = sorted(set(ligo) - {"source_layers", "source_pattern"})
        if unknown:
            raise ValueError(f"model.ligo: unknown keys {unknown}; known: source_layers, source_pattern")
        ls = int(ligo.get("source_layers", 0))
        if ls < 1:
            raise ValueError(f"model.ligo.source_layers must be >= 1 (the base run's depth), got {ls}")
        src_kwargs = dict(lm_kwargs, num_layers=ls)
        if ligo.get("source_pattern"):
            src_kwargs["block_pattern"] = ligo["source_pattern"]
        self.target_kwargs = _Frozen(lm_kwargs)
        self.base = LM(**src_kwargs, rngs=rngs)
        src = paths.pure_params(self.base)
        tgt = paths.pure_params(_abstract_lm(lm_kwargs))
        lt = paths.num_layers(tgt)
        if lt < ls:
            raise ValueError(f"G_learn: the target has {lt} layers, fewer than the base's {ls}")
        src_sigs = [paths.signature(paths.layer(src, j)) for j in range(ls)]
        tgt_sigs = [paths.signature(paths.layer(tgt, i)) for i in range(lt)]
        groups = kind_groups(src_sigs, tgt_sigs)
        start = depth.layer_map(src_sigs, tgt_sigs, "by_kind")
        maps, rels = {}, []
        for g, (ti, si) in enumerate(groups):
            w = np.zeros((len(ti), len(si)), np.float32)
            for a, i in enumerate(ti):
                w[a, si.index(start[i])] = 1.0
            group_rels = tuple(sorted(paths.flatten(paths.layer(src, si[0])), key=str))
            rels.append(group_rels)
            maps[f"k{g}"] = paths.unflatten({r: nnx.Param(jnp.asarray(w), axes=(None, None)) for r in group_rels})
        self.plan = _Plan(tuple(groups), tuple(rels))
        self.maps = _to_nnx(maps)

    # -- the grown weights ------------------------------------------------------------------------------------
    def target_params(self) -> dict:
        """The target LM's parameters (pure dict): layer ``i`` of a kind group = its map row times the group's
        base layers; embedding, final norm and head are the base's."""
        src = paths.pure_params(self.base)
        out = {k: v for k, v in src.items() if k != paths.BLOCKS}
        blocks: dict[int, dict] = {}
        for g, ((ti, si), group_rels) in enumerate(zip(self.plan.groups, self.plan.rels)):
            maps = paths.flatten(nnx.to_pure_dict(nnx.state(self.maps[f"k{g}"], nnx.Param)))
            layers = [paths.flatten(paths.layer(src, j)) for j in si]
            for rel in group_rels:
                stacked = jnp.stack([lay[rel] for lay in layers])
                mixed = jnp.einsum("ts,s...->t...", maps[rel], stacked, precision=jax.lax.Precision.HIGHEST)
                for a, i in enumerate(ti):
                    blocks.setdefault(i, {})[rel] = mixed[a]
        out[paths.BLOCKS] = {i: paths.unflatten(blocks[i]) for i in sorted(blocks)}
        return out

    def target_model(self) -> LM:
        """The target LM holding ``target_params()`` (inside a trace: its tracers)."""
        lm = _abstract_lm(self.target_kwargs.value)
        st = nnx.state(lm, nnx.Param)
        nnx.replace_by_pure_dict(st, self.target_params())
        nnx.update(lm, st)
        return lm

    def __call__(self, tokens, *, segment_ids=None):
        return self.target_model()(tokens, segment_ids=segment_ids)

    # -- FLOPs ------------------------------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: the target LM's (its forward and full backward run every step)."""
        from sqattn.train import state as state_lib
        lm = _target_view(self.target_kwargs)
        return state_lib.flops_per_token(lm, nnx.state(lm, nnx.Param), seq_len)

    @property
    def blocks(self) -> list:
        """The target LM's blocks (what the forward runs; for per-block estimates such as the dry run's).
        (Not a module attribute: no parameters, not traversed.)"""
        return list(_target_view(self.target_kwargs).blocks)


class _Frozen:
    """A hashable, static holder of the target LM's kwargs (nested dicts) inside the graph definition."""

    def __init__(self, value: dict):
        import json
        self.value = value
        self._key = json.dumps(value, sort_keys=True, default=str)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Frozen) and other._key == self._key


def _to_nnx(tree: dict):
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    return tree


# -- the two init.transforms ----------------------------------------------------------------------------------
def start(src_model: nnx.Module, src_config, config) -> LiGOLM:
    """``init.transform`` of the learn run: a ``LiGOLM`` of ``config`` whose base is the base run's model.

    Raises:
      ValueError: the config is not a ``ligo_lm``, or the base run's model is not the LiGO base it describes
        (depth, block pattern, or any other model field).
    """
    from sqattn.train import state as state_lib
    if config.model_name != MODEL:
        raise ValueError(f"G_learn: init.transform {START!r} builds model_name={MODEL!r}, the config has "
                         f"{config.model_name!r} (sqattn.configs.growth.grown_config(op='learn') sets it)")
    ligo = dict(config.model.ligo)
    want = model_fields(config.model, drop=("ligo", "num_layers", "block_pattern"))
    got = model_fields(src_config.model, drop=("num_layers", "block_pattern"))
    if src_config.model_name != "lm" or field_diff(want, got):
        raise ValueError(f"G_learn: the base run's model ({src_config.model_name!r}) differs from the LiGO base "
                         f"in {field_diff(want, got) or ['model_name']}: depth growth changes only num_layers")
    ls = int(src_config.model.num_layers)
    src_pattern = src_config.model.get("block_pattern", "A")
    want_pattern = ligo.get("source_pattern") or config.model.get("block_pattern", "A")
    if ls != int(ligo["source_layers"]) or src_pattern != want_pattern:
        raise ValueError(f"G_learn: model.ligo describes a base of {ligo['source_layers']} layers with pattern "
                         f"{want_pattern!r}, the base run has {ls} with {src_pattern!r}")
    model = state_lib.build_base_model(config)
    paths.load(model.base, paths.pure_params(src_model))
    return model


def fold(src_model: nnx.Module, src_config, config) -> LM:
    """``init.transform`` of the run after the learn phase: the plain ``lm`` of ``config`` holding the weights
    the LiGO model computed with its trained maps.

    Raises:
      ValueError: the source run is not a ``ligo_lm`` run, or its target is not ``config.model``.
    """
    from sqattn.train import state as state_lib
    if not isinstance(src_model, LiGOLM):
        raise ValueError(f"G_learn: init.transform {FOLD!r} folds a {MODEL!r} run (the learn phase), but "
                         f"{config.init.workdir!r} holds a {src_config.model_name!r} model")
    want = model_fields(src_config.model, drop=("ligo",))
    got = model_fields(config.model)
    if config.model_name != "lm" or field_diff(want, got):
        raise ValueError(f"G_learn: the fold's config must be the learn run's target (model_name 'lm', the same "
                         f"model fields); differs in {field_diff(want, got) or ['model_name']}")
    params = jax.device_get(jax.jit(lambda m: m.target_params())(src_model))
    return paths.load(state_lib.build_base_model(config), params)
