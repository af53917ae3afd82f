"""Forward+backward time and compiled peak memory of each sequence mixer vs sequence length T.

  python -m experiments.bench_mixers                                   # default sweep, JSON on stdout
  python -m experiments.bench_mixers --workdir=/work/runs/bench_mixers # + bench_mixers.json, bench_mixers.png
  python -m experiments.bench_mixers --mixers=gla,sse_sorted --lengths=1024,4096,16384,65536 --max_seconds=60 \
      --budget_s=0                                                    # longer T, no wall-time budget
  python -m experiments.bench_mixers --nosse_n_sweep --norecurrent_speedup   # only the main sweep

What is measured, per (mixer, T): one ``jax.jit`` of ``jax.value_and_grad`` of ``sum(mixer(x))`` with respect to
the mixer's parameters *and* x, at a fixed number of tokens per batch (``batch = --tokens // T``, at least 1),
``--d_model`` 256, ``--num_heads`` 4, bf16 compute (parameters stay float32, as in training). The function is
compiled ahead of time; ``memory`` is the compiled executable's ``memory_analysis()`` (temp + argument + output
bytes: deterministic for a given shape and XLA version, and reported per component), ``time_s`` the median of
``--repeats`` calls after ``--warmup`` calls, each synchronised with ``block_until_ready``. Per mixer the log-log
slopes of time and memory vs T come from ``numpy.polyfit(log T, log y, 1)`` over the measured points; at fixed
tokens, quadratic attention has slope ~1 and a linear-time mixer ~0; ``time_per_seq_slope`` fits the time of one
sequence (batch time / batch) instead: ~2 for attention, ~1 for a linear-time mixer.

Skips (recorded with their reason, never silent): a mixer whose letter is not registered or whose constructor
rejects its config; a point whose predicted time (extrapolated from the mixer's measured points with their
fitted slope, or slope 1/2 from a single point) exceeds ``--max_seconds``; a point whose compiled memory exceeds
``--max_memory_gb`` (compiled, never run); every longer T once a call took more than ``--max_seconds``; every
point started after ``--budget_s`` of wall time (default 300 s, so the default run ends in a few minutes on 2
CPUs; compilation alone takes ~2-30 s per point there). The main sweep runs the shortest T of every mixer first,
so the budget drops the longest lengths evenly; it may use 2/3 of the budget when a section is on, the sections
the rest. ``--budget_s=0`` lifts the limit.

Extra sections: ``--sse_n_sweep`` (SSE sorted vs mask form as N = 2, 4, 8, 16 grows at K = 1, T =
``--sweep_length``), ``--scout_lengths`` (SCOUT vs full attention: time ratio at fixed L, slope at L = sqrt(T),
decode cache entries), ``--mambapy_lengths`` (our Mamba vs the PyTorch package ``mambapy``, same weights, when torch
is installed) and ``--recurrent_speedup`` (chunked vs per-token recurrent form at T = ``--speedup_length``
for gla, mamba and mamba2 when registered). Times are wall-clock on a shared machine: the JSON carries the load
average at start and end (``load_avg``), so compare numbers only within one run.

Adding a mixer: one entry in ``MIXERS`` (name -> (letter, cfg)); ``num_heads`` is added to the cfg when the
constructor takes it.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app, flags

# name -> (block-pattern letter, constructor kwargs, or a function (d_model, num_heads) -> kwargs).
MIXERS: dict[str, tuple[str, dict | Callable[[int, int], dict]]] = {
    "attention": ("A", {}),
    "swa": ("A", {"window": 256}),
    "gla": ("G", {}),
    "gla_recurrent": ("G", {"impl": "ref"}),
    "sse_mask": ("S", {"form": "mask", "num_partitions": 4, "top_k": 1}),
    "sse_sorted": ("S", {"form": "sorted", "num_partitions": 4, "top_k": 1}),
    "sse_recurrent": ("S", {"form": "recurrent", "num_partitions": 4, "top_k": 1}),
    "mamba": ("M", {}),
    "mamba_recurrent": ("M", {"impl": "ref"}),
    "mamba2": ("2", lambda d, h: {"head_dim": 2 * d // h}),          # expand 2: h heads of 2d/h
    "mamba2_recurrent": ("2", lambda d, h: {"head_dim": 2 * d // h, "impl": "ref"}),
    "scout": ("C", {"segment_len": 16}),
}
DEFAULT_MIXERS = ("attention", "swa", "gla", "gla_recurrent", "sse_mask", "sse_sorted", "mamba", "mamba2")
# family -> (chunked/parallel form, per-token recurrent form) for --recurrent_speedup.
RECURRENT_PAIRS = {
    "gla": ("gla", "gla_recurrent"),
    "mamba": ("mamba", "mamba_recurrent"),
    "mamba2": ("mamba2", "mamba2_recurrent"),
}
SSE_SWEEP_PARTITIONS = (2, 4, 8, 16)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so tests can import this module
    next to other absl binaries that define flags of the same names)."""
    flags.DEFINE_list("mixers", list(DEFAULT_MIXERS), f"Mixers to time, from: {', '.join(MIXERS)}.")
    flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192", "16384"], "Sequence lengths T.")
    flags.DEFINE_integer("tokens", 16384, "Tokens per batch: batch = tokens // T (at least 1).")
    flags.DEFINE_integer("d_model", 256, "Model width.")
    flags.DEFINE_integer("num_heads", 4, "Heads (for mixers whose constructor takes num_heads).")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (parameters stay float32).")
    flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")
    flags.DEFINE_integer("repeats", 3, "Timed calls; the reported time is their median.")
    flags.DEFINE_float("max_seconds", 20.0, "Skip points predicted to take longer per call than this.")
    flags.DEFINE_float("max_memory_gb", 6.0, "Skip (without running) points whose compiled memory exceeds this.")
    flags.DEFINE_float("budget_s", 300.0, "Wall-time budget of the whole run; points started after it are "
                       "skipped with that reason (0: no limit). Compilation alone is ~2-30 s per point on 2 CPUs.")
    flags.DEFINE_bool("sse_n_sweep", True, "Also time SSE sorted vs mask as N grows (K=1, T=--sweep_length).")
    flags.DEFINE_integer("sweep_length", 2048, "T of the SSE N sweep.")
    flags.DEFINE_bool("recurrent_speedup", True, "Also time chunked vs recurrent forms at T=--speedup_length.")
    flags.DEFINE_integer("speedup_length", 4096, "T of the chunked-vs-recurrent comparison.")
    flags.DEFINE_list("scout_lengths", ["512", "1024", "2048", "4096", "8192"], "T of the SCOUT section (SCOUT vs "
                      "full attention at fixed L and at L = sqrt(T); decode cache entries). Empty: skip.")
    flags.DEFINE_integer("scout_segment_len", 16, "L of the SCOUT section's fixed-L series.")
    flags.DEFINE_list("mambapy_lengths", ["256", "1024"], "T of the ours-vs-mambapy (PyTorch) Mamba section, "
                      "d_model 128, batch 4, f32 (empty: skip; skipped with a hint when torch is absent).")
    flags.DEFINE_string("workdir", None, "If set, write bench_mixers.json and bench_mixers.png there.")
    flags.DEFINE_string("compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "sqattn-jax-bench"),
                        "Persistent XLA compilation cache directory ('' disables).")


