"""COPY experiment of "Can Mamba always enjoy the free lunch?" (papers/mamba_free_lunch.md §5).

Per-token copy accuracy (512 fresh sequences) against copy length L for constant-state Mamba-2 with
d_state N in {4, 16, 64} and a 2-layer d_model-32 Transformer (RoPE attention; the note uses learned
absolute positions). Every cell is one ``train_and_evaluate`` run of a ``sqattn/configs/copy_task.py``
config (``copy_mamba2:d_state=16,copy_len=32,steps=...``) in ``<workdir>/runs/<name>``.

Prediction (Theorems 1-3): at fixed N the SSM's accuracy falls once L exceeds what its state can hold;
the break point moves out as N grows; the Transformer copies at every L.

  python -m experiments.copy_task --workdir=/work/runs/copy_task                  # the grid
  python -m experiments.copy_task --workdir=/tmp/copy_time --time_steps=30        # time it first

Writes ``results.json`` (every run, the accuracy table, the largest L with >= 90% accuracy per row and
the checks of the prediction) and ``results.png``; prints the table and the JSON. Resumable: a finished
run (its ``result.json``) is skipped, an interrupted one resumes from its checkpoint, so a grid can be
extended (e.g. by another L) with the same --workdir and --steps.

Measured (2 CPU cores shared with other jobs, load average 7-20; seed 0; --steps=1000, i.e. 2/3 of the
note's 1500; 16 runs, 73 min of run time in total: 2-10 min per Mamba-2 run, 0.3-2 min per Transformer run):

  | model           | L=8    | L=16   | L=32   | L=64   | largest L >= 90% |
  |-----------------|--------|--------|--------|--------|------------------|
  | Mamba-2 N=4     | 62.2%  | 39.0%  | 25.8%  | 18.4%  | none             |
  | Mamba-2 N=16    | 93.3%  | 79.1%  | 49.9%  | 25.1%  | 8                |
  | Mamba-2 N=64    | 98.8%  | 93.1%  | 83.2%  | 68.8%  | 16               |
  | Transformer     | 100%   | 100%   | 100%   | 100%   | >= 64            |

As predicted: at fixed N accuracy falls with L, the largest copyable L grows with N (0 -> 8 -> 16 for
N = 4 -> 16 -> 64), and the Transformer (26k params vs 15-24k) copies every L. Single seed, so +-few
points per cell; the budget is below the note's, so absolute numbers are lower than its table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Sequence

from absl import app, flags


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", "/tmp/sqattn/copy_task", "Output directory (runs/, results.json, .png).")
    flags.DEFINE_list("models", ["mamba2", "transformer"], "Rows: mamba2, mamba (S6) and/or transformer.")
    flags.DEFINE_list("d_states", ["4", "16", "64"], "SSM state sizes N (mamba2 / mamba rows).")
    flags.DEFINE_list("copy_lens", ["8", "16", "32", "64"], "Copy lengths L.")
    flags.DEFINE_list("seeds", ["0"], "Seeds (model init and data); the table averages over them.")
    flags.DEFINE_integer("steps", 1500, "Training steps per run.")
    flags.DEFINE_string("config_extra", "", "Extra config args appended to every run (e.g. 'runlocal').")
    flags.DEFINE_integer("time_steps", 0, "If > 0: only time every (row, L) with this many steps, write "
                         "timing.json with the projected grid time for --steps, and exit.")
    flags.DEFINE_bool("progress", True, "Progress bars (grid and per-run training).")


FLAGS = flags.FLAGS

THRESHOLD = 0.9  # "copies" = per-token accuracy >= 90%
SSM_MODELS = ("mamba2", "mamba")


# ----------------------------------------------------------------------------------------------
# The grid.
# ----------------------------------------------------------------------------------------------


def grid(models: Sequence[str], d_states: Sequence[int], copy_lens: Sequence[int],
         seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every run as {model, d_state (None for the Transformer), copy_len, seed}."""
    runs = []
    for model in models:
        if model not in SSM_MODELS + ("transformer",):
            raise ValueError(f"unknown model {model!r}; expected mamba2, mamba or transformer")
        for n in (d_states if model in SSM_MODELS else [None]):
            for length in copy_lens:
                for seed in seeds:
                    runs.append(dict(model=model, d_state=n, copy_len=int(length), seed=int(seed)))
    return runs


