"""Growth functions and diameters of Cayley graphs (CayleyPy Growth, arXiv 2509.19162), computed with JAX.

  python -m experiments.cayley_growth --workdir=/tmp/cayley                        # default list of graphs
  python -m experiments.cayley_growth --workdir=/tmp/cayley --graphs=lrx-11,pancake-10 --engine=dense
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.cayley_growth --workdir=/tmp/cayley_mesh \\
      --graphs=lrx-9,lx-8 --mesh                                                    # the shard_map BFS

For every graph spec (``sqattn.science.cayley.family``: ``lrx-10``, ``pancake-9``, ``lx-9``, ``burnt_pancake-6``,
``coxeter-8``, ``all_transpositions-8``, ``cyclic_coxeter-8``, ``stars-8``, ``full_reversals-8``, ``top_spin-9-4``)
it runs ``growth(graph, engine=--engine)`` (or ``sharded_growth`` over all devices with ``--mesh``) and records
the layer sizes, the diameter, the number of states, wall seconds (compilation included: each graph is a new set
of generators), states per second, the compilations the run traced, and the process's peak RSS so far (graphs run
in the order given, so list them smallest first if you read the peak as the last graph's). Where the
cayleypy-derived note (../shared/papers/cayleypy_growth.md) has the vector or the diameter, ``"known"`` says
whether ours equals it. A progress bar ticks once per BFS layer (``--noprogress`` to silence).

Outputs under ``--workdir``: ``results.json`` (also printed) and ``layers.png`` (layer size against distance, log
scale, one line per graph).

Measured with ``nice -n 10 python -m experiments.cayley_growth --workdir=/tmp/cayley_runs/exp --noprogress`` on the
2-core CPU shared with other jobs (load average 10.4 before, 13.0 after; jax 0.10.2, one device, engine auto).
Seconds include compilation (every graph is a new generating set; the small slice/append programs are shared
after the first graph). "known": the diameter equals the note's value (``-``: none there); every vector of n <= 9
that the tests know is checked there, and lrx-10 / pancake-10 equal cayleypy's in ``bench_cayley``.

| graph | engine | X | directed | diameter (known) | states | seconds | states/s | compilations | peak RSS MB |
|---|---|---|---|---|---|---|---|---|---|
| coxeter-8 | dense | 7 |  | 28 (=) | 40320 | 8.94 | 4511 | 3 | 379 |
| all_transpositions-8 | dense | 28 |  | 7 (=) | 40320 | 12.02 | 3355 | 3 | 485 |
| cyclic_coxeter-8 | dense | 8 |  | 16 (=) | 40320 | 8.03 | 5023 | 3 | 485 |
| stars-8 | dense | 7 |  | 10 (-) | 40320 | 5.78 | 6980 | 3 | 485 |
| full_reversals-8 | dense | 28 |  | 7 (=) | 40320 | 8.40 | 4799 | 3 | 552 |
| top_spin-9-4 | dense | 3 |  | 23 (-) | 181440 | 7.52 | 24130 | 5 | 552 |
| burnt_pancake-6 | sort | 6 |  | 12 (=) | 46080 | 6.20 | 7429 | 1 | 552 |
| lx-8 | dense | 2 | yes | 35 (=) | 40320 | 7.49 | 5380 | 3 | 552 |
| lrx-9 | dense | 3 |  | 36 (=) | 362880 | 5.74 | 63211 | 5 | 555 |
| pancake-9 | dense | 8 |  | 10 (=) | 362880 | 5.58 | 64995 | 3 | 577 |
| lx-9 | dense | 2 | yes | 45 (=) | 362880 | 5.02 | 72332 | 3 | 578 |
| lrx-10 | dense | 3 |  | 45 (=) | 3628800 | 7.58 | 479047 | 9 | 673 |
| pancake-10 | dense | 9 |  | 11 (=) | 3628800 | 9.98 | 363646 | 7 | 798 |

Small graphs are compile-bound (~5-10 s each at this load); lrx-10 and pancake-10 spend ~2-3 s of their time in
the BFS itself (``bench_cayley``: 1.7 s and 3.2 s warm). burnt_pancake-6 acts on 12 points (12! > 11!), so auto
picks the sort engine. Vectors not in the note, from this run: top_spin-9-4 (half of S_9: the 4-reversal is even)
1, 3, 6, 12, 24, 46, 88, 168, 322, 613, 1137, 2095, 3745, 6385, 10697, 17134, 24461, 30412, 32269, 27633, 17101,
5884, 1112, 92; burnt_pancake-6 1, 6, 30, 150, 675, 2340, 6604, 12795, 15519, 6957, 959, 43, 1; lx-9 (directed)
1, 2, 3, 5, 8, 13, 21, 34, 55, 88, 141, 221, 332, 479, 671, 923, 1253, 1681, 2235, 2948, 3859, 5010, 6420, 8074,
9939, 12008, 14281, 16727, 19268, 21785, 24173, 26209, 27523, 27766, 27003, 25493, 23053, 19472, 14997, 10111,
5624, 2259, 574, 108, 28, 2. ``layers.png`` plots all thirteen on a log scale: the Coxeter-type graphs are
symmetric bells, LRX/LX rise slowly over ~n^2/2 layers, the pancake graphs rise fast and end in a thin tail.
"""

