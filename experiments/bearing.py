"""Bearing-fault digital twin (papers/digital_twin_bearing.md; ``sqattn/science/bearing``): accuracy of the
paper's random forest and of a JAX MLP trained by the one trainer, and the measured latency budget.

A. Classification. Synthesised CWRU-like records (4 classes x 4 rpm x ``records`` records x 29 windows of 2048
   samples at 12 kHz), at each noise level sigma_n, with the 15 window features or 15 + 3 envelope features, split
   by record (even records train, odd test: no leakage) or by window (a random half of all windows: the leaky
   protocol). Random forest: scikit-learn defaults, 100 trees. MLP: ``bearing_mlp[_env]`` configs trained by
   ``sqattn.train.train_and_evaluate`` in ``<workdir>/runs/<name>``. Accuracy, macro-F1, confusion matrices.
B. Latency. The twin's processing path (18 features of the window -> classifier) timed per stage at batch sizes
   1..4096, interleaved (p50, p99, min): scikit-learn's ``predict_proba`` vs the same forest compiled to arrays
   and traversed by a jitted JAX loop vs the JAX MLP; a path = features then classifier, dispatched back to back. The
   batch-1 p50/p99 of each full path is the measured T_proc of the link model (6G / 5G / WiFi-6 totals); the
   scaling exponent alpha is fitted to t(K) = a K^alpha over the batch sizes. A streaming run times
   acquire / features / classify / twin-update per window.

  python -m experiments.bearing --workdir=/work/runs/bearing               # everything (~10 min on 2 loaded cores)
  python -m experiments.bearing --workdir=/tmp/b --nomlp --noises=0.05     # forest only, one noise level

Writes ``results.json`` and ``results.png`` to --workdir and prints the tables and the JSON. Finished MLP runs
(``runs/<name>/result.json``) are reused.

Measured: see the tables below (filled from a full run; machine, load and command with them).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

from absl import app, flags

PATHS = ("sklearn_rf", "jax_rf", "jax_mlp")


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program)."""
    flags.DEFINE_string("workdir", "/tmp/sqattn/bearing", "Output directory (runs/, results.json, .png).")
    flags.DEFINE_list("noises", ["0.05", "0.15", "0.3"], "Noise levels sigma_n.")
    flags.DEFINE_list("splits", ["record", "window"], "Train/test splits.")
    flags.DEFINE_list("envelope", ["false", "true"], "Without / with the 3 envelope features.")
    flags.DEFINE_integer("records", 8, "Records per (class, rpm) cell.")
    flags.DEFINE_float("seconds", 5.0, "Seconds per record.")
    flags.DEFINE_integer("trees", 100, "Random-forest trees.")
    flags.DEFINE_bool("mlp", True, "Also train the JAX MLP (through the trainer) for every setting.")
    flags.DEFINE_integer("mlp_steps", 1000, "MLP training steps.")
    flags.DEFINE_list("batch_sizes", ["1", "4", "16", "64", "256", "1024", "4096"], "Latency batch sizes.")
    flags.DEFINE_integer("repeats", 300, "Timed repeats at batch 1; batch B gets max(5, repeats / sqrt(B)).")
    flags.DEFINE_float("latency_noise", 0.05, "Noise level of the latency part's data and models.")
    flags.DEFINE_integer("stream_windows", 200, "Windows streamed through the twin loop.")
    flags.DEFINE_integer("seed", 0, "Data, forest and MLP seed.")
    flags.DEFINE_bool("progress", False, "Training progress bars.")


FLAGS = flags.FLAGS


def _bool(s) -> bool:
    return str(s).lower() in ("1", "true", "yes", "env")


def config_arg(noise: float, split: str, envelope: bool, *, steps: int, records: int, seconds: float,
               seed: int) -> str:
    name = "bearing_mlp_env" if envelope else "bearing_mlp"
    return f"{name}:noise={noise},split={split},steps={steps},records={records},seconds={seconds},seed={seed}"


def run_name(noise: float, split: str, envelope: bool, steps: int, records: int, seconds: float, seed: int) -> str:
    return (f"mlp_noise{noise}_{split}_{'env' if envelope else 'f15'}_steps{steps}_rec{records}_s{seconds}"
            f"_seed{seed}")


