"""SEMA vs FT-Adapter vs expand-every-task vs frozen backbone + prototypes on a class-incremental digit stream
(papers/sema.md; ``sqattn.models.sema``, ``sqattn.train.stream``).

Protocol (the note's small-scale reproduction):
  backbone  ``vit_digits`` (16x16, patch 4, d 64, 4 blocks, 4 heads) trained by the trainer on all ten digits in
            the transposed domain (``digits_transposed``: a pretext no stream task uses), then frozen.
  stream    ``digits5``: 5 tasks x 2 classes (0,1 | 2,3 | 4,5 | 6,7 | 8,9); tasks 4-5 (indices 3, 4) inverted +
            Gaussian noise sigma 0.3, the domain shift. Eval after each task on every class seen so far, no task
            id (class-incremental).
  methods   sema (adapters r 8 in every block, the last 2 blocks expandable up to 4 slots, RD 64 -> 16 -> 64,
            z-buffer 200, z threshold ``--z``), ft_adapter (one adapter per block trained on every task),
            expand_every (a new slot in each expandable block at every task, same router), prototypes
            (nearest-class-mean head on frozen features, nothing trained). AdamW lr 3e-3, batch 32,
            ``--func_epochs`` / ``--rd_epochs`` epochs per run, old-class logits masked.
  metrics   A-bar (mean over tasks of the accuracy on all seen classes) and A_N (after the last task); adapters per
            layer after each task and every expansion (the expansion log); z-scores per task and expandable layer
            (SEMA's detection statistic at the start of each task); trainable parameters per task; adapter
            parameters held after each task.

  python -m experiments.sema --workdir=/tmp/sema                     # 4 methods, the note's 3 seeds
  python -m experiments.sema --workdir=/tmp/sema --seeds=0           # one seed (a third of the time)

Writes ``results.json`` and ``results.png`` (z-scores, accuracy per task, adapter parameters) to --workdir and
prints the tables. Every run lives under --workdir (``backbone/``, ``<method>_s<seed>/t<task>_<i>_<phase>/``);
finished runs are reused, so a killed experiment continues where it stopped.

Measured: ``python -m experiments.sema --workdir=/work/runs/sema --seeds=0,1,2`` (the note's 3 seeds; seed 0's
runs from 2026-12-02 reused, seeds 1 and 2 run 2026-12-03 in 15 min of wall at load average 6-7 on 2 cores,
the test suite beside it; JAX 0.10.2 CPU). Backbone eval accuracy on the transposed digits: 0.975. Mean ± std
over the 3 seeds:

  | method       | A-bar         | A_N           | A-bar per seed      | adapters/layer after each task (seed 0)  | adapter params (seed 0) |
  |--------------|---------------|---------------|---------------------|------------------------------------------|-------------------------|
  | sema         | 0.490 ± 0.030 | 0.235 ± 0.021 | 0.451 0.494 0.524   | 1111 1122 1122 1132 1132                 | 8770 -> 18637           |
  | ft_adapter   | 0.474 ± 0.062 | 0.172 ± 0.066 | 0.398 0.549 0.477   | 1111 (always)                            | 8770                    |
  | expand_every | 0.495 ± 0.042 | 0.231 ± 0.033 | 0.438 0.510 0.538   | 1111 1122 1133 1144 1144 (full)          | 8770 -> 28504           |
  | prototypes   | 0.585 ± 0.007 | 0.394 ± 0.019 | 0.576 0.590 0.591   | none                                     | 0                       |

  Trainable parameters per task (sema, seed 0): 9420 (task 1: every adapter + RDs + head), 7878, 650 (head
  only), 3939, 650.
  Expansion log / z-scores (min over RDs of the mean z at each task's start; expandable blocks 2, 3; threshold 2;
  tasks 2, 3 clean, 4, 5 shifted):
    seed 0: task 2 z 1.85, 2.29 -> blocks 3 and 2 expanded; task 3 0.72, 0.77 -> nothing; task 4 2.04, 1.29 ->
            block 2; task 5 0.73, 1.19 -> nothing (the task-4 adapter's RD accepts the same shift)
    seed 1: task 2 1.34, 1.61 -> nothing; task 3 0.94, 1.10 -> nothing; task 4 2.51, 2.80 -> blocks 2 and 3;
            task 5 0.93, 0.83 -> nothing (expansion on the shift only)
    seed 2: task 2 1.67, 2.50 -> blocks 3 and 2; task 3 0.63, 0.65 -> nothing; task 4 2.07, 1.14 -> block 2;
            task 5 0.98, 1.30 -> nothing

What this shows, honestly: the direction of the paper holds only in part. Over 3 seeds SEMA forgets less than
FT-Adapter (A_N 0.235 ± 0.021 vs 0.172 ± 0.066, better on 2 of 3 seeds) and matches expand-every-task (0.231 ±
0.033) with fewer adapters (7, 6 and 7 vs 10 per stream) and 35-46 % fewer adapter parameters; its trigger
reuses adapters for a repeated domain (task 5, every seed) and for a clean task (task 3, every seed). But the
trigger does not separate the shift cleanly: on seeds 0 and 2 the clean task 2 scores as high as the shifted
task 4 (2.29 / 2.50 vs 2.04 / 2.07), so SEMA expanded on a clean task too; only seed 1 expands on the shift
alone. The statistic sits near the threshold at this scale. And every trained-head
method loses to the nearest-class-mean prototypes: with 2 classes per task, the masked cross-entropy only learns
the difference of the two new head rows (their sum stays at its initial value under the softmax's shift
invariance), so new classes are not calibrated against old ones and mostly lose the argmax to task 1's classes
(seed 0: per-task accuracy of task 2's classes after task 5: sema 0.03, prototypes 0.19). The note's expected outcome
"SEMA >= prototypes" needs a strong backbone and more classes per task than this toy stream has.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
METHODS = ("sema", "ft_adapter", "expand_every", "prototypes")


def define_flags() -> None:
    flags.DEFINE_string("workdir", "/tmp/sqattn/sema", "Output directory (runs, results.json, results.png).")
    flags.DEFINE_list("methods", list(METHODS), "Methods to run.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Stream seeds (head/adapter init, sampling, domain noise).")
    flags.DEFINE_string("stream", "digits5", "Stream name (sqattn.configs.vit.STREAMS).")
    flags.DEFINE_string("backbone", "digits_transposed", "Backbone pretext stream (vit_digits source).")
    flags.DEFINE_integer("backbone_steps", 600, "Backbone training steps.")
    flags.DEFINE_float("z", 2.0, "SEMA expansion threshold on the z-score.")
    flags.DEFINE_float("func_epochs", 5, "Epochs of each func / joint run.")
    flags.DEFINE_float("rd_epochs", 5, "Epochs of each rd run.")
    flags.DEFINE_bool("progress", False, "Training progress bars.")


def backbone_config(pretext: str, steps: int):
    from sqattn import configs
    source = "glyphs" if pretext == "glyphs" else "digits"
    return configs.get(f"vit_digits:source={source},stream={pretext},steps={steps}")


def run(workdir: str, *, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0,), stream_name: str = "digits5",
        pretext: str = "digits_transposed", backbone_steps: int = 600, z: float = 2.0, func_epochs: float = 5,
        rd_epochs: float = 5, progress: bool = False) -> dict:
    """Trains the backbone and every (method, seed) stream; returns (and writes) the results."""
    import jax
    from sqattn import configs
    from sqattn.train import stream, train_and_evaluate
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {METHODS}")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    bb_dir = os.path.join(workdir, "backbone")
    bb = train_and_evaluate(backbone_config(pretext, backbone_steps), bb_dir, progress=progress)
    streams, wall = {}, {"backbone": time.perf_counter() - t0}
    for seed in seeds:
        for method in methods:
            t = time.perf_counter()
            cfg = configs.get(f"sema_digits:method={method},seed={seed},z={z},stream={stream_name}")
            s = stream.run_stream(cfg, os.path.join(workdir, f"{method}_s{seed}"), backbone=bb_dir,
                                  func_epochs=func_epochs, rd_epochs=rd_epochs, progress=progress)
            s.pop("runs")
            streams[f"{method}_s{seed}"] = s
            wall[f"{method}_s{seed}"] = time.perf_counter() - t
    out = {"settings": dict(methods=list(methods), seeds=list(seeds), stream=stream_name, pretext=pretext,
                            backbone_steps=backbone_steps, z=z, func_epochs=func_epochs, rd_epochs=rd_epochs),
           "backbone_eval_accuracy": bb.get("eval_accuracy"), "streams": streams, "summary": summarise(streams),
           "machine": {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "jax": jax.__version__,
                       "python": platform.python_version()},
           "wall_s": wall}
    out["plot"] = plot(streams, z, os.path.join(workdir, "results.png"))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def summarise(streams: dict) -> dict:
    """Per method: mean and std over seeds of A-bar and A_N, and the seeds' expansion logs."""
    import numpy as np
    by_method: dict[str, list] = {}
    for key, s in streams.items():
        by_method.setdefault(s["method"], []).append(s)
    out = {}
    for method, runs in by_method.items():
        abar = [r["average_accuracy"] for r in runs]
        an = [r["final_accuracy"] for r in runs]
        out[method] = {
            "abar_mean": float(np.mean(abar)), "abar_std": float(np.std(abar)),
            "an_mean": float(np.mean(an)), "an_std": float(np.std(an)), "seeds": len(runs),
            "accuracy_per_task": [[t["accuracy"] for t in r["tasks"]] for r in runs],
            "adapters_per_task": [[t["adapters"] for t in r["tasks"]] for r in runs],
            "expansions_per_task": [[t["expansions"] for t in r["tasks"]] for r in runs],
            "z_per_task": [[t["z_scores"] for t in r["tasks"]] for r in runs],
            "trainable_params_per_task": [[t["trainable_params"] for t in r["tasks"]] for r in runs],
            "adapter_params_per_task": [[t["adapter_params"] for t in r["tasks"]] for r in runs],
        }
    return out


