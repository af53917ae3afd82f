"""Width growth (papers/gstack.md, widthwise G_direct and G_zero) of the residual stream (``d_model``, logical
axis ``"embed"``) and of the MLP hidden width (``mlp_dim`` and MoE expert widths, axis ``"mlp"``).

Every other dimension (heads, head dims, state sizes) must stay: ``width_config`` pins the head dims that
default to ``d_model // num_heads``. A dimension that changes under another axis name is an error naming it.

* ``net2net`` (G_direct): new units are copies of old ones (Net2Net / bert2BERT). For ``"mlp"`` unit i of the
  target copies unit ``g(i)`` (the first ``n_s`` are the old units, the rest drawn at random) and each copy's
  outgoing weights are divided by the number of copies, which keeps the function exactly. For ``"embed"`` the
  target width must be ``r * d_model``: the residual stream becomes ``r`` copies of the old one scaled by
  ``1/r`` (embedding and every residual-branch output projection gather-and-scale), RMSNorm is
  scale-invariant, so each norm's output is ``r`` copies of the old output, and every weight reading it divides
  by ``r``; the tied output head then gives the old logits too. Exact up to RMSNorm's epsilon, which acts as
  ``r^2 eps`` (a relative change ~``r^2 eps / mean(x^2)``).
* ``zero`` (G_zero): the old tensor in the top-left corner, new entries zero where zeros keep the function:
  new ``"mlp"`` units' outgoing weights, new ``"embed"`` dims' writers (embedding and residual outputs). The
  other side of each new unit (its incoming weights) takes the target's random init: with zeros on both sides
  every new parameter's gradient is zero forever (a saddle). Zero-padding the stream changes every RMSNorm's
  mean-square by ``d_s/d_t``, which the same ``c = sqrt(d_s/d_t)`` scale on the embedding, the residual outputs
  and the readers of the stream undoes, so this variant also keeps the function (up to epsilon).
"""

from __future__ import annotations

import numpy as np

from sqattn.growth import paths

GROWABLE = ("embed", "mlp")
OPS = ("net2net", "zero")


def _role(path: tuple, axes: tuple, axis: int) -> str:
    """``"out"`` if ``axis`` of this parameter indexes its outputs (or it is a vector), ``"in"`` if inputs."""
    del path
    return "in" if len(axes) >= 2 and axis == len(axes) - 2 else "out"


def _unit_maps(changes: dict[tuple, None], rng: np.random.Generator, op: str) -> dict:
    """(axis name, n_s, n_t) -> index map g [n_t] and copy counts [n_s]."""
    maps = {}
    for name, ns, nt in sorted(changes, key=str):
        if name == "embed" and op == "net2net":
            if nt % ns:
                raise ValueError(f"growth: net2net widening of d_model needs a multiple of the source width "
                                 f"(RMSNorm is exact only for uniform copies), got {ns} -> {nt}")
            g = np.arange(nt) % ns
        else:
            g = np.concatenate([np.arange(ns), rng.integers(0, ns, nt - ns)])
        maps[(name, ns, nt)] = (g, np.bincount(g, minlength=ns))
    return maps