# ----------------------------------------------------------------------------------------------- A: accuracy
def train_mlp(workdir: str, noise: float, split: str, envelope: bool, *, steps: int, records: int, seconds: float,
              seed: int, progress: bool = False) -> tuple[dict, str]:
    """Trains (or reuses) one MLP run; returns (its eval record, run dir)."""
    from sqattn import configs
    from sqattn.train import train_and_evaluate
    run_dir = os.path.join(workdir, "runs", run_name(noise, split, envelope, steps, records, seconds, seed))
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f), run_dir
    cfg = configs.get(config_arg(noise, split, envelope, steps=steps, records=records, seconds=seconds, seed=seed))
    t0 = time.perf_counter()
    out = train_and_evaluate(cfg, run_dir, progress=progress)
    if out["stopped_early"]:   # SIGTERM/SIGINT: the run saved a checkpoint; stop here, a rerun resumes it
        raise SystemExit(f"interrupted at step {out['step']} of {run_dir}; rerun the same command to resume")
    rec = {k: v for k, v in out.items() if k.startswith("eval_")}
    rec.update(wall_s=time.perf_counter() - t0, steps=int(out["step"]), train_loss=float(out["loss"]))
    with open(done, "w") as f:
        json.dump(rec, f, indent=2)
    return rec, run_dir


def data_config(noise: float, split: str, envelope: bool, *, records: int, seconds: float, seed: int):
    from sqattn.science.bearing import dataset
    c = dataset.default_config()
    c.update(dict(noise=noise, split=split, envelope=envelope, records_per_cell=records, seconds=seconds, seed=seed))
    return c


def accuracy_grid(workdir: str, *, noises: Sequence[float], splits: Sequence[str], envelopes: Sequence[bool],
                  records: int, seconds: float, trees: int, mlp: bool, mlp_steps: int, seed: int,
                  progress: bool = False) -> list[dict[str, Any]]:
    """One row per (noise, split, envelope, classifier) with accuracy, macro-F1, per-class F1 and confusion."""
    import numpy as np
    from sqattn.science.bearing import dataset, forest, task
    rows = []
    for noise in noises:
        for split in splits:
            for env in envelopes:
                d = dataset.build(data_config(noise, split, env, records=records, seconds=seconds, seed=seed))
                (xtr, ytr), (xte, yte) = d.split("train"), d.split("test")
                base = dict(noise=noise, split=split, envelope=env, features=d.features.shape[1],
                            n_train=int(len(ytr)), n_test=int(len(yte)))
                t0 = time.perf_counter()
                rf = forest.fit_forest(xtr, ytr, n_estimators=trees, seed=seed)
                pred = rf.predict(xte)
                conf = np.zeros((task.NUM_CLASSES, task.NUM_CLASSES))
                np.add.at(conf, (yte, pred), 1)
                rep = task.classification_report(conf, prefix="")
                rows.append(dict(base, classifier="rf", accuracy=float((pred == yte).mean()),
                                 macro_f1=rep["macro_f1"], confusion=conf.astype(int).tolist(),
                                 f1={c: rep[f"f1_{c}"] for c in _classes()}, wall_s=time.perf_counter() - t0))
                if mlp:
                    rec, _ = train_mlp(workdir, noise, split, env, steps=mlp_steps, records=records,
                                       seconds=seconds, seed=seed, progress=progress)
                    conf = task.confusion_from_report(rec)
                    rows.append(dict(base, classifier="mlp", accuracy=rec["eval_accuracy"],
                                     macro_f1=rec["eval_macro_f1"], confusion=conf.round().astype(int).tolist(),
                                     f1={c: rec[f"eval_f1_{c}"] for c in _classes()}, wall_s=rec["wall_s"]))
    return rows


def _classes():
    from sqattn.science.bearing import kinematics
    return kinematics.CLASSES


# ----------------------------------------------------------------------------------------------- B: latency
def _repeats(base: int, b: int) -> int:
    return max(5, int(base / b ** 0.5))