def row_label(model: str, d_state: int | None) -> str:
    return model if d_state is None else f"{model} N={d_state}"


def config_arg(run: dict, steps: int, extra: str = "") -> str:
    """``copy_<model>:...`` registered-config string of one run."""
    args = [f"copy_len={run['copy_len']}", f"steps={steps}", f"seed={run['seed']}"]
    if run["d_state"] is not None:
        args.insert(0, f"d_state={run['d_state']}")
    return f"copy_{run['model']}:" + ",".join(args + ([extra] if extra else []))


def run_name(run: dict, steps: int) -> str:
    n = "" if run["d_state"] is None else f"_N{run['d_state']}"
    return f"{run['model']}{n}_L{run['copy_len']}_seed{run['seed']}_steps{steps}"


def _param_count(cfg) -> int:
    from sqattn.train import state as state_lib
    _, params = state_lib.abstract_model(cfg)
    return state_lib.param_count(params)


def _state_floats_per_layer(cfg) -> int | None:
    """Recurrent state size of one layer (64 N for the note's Mamba-2), None for attention (grows with T)."""
    m = cfg.model
    if m.block_pattern == "2":
        return m.d_model * m.mixers.mamba2.expand * m.mixers.mamba2.d_state
    if m.block_pattern == "M":
        return m.d_model * m.mixers.mamba.expand * m.mixers.mamba.d_state
    return None


def train_one(run: dict, workdir: str, *, steps: int, extra: str = "", progress: bool = True) -> dict:
    """Trains one cell (or loads its finished result) and returns its record."""
    from sqattn import configs
    from sqattn.train import train_and_evaluate
    arg = config_arg(run, steps, extra)
    cfg = configs.get(arg)
    run_dir = os.path.join(workdir, "runs", run_name(run, cfg.num_steps))
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    t0 = time.perf_counter()
    out = train_and_evaluate(cfg, run_dir, progress=progress)
    rec = dict(run, config=arg, steps=int(out["step"]), accuracy=float(out["eval_accuracy"]),
               eval_loss=float(out["eval_loss"]), train_loss=float(out["loss"]),
               wall_s=time.perf_counter() - t0, params=_param_count(cfg),
               state_floats_per_layer=_state_floats_per_layer(cfg),
               eval_sequences=cfg.batch_size * cfg.eval_batches)
    if not out["stopped_early"]:
        with open(done, "w") as f:
            json.dump(rec, f, indent=2)
    return rec


