"""AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax


def lr_schedule(o, num_steps: int) -> optax.Schedule:
    warmup = max(int(o.warmup_steps), 0)
    decay = max(num_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup, decay_steps=warmup + decay,
        end_value=o.lr * o.min_lr_ratio)


# Parameters that are never decayed whatever their rank: SSM dynamics (Mamba's A_log is [D_in, N] in S6; decaying
# it pulls every decay rate towards exp(0) = 1 step), as in the Mamba reference code's ``_no_weight_decay``.
NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias"})


def decay_mask(params):
    """Weight decay on matrices only (not norms, biases, per-channel vectors) and never on ``NO_DECAY_NAMES``."""
    def keep(path, p):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return p.ndim >= 2 and not (names & NO_DECAY_NAMES)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(o, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(o, num_steps)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
    if o.get("lr_scale"):
        parts.append(scale_by_path(parse_lr_scale(o.lr_scale)))
    return optax.chain(*parts), schedule


def parse_lr_scale(spec: str) -> list[tuple[str, float]]:
    """``"^base/=0.5,decoder=2"`` -> [("^base/", 0.5), ("decoder", 2.0)] (regexes checked).

    Raises:
      ValueError: an entry is not ``regex=factor``, the regex does not compile, or the factor is not > 0.
    """
    import re
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        rx, eq, val = item.rpartition("=")
        try:
            factor = float(val)
            re.compile(rx)
        except (ValueError, re.error) as e:
            raise ValueError(f"optim.lr_scale entry {item!r} is not 'regex=factor': {e}") from None
        if not eq or not rx or not factor > 0:
            raise ValueError(f"optim.lr_scale entry {item!r} is not 'regex=factor' with factor > 0")
        out.append((rx, factor))
    return out


def scale_by_path(rules: list[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies the update of every parameter whose path matches a rule's regex by its factor (first match;
    unmatched: 1). After AdamW this scales that parameter's learning rate and decoupled decay alike."""
    import re
    compiled = [(re.compile(rx), f) for rx, f in rules]

    def factors(params):
        paths = param_paths(params)
        fs = [next((f for rx, f in compiled if rx.search(p)), 1.0) for p in paths]
        return jax.tree.unflatten(jax.tree.structure(params), fs)

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def param_paths(params) -> list[str]:
    """"/"-joined paths of a pure parameter dict's leaves ("blocks/0/mixer/q/lora_a")."""
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def only_trainable(tx: optax.GradientTransformation, params, pattern: str) -> optax.GradientTransformation:
    """``tx`` on the parameters whose path matches the regex ``pattern`` (``re.search``); the others are
    frozen: zero updates and no optimizer state.

    Raises:
      ValueError: ``pattern`` is not a regex, or matches no parameter.
    """
    import re
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"optim.trainable {pattern!r} is not a regular expression: {e}") from None
    paths = param_paths(params)
    hits = [p for p in paths if rx.search(p)]
    if not hits:
        raise ValueError(f"optim.trainable {pattern!r} matches no parameter; paths look like: {paths[:4]}")
    labels = jax.tree.unflatten(jax.tree.structure(params),
                                ["train" if rx.search(p) else "freeze" for p in paths])
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