def latency(workdir: str, *, noise: float, batch_sizes: Sequence[int], repeats: int, records: int, seconds: float,
            trees: int, mlp: bool, mlp_steps: int, stream_windows: int, seed: int,
            progress: bool = False) -> dict[str, Any]:
    """Per-stage timings of the three processing paths at every batch size, the link totals and alpha."""
    import jax
    import numpy as np
    import threadpoolctl
    from flax import nnx
    from sqattn.science.bearing import dataset, features as features_lib, forest, task, twin

    cfg = data_config(noise, "record", True, records=records, seconds=seconds, seed=seed)
    d = dataset.build(cfg)
    mean, std = task.standardisation(d)
    (xtr, ytr) = d.split("train")
    rf = forest.fit_forest(xtr, ytr, n_estimators=trees, seed=seed, n_jobs=1)
    cf = forest.compile_forest(rf)
    arrays = cf.arrays()
    fs = float(cfg.fs)

    def feats(w, shaft):                                    # standardised 18 features, as the classifiers saw them
        return (features_lib.all_features(w, fs, shaft, envelope=True) - mean) / std

    def rf_proba(f):
        return forest.forest_proba(cf, f, arrays)

    # A path is two jitted calls dispatched back to back (no host sync between them): fusing them into one
    # jit would compile the feature pipeline once more per path and batch size for a few microseconds.
    feats_j = jax.jit(feats)
    rf_j = jax.jit(rf_proba)
    mlp_j = None
    if mlp:
        from sqattn import sample
        _, run_dir = train_mlp(workdir, noise, "record", True, steps=mlp_steps, records=records, seconds=seconds,
                               seed=seed, progress=progress)
        model, _ = sample.load_model(run_dir)
        graphdef, params = nnx.split(model)

        def mlp_proba(f):
            return jax.nn.softmax(nnx.merge(graphdef, params)(f))

        mlp_j = jax.jit(mlp_proba)

    # test windows of every class, tiled to the largest batch
    test_ids = np.flatnonzero(dataset.record_table(cfg)[2] % 2 == 1)
    win, _, rpms = dataset.synthesize_windows(cfg, test_ids)                   # [R, nw, N]
    nw = win.shape[1]
    win = win.reshape(-1, win.shape[-1])
    shaft_all = np.repeat(rpms / 60.0, nw).astype(np.float32)
    top = max(batch_sizes)
    reps = int(np.ceil(top / len(win)))
    win, shaft_all = np.tile(win, (reps, 1))[:top], np.tile(shaft_all, reps)[:top]

    # scikit-learn runs single-threaded (n_jobs=1 and one OpenMP/BLAS thread): its idle OpenMP workers otherwise
    # spin on the second core after each call and slow whatever is timed next (measured: the JAX forest's batch-1
    # p50 went from ~0.2 ms to ~4.6 ms when it followed a scikit-learn call on this 2-core machine).
    limit = threadpoolctl.threadpool_limits(limits=1)
    per_batch = {}
    for b in batch_sizes:
        w, s = jax.device_put(win[:b]), jax.device_put(shaft_all[:b])
        f = feats_j(w, s)
        f_np = np.asarray(f)
        fns = {"features": lambda: feats_j(w, s),
               "sklearn_rf_classify": lambda: rf.predict_proba(f_np),
               "jax_rf_classify": lambda: rf_j(f),
               "sklearn_rf": lambda: rf.predict_proba(np.asarray(feats_j(w, s))),
               "jax_rf": lambda: rf_j(feats_j(w, s))}
        if mlp_j is not None:
            fns["jax_mlp_classify"] = lambda: mlp_j(f)
            fns["jax_mlp"] = lambda: mlp_j(feats_j(w, s))
        # the paths agree: the compiled forest reproduces scikit-learn's probabilities
        agree = float(np.abs(np.asarray(rf_j(f)) - rf.predict_proba(f_np)).max())
        per_batch[str(b)] = dict(twin.time_interleaved(fns, _repeats(repeats, b)), rf_max_abs_diff=agree)

    sizes = [int(b) for b in batch_sizes]
    alpha = {}
    for p in PATHS:
        if p in per_batch[str(sizes[0])] and len(sizes) > 1:
            a, al = twin.fit_power_law(sizes, [per_batch[str(b)][p]["p50_ms"] for b in sizes])
            alpha[p] = {"a_ms": a, "alpha": al}
    links = {p: link_totals(per_batch["1"][p]) for p in PATHS if "1" in per_batch and p in per_batch["1"]}

    # the streaming twin: one window at a time through acquire -> features -> classify -> twin update
    n_stream = min(stream_windows, len(win))
    signal = win[:n_stream].reshape(-1)
    stream = {}
    classifiers = {"jax_rf": rf_j, "sklearn_rf": lambda f: rf.predict_proba(np.asarray(f))}
    if mlp_j is not None:
        classifiers["jax_mlp"] = mlp_j
    for name, clf in classifiers.items():
        shaft = float(shaft_all[0])
        state, stages = twin.stream(signal, window=int(cfg.window), fs=fs,
                                    features=lambda x: feats_j(x, np.full((1,), shaft, np.float32)),
                                    classify=clf, max_windows=n_stream)
        stream[name] = {"stages": stages, "twin": {"fault": state.fault, "windows": state.windows,
                                                    "counts": list(state.counts)}}
    limit.unregister()
    # T_proc of the twin loop itself: acquire + features + classify + twin update per streamed window
    links_stream = {p: link_totals(v["stages"]["total"]) for p, v in stream.items()}
    return {"batches": per_batch, "alpha": alpha, "links": links, "links_stream": links_stream, "stream": stream,
            "forest": {"trees": cf.num_trees, "max_nodes": int(cf.feature.shape[1]), "depth": cf.depth},
            "budget_ms": 0.8}


