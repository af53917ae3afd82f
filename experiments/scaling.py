"""Learning curves and power-law fits over trainer sweeps (papers/scaling_laws.md, Hestness et al. 2017).

Parts (``--parts``), each a sweep of config overrides run through the trainer (``sqattn.analysis.sweep``; finished
runs in ``<workdir>/<part>/runs/<name>`` are reused, so a rerun only fits, and a longer shard list only trains the
new runs):

* ``A``: ``teacher_reg`` - regression on a 16 -> 64 -> 1 tanh teacher + N(0, 0.1^2) noise; metric: validation
  MSE (floor 0.01). Nested shards m = 2^``shard_min`` .. 2^``shard_max`` examples x student widths ``--widths`` x
  ``--seeds``; Adam with cosine decay, batch 64, steps = clip(``epochs`` epochs, ``min_steps``, ``max_steps``);
  the best of 4 evaluations is the run's value (early stopping after the fact).
* ``B``: ``teacher_cls`` - 10 classes from a 16 -> 64 -> 10 tanh teacher, 10 % label noise; metric: validation
  error (best guess 0.9).
* ``lm``: ``lm_shards`` - the tiny byte LM on nested shards of the stdlib corpus (``--lm_bytes``) x widths
  ``--lm_widths``; metric: best validation loss in bits per byte.

Per part: best-per-shard curve (mean over seeds, then min over widths), fits with and without the floor gamma,
bootstrap CIs, ``scipy.optimize.curve_fit`` on the same points (anchor: is its estimate inside our CI?), the
power-law window from local slopes, holdout extrapolation (fit without the 2 largest shards, predict them),
per-width curves, and the best-model-size curve s(m). Writes ``results.json`` and ``scaling_<part>.png``.

  python -m experiments.scaling --workdir=/tmp/scaling                  # A, B and lm
  python -m experiments.scaling --workdir=/tmp/scaling --parts=A --widths=4,16,64 --seeds=0,1

Measured (2 CPU cores shared with ~9 other agents' jobs, load average 20-23; JAX 0.10.2 CPU; one seed, widths 8
and 64, Adam 3e-3 cosine, batch 64, steps = clip(10 epochs, 200, 800), 2048 validation examples, 300 bootstrap
refits of points, 90 % intervals). ``python -m experiments.scaling --workdir=/work/runs/scaling --parts=A,B``:
14 + 14 trainer runs, A 428 s, B 494 s (first run of each ~100 s: imports and compiles).

A (validation MSE; floor 0.01):

  | m     | 128    | 256    | 512    | 1024   | 2048   | 4096   | 8192   |
  |-------|--------|--------|--------|--------|--------|--------|--------|
  | w 8   | 0.155  | 0.133  | 0.135  | 0.122  | 0.074  | 0.047  | 0.044  |
  | w 64  | 0.101  | 0.089  | 0.065  | 0.056  | 0.047  | 0.039  | 0.035  |

  no floor: eps = 0.365 m^-0.266, beta CI [-0.290, -0.236]; with floor: eps = 0.581 m^-0.393 + 0.0176, beta CI
  [-0.589, -0.284], gamma CI [~0, 0.028] (contains the true 0.01; weakly identified, as the note warns).
  scipy curve_fit on log eps (the same objective) lands on our estimates (identical to 1e-8) and inside every CI;
  curve_fit on raw eps (beta -0.277 / -0.350) is inside our CIs too. Holdout (fit on m <= 2048, predict 4096 and
  8192): no floor 3.0 % / 11.1 % relative error (the second outside the CI), with floor 1.2 % / 2.9 % (both inside).
  Local slopes -0.19 -0.45 -0.22 -0.25 -0.27 -0.16: one power-law window over the whole range. The small width
  plateaus first (0.155 -> 0.122 over 8x data) and then drops when the epochs cap lets it train longer.

B (validation error; best guess 0.9, label-noise floor ~0.09):

  | m     | 128    | 256    | 512    | 1024   | 2048   | 4096   | 8192   |
  |-------|--------|--------|--------|--------|--------|--------|--------|
  | w 8   | 0.676  | 0.650  | 0.652  | 0.642  | 0.582  | 0.485  | 0.433  |
  | w 64  | 0.511  | 0.453  | 0.401  | 0.349  | 0.306  | 0.300  | 0.292  |

  no floor: eps = 0.982 m^-0.143, beta CI [-0.185, -0.118]; window m <= 4096 (local slopes -0.17 -0.18 -0.20
  -0.19 then -0.03 -0.04): beta -0.164 [-0.189, -0.138]; with floor: beta -0.466 [-1.02, -0.19], gamma 0.246
  [~0, 0.285]. curve_fit agrees as for A (log objective identical; raw-scale estimates inside our CIs). Holdout:
  10 % / 19 % relative error, outside the CIs: the curve bends at 2048 because steps are capped at 800 (6 epochs
  at m = 8192), so the largest shards are optimisation-limited, not at the label-noise floor - the note's "never
  extrapolate across regions" case. The small-data plateau near 0.9 is not reached at m >= 128 (even width 8 is
  at 0.68). The best width is 64 at every m, so the model-size curve is flat with two widths (no beta_p).

lm (best validation bits/byte): ``python -m experiments.scaling --workdir=/work/runs/scaling_lm2 --parts=lm``
(defaults: shards of 4 KiB - 1 MiB of the stdlib corpus x d_model 32 / 64, 2 blocks, rows of 64 bytes, batch
16, 800 steps = 819 KB seen, 4 evaluations; one seed). 10 trainer runs in 350 s, measured 2026-12-03 on 2 cores
at load average 4-6 (another experiment and a helper's tests beside it):

  | bytes | 4096  | 16384 | 65536 | 262144 | 1048576 |
  |-------|-------|-------|-------|--------|---------|
  | d 32  | 4.454 | 3.190 | 2.846 | 2.733  | 2.565   |
  | d 64  | 5.298 | 3.284 | 2.604 | 2.358  | 2.133   |
  | best  | 4.454 | 3.190 | 2.604 | 2.358  | 2.133   |

  No floor: eps = 11.8 m^-0.128, beta CI [-0.163, -0.072] (curve_fit identical on the log objective, inside the
  CI on raw values: -0.145); with floor: eps = 163 m^-0.506 + 2.02, beta CI [-0.578, -0.396], gamma [1.89, 2.15]
  (flagged not identified: 125 of 300 bootstrap refits succeed). Local slopes -0.24, -0.15, -0.07, -0.07: the curve
  bends. The 4 KiB and 16 KiB shards overfit (best evaluation at step 200 of 800; final 6.4 / 3.4 bits/byte for d
  32), the three larger ones are still improving at step 800 (best = last evaluation), i.e. compute-limited: the
  largest shard is seen less than once. So the sweep spans the small-data region and the start of a
  compute-limited one, not one power-law region, and the holdout shows it: fit on m <= 64 KiB, the prediction for
  256 KiB and 1 MiB is 17 % and 30 % too optimistic (1.95 and 1.49 vs 2.36 and 2.13), outside the CI - the note's
  "never extrapolate across regions". The best width grows with the data (32 below 64 KiB, 64 above;
  model-size exponent beta_p 0.27, CI [0.06, 0.48] from two widths), as the note's s(m) predicts. An earlier
  150-step sweep (16 KiB - 1 MiB) was flat (beta CI [-0.026, 0.015]): every run compute-limited.
"""