class Unavailable(Exception):
    """A mixer that cannot be built here (letter not registered, or its config rejected)."""


# ----------------------------------------------------------------------------------------------- building
def mixer_kwargs(name: str, d_model: int, num_heads: int) -> tuple[str, dict]:
    """(letter, constructor kwargs) of table entry ``name``; adds num_heads where the constructor takes it."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known: {', '.join(MIXERS)}")
    letter, cfg = MIXERS[name]
    return letter, dict(cfg(d_model, num_heads) if callable(cfg) else cfg)


def complete_cfg(letter: str, cfg: dict, num_heads: int) -> dict:
    """``cfg`` plus ``num_heads`` when mixer ``letter``'s constructor takes it; ``Unavailable`` if unregistered."""
    from sqattn import mixers
    table = mixers.mixers()
    if letter not in table:
        known = ", ".join(f"{k}={v.name}" for k, v in sorted(table.items()))
        raise Unavailable(f"mixer letter {letter!r} is not registered (its module is missing or fails to "
                          f"import); registered: {known}")
    cfg = dict(cfg)
    if "num_heads" in inspect.signature(table[letter].factory.__init__).parameters:
        cfg.setdefault("num_heads", num_heads)
    return cfg


def build_mixer(letter: str, cfg: dict, d_model: int, num_heads: int, dtype, seed: int = 0):
    """(mixer, its full cfg): the registered mixer ``letter`` built with ``cfg``; ``Unavailable`` with the reason."""
    from flax import nnx
    from sqattn import mixers
    cfg = complete_cfg(letter, cfg, num_heads)
    spec = mixers.get(letter)
    try:
        return spec.factory(d_model, rngs=nnx.Rngs(seed), dtype=dtype, **cfg), cfg
    except (TypeError, ValueError) as e:
        raise Unavailable(f"{spec.name}({cfg}) rejected: {e}") from e