from __future__ import annotations

import json
import os
import resource
import time

from absl import app, flags

FLAGS = flags.FLAGS

DEFAULT_GRAPHS = ("coxeter-8", "all_transpositions-8", "cyclic_coxeter-8", "stars-8", "full_reversals-8",
                  "top_spin-9-4", "burnt_pancake-6", "lx-8", "lrx-9", "pancake-9", "lx-9", "lrx-10", "pancake-10")

# Diameters by n, from the note (cayleypy 0.2.0's shipped datasets / OEIS); vectors checked in the tests.
KNOWN_DIAMETERS = {
    "lrx": {n: d for n, d in zip(range(3, 16), (2, 6, 10, 15, 21, 28, 36, 45, 55, 66, 78, 91, 105))},
    "lx": {n: d for n, d in zip(range(3, 16), (2, 6, 11, 18, 25, 35, 45, 58, 71, 87, 103, 122, 141))},
    "pancake": {n: d for n, d in zip(range(2, 15), (1, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14, 15, 16))},
    "burnt_pancake": {n: d for n, d in zip(range(1, 10), (1, 4, 6, 8, 10, 12, 14, 15, 17))},
    "all_transpositions": {n: n - 1 for n in range(2, 20)},
    "coxeter": {n: n * (n - 1) // 2 for n in range(2, 20)},
    "cyclic_coxeter": {n: n * n // 4 for n in range(2, 14)},
    "full_reversals": {n: n - 1 for n in range(2, 15)},
}


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", "/tmp/sqattn/cayley_growth", "Output directory (results.json, layers.png).")
    flags.DEFINE_list("graphs", list(DEFAULT_GRAPHS), "Graph specs, family-n[-k].")
    flags.DEFINE_enum("engine", "auto", ["auto", "dense", "sort"], "growth() engine (ignored with --mesh).")
    flags.DEFINE_bool("mesh", False, "Use sharded_growth over all devices (1-D mesh 'states').")
    flags.DEFINE_integer("max_layers", None, "Stop after this many layers (partial growth).")
    flags.DEFINE_bool("progress", True, "A progress bar per graph, one tick per layer.")


def known_diameter(spec: str) -> int | None:
    head, *args = spec.split("-")
    return KNOWN_DIAMETERS.get(head, {}).get(int(args[0])) if args and len(args) == 1 else None


def run_graph(spec: str, *, engine: str, mesh: bool, max_layers: int | None, progress: bool) -> dict:
    """One graph -> its JSON record."""
    from sqattn.science.cayley import family, growth

    graph = family(spec)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=spec, unit="layer", leave=False)

    def on_layer(k: int, size: int) -> None:
        if bar is not None:
            bar.set_postfix(size=size)
            bar.update(1)

    start = time.perf_counter()
    if mesh:
        from sqattn.science.cayley.sharded import sharded_growth

        result = sharded_growth(graph, max_layers=max_layers)
    else:
        result = growth(graph, engine=engine, max_layers=max_layers, on_layer=on_layer)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    rec = {"graph": spec, "engine": result.engine, "n": graph.n, "generators": graph.num_generators,
           "inverse_closed": graph.inverse_closed, "diameter": result.diameter, "states": result.num_states,
           "seconds": round(seconds, 3), "states_per_s": round(result.num_states / seconds),
           "compilations": result.compilations, "truncated": result.truncated,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "layer_sizes": result.layer_sizes}
    want = known_diameter(spec)
    if want is not None and not result.truncated:
        rec["known_diameter"] = want
        rec["known"] = want == result.diameter
    return rec


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, rec in enumerate(records):                                  # 10 colours, then a new line style
        ax.plot(range(len(rec["layer_sizes"])), rec["layer_sizes"], marker=".", linestyle=("-", "--", ":")[i // 10 % 3],
                label=rec["graph"])
    ax.set_yscale("log")
    ax.set_xlabel("distance k from the identity")
    ax.set_ylabel("layer size s_k")
    ax.set_title("Growth functions of Cayley graphs (sqattn.science.cayley)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv) -> None:
    del argv
    import jax

    os.makedirs(FLAGS.workdir, exist_ok=True)
    load0 = os.getloadavg()
    records = []
    for spec in FLAGS.graphs:
        rec = run_graph(spec, engine=FLAGS.engine, mesh=FLAGS.mesh, max_layers=FLAGS.max_layers,
                        progress=FLAGS.progress)
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "layer_sizes"}), flush=True)
    out = {"graphs": records, "_meta": {"loadavg_before": load0, "loadavg_after": os.getloadavg(),
                                        "jax": jax.__version__, "devices": len(jax.devices()),
                                        "mesh": FLAGS.mesh, "engine": FLAGS.engine}}
    with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(records, os.path.join(FLAGS.workdir, "layers.png"))
    print(json.dumps(out))
    if any(rec.get("known") is False for rec in records):
        raise SystemExit("a diameter differs from the known value (see 'known' in results.json)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