def grow_params(src: dict, tgt_init: dict, tgt_axes: dict, *, op: str = "net2net", seed: int = 0) -> dict:
    """Widened parameters on pure dicts (same depth and tree; shapes of ``tgt_init``).

    Raises:
      ValueError: a parameter is missing, shrinks, or changes along an axis other than ``GROWABLE``.
    """
    if op not in OPS:
        raise ValueError(f"growth: unknown width op {op!r}; expected one of {OPS}")
    s_flat, t_flat = paths.flatten(src), paths.flatten(tgt_init)
    if set(s_flat) != set(t_flat):
        raise ValueError(f"growth: width growth keeps the parameter tree; only in the source "
                         f"{sorted(set(s_flat) - set(t_flat), key=str)[:4]}, only in the target "
                         f"{sorted(set(t_flat) - set(s_flat), key=str)[:4]} (change depth separately)")
    changes: dict = {}
    for p, t in t_flat.items():
        s, axes = s_flat[p], tgt_axes[p]
        for ax, (ns, nt) in enumerate(zip(np.shape(s), np.shape(t))):
            if ns == nt:
                continue
            name = "embed" if axes[ax] == "norm" and paths.is_stream_norm(p) else axes[ax]
            if nt < ns:
                raise ValueError(f"growth: width growth cannot shrink {'/'.join(map(str, p))} axis {axes[ax]!r} "
                                 f"({ns} -> {nt})")
            if name not in GROWABLE:
                raise ValueError(f"growth: {'/'.join(map(str, p))} changes along axis {axes[ax]!r} ({ns} -> {nt}); "
                                 f"only {GROWABLE} may grow (pin head dims with width_config)")
            changes[(name, ns, nt)] = None
    maps = _unit_maps(changes, np.random.default_rng(seed), op)
    embed = [k for k in maps if k[0] == "embed"]
    ratio = embed[0][2] / embed[0][1] if embed else 1.0
    out = {}
    for p, t in t_flat.items():
        w, fresh, axes = np.asarray(s_flat[p], np.float32), np.asarray(t, np.float32), tgt_axes[p]
        names = ["embed" if a == "norm" and paths.is_stream_norm(p) else a for a in axes]
        # G_zero scales every reader and writer of the stream by sqrt(d_s/d_t) (net2net's 1/r comes with the
        # copy counts in _net2net)
        zero_scaled = op == "zero" and "embed" in names and not paths.is_stream_norm(p)
        scale = 1.0 / np.sqrt(ratio) if zero_scaled else 1.0
        out[p] = (_net2net(w, fresh.shape, names, p, maps, ratio) if op == "net2net"
                  else _zero_pad(w, fresh, names, p)) * scale
    return paths.unflatten(out)


def _net2net(w, shape, names, path, maps, ratio):
    for ax, name in enumerate(names):
        if w.shape[ax] == shape[ax]:
            continue
        g, counts = maps[(name, w.shape[ax], shape[ax])]
        w = np.take(w, g, axis=ax)
        if _role(path, names, ax) == "in":
            w = w / _bcast(counts[g], ax, w.ndim)
        elif name == "embed" and not paths.is_stream_norm(path):
            w = w / ratio                                   # a writer of the stream: r copies of x / r
    return w


def _zero_pad(w, fresh, names, path):
    """Old block top-left; a new entry is 0 if it is new along an axis where zeros keep the function (new
    mlp units' outgoing weights, new stream dims' writers), 1 in a stream norm, else the fresh init."""
    if w.shape == fresh.shape:
        return w
    if paths.is_stream_norm(path):
        return np.concatenate([w, np.ones(fresh.shape[0] - w.shape[0], np.float32)])
    out = fresh.copy()
    zero = np.zeros(fresh.shape, bool)
    for ax, name in enumerate(names):
        if w.shape[ax] == fresh.shape[ax]:
            continue
        role = _role(path, names, ax)
        if (name == "mlp" and role == "in") or (name == "embed" and role == "out"):
            idx = [slice(None)] * w.ndim
            idx[ax] = slice(w.shape[ax], None)
            zero[tuple(idx)] = True
    out[zero] = 0.0
    out[tuple(slice(0, n) for n in w.shape)] = w
    return out


def _bcast(v: np.ndarray, ax: int, nd: int) -> np.ndarray:
    shape = [1] * nd
    shape[ax] = v.shape[0]
    return v.reshape(shape)


def width_config(config, *, d_model: int | None = None, mlp_dim: int | None = None,
                 moe_mlp_dim: int | None = None):
    """A copy of ``config`` with the model widened, every head dim pinned to the source's value.

    Mixers whose inner width is a multiple of ``d_model`` (Mamba's ``expand``) cannot be widened this way;
    ``grow_params`` then names the axis that changes.
    """
    c = config.copy_and_resolve_references()
    m = c.model
    d0 = int(m.d_model)
    with c.unlocked():
        for name, sub in (m.get("mixers") or {}).items():
            heads = int(sub.get("num_heads", 0) or 0)
            if not heads:
                continue
            for key in ("head_dim", "head_k_dim", "head_v_dim"):
                if name == "attention" and key != "head_dim":
                    continue
                if name != "attention" and key == "head_dim":
                    continue
                if not sub.get(key):
                    sub[key] = d0 // heads
        if d_model is not None:
            m.d_model = int(d_model)
        if mlp_dim is not None:
            m.mlp_dim = int(mlp_dim)
        if moe_mlp_dim is not None:
            if not m.get("moe"):
                raise ValueError("growth: moe_mlp_dim given but the model has no moe section")
            m.moe.mlp_dim = int(moe_mlp_dim)
    return c