def loss_and_grad_fn(mixer):
    """(jitted value_and_grad of sum(mixer(x)) w.r.t. (params, x), the mixer's params)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

    def total(p, x):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1))), params


def param_count(mixer) -> int:
    import jax
    from flax import nnx
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(mixer, nnx.Param))))


# ----------------------------------------------------------------------------------------------- timing
def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of log y vs log x (numpy polyfit, degree 1); None with fewer than 2 distinct x."""
    import numpy as np
    if len(set(xs)) < 2:
        return None
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def measure(mixer, batch: int, length: int, d_model: int, dtype, *, warmup: int, repeats: int,
            max_seconds: float, max_bytes: float, seed: int = 0) -> dict:
    """Compiles and times one point. Returns a record with ``time_s`` or with ``skipped`` (the reason)."""
    import jax
    fn, params = loss_and_grad_fn(mixer)
    x = jax.random.normal(jax.random.key(seed), (batch, length, d_model), dtype)   # [b, T, d]
    rec: dict[str, Any] = {"length": length, "batch": batch, "tokens": batch * length}
    t0 = time.perf_counter()
    compiled = fn.lower(params, x).compile()
    rec["compile_s"] = time.perf_counter() - t0
    rec["memory"] = memory_record(compiled)
    if rec["memory"]["total_bytes"] > max_bytes:
        rec["skipped"] = (f"compiled memory {rec['memory']['total_bytes'] / 2**30:.2f} GiB > --max_memory_gb="
                          f"{max_bytes / 2**30:g} (not run)")
        return rec
    warm = []
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        warm.append(time.perf_counter() - t0)
        if warm[-1] > max_seconds:
            break
    rec["warmup_s"] = warm
    times = []
    if warm[-1] <= max_seconds:
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, x))
            times.append(time.perf_counter() - t0)
    if times:
        rec["times_s"] = times
        rec["time_s"] = statistics.median(times)
    else:   # a single call already exceeded the limit: report it, flagged, and time nothing more
        rec["times_s"] = warm[-1:]
        rec["time_s"] = warm[-1]
        rec["from_warmup"] = True
        rec["note"] = f"one call took {warm[-1]:.1f} s > --max_seconds={max_seconds:g}; not repeated"
    return rec