def link_totals(proc: dict) -> dict:
    """{link: {"p50": budget, "p99": budget}} with T_proc = a timing's p50 and p99 (ms)."""
    from sqattn.science.bearing import twin
    return {link.name: {"p50": link.budget(proc["p50_ms"]), "p99": link.budget(proc["p99_ms"])}
            for link in twin.LINKS}


# ----------------------------------------------------------------------------------------------- tables, plot
def accuracy_table(rows: Sequence[dict]) -> str:
    lines = ["| sigma_n | split | features | classifier | accuracy | macro-F1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['noise']} | {r['split']} | {r['features']} | {r['classifier']} | "
                     f"{r['accuracy']:.3f} | {r['macro_f1']:.3f} |")
    return "\n".join(lines)


def accuracy_pivot(rows: Sequence[dict]) -> str:
    """One line per (sigma_n, split); a column per (classifier, feature count): "accuracy / macro-F1"."""
    cols = sorted({(r["classifier"], r["features"]) for r in rows}, key=lambda c: (c[0] != "rf", c[1]))
    cells = {(r["noise"], r["split"], r["classifier"], r["features"]): r for r in rows}
    lines = ["| sigma_n | split | " + " | ".join(f"{c.upper()} {n} feats" for c, n in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for noise, split in dict.fromkeys((r["noise"], r["split"]) for r in rows):
        vals = [cells.get((noise, split, c, n)) for c, n in cols]
        lines.append(f"| {noise} | {split} | " + " | ".join(
            f"{v['accuracy']:.3f} / {v['macro_f1']:.3f}" if v else "-" for v in vals) + " |")
    return "\n".join(lines)


def latency_table(lat: dict) -> str:
    stages = [s for s in ("features", "sklearn_rf_classify", "jax_rf_classify", "jax_mlp_classify", "sklearn_rf",
                          "jax_rf", "jax_mlp") if s in next(iter(lat["batches"].values()))]
    lines = ["| batch | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for b, t in lat["batches"].items():
        lines.append(f"| {b} | " + " | ".join(f"{t[s]['p50_ms']:.3g} / {t[s]['p99_ms']:.3g}" for s in stages) + " |")
    return "\n".join(lines)


def link_table(lat: dict, key: str = "links") -> str:
    """End-to-end totals per path and link; ``key`` "links" (T_proc = interleaved batch-1 features + classifier
    call) or "links_stream" (T_proc = one streamed window through acquire .. twin update)."""
    lines = ["| path (T_proc p50 / p99) | " + " | ".join(link.name for link in _links()) + " |",
             "|---|" + "---|" * len(_links())]
    for p, by_link in lat[key].items():
        proc = by_link[_links()[0].name]
        lines.append(f"| {p} ({proc['p50']['proc']:.3f} / {proc['p99']['proc']:.3f} ms) | " + " | ".join(
            f"{by_link[link.name]['p50']['total']:.2f} / {by_link[link.name]['p99']['total']:.2f}"
            for link in _links()) + " |")
    return "\n".join(lines)


def _links():
    from sqattn.science.bearing import twin
    return twin.LINKS


def plot(rows: Sequence[dict], lat: dict | None, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if lat else 1, figsize=(12 if lat else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    labels = [f"{r['noise']}/{r['split'][0]}/{r['features']}/{r['classifier']}" for r in rows]
    ax.bar(range(len(rows)), [r["accuracy"] for r in rows],
           color=["tab:blue" if r["classifier"] == "rf" else "tab:orange" for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("test accuracy")
    ax.set_title("sigma_n / split (r=record, w=window) / features / classifier")
    ax.set_ylim(0, 1.02)
    if lat:
        ax = axes[0, 1]
        sizes = [int(b) for b in lat["batches"]]
        for p in PATHS:
            if p in lat["batches"][str(sizes[0])]:
                ax.plot(sizes, [lat["batches"][str(b)][p]["p50_ms"] for b in sizes], "o-", label=f"{p} (p50)")
        ax.axhline(lat["budget_ms"], color="k", linestyle=":", label="0.8 ms end-to-end budget")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("windows per call (batch)")
        ax.set_ylabel("features + classifier per call (ms)")
        ax.legend(fontsize=8)
        ax.set_title("processing latency vs batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- entry points
def run(workdir: str, *, noises: Sequence[float] = (0.05, 0.15, 0.3), splits: Sequence[str] = ("record", "window"),
        envelopes: Sequence[bool] = (False, True), records: int = 8, seconds: float = 5.0, trees: int = 100,
        mlp: bool = True, mlp_steps: int = 1000, batch_sizes: Sequence[int] = (1, 4, 16, 64, 256, 1024, 4096),
        repeats: int = 300, latency_noise: float = 0.05, stream_windows: int = 200, seed: int = 0,
        progress: bool = False) -> dict[str, Any]:
    """Both parts; writes ``results.json`` and ``results.png`` in ``workdir`` and returns the results."""
    import jax
    import platform
    os.makedirs(workdir, exist_ok=True)
    settings = dict(noises=list(noises), splits=list(splits), envelopes=list(envelopes), records=records,
                    seconds=seconds, trees=trees, mlp=mlp, mlp_steps=mlp_steps, batch_sizes=list(batch_sizes),
                    repeats=repeats, latency_noise=latency_noise, stream_windows=stream_windows, seed=seed)
    t0 = time.perf_counter()
    rows = accuracy_grid(workdir, noises=noises, splits=splits, envelopes=envelopes, records=records,
                         seconds=seconds, trees=trees, mlp=mlp, mlp_steps=mlp_steps, seed=seed, progress=progress)
    t1 = time.perf_counter()
    lat = latency(workdir, noise=latency_noise, batch_sizes=batch_sizes, repeats=repeats, records=records,
                  seconds=seconds, trees=trees, mlp=mlp, mlp_steps=mlp_steps, stream_windows=stream_windows,
                  seed=seed, progress=progress) if batch_sizes else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {"settings": settings, "accuracy": rows, "latency": lat,
           "machine": {"cpu_count": os.cpu_count(), "load_avg": load, "jax": jax.__version__,
                       "backend": jax.default_backend(), "python": platform.python_version()},
           "wall_s": {"accuracy": t1 - t0, "latency": time.perf_counter() - t1}}
    out["plot"] = plot(rows, lat, os.path.join(workdir, "results.png"))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = run(FLAGS.workdir, noises=[float(x) for x in FLAGS.noises], splits=FLAGS.splits,
              envelopes=[_bool(x) for x in FLAGS.envelope], records=FLAGS.records, seconds=FLAGS.seconds,
              trees=FLAGS.trees, mlp=FLAGS.mlp, mlp_steps=FLAGS.mlp_steps,
              batch_sizes=[int(b) for b in FLAGS.batch_sizes], repeats=FLAGS.repeats,
              latency_noise=FLAGS.latency_noise, stream_windows=FLAGS.stream_windows, seed=FLAGS.seed,
              progress=FLAGS.progress)
    print(accuracy_pivot(out["accuracy"]))
    if out["latency"]:
        print("\nlatency p50 / p99 (ms per call)\n" + latency_table(out["latency"]))
        print("\nend-to-end (ms, p50 / p99), T_proc = batch-1 call\n" + link_table(out["latency"]))
        print("\nend-to-end (ms, p50 / p99), T_proc = streamed window\n" + link_table(out["latency"], "links_stream"))
        print("\nalpha: " + json.dumps(out["latency"]["alpha"]))
    print(json.dumps(out))


if __name__ == "__main__":
    define_flags()
    app.run(main)