def table(summary: dict) -> str:
    lines = ["| method | seeds | A-bar | A_N | adapters per layer after each task | trainable params per task |",
             "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        adapters = " ".join("".join(str(n) for n in a) for a in s["adapters_per_task"][0])
        lines.append(f"| {method} | {s['seeds']} | {s['abar_mean']:.3f} ± {s['abar_std']:.3f} | "
                     f"{s['an_mean']:.3f} ± {s['an_std']:.3f} | {adapters} | "
                     f"{' '.join(str(p) for p in s['trainable_params_per_task'][0])} |")
    return "\n".join(lines)


def expansion_log(summary: dict) -> str:
    s = summary.get("sema")
    if not s:
        return "(no sema run)"
    lines = []
    for i, (exp, z) in enumerate(zip(s["expansions_per_task"], s["z_per_task"])):
        for t, (e, zz) in enumerate(zip(exp, z)):
            zs = "-" if zz is None else ", ".join(f"{v:.2f}" for v in zz)
            lines.append(f"seed#{i} task {t}: z per expandable layer [{zs}] -> expanded (layer, slot) {e}")
    return "\n".join(lines)


def plot(streams: dict, z: float, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for key, s in streams.items():
        tasks = [t["task"] for t in s["tasks"]]
        ax[1].plot(tasks, [t["accuracy"] for t in s["tasks"]], marker="o", label=key)
        ax[2].plot(tasks, [t["adapter_params"] for t in s["tasks"]], marker="o", label=key)
        if s["method"] == "sema":
            zs = [(t["task"], t["z_scores"]) for t in s["tasks"] if t["z_scores"] is not None]
            for j in range(len(zs[0][1]) if zs else 0):
                ax[0].plot([t for t, _ in zs], [v[j] for _, v in zs], marker="o",
                           label=f"{key} expandable layer {j}")
    ax[0].axhline(z, color="k", ls="--", lw=1, label=f"threshold {z}")
    ax[0].set(title="SEMA z-score at each task start (min over RDs)", xlabel="task", ylabel="z", yscale="log")
    ax[1].set(title="accuracy on all seen classes", xlabel="task", ylabel="accuracy", ylim=(0, 1))
    ax[2].set(title="adapter parameters held", xlabel="task", ylabel="parameters")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = run(FLAGS.workdir, methods=FLAGS.methods, seeds=[int(s) for s in FLAGS.seeds], stream_name=FLAGS.stream,
              pretext=FLAGS.backbone, backbone_steps=FLAGS.backbone_steps, z=FLAGS.z,
              func_epochs=FLAGS.func_epochs, rd_epochs=FLAGS.rd_epochs, progress=FLAGS.progress)
    print(table(out["summary"]))
    print(expansion_log(out["summary"]))
    print(json.dumps({k: v for k, v in out.items() if k != "streams"}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