def memory_record(compiled) -> dict:
    """temp / argument / output bytes of a compiled executable and their total (the peak we report)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {"temp_bytes": 0, "argument_bytes": 0, "output_bytes": 0, "total_bytes": 0, "unavailable": True}
    out = {"temp_bytes": int(ma.temp_size_in_bytes), "argument_bytes": int(ma.argument_size_in_bytes),
           "output_bytes": int(ma.output_size_in_bytes), "alias_bytes": int(ma.alias_size_in_bytes)}
    out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
    return out


SINGLE_POINT_SLOPE = 0.5   # prior log-log slope from one point: between linear time (0) and attention (1)


def predict_seconds(points: list[dict], length: float) -> float | None:
    """Time at ``length`` extrapolated from measured points: their fitted slope (>= 0), or ``SINGLE_POINT_SLOPE``
    from a single point. A wrong guess costs one call: a call over the limit ends the series."""
    timed = [p for p in points if "time_s" in p]
    if not timed:
        return None
    last = max(timed, key=lambda p: p["length"])
    slope = fit_slope([p["length"] for p in timed], [p["time_s"] for p in timed])
    slope = SINGLE_POINT_SLOPE if slope is None else max(slope, 0.0)
    return last["time_s"] * (length / last["length"]) ** slope


class Bench:
    """Runs points with shared settings and caches them by (mixer name, cfg, T) so sections reuse them."""

    def __init__(self, *, tokens: int, d_model: int, num_heads: int, dtype: str, warmup: int, repeats: int,
                 max_seconds: float, max_memory_gb: float, budget_s: float = 0.0,
                 log: Callable[[str], None] = lambda s: None):
        import jax.numpy as jnp
        self.budget_s = budget_s
        self.deadline = time.perf_counter() + budget_s if budget_s > 0 else math.inf
        self.tokens, self.d_model, self.num_heads = tokens, d_model, num_heads
        self.dtype_name, self.dtype = dtype, {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
        self.warmup, self.repeats = warmup, repeats
        self.max_seconds, self.max_bytes = max_seconds, max_memory_gb * 2**30
        self.log = log
        self._cache: dict[str, dict] = {}

    def batch(self, length: int) -> int:
        return max(1, self.tokens // length)

    def point(self, name: str, letter: str, cfg: dict, length: int, history: list[dict] | None = None,
              x_of: Callable[[dict], float] | None = None, x_value: float | None = None) -> dict:
        """One (mixer, T) record; ``history`` (earlier points of the same series) drives the time-limit skip,
        extrapolating along ``x_of(point)`` to ``x_value`` (default: along T)."""
        batch = self.batch(length)
        try:
            cfg = complete_cfg(letter, cfg, self.num_heads)
        except Unavailable as e:
            return {"length": length, "batch": batch, "tokens": batch * length, "skipped": str(e)}
        key = json.dumps([letter, cfg, length], sort_keys=True, default=str)
        if key in self._cache:
            return dict(self._cache[key])
        history = history or []
        if time.perf_counter() > self.deadline:
            return {"length": length, "batch": batch, "tokens": batch * length,
                    "skipped": f"over --budget_s={self.budget_s:g} (raise it or pass 0 for no limit)"}
        if any(p.get("from_warmup") for p in history):
            return {"length": length, "batch": batch, "tokens": batch * length,
                    "skipped": "a shorter point already exceeded --max_seconds"}
        if any("max_memory_gb" in p.get("skipped", "") for p in history):
            return {"length": length, "batch": batch, "tokens": batch * length,
                    "skipped": "a shorter point already exceeded --max_memory_gb"}
        if x_of is None:
            pred = predict_seconds(history, length)
        else:   # extrapolate along another variable (e.g. N in the SSE sweep) at fixed T
            pred = predict_seconds([dict(p, length=x_of(p)) for p in history], x_value)
        if pred is not None and pred > self.max_seconds:
            return {"length": length, "batch": batch, "tokens": batch * length,
                    "skipped": f"predicted {pred:.1f} s per call > --max_seconds={self.max_seconds:g}"}
        try:
            mixer, _ = build_mixer(letter, cfg, self.d_model, self.num_heads, self.dtype)
        except Unavailable as e:
            return {"length": length, "batch": batch, "tokens": batch * length, "skipped": str(e)}
        rec = measure(mixer, batch, length, self.d_model, self.dtype, warmup=self.warmup, repeats=self.repeats,
                      max_seconds=self.max_seconds, max_bytes=self.max_bytes)
        self.log(f"{name:>16s} T={length:<6d} b={batch:<4d} "
                 + (f"{rec['time_s'] * 1e3:9.1f} ms" if "time_s" in rec else f"skipped: {rec['skipped']}")
                 + f"  mem {rec['memory']['total_bytes'] / 2**20:8.1f} MiB  compile {rec['compile_s']:.1f} s")
        self._cache[key] = rec
        return dict(rec)


# ----------------------------------------------------------------------------------------------- sections
def main_sweep(bench: Bench, names: Sequence[str], lengths: Sequence[int]) -> dict[str, dict]:
    """The main sweep: every mixer at every T, shortest T first for all mixers (so a ``--budget_s`` cut drops
    the longest lengths evenly), then each mixer's fitted slopes."""
    out: dict[str, dict] = {}
    for name in names:
        letter, cfg = mixer_kwargs(name, bench.d_model, bench.num_heads)
        try:
            mixer, full_cfg = build_mixer(letter, cfg, bench.d_model, bench.num_heads, bench.dtype)
        except Unavailable as e:
            out[name] = dict(letter=letter, cfg=cfg, available=False, reason=str(e), points=[],
                             time_slope=None, time_per_seq_slope=None, memory_slope=None)
            continue
        out[name] = dict(letter=letter, cfg=full_cfg, available=True, params=param_count(mixer), points=[])
    for length in sorted(lengths):
        for name, m in out.items():
            if m["available"]:
                m["points"].append(bench.point(name, m["letter"], m["cfg"], length, history=m["points"]))
    for m in out.values():
        if m["available"]:
            timed = [p for p in m["points"] if "time_s" in p]
            sized = [p for p in m["points"] if "memory" in p]
            m["time_slope"] = fit_slope([p["length"] for p in timed], [p["time_s"] for p in timed])
            # time of one sequence (= batch time / batch): ~1 for a linear-time mixer, ~2 for attention
            m["time_per_seq_slope"] = fit_slope([p["length"] for p in timed],
                                                [p["time_s"] / p["batch"] for p in timed])
            m["memory_slope"] = fit_slope([p["length"] for p in sized],
                                          [p["memory"]["total_bytes"] for p in sized])
    return out


