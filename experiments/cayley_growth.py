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

Measured on the 2-core CPU (shared with other jobs; ``uptime`` load average 9-12 during the run), command:
``nice -n 10 python -m experiments.cayley_growth --workdir=/tmp/cayley``. Table: see the bottom of this docstring
(filled from that run's results.json).
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
    for rec in records:
        ax.plot(range(len(rec["layer_sizes"])), rec["layer_sizes"], marker=".", label=rec["graph"])
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
