"""Growth-function BFS, ours (JAX) against cayleypy (PyTorch, CPU) on the same graphs in one run.

  pip install cayleypy          # the anchor (setup.cfg extra ``cayley``); pulls torch
  python -m experiments.bench_cayley                                   # default graphs, JSON on stdout
  python -m experiments.bench_cayley --graphs=lrx-10,lrx-11,pancake-10 --repeats=3 --out=/tmp/bench_cayley.json

What is timed, per graph (specs as in ``sqattn.science.cayley.family``: ``lrx-10``, ``pancake-10``, ``lx-9``, ...):

* ``jax_dense``: ``growth(graph, engine="dense")`` (visited array indexed by Lehmer rank, no sort),
* ``jax_sort``: ``growth(graph, engine="sort")`` (cayleypy's algorithm: packed keys, sort + binary search),
* ``cayleypy``: ``CayleyGraph(PermutationGroups.<family>(n), device="cpu").bfs()`` with ``torch.set_num_threads``
  = the core count (bit-packed states, cayleypy's default path),
* ``cayleypy_numpy``: ``cayleypy.bfs_numpy(graph)`` (its low-memory numpy BFS; inverse-closed, one-word states).

Each JAX engine is first run once untimed-for-the-ratio (``cold_s``: its first call in the process, compilation
included; no persistent compilation cache). Then ``--repeats`` rounds run every implementation once per round,
interleaved (so load drifts hit all of them alike); ``min_s`` and ``median_s`` are over the rounds. The layer
vectors of all implementations must be identical (and equal to the known vector where ``sqattn`` tests hold one):
``"identical": true``; a mismatch is reported and makes the script exit 1. ``ratio_min`` = cayleypy ``min_s`` /
ours ``min_s`` (> 1: ours is faster); ``ratio_cold`` uses our cold time. Graph construction is outside the
timings for both. ``_meta`` records the load average before and after, versions and thread counts: the box is
shared, so compare numbers within one run.

Measured on the 2-core CPU shared with ~6 other jobs (load average 10-15 throughout, so every absolute time is
inflated several-fold; compare within a row). cayleypy 0.2.0 + torch 2.14.1 (2 threads), jax 0.10.2; seconds;
"cold" = our first call in the process, XLA compilation included. Vectors identical in every run ("identical":
true; LRX-10/11 and pancake-10 also equal the note's vectors).

| graph (states) | jax_dense min / cold | jax_sort min / cold | cayleypy min | bfs_numpy min | ratio* | run |
|---|---|---|---|---|---|---|
| lrx-10 (3.6M) | 1.74 / 17.5 | | 18.4 | | 10.6x, 1.05x | C |
| pancake-10 (3.6M) | 3.23 / 9.3 | | 29.1 | | 9.0x, 3.1x | C |
| lrx-11 (39.9M) | 78.8 / 128.1 | | 329.8 | | 4.2x, 2.6x | B |
| lrx-10 | 0.70 / 38.1 | 17.5 / 109.2 | 32.8 | 6.45 | 47x, 0.86x | A |
| pancake-10 | 3.00 / 60.1 | 47.8 / 135.0 | 91.3 | 42.6 | 30x, 1.5x | A |

(*) cayleypy ``bfs()`` min over jax_dense min, and over jax_dense cold. Run A predates the current dense engine
(it compiled one program per buffer size instead of one per graph: hence its long cold times); B and C are the
committed code. Commands (``nice -n 10``):
A ``--graphs=lrx-10,pancake-10 --repeats=2`` (all four implementations; load 15.6 -> 15.3),
B ``--graphs=lrx-11 --impls=jax_dense,cayleypy --repeats=1`` (load 9.9 -> 14.0),
C ``--graphs=lrx-10,pancake-10 --impls=jax_dense,cayleypy --repeats=2`` (load 12.0 -> 11.8).
Run C's JSON (layer vectors elided)::

  {"lrx-10": {"diameter": 45, "states": 3628800, "identical": true,
              "jax_dense": {"min_s": 1.7413, "median_s": 2.1912, "states_per_s": 2084014, "cold_s": 17.512},
              "cayleypy": {"min_s": 18.4358, "median_s": 20.9351, "states_per_s": 196834},
              "ratio_min_cayleypy_over_jax_dense": 10.59, "ratio_cold_cayleypy_over_jax_dense": 1.05},
   "pancake-10": {"diameter": 11, "states": 3628800, "identical": true,
              "jax_dense": {"min_s": 3.2291, "median_s": 3.2891, "states_per_s": 1123764, "cold_s": 9.306},
              "cayleypy": {"min_s": 29.0971, "median_s": 32.9378, "states_per_s": 124713},
              "ratio_min_cayleypy_over_jax_dense": 9.01, "ratio_cold_cayleypy_over_jax_dense": 3.13},
   "_meta": {"loadavg_before": [11.96, 12.65, 13.06], "loadavg_after": [11.80, 12.48, 12.94], "jax": "0.10.2",
             "cpus": 2, "repeats": 2, "torch_threads": 2, "torch": "2.14.1+cu130"}}

Reading: the dense engine (no sort; one gather/scatter pass per candidate) is 9-47x faster than cayleypy's torch
BFS once compiled and 1-3x including compilation; the sort engine (cayleypy's own algorithm in XLA) is ~1.9x
faster warm but slower cold, since XLA's CPU sort runs ~4M uint64 keys/s. LRX-11's claim array (160 MB) no longer
fits the cache, so its states/s drop ~4x from LRX-10 (random gathers); a byte-map "visited" filter before the
claim scatter is the next step there.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

DEFAULT_GRAPHS = ("lrx-9", "pancake-9", "lrx-10", "pancake-10")


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program)."""
    flags.DEFINE_list("graphs", list(DEFAULT_GRAPHS), "Graph specs (family-n[-k]).")
    flags.DEFINE_list("impls", ["jax_dense", "jax_sort", "cayleypy", "cayleypy_numpy"], "Implementations.")
    flags.DEFINE_integer("repeats", 3, "Interleaved timed rounds (min and median reported).")
    flags.DEFINE_integer("threads", 2, "torch.set_num_threads for cayleypy.")
    flags.DEFINE_string("out", None, "If set, also write the JSON object to this path.")