def sse_n_sweep(bench: Bench, length: int, partitions: Sequence[int] = SSE_SWEEP_PARTITIONS,
                top_k: int = 1) -> dict:
    """SSE sorted vs mask time as N grows at fixed K and T (the sorted form should stay ~flat in N)."""
    out: dict[str, Any] = {"length": length, "top_k": top_k, "batch": bench.batch(length)}
    try:
        complete_cfg("S", {}, bench.num_heads)
    except Unavailable as e:
        return dict(out, available=False, reason=str(e), points=[])
    forms = ("sorted", "mask")
    series: dict[str, list[dict]] = {f: [] for f in forms}
    points = []
    for n in partitions:
        row: dict[str, Any] = {"num_partitions": n}
        for form in forms:
            cfg = {"form": form, "num_partitions": n, "top_k": top_k}
            rec = bench.point(f"sse_{form}_n{n}", "S", cfg, length, history=series[form],
                              x_of=lambda p: p["num_partitions"], x_value=n)
            rec["num_partitions"] = n
            series[form].append(rec)
            row[form] = rec
        if "time_s" in row["sorted"] and "time_s" in row["mask"]:
            row["mask_over_sorted"] = row["mask"]["time_s"] / row["sorted"]["time_s"]
        points.append(row)
    out["available"] = True
    out["points"] = points
    for form in forms:
        timed = [p for p in series[form] if "time_s" in p]
        out[f"{form}_time_slope_vs_n"] = fit_slope([p["num_partitions"] for p in timed],
                                                  [p["time_s"] for p in timed])
    return out


def recurrent_speedup(bench: Bench, length: int, pairs: dict[str, tuple[str, str]] = RECURRENT_PAIRS) -> dict:
    """Per family: time of the per-token recurrent form / time of the chunked form at T = ``length``."""
    out: dict[str, Any] = {"length": length, "batch": bench.batch(length), "families": {}}
    for family, (chunked, recurrent) in pairs.items():
        recs = {}
        for role, name in (("chunked", chunked), ("recurrent", recurrent)):
            letter, cfg = mixer_kwargs(name, bench.d_model, bench.num_heads)
            recs[role] = dict(bench.point(name, letter, cfg, length), mixer=name)
        entry: dict[str, Any] = dict(recs)
        if all("time_s" in r for r in recs.values()) and len(recs) == 2:
            entry["speedup"] = recs["recurrent"]["time_s"] / recs["chunked"]["time_s"]
        else:
            entry["speedup"] = None
            entry["reason"] = "; ".join(f"{k}: {r['skipped']}" for k, r in recs.items() if "skipped" in r)
        out["families"][family] = entry
    return out