from __future__ import annotations

import json
import math
import os
import time
from types import SimpleNamespace
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS

# name -> (default, help); flags of the same names (defined only when run as a program, like the other experiments)
DEFAULTS: dict[str, tuple[Any, str]] = {
    "workdir": ("/tmp/scaling", "output directory (runs, results.json, plots)"),
    "parts": (["A", "B", "lm"], "A (teacher regression), B (teacher classification), lm"),
    "shard_min": (7, "smallest teacher shard: 2^shard_min examples"),
    "shard_max": (13, "largest teacher shard: 2^shard_max examples"),
    "widths": (["8", "64"], "teacher student widths"),
    "seeds": (["0"], "init and data-order seeds"),
    "lr": (3e-3, "teacher Adam learning rate"),
    "epochs": (10, "teacher epochs per run before clipping"),
    "min_steps": (200, "teacher steps at least"),
    "max_steps": (800, "teacher steps at most"),
    "n_eval": (2048, "teacher validation examples"),
    "lm_bytes": (["4096", "16384", "65536", "262144", "1048576"], "byte-LM shard sizes (bytes)"),
    "lm_widths": (["32", "64"], "byte-LM widths (d_model)"),
    "lm_steps": (800, "byte-LM steps per run"),
    "bootstrap": (300, "bootstrap refits per fit"),
    "holdout": (2, "largest shards held out of the extrapolation fit"),
    "progress": (False, "progress bars of the trainer"),
}