# ----------------------------------------------------------------------------------------------
# Summary, checks of the prediction, plot.
# ----------------------------------------------------------------------------------------------


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Mean accuracy per (row, L), the largest L >= THRESHOLD per row, and the prediction checks."""
    cells: dict[str, dict[int, list[float]]] = {}
    for r in records:
        cells.setdefault(row_label(r["model"], r["d_state"]), {}).setdefault(r["copy_len"], []).append(
            r["accuracy"])
    table = {row: {str(length): sum(v) / len(v) for length, v in sorted(by_len.items())}
             for row, by_len in cells.items()}
    largest = {row: max([int(k) for k, v in accs.items() if v >= THRESHOLD], default=0)
               for row, accs in table.items()}
    checks: dict[str, Any] = {}
    ssm_rows = sorted(((r["model"], r["d_state"]) for r in records if r["d_state"] is not None),
                      key=lambda x: (x[0], x[1]))
    by_model: dict[str, list[str]] = {}
    for model, n in dict.fromkeys(ssm_rows):
        by_model.setdefault(model, []).append(row_label(model, n))
    for model, rows in by_model.items():
        # (1) The smallest state fails (< 90%) at the longest L (larger N may hold beyond the grid).
        checks[f"{model}: smallest N fails at the longest L"] = list(table[rows[0]].values())[-1] < THRESHOLD
        # (2) The largest copyable L does not shrink as N grows, and grows from smallest to largest N.
        ls = [largest[row] for row in rows]
        checks[f"{model}: largest L >= 90% grows with N"] = (
            all(a <= b for a, b in zip(ls, ls[1:])) and ls[-1] > ls[0])
        # (3) At the longest L, more state copies better.
        longest = [list(table[row].values())[-1] for row in rows]
        checks[f"{model}: accuracy at the longest L grows with N"] = all(
            a <= b for a, b in zip(longest, longest[1:]))
    if "transformer" in table:
        checks["transformer: >= 90% at every L"] = all(v >= THRESHOLD for v in table["transformer"].values())
    return {"table": table, "largest_L_ge_90": largest, "checks": checks,
            "prediction_holds": bool(checks) and all(checks.values())}


def format_table(summary: dict) -> str:
    table = summary["table"]
    lens = sorted({int(k) for row in table.values() for k in row})
    head = "| model | " + " | ".join(f"L={length}" for length in lens) + " | largest L >= 90% |"
    lines = [head, "|" + "---|" * (len(lens) + 2)]
    for row, accs in table.items():
        vals = [f"{100 * accs[str(length)]:.1f}%" if str(length) in accs else "-" for length in lens]
        lines.append(f"| {row} | " + " | ".join(vals) + f" | {summary['largest_L_ge_90'][row]} |")
    return "\n".join(lines)


def plot(summary: dict, records: Sequence[dict], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for row, accs in summary["table"].items():
        lens = [int(k) for k in accs]
        ax1.plot(lens, [100 * v for v in accs.values()], marker="o", label=row,
                 linestyle="--" if row == "transformer" else "-")
    ax1.axhline(100 / 16, color="gray", linewidth=0.8, linestyle=":", label="chance (1/16)")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("copy length L")
    ax1.set_ylabel("per-token copy accuracy (%)")
    ax1.set_title("COPY: accuracy vs length (d_model 32, 2 layers)")
    ax1.legend(fontsize=8)
    models = sorted({r["model"] for r in records if r["d_state"] is not None})
    for model in models:
        ns = sorted({r["d_state"] for r in records if r["model"] == model})
        ax2.plot(ns, [summary["largest_L_ge_90"][row_label(model, n)] for n in ns], marker="o", label=model)
    if "transformer" in summary["largest_L_ge_90"]:
        ax2.axhline(summary["largest_L_ge_90"]["transformer"], color="k", linestyle="--",
                    label="transformer (at most the grid's largest L)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("SSM state size N (state per layer = 64 N floats)")
    ax2.set_ylabel("largest L with >= 90% accuracy")
    ax2.set_title("copy capacity vs state size")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------


def run_grid(workdir: str, *, models: Sequence[str], d_states: Sequence[int], copy_lens: Sequence[int],
             seeds: Sequence[int] = (0,), steps: int = 1500, extra: str = "",
             progress: bool = True) -> dict[str, Any]:
    """Trains every cell not yet finished, then writes ``results.json`` and ``results.png``.

    Returns:
      {"settings", "runs" (one record per cell), "table", "largest_L_ge_90", "checks",
       "prediction_holds", "plot"}.
    """
    os.makedirs(workdir, exist_ok=True)
    runs = grid(models, d_states, copy_lens, seeds)
    settings = dict(models=list(models), d_states=[int(n) for n in d_states],
                    copy_lens=[int(x) for x in copy_lens], seeds=[int(s) for s in seeds], steps=steps,
                    extra=extra, threshold=THRESHOLD)
    records = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(runs), desc="copy grid", unit="run", position=0, dynamic_ncols=True)
    try:
        for run in runs:
            if bar is not None:
                bar.set_postfix_str(config_arg(run, steps, extra))
            rec = train_one(run, workdir, steps=steps, extra=extra, progress=progress)
            records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.write(f"{run_name(run, rec['steps'])}: accuracy {100 * rec['accuracy']:.1f}% "
                          f"({rec['wall_s']:.0f} s)")
            _write(workdir, settings, records)  # partial results after every run
    finally:
        if bar is not None:
            bar.close()
    return _write(workdir, settings, records)


def _write(workdir: str, settings: dict, records: list[dict]) -> dict[str, Any]:
    summary = summarize(records)
    out = {"settings": settings, "runs": records, **summary,
           "plot": plot(summary, records, os.path.join(workdir, "results.png"))}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def time_grid(workdir: str, *, models: Sequence[str], d_states: Sequence[int], copy_lens: Sequence[int],
              time_steps: int, steps: int, num_seeds: int = 1, extra: str = "",
              progress: bool = True) -> dict[str, Any]:
    """Times every (row, L) and projects the grid's wall time at ``steps`` steps per run.

    Each cell trains ``time_steps`` steps from scratch with a checkpoint half way. The trainer's
    tokens/s over the second half (it restarts its clock at every checkpoint) gives the steady-state
    time per step; the rest of the wall time (compile, eval, checkpoints, plot) is per-run overhead.
    """
    from sqattn import configs
    from sqattn.train import metrics as metrics_lib
    from sqattn.train import train_and_evaluate
    if time_steps < 4:
        raise ValueError(f"time_steps must be >= 4, got {time_steps}")
    rows = []
    for run in grid(models, d_states, copy_lens, [0]):
        cfg = configs.get(config_arg(run, time_steps, extra))
        cfg.log_every = 1
        cfg.checkpoint_every = time_steps // 2
        run_dir = os.path.join(workdir, "timing", run_name(run, time_steps))
        if os.path.exists(run_dir):
            shutil.rmtree(run_dir)  # a resumed run would not be timed
        t0 = time.perf_counter()
        train_and_evaluate(cfg, run_dir, progress=progress)
        wall = time.perf_counter() - t0
        last = [r for r in metrics_lib.read_metrics(run_dir) if "tokens_per_s" in r][-1]
        s_step = cfg.batch_size * cfg.data.seq_len / last["tokens_per_s"]
        overhead = max(wall - time_steps * s_step, 0.0)
        rows.append(dict(run, s_per_step=s_step, overhead_s=overhead, wall_s=wall,
                         projected_s=overhead + steps * s_step))
    total = num_seeds * sum(r["projected_s"] for r in rows)
    out = {"time_steps": time_steps, "steps": steps, "seeds": num_seeds, "rows": rows,
           "projected_grid_s": total}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "timing.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def main(argv):
    del argv
    from experiments import common
    common.quiet_logging()
    d_states = [int(n) for n in FLAGS.d_states]
    copy_lens = [int(x) for x in FLAGS.copy_lens]
    seeds = [int(s) for s in FLAGS.seeds]
    if FLAGS.time_steps > 0:
        out = time_grid(FLAGS.workdir, models=FLAGS.models, d_states=d_states, copy_lens=copy_lens,
                        time_steps=FLAGS.time_steps, steps=FLAGS.steps, num_seeds=len(seeds),
                        extra=FLAGS.config_extra, progress=FLAGS.progress)
        for r in out["rows"]:
            print(f"{row_label(r['model'], r['d_state']):>16} L={r['copy_len']:<3} "
                  f"{1000 * r['s_per_step']:7.1f} ms/step  overhead {r['overhead_s']:5.1f} s  "
                  f"-> {r['projected_s']:6.1f} s at {FLAGS.steps} steps")
        print(f"projected grid time: {out['projected_grid_s'] / 60:.1f} min")
        print(json.dumps(out))
        return
    out = run_grid(FLAGS.workdir, models=FLAGS.models, d_states=d_states, copy_lens=copy_lens, seeds=seeds,
                   steps=FLAGS.steps, extra=FLAGS.config_extra, progress=FLAGS.progress)
    print(format_table(out))
    print("checks:", json.dumps(out["checks"], indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