def scout_section(bench: Bench, lengths: Sequence[int], *, segment_len: int = 16, window: int = 256) -> dict:
    """SCOUT checkpoint attention ("C") next to full attention at the same T and tokens:

    * ``fixed_l``: L = ``segment_len``; per T the time ratio full / SCOUT (-> L as the scores dominate) and the
      ratio of admissible score entries (theory: ~L);
    * ``sqrt_l``: L = round(sqrt(T)); the fitted per-sequence time slope (-> 1.5; full attention ~2);
    * ``decode_cache``: K/V entries a decoder keeps per layer at length T, read off each mixer's ``init_cache``:
      full attention T, SWA W, SCOUT T // L (its SCOUT-SWA layer adds the SWA's W).
    """
    import math as _math
    out: dict[str, Any] = {"segment_len": segment_len, "window": window}
    try:
        complete_cfg("C", {}, bench.num_heads)
    except Unavailable as e:
        return dict(out, available=False, reason=str(e))
    from kernels.segment_attention import score_entries
    fixed, att_pts, sqrt_pts = [], [], []
    for t in sorted(lengths):
        att = bench.point("attention", "A", {}, t, history=att_pts)
        att_pts.append(att)
        sc = bench.point(f"scout_l{segment_len}", "C", {"segment_len": segment_len}, t,
                         history=[r["scout"] for r in fixed])
        row: dict[str, Any] = {"length": t, "attention": att, "scout": sc,
                               "score_entries_ratio": t * (t + 1) / 2 / score_entries(t, segment_len)}
        if "time_s" in att and "time_s" in sc:
            row["time_ratio"] = att["time_s"] / sc["time_s"]
        fixed.append(row)
        l_sqrt = max(1, round(_math.sqrt(t)))
        sq = bench.point(f"scout_sqrt_l{l_sqrt}", "C", {"segment_len": l_sqrt}, t, history=sqrt_pts)
        sq["segment_len"] = l_sqrt
        sqrt_pts.append(sq)
    timed = [p for p in sqrt_pts if "time_s" in p]
    att_timed = [p for p in att_pts if "time_s" in p]
    out["fixed_l"] = fixed
    out["sqrt_l"] = {"points": sqrt_pts,
                     "time_per_seq_slope": fit_slope([p["length"] for p in timed],
                                                     [p["time_s"] / p["batch"] for p in timed]),
                     "attention_time_per_seq_slope": fit_slope([p["length"] for p in att_timed],
                                                               [p["time_s"] / p["batch"] for p in att_timed])}
    out["decode_cache"] = decode_cache_entries(sorted(lengths), segment_len=segment_len, window=window,
                                               d_model=bench.d_model, num_heads=bench.num_heads)
    out["available"] = True
    return out


def decode_cache_entries(lengths: Sequence[int], *, segment_len: int, window: int, d_model: int,
                         num_heads: int) -> list[dict]:
    """K/V slots per layer of each mixer's decode cache (``init_cache(1, T)["k"].shape[1]``) at every T."""
    import jax
    import jax.numpy as jnp
    builders = {"attention": ("A", {}), "swa": ("A", {"window": window}),
                "scout": ("C", {"segment_len": segment_len})}
    rows = []
    for t in lengths:
        row: dict[str, Any] = {"length": t}
        for name, (letter, cfg) in builders.items():
            mixer, _ = build_mixer(letter, cfg, d_model, num_heads, jnp.float32)
            cache = jax.eval_shape(lambda m=mixer: m.init_cache(1, t, jnp.float32))
            row[name] = int(cache["k"].shape[1])
        row["scout_swa"] = row["scout"] + row["swa"]
        rows.append(row)
    return rows