def define_flags() -> None:
    from sqattn.analysis import sweep
    sweep.define_flags(DEFAULTS)


def settings(**overrides) -> SimpleNamespace:
    """The experiment's settings: the defaults above with ``overrides`` (what the flags give in ``main``)."""
    from sqattn.analysis import sweep
    return sweep.settings(DEFAULTS, **overrides)


METRIC = {"A": "eval_mse", "B": "eval_error", "lm": "eval_bits_per_byte"}
BEST_GUESS = {"A": None, "B": 0.9, "lm": None}


def teacher_steps(opts, m: int, batch: int = 64) -> int:
    return int(min(max(opts.epochs * m // batch, opts.min_steps), opts.max_steps))


def sweep_specs(opts, part: str) -> tuple[str, list[dict], list[str], list[dict]]:
    """(base config, overrides, names, per-run facts) of a part."""
    ovs, names, facts = [], [], []
    if part in ("A", "B"):
        base = "teacher_reg" if part == "A" else "teacher_cls"
        for e in range(opts.shard_min, opts.shard_max + 1):
            m = 2 ** e
            steps = teacher_steps(opts, m)
            for w in (int(x) for x in opts.widths):
                for s in (int(x) for x in opts.seeds):
                    ovs.append({"data.n_train": m, "model.hidden": w, "seed": s, "data.seed": 100 + s,
                                "num_steps": steps, "checkpoint_every": steps, "eval_every": max(steps // 4, 1),
                                "optim.lr": opts.lr, "data.n_eval": opts.n_eval,
                                "eval_batches": -(-opts.n_eval // 64)})
                    names.append(f"m{m}_w{w}_s{s}")
                    facts.append({"m": m, "width": w, "seed": s, "lr": opts.lr, "steps": steps})
    elif part == "lm":
        base = "lm_shards"
        for nb in (int(x) for x in opts.lm_bytes):
            for w in (int(x) for x in opts.lm_widths):
                for s in (int(x) for x in opts.seeds):
                    st = opts.lm_steps
                    ovs.append({"data.train_bytes": nb, "model.d_model": w, "model.mlp_dim": 3 * w,
                                "model.mixers.attention.num_heads": w // 16,
                                "model.mixers.attention.num_kv_heads": max(1, w // 32), "seed": s,
                                "data.seed": 100 + s, "num_steps": st, "checkpoint_every": st,
                                "eval_every": max(st // 4, 1), "optim.warmup_steps": min(30, st // 10)})
                    names.append(f"b{nb}_d{w}_s{s}")
                    facts.append({"m": nb, "width": w, "seed": s, "lr": 3e-3, "steps": st})
    else:
        raise app.UsageError(f"unknown part {part!r}; expected A, B or lm")
    return base, ovs, names, facts


def n_params(workdir: str) -> int:
    from sqattn import sample
    from sqattn.train import state as state_lib
    cfg = sample.load_config(workdir)
    return state_lib.param_count(state_lib.abstract_model(cfg)[1])


def run_part(opts, part: str, root: str) -> dict[str, Any]:
    from sqattn.analysis import scaling, sweep
    base, ovs, names, facts = sweep_specs(opts, part)
    t0 = time.perf_counter()

    def report(r):
        print(f"  {r.name}: {r.status} {r.wall_s:.1f}s {r.error}", flush=True)
    results = sweep.run_sweep(base, ovs, os.path.join(root, "runs"), names=names, progress=opts.progress,
                              on_result=report)
    wall = time.perf_counter() - t0
    metric = METRIC[part]
    records, failed = [], []
    for res, fact in zip(results, facts):
        if res.status == "failed":
            failed.append({"name": res.name, "error": res.error})
            continue
        value, step = sweep.best_eval(res.workdir, metric)
        records.append(dict(fact, value=value, best_step=step, final=float(res.result.get(metric, math.nan)),
                            n_params=n_params(res.workdir), status=res.status, wall_s=res.wall_s))
    best = scaling.best_per_shard(records, metric="value", hparam_keys=("width", "lr"))
    m, err = best["m"], best["err"]
    out: dict[str, Any] = {"metric": metric, "records": records, "failed": failed, "sweep_wall_s": wall,
                           "best": {k: v.tolist() for k, v in best.items()},
                           "local_slopes": scaling.local_slopes(m, err).tolist()}
    i0, i1 = scaling.find_power_law_region(m, err, best_guess=BEST_GUESS[part], min_points=3)
    out["region"] = [float(m[i0]), float(m[i1 - 1])]
    fits = {}
    for gmode in ("none", "fit"):
        if gmode == "fit" and len(m) < 4:
            continue
        try:
            fit = scaling.fit_power_law(m, err, gamma=gmode, bootstrap=opts.bootstrap, seed=0)
            ref = scaling.curve_fit_reference(m, err, gamma=gmode)
            fits[gmode] = {"ours": fit.summary(), "formula": fit.formula(), "curve_fit": ref,
                           "curve_fit_log_inside_ci": scaling.agrees_with(fit, ref["log"]),
                           "curve_fit_linear_inside_ci": scaling.agrees_with(fit, ref["linear"])}
        except Exception as e:  # noqa: BLE001 - a fit that cannot be made is reported, the rest goes on
            fits[gmode] = {"error": f"{type(e).__name__}: {e}"}
    if i1 - i0 >= 3:
        fit = scaling.fit_power_law(m[i0:i1], err[i0:i1], bootstrap=opts.bootstrap, seed=0)
        fits["region"] = {"ours": fit.summary(), "formula": fit.formula()}
    out["fits"] = fits
    if len(m) >= opts.holdout + 3:
        out["holdout"] = {g: scaling.holdout_check(m, err, n_holdout=opts.holdout, gamma=g,
                                                   bootstrap=opts.bootstrap, seed=0)
                          for g in ("none", "fit") if g == "none" or len(m) - opts.holdout >= 4}
    per_width = {}
    for w in sorted({r["width"] for r in records}):
        rs = scaling.best_per_shard([r for r in records if r["width"] == w], metric="value",
                                    hparam_keys=("width", "lr"))
        entry = {"m": rs["m"].tolist(), "err": rs["err"].tolist()}
        if len(rs["m"]) >= 4:
            try:
                entry["fit"] = scaling.fit_power_law(rs["m"], rs["err"], gamma="fit").summary()
            except Exception as e:  # noqa: BLE001
                entry["fit"] = {"error": str(e)}
        per_width[str(w)] = entry
    out["per_width"] = per_width
    if len(set(best["best_params"].tolist())) > 1:
        out["model_size"] = scaling.fit_model_size(m, best["best_params"]).summary()
    return out


def plot(part: str, rec: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sqattn.analysis import scaling
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    m, err = np.array(rec["best"]["m"]), np.array(rec["best"]["err"])
    for w, entry in rec["per_width"].items():
        ax[0].plot(entry["m"], entry["err"], "o-", alpha=0.5, ms=3, label=f"width {w}")
    ax[0].plot(m, err, "ks", label="best per shard")
    xs = np.geomspace(m.min(), m.max() * 4, 100)
    for gmode, style in (("none", "--"), ("fit", "-")):
        f = rec["fits"].get(gmode, {}).get("ours")
        if f:
            ax[0].plot(xs, f["alpha"] * xs ** f["beta"] + f["gamma"], "r" + style, lw=1,
                       label=f"fit ({'floor' if gmode == 'fit' else 'no floor'}): beta {f['beta']:.3f} "
                             f"[{f['beta_ci'][0]:.3f}, {f['beta_ci'][1]:.3f}]")
    if BEST_GUESS[part]:
        ax[0].axhline(BEST_GUESS[part], color="gray", lw=0.7, ls=":", label="best guess")
    ax[0].axvspan(*rec["region"], color="y", alpha=0.1, label="power-law window")
    ax[0].set(xscale="log", yscale="log", xlabel="training examples m" if part != "lm" else "training bytes m",
              ylabel=rec["metric"], title=f"{part}: learning curves")
    ax[0].legend(fontsize=6)
    sl = scaling.local_slopes(m, err)
    ax[1].plot(np.sqrt(m[1:] * m[:-1]), sl, "o-")
    ax[1].set(xscale="log", xlabel="m (geometric midpoint)", ylabel="d log err / d log m", title="local slopes")
    ax[2].plot(m, rec["best"]["best_params"], "o-")
    ax[2].set(xscale="log", yscale="log", xlabel="m", ylabel="parameters of the best model", title="model size")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def print_part(part: str, rec: dict) -> None:
    print(f"\n{part} ({rec['metric']}), sweep {rec['sweep_wall_s']:.0f} s, failed: {len(rec['failed'])}")
    print("| m | best | best width | " + " | ".join(f"w{w}" for w in rec["per_width"]) + " |")
    print("|---|---|---|" + "---|" * len(rec["per_width"]))
    for i, m in enumerate(rec["best"]["m"]):
        cells = []
        for entry in rec["per_width"].values():
            cells.append(f"{entry['err'][entry['m'].index(m)]:.4g}" if m in entry["m"] else "-")
        print(f"| {int(m)} | {rec['best']['err'][i]:.4g} | {rec['best']['width'][i]} | " + " | ".join(cells) + " |")
    for g, f in rec["fits"].items():
        if "ours" in f:
            o = f["ours"]
            print(f"fit[{g}]: alpha {o['alpha']:.4g} beta {o['beta']:.4f} CI {o['beta_ci']} gamma {o['gamma']:.4g}"
                  f" {o.get('gamma_ci', '')}; curve_fit(log) beta {f.get('curve_fit', {}).get('log', {}).get('beta')}"
                  f" inside CI {f.get('curve_fit_log_inside_ci')}; curve_fit(linear) beta "
                  f"{f.get('curve_fit', {}).get('linear', {}).get('beta')} inside {f.get('curve_fit_linear_inside_ci')}")
        else:
            print(f"fit[{g}]: {f}")
    for g, h in rec.get("holdout", {}).items():
        print(f"holdout[{g}]: m {h['held_m']} true {h['true']} pred {h['pred']} rel_err {h['rel_err']} "
              f"inside CI {h['inside_ci']}")
    print("local slopes", [round(x, 3) for x in rec["local_slopes"]], "region", rec["region"])
    if "model_size" in rec:
        print(f"model size: beta_p {rec['model_size']['beta']:.3f} CI {rec['model_size']['beta_ci']}", flush=True)


def main(argv):
    del argv
    opts = settings(**{k: FLAGS[k].value for k in DEFAULTS})
    from experiments.common import quiet_logging
    from sqattn.analysis import lmc
    from sqattn.train.trainer import enable_compilation_cache
    quiet_logging()
    enable_compilation_cache()
    os.makedirs(opts.workdir, exist_ok=True)
    path = os.path.join(opts.workdir, "results.json")
    results: dict[str, Any] = {}
    if os.path.exists(path):               # keep the parts not rerun now
        with open(path) as f:
            results = json.load(f)
    results["flags"] = vars(opts)
    for part in opts.parts:
        print(f"== {part}", flush=True)
        rec = run_part(opts, part, os.path.join(opts.workdir, part))
        rec["plot"] = plot(part, rec, os.path.join(opts.workdir, f"scaling_{part}.png"))
        results[part] = rec
        print_part(part, rec)
        lmc.write_json(path, results)
    print(json.dumps({p: {k: results[p][k] for k in ("fits", "region") if k in results[p]} for p in opts.parts},
                     default=float)[:4000])


if __name__ == "__main__":
    define_flags()
    app.run(main)