FLAGS = flags.FLAGS


def cayleypy_graph(spec: str):
    """The cayleypy ``CayleyGraph`` (cpu) for a spec, or raise if cayleypy lacks the family."""
    from cayleypy import CayleyGraph, PermutationGroups

    head, *args = spec.split("-")
    return CayleyGraph(getattr(PermutationGroups, head)(*[int(a) for a in args]), device="cpu")


def make_runners(spec: str, impls: list[str]) -> dict:
    """``{impl: zero-argument callable -> list of layer sizes}``; graphs are built here, outside the timings."""
    from sqattn.science.cayley import family, growth

    graph = family(spec)
    runners = {}
    if "jax_dense" in impls:
        runners["jax_dense"] = lambda: growth(graph, engine="dense").layer_sizes
    if "jax_sort" in impls:
        runners["jax_sort"] = lambda: growth(graph, engine="sort").layer_sizes
    if "cayleypy" in impls or "cayleypy_numpy" in impls:
        cg = cayleypy_graph(spec)
        if "cayleypy" in impls:
            runners["cayleypy"] = lambda: [int(v) for v in cg.bfs().layer_sizes]
        if "cayleypy_numpy" in impls and graph.inverse_closed:
            from cayleypy import bfs_numpy

            runners["cayleypy_numpy"] = lambda: [int(v) for v in bfs_numpy(cg)]
    return runners


def timed(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_graph(spec: str, impls: list[str], repeats: int) -> dict:
    """One graph: cold JAX runs, then interleaved rounds; returns the per-graph JSON record."""
    runners = make_runners(spec, impls)
    vectors, cold = {}, {}
    for name in runners:
        if name.startswith("jax"):
            cold[name], vectors[name] = timed(runners[name])
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            t, vec = timed(fn)
            times[name].append(t)
            vectors.setdefault(name, vec)
            if vec != vectors[name]:
                raise RuntimeError(f"{spec}: {name} returned different vectors on two calls")
    ref = next(iter(vectors.values()))
    rec = {"layer_sizes": ref, "diameter": len(ref) - 1, "states": sum(ref),
           "identical": all(v == ref for v in vectors.values())}
    if not rec["identical"]:
        rec["mismatch"] = {k: v for k, v in vectors.items()}
    for name, ts in times.items():
        r = {"min_s": round(min(ts), 4), "median_s": round(statistics.median(ts), 4),
             "states_per_s": round(rec["states"] / min(ts))}
        if name in cold:
            r["cold_s"] = round(cold[name], 3)
        rec[name] = r
    if "cayleypy" in times:
        for name in cold:
            rec[f"ratio_min_cayleypy_over_{name}"] = round(rec["cayleypy"]["min_s"] / rec[name]["min_s"], 2)
            rec[f"ratio_cold_cayleypy_over_{name}"] = round(rec["cayleypy"]["min_s"] / rec[name]["cold_s"], 2)
    return rec


def main(argv) -> None:
    del argv
    import jax

    if any(i.startswith("cayleypy") for i in FLAGS.impls):
        try:
            import torch
        except ImportError as e:
            raise SystemExit("cayleypy is the anchor here: pip install cayleypy (or pip install -e '.[cayley]'), "
                             "or pass --impls=jax_dense,jax_sort") from e
        torch.set_num_threads(FLAGS.threads)
    load0 = os.getloadavg()
    results = {}
    for spec in FLAGS.graphs:
        results[spec] = bench_graph(spec, FLAGS.impls, FLAGS.repeats)
        print(json.dumps({spec: {k: v for k, v in results[spec].items() if k != "layer_sizes"}}), flush=True)
    meta = {"loadavg_before": load0, "loadavg_after": os.getloadavg(), "jax": jax.__version__,
            "cpus": os.cpu_count(), "repeats": FLAGS.repeats, "torch_threads": FLAGS.threads}
    try:
        import torch

        from importlib.metadata import version

        meta.update(cayleypy=version("cayleypy"), torch=torch.__version__)
    except ImportError:
        pass
    results["_meta"] = meta
    text = json.dumps(results, indent=1)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text)
    if not all(r["identical"] for k, r in results.items() if k != "_meta"):
        raise SystemExit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