def mambapy_section(lengths: Sequence[int], *, d_model: int = 128, batch: int = 4, reps: int = 5) -> dict:
    """Our Mamba (S6) mixer against the PyTorch package ``mambapy`` on the same weights and inputs
    (``experiments.bench_mamba_vs_mambapy.bench``: f32, forward + backward, median of alternating calls).
    ``speedup`` = mambapy_ms / ours_ms (> 1: ours is faster). Skipped, with the install hint, without torch."""
    from experiments import bench_mamba_vs_mambapy as mp
    out: dict[str, Any] = {"d_model": d_model, "batch": batch, "reps": reps}
    try:
        torch, _, _ = mp._import_torch_side()
    except ImportError as e:
        return dict(out, available=False, reason=str(e), rows=[])
    torch.set_num_threads(os.cpu_count() or 1)
    out["torch_threads"] = torch.get_num_threads()
    out["rows"] = [mp.bench(int(t), "chunked", d_model=d_model, batch=batch, reps=reps) for t in lengths]
    out["available"] = True
    return out


# ----------------------------------------------------------------------------------------------- driver
def run(*, mixers: Sequence[str] = DEFAULT_MIXERS, lengths: Sequence[int] = (512, 1024, 2048, 4096, 8192, 16384),
        tokens: int = 16384, d_model: int = 256, num_heads: int = 4, dtype: str = "bfloat16", warmup: int = 1,
        repeats: int = 3, max_seconds: float = 20.0, max_memory_gb: float = 6.0, budget_s: float = 0.0,
        sse_sweep: bool = True,
        sweep_length: int = 2048, speedup: bool = True, speedup_length: int = 4096,
        speedup_families: Sequence[str] = tuple(RECURRENT_PAIRS),
        mambapy_lengths: Sequence[int] = (), scout_lengths: Sequence[int] = (), scout_segment_len: int = 16,
        log: Callable[[str], None] = lambda s: None) -> dict:
    """Runs the benchmark and returns the JSON-able record (see the module docstring)."""
    import flax
    import jax
    for name in mixers:
        if name not in MIXERS:
            raise ValueError(f"unknown mixer {name!r}; known: {', '.join(MIXERS)}")
    if tokens < 1 or not lengths or min(lengths) < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need tokens >= 1, lengths >= 1, warmup >= 0, repeats >= 1; got tokens={tokens}, "
                         f"lengths={list(lengths)}, warmup={warmup}, repeats={repeats}")
    start = time.perf_counter()
    load_start = os.getloadavg()
    bench = Bench(tokens=tokens, d_model=d_model, num_heads=num_heads, dtype=dtype, warmup=warmup,
                  repeats=repeats, max_seconds=max_seconds, max_memory_gb=max_memory_gb, budget_s=budget_s,
                  log=log)
    record: dict[str, Any] = {
        "settings": {"mixers": list(mixers), "lengths": sorted(int(t) for t in lengths), "tokens": tokens,
                     "d_model": d_model, "num_heads": num_heads, "dtype": dtype, "warmup": warmup,
                     "repeats": repeats, "max_seconds": max_seconds, "max_memory_gb": max_memory_gb,
                     "budget_s": budget_s,
                     "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                     "devices": jax.device_count(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                     "flax": flax.__version__},
        "what": "time_s: median wall time of one jitted value_and_grad(sum(mixer(x))) w.r.t. (params, x); "
                "memory.total_bytes: compiled temp + argument + output bytes; slopes: polyfit(log T, log y, 1)",
        "mixers": {},
    }
    if budget_s > 0 and (sse_sweep or speedup):   # keep a third of the budget for the sections
        bench.deadline = time.perf_counter() + budget_s * 2 / 3
    record["mixers"] = main_sweep(bench, mixers, [int(t) for t in lengths])
    bench.deadline = start + budget_s if budget_s > 0 else math.inf
    if sse_sweep:
        record["sse_n_sweep"] = sse_n_sweep(bench, sweep_length)
    if speedup:
        record["recurrent_speedup"] = recurrent_speedup(bench, speedup_length,
                                                        {f: RECURRENT_PAIRS[f] for f in speedup_families})
    if scout_lengths:
        record["scout"] = scout_section(bench, scout_lengths, segment_len=scout_segment_len)
    if mambapy_lengths:
        log(f"mambapy section: T = {list(mambapy_lengths)}")
        record["mambapy"] = mambapy_section(mambapy_lengths)
    record["load_avg"] = {"start": list(load_start), "end": list(os.getloadavg()), "cpu_count": os.cpu_count(),
                          "note": "1/5/15-minute load averages; above cpu_count, other jobs shared the CPU "
                                  "and times are inflated and noisy"}
    record["elapsed_s"] = time.perf_counter() - start
    return record


def summary_table(record: dict) -> str:
    """A plain-text table: one row per mixer, time (ms) and memory (MiB) per T, then the slopes."""
    lengths = record["settings"]["lengths"]
    head = f"{'mixer':>16s} | " + " ".join(f"{t:>9d}" for t in lengths) + " | slope_t seq_t slope_m"
    lines = [f"time ms / memory MiB at fixed {record['settings']['tokens']} tokens", head, "-" * len(head)]
    for name, m in record["mixers"].items():
        by_t = {p["length"]: p for p in m.get("points", [])}
        cells_t, cells_m = [], []
        for t in lengths:
            p = by_t.get(t, {})
            cells_t.append(f"{p['time_s'] * 1e3:9.1f}" if "time_s" in p else f"{'-':>9s}")
            cells_m.append(f"{p['memory']['total_bytes'] / 2**20:9.1f}" if "memory" in p else f"{'-':>9s}")
        st = "  n/a " if m.get("time_slope") is None else f"{m['time_slope']:6.2f}"
        sq = " n/a " if m.get("time_per_seq_slope") is None else f"{m['time_per_seq_slope']:5.2f}"
        sm = "  n/a " if m.get("memory_slope") is None else f"{m['memory_slope']:6.2f}"
        lines.append(f"{name:>16s} | " + " ".join(cells_t) + f" | {st} {sq}  {sm}")
        lines.append(f"{'':>16s} | " + " ".join(cells_m) + " |")
    return "\n".join(lines)


def plot(record: dict, path: str) -> str:
    """Log-log time per sequence (a batch's time / its rows, so a point whose batch was cut to one row stays
    comparable) and compiled memory vs T, one line per mixer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, m in record["mixers"].items():
        timed = [p for p in m.get("points", []) if "time_s" in p]
        sized = [p for p in m.get("points", []) if "memory" in p]
        if timed:
            s = m.get("time_per_seq_slope")
            ax_t.plot([p["length"] for p in timed], [p["time_s"] / p["batch"] for p in timed], "o-",
                      label=name + ("" if s is None else f" (slope {s:.2f})"))
        if sized:
            s = m["memory_slope"]
            ax_m.plot([p["length"] for p in sized], [p["memory"]["total_bytes"] / 2**20 for p in sized], "o-",
                      label=name + ("" if s is None else f" (slope {s:.2f})"))
    st = record["settings"]
    for ax, ylabel in ((ax_t, "fwd+bwd time per sequence (s)"), (ax_m, "compiled memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"mixers at {st['tokens']} tokens/batch, d_model {st['d_model']}, {st['num_heads']} heads, "
                 f"{st['dtype']}; load avg {record['load_avg']['start'][0]:.1f} on {st['cpu_count']} CPUs",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(record: dict, workdir: str) -> tuple[str, str]:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "bench_mixers.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return path, plot(record, os.path.join(workdir, "bench_mixers.png"))


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    import jax
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        lengths = [int(t) for t in FLAGS.lengths]
        record = run(mixers=FLAGS.mixers, lengths=lengths, tokens=FLAGS.tokens, d_model=FLAGS.d_model,
                     num_heads=FLAGS.num_heads, dtype=FLAGS.dtype, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                     max_seconds=FLAGS.max_seconds, max_memory_gb=FLAGS.max_memory_gb, budget_s=FLAGS.budget_s,
                     sse_sweep=FLAGS.sse_n_sweep, sweep_length=FLAGS.sweep_length,
                     speedup=FLAGS.recurrent_speedup, speedup_length=FLAGS.speedup_length,
                     mambapy_lengths=[int(t) for t in FLAGS.mambapy_lengths],
                     scout_lengths=[int(t) for t in FLAGS.scout_lengths], scout_segment_len=FLAGS.scout_segment_len,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if FLAGS.workdir:
        paths = write(record, FLAGS.workdir)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    print(summary_table(record), file=sys.stderr)
    print(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    define_flags()
    app.run(main)
