"""Linear mode connectivity along training (papers/lmc.md): spawn children of a parent run at step k, measure the
barrier between each pair of children and what predicts it, versus k.

Every run is an ordinary trainer run (``sqattn.train.train_and_evaluate``) in ``<workdir>/<part>/...``:
parents are trained in segments so a checkpoint exists at each spawn step (``lmc.train_parent``); a child is
``lmc.child_config(parent, k, data_seed)`` (the parent's whole train state at k - parameters, step, Adam
moments - its own data order, the parent's remaining steps). Finished runs are reused, so a rerun only measures. Parts:

* ``teacher``: the note's protocol on the teacher MLP (``teacher_lmc``: 32 -> 128 -> 128 -> 10 ReLU student of a
  random 10-class teacher, 10k examples, batch 32, constant-LR AdamW). ``--parent_seeds`` parents (init seed s,
  data seed 100 + s), 2 children per spawn step. Controls: independent initialisations (the parents' final states
  against each other: different init and data order) and children of the final checkpoint trained ``--tail``
  more steps (negative control).
* ``lm``: the same on a byte LM of this project (``lm_tiny`` structure at ``--lm_d_model``/``--lm_layers``,
  bytes of the stdlib, constant LR after warmup), children spawned at ``--lm_spawn_steps``.

Per pair: train-loss barrier (chord form, 21 points, ``--num_batches`` train batches), eval-error barrier,
a*, distance, displacement angle from the spawn point, B_H / B_g / B_q along the whole path, and per layer group
(Dense layers of the MLP; embed / each block's mixer and MLP / final norm of the LM) the layer-wise barrier
(other groups stay at child A) with its predictors. Writes ``results.json`` and ``lmc_<part>.png``.

  python -m experiments.lmc --workdir=/tmp/lmc                          # both parts
  python -m experiments.lmc --workdir=/tmp/lmc --parts=teacher --steps=1500

Measured on 2 CPU cores, JAX 0.10.2 CPU (load stated per part).

Teacher part: ``python -m experiments.lmc --workdir=/work/runs/lmc_full --parts=teacher`` (defaults: 2 parents x
600 steps, width 32, AdamW lr 0.03 constant after 10 warmup steps, batch 32, spawn k in {0, 10, 50, 200}, 2
children per k, negative control = 2 children of step 600 trained 60 more steps). Children copy the parent's
whole train state at k (step, parameters, Adam moments: ``lmc.child_config(..., state="full")``, the note's
protocol). Re-measured 2026-12-03 (2 cores, load average 4-5: the test suite ran beside it): 20 child runs in
113 s (parents reused), measuring 47 s. Barriers in the chord form on 21 points; train loss on 16 x 32 train
examples, eval error on 32 x 32 eval examples; means over the 2 parents' pairs (one pair for the independent
control: parent 0 vs parent 1, different init and data order):

  | pairs                  | k   | train-loss barrier | eval-error barrier | a*   | distance | angle (deg) | parent loss at k | B_H    | B_g    | B_q    | chord gap at 1/2 |
  |------------------------|-----|--------------------|--------------------|------|----------|-------------|------------------|--------|--------|--------|------------------|
  | spawned children       | 0   | 0.173              | 0.057              | 0.50 | 25.9     | 63.7        | 2.42             | 0.531  | -0.052 | 0.178  | 0.173            |
  | spawned children       | 10  | 0.095              | 0.012              | 0.48 | 23.0     | 59.9        | 1.51             | 0.279  | -0.059 | 0.095  | 0.095            |
  | spawned children       | 50  | 0.058              | 0.015              | 0.50 | 21.1     | 63.4        | 1.08             | 0.205  | -0.071 | 0.060  | 0.058            |
  | spawned children       | 200 | 0.000              | 0.000              | -    | 16.4     | 64.0        | 0.91             | -0.040 | -0.079 | -0.060 | -0.060           |
  | independent inits      | -   | 1.017              | 0.214              | 0.55 | 32.4     | -           | -                | 1.843  | -0.003 | 1.001  | 1.000            |
  | children of step 600   | 600 | 0.000              | 0.002              | -    | 8.7      | 71.8        | 0.79             | -0.090 | -0.088 | -0.087 | -0.087           |

  Final eval error of the children ~0.28 (a hard 10-class teacher for a width-32 student after 600 steps).
  The barrier falls monotonically with the spawn step (0.173, 0.095, 0.058) and is gone by k = 200 (a third of
  training); the positive control is 6x the k = 0 barrier, the negative control is 0. The two parents differ a
  lot (k = 0: 0.047 and 0.299; k = 50: 0.096 and 0.020), so with 2 children per k only the trend is firm.
  Against the first protocol (children restarting Adam from fresh moments, measured 2026-12-02: 0.173, 0.046,
  0.050, 0.000) copying the moments changes k = 10 the most (0.046 -> 0.095): a fresh Adam's first steps at lr
  0.03 were themselves a perturbation. k = 0 is the same in both (nothing to copy). B_q equals the measured chord
  gap at 1/2 within 0.5 % (median relative error); B_H has the right sign and ranking (Spearman 0.98 with the
  measured barrier, 1.0 with the mid gap) and overestimates it ~3x (median B_H / barrier 3.1); B_g is ~0 or
  negative (near-stationary endpoints), as the note warns. The displacement angle does not shrink with k here
  (60-64 deg, 72 deg for the final-step children): the children's displacements are near-orthogonal whatever k.
  Layer-wise (other layers at child A): nearly every single-layer path is convex (largest layer barrier 0.016,
  first layer at k = 10, where the whole network has 0.095), so layer-wise LMC holds even when the network is not
  connected; layer B_q matches the layer chord gap at 1/2 (Spearman 0.9997, median relative error 7e-5), B_H only
  in rank (0.64). ReLU students gave a B_q off by ~2x (the kinks' curvature is invisible to AD), hence GELU. With
  width 128 and lr 2e-3 / 1e-2 (first pilots) children were linearly connected already from k = 0 (barrier 0.000
  at k = 0; independent control 0.59), the "too stable from initialisation" pitfall.

Byte-LM part: ``python -m experiments.lmc --workdir=/work/runs/lmc_full_lm --parts=lm`` (lm_tiny structure at
d_model 64, 2 blocks, rows of 64 bytes, batch 16, AdamW 3e-3 constant after 20 warmup steps; parent 0 trained 200
steps with children at k in {0, 25, 100} and 2 children of step 200 trained 20 more; parent 1 only for the
independent-init control). Children copy the parent's train state, as in the teacher part. Re-measured
2026-12-03 (parents reused; load average 5-7, the test suite beside it): 8 child runs in 198 s, measuring 201 s.
Barriers on 2 train batches of 16 x 64 bytes for the loss, 2 eval batches for the next-byte error, 21 points;
layer groups = embedding, each block's norm1 / mixer / norm2 / mlp, final norm, other groups at child A).
Children end at ~1.8 nats/byte of train loss:

  | pairs              | k   | train-loss barrier | eval-error barrier | a*   | distance | angle (deg) | largest layer barrier      |
  |--------------------|-----|--------------------|--------------------|------|----------|-------------|----------------------------|
  | spawned children   | 0   | 0.0088             | 0.0076             | 0.45 | 12.9     | 34.4        | 0                          |
  | spawned children   | 25  | 0.0000             | 0.0058             | -    | 11.0     | 34.4        | 0                          |
  | spawned children   | 100 | 0.0000             | 0.0000             | -    | 7.1      | 38.2        | 0                          |
  | children of 200    | 200 | 0.0000             | 0.0012             | -    | 2.7      | 48.8        | 0                          |
  | independent inits  | -   | 1.666              | 0.302              | 0.50 | 57.8     | -           | 0.034 (blocks/1/mixer)     |

  Predictors (whole path): B_q equals the measured chord gap at 1/2 on every pair (median relative error 1e-5;
  1.663 vs 1.666 for the independent pair); B_H has the right sign and order (Spearman 0.89 with the barrier,
  1.0 with the mid gap) but overestimates 7x (0.059 at k = 0, 11.4 for the independent pair); B_g is ~0 or
  negative. The byte LM is linearly connected from a common initialisation up to a barrier of 0.5 % of the loss
  at k = 0, and exactly from k = 25 on (an eighth of training), while two initialisations are 1.67 nats/byte
  apart. Copying the parent's Adam moments (against the first protocol's restarted optimizer: 0.0080, 0, 0, 0)
  changes nothing that matters here. Layer-wise, even the independent pair is nearly connected one group at a
  time (largest 0.034, second-block mixer; 0.015 its MLP; every norm and the embedding 0). Layer predictors are
  off for the LM (the second derivative through the LM compiles for minutes per shape).
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS

# name -> (default, help); flags of the same names (defined only when run as a program, like the other experiments)
DEFAULTS: dict[str, tuple[Any, str]] = {
    "workdir": ("/tmp/lmc", "output directory (runs, results.json, plots)"),
    "parts": (["teacher", "lm"], "teacher and/or lm"),
    "steps": (600, "teacher parent steps (children train the rest)"),
    "spawn_steps": (["0", "10", "50", "200"], "teacher spawn steps k"),
    "parent_seeds": (["0", "1"], "parent init seeds (data seed 100 + s)"),
    "n_train": (10000, "teacher train examples"),
    "lr": (3e-2, "teacher learning rate (constant after a 10-step warmup)"),
    "width": (32, "teacher student hidden width"),
    "tail": (60, "steps of the negative-control children spawned at the final step (0: none)"),
    "num_batches": (16, "teacher train batches of the landscape (loss curves and predictors)"),
    "eval_num_batches": (32, "teacher eval batches of the error curves"),
    "alphas": (21, "interpolation points"),
    "lm_steps": (200, "byte-LM parent steps"),
    "lm_spawn_steps": (["0", "25", "100"], "byte-LM spawn steps"),
    "lm_spawn_from": (["0"], "byte-LM parent seeds that get children (the others: independent-init control only)"),
    "lm_d_model": (64, "byte-LM width"),
    "lm_layers": (2, "byte-LM blocks"),
    "lm_seq_len": (64, "byte-LM row length"),
    "lm_num_batches": (2, "byte-LM landscape batches (of 16 rows)"),
    "progress": (False, "progress bars of the trainer"),
}


def define_flags() -> None:
    from sqattn.analysis import sweep
    sweep.define_flags(DEFAULTS)


def teacher_parent_config(seed: int, steps: int, n_train: int, lr: float, width: int, n_spawn: int):
    from sqattn import configs
    c = configs.get(f"teacher_lmc:seed={seed},data_seed={100 + seed},steps={steps},n_train={n_train},lr={lr},"
                    f"width={width}")
    c.keep_checkpoints = max(int(c.keep_checkpoints), n_spawn + 2)
    return c


def lm_parent_config(seed: int, steps: int, d_model: int, layers: int, seq_len: int, n_spawn: int):
    from experiments.common import small_lm_config
    c = small_lm_config(steps=steps, d_model=d_model, layers=layers, seq_len=seq_len, seed=seed)
    c.data.seed = 100 + seed
    c.optim.update(warmup_steps=min(20, steps // 10), min_lr_ratio=1.0)    # constant LR after warmup
    c.keep_checkpoints = n_spawn + 2
    c.eval_batches = 4
    return c


def _group_spec(params, part: str) -> dict[str, str]:
    from sqattn.analysis import lmc
    return lmc.default_groups(params, depth=None if part == "teacher" else 3)


def run_part(part: str, root: str, parent_cfgs: dict[int, Any], spawn_steps: list[int], tail: int,
             num_batches: int, eval_num_batches: int, alphas: int, progress: bool,
             spawn_from: list[int] | None = None) -> dict[str, Any]:
    """Trains (or reuses) parents and children and measures every pair; returns the part's records.

    ``spawn_from``: the parent seeds that get children (default all); the others serve only as independent
    initialisations for the positive control."""
    from sqattn.analysis import lmc, sweep
    rows, runs_log = [], []
    finals = {}
    t0 = time.perf_counter()
    for seed, pcfg in parent_cfgs.items():
        pwd = os.path.join(root, f"parent_s{seed}")
        t = time.perf_counter()
        lmc.train_parent(pcfg, pwd, spawn_steps if spawn_from is None or seed in spawn_from else [],
                         progress=progress)
        runs_log.append({"run": pwd, "wall_s": time.perf_counter() - t})
        T = int(pcfg.num_steps)
        finals[seed] = pwd
        if spawn_from is not None and seed not in spawn_from:
            continue
        for k in spawn_steps + ([T] if tail > 0 else []):       # tail 0: no negative control
            kids = []
            for c in range(2):
                cfg = lmc.child_config(pwd, k, data_seed=1000 + 10 * seed + c, extra_steps=tail if k == T else None,
                                       parent_config=pcfg)
                res = sweep.run_one(cfg, os.path.join(root, f"child_s{seed}_k{k}_c{c}"), progress=progress)
                runs_log.append({"run": res.workdir, "status": res.status, "wall_s": res.wall_s, "error": res.error})
                if res.status == "failed":
                    print(f"  FAILED {res.workdir}: {res.error}")
                kids.append(res)
            if any(r.status == "failed" for r in kids):
                continue
            rows.append(dict(kind="control_final" if k == T else "spawn", seed=seed, k=k, a=kids[0].workdir,
                             b=kids[1].workdir, base=(pwd, k)))
    seeds = sorted(finals)
    for i in range(len(seeds) - 1):
        rows.append(dict(kind="control_independent", seed=seeds[i], k=-1, a=finals[seeds[i]],
                         b=finals[seeds[i + 1]], base=None))
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = []
    for r in rows:
        ra, rb = lmc.load_run(r["a"]), lmc.load_run(r["b"])
        base = lmc.load_run(r["base"][0], r["base"][1], datasets=False) if r["base"] else None
        res = lmc.compare(ra, rb, base=base, num_batches=num_batches, eval_num_batches=eval_num_batches,
                          alphas=alphas, groups=_group_spec(ra.params, part), layer_predictors=part == "teacher")
        if base is not None:
            fn = ra.loss_fn()
            res["parent_loss_at_k"] = lmc.evaluate(fn, base.params, ra.batches("train", num_batches))["loss"]
        res.update(kind=r["kind"], seed=r["seed"], k=r["k"])
        out.append(res)
        _print_row(res)
    return {"pairs": out, "runs": runs_log, "train_wall_s": train_s, "measure_wall_s": time.perf_counter() - t1}


def _print_row(res):
    tb, eb, p = res["train"]["loss_barrier"], res.get("eval", {}).get("error_barrier", {}), res["predictors"]
    layers = " ".join(f"{n}={v['train']['loss_barrier']['barrier']:.3g}" for n, v in res.get("layers", {}).items())
    print(f"{res['kind']:>20} s{res['seed']} k={res['k']:>5}: B_loss={tb['barrier']:.4f} (a*={tb['a_star']:.2f}) "
          f"B_err={eb.get('barrier', float('nan')):.4f} dist={res['distance']:.2f} "
          f"angle={res.get('angle', float('nan')):.1f} B_H={p['B_H']:.4f} B_g={p['B_g']:.4f} B_q={p['B_q']:.4f} | "
          f"{layers}", flush=True)


def summarise(pairs: list[dict]) -> dict[str, Any]:
    """Per spawn step: means over the parents' pairs; rank agreement of predictors and measured barriers."""
    import numpy as np
    from scipy.stats import spearmanr
    table = {}
    for res in pairs:
        key = f"{res['kind']}:{res['k']}"
        table.setdefault(key, []).append(res)
    rows = []
    for key, rs in table.items():
        m = lambda f: float(np.mean([f(r) for r in rs]))    # noqa: E731
        row = {"kind": rs[0]["kind"], "k": rs[0]["k"], "pairs": len(rs),
               "loss_barrier": m(lambda r: r["train"]["loss_barrier"]["barrier"]),
               "loss_barrier_mean_form": m(lambda r: r["train"]["loss_barrier"]["barrier_mean"]),
               "a_star": m(lambda r: r["train"]["loss_barrier"]["a_star"]),
               "eval_error_barrier": m(lambda r: r["eval"]["error_barrier"]["barrier"]),
               "eval_error_end": m(lambda r: 0.5 * (r["eval"]["error_barrier"]["start"]
                                                    + r["eval"]["error_barrier"]["end"])),
               "distance": m(lambda r: r["distance"]),
               "angle": m(lambda r: r.get("angle", float("nan"))),
               "parent_loss_at_k": m(lambda r: r.get("parent_loss_at_k", float("nan"))),
               "B_H": m(lambda r: r["predictors"]["B_H"]), "B_g": m(lambda r: r["predictors"]["B_g"]),
               "B_q": m(lambda r: r["predictors"]["B_q"]),
               "chord_gap_mid": m(lambda r: _mid_gap(r["train"]))}
        for name in rs[0].get("layers", {}):
            row[f"layer:{name}"] = m(lambda r: r["layers"][name]["train"]["loss_barrier"]["barrier"])
            if "predictors" in rs[0]["layers"][name]:
                row[f"layer_B_q:{name}"] = m(lambda r: r["layers"][name]["predictors"]["B_q"])
                row[f"layer_B_H:{name}"] = m(lambda r: r["layers"][name]["predictors"]["B_H"])
        rows.append(row)
    rows.sort(key=lambda r: (r["kind"] != "spawn", r["k"]))
    meas, bh, bq, gap = [], [], [], []
    lmeas, lbh, lbq, lgap = [], [], [], []
    for r in pairs:
        meas.append(r["train"]["loss_barrier"]["barrier"])
        gap.append(_mid_gap(r["train"]))
        bh.append(r["predictors"]["B_H"])
        bq.append(r["predictors"]["B_q"])
        for v in r.get("layers", {}).values():
            if "predictors" not in v:
                continue
            lmeas.append(v["train"]["loss_barrier"]["barrier"])
            lgap.append(_mid_gap(v["train"]))
            lbh.append(v["predictors"]["B_H"])
            lbq.append(v["predictors"]["B_q"])
    pos = [i for i, b in enumerate(meas) if b > 0.01]
    sp = lambda a, b: float(spearmanr(a, b)[0]) if len(a) > 2 else float("nan")   # noqa: E731
    rel = lambda a, b: float(np.median(np.abs(np.array(a) - np.array(b)) / np.maximum(np.abs(b), 1e-6)))  # noqa
    return {"table": rows, "spearman_BH_vs_barrier": sp(bh, meas), "spearman_Bq_vs_barrier": sp(bq, meas),
            "median_rel_err_Bq_vs_mid_gap": rel(bq, gap),
            "median_BH_over_barrier": float(np.median([bh[i] / meas[i] for i in pos])) if pos else float("nan"),
            "spearman_BH_vs_mid_gap": sp(bh, gap),
            "layer_spearman_BH_vs_barrier": sp(lbh, lmeas), "layer_spearman_Bq_vs_barrier": sp(lbq, lmeas),
            "layer_spearman_Bq_vs_mid_gap": sp(lbq, lgap), "layer_spearman_BH_vs_mid_gap": sp(lbh, lgap),
            "layer_median_rel_err_Bq_vs_mid_gap": rel(lbq, lgap) if lgap else float("nan"),
            "max_layer_barrier": float(max(lmeas)) if lmeas else float("nan"),
            "max_layer_mid_gap": float(max(lgap)) if lgap else float("nan")}


def _mid_gap(curve: dict) -> float:
    """phi(1/2) - chord(1/2) of a curve (what B_q estimates)."""
    import numpy as np
    a, v = np.asarray(curve["alpha"]), np.asarray(curve["loss"])
    i = int(np.argmin(np.abs(a - 0.5)))
    return float(v[i] - (1 - a[i]) * v[0] - a[i] * v[-1])


def plot(part: str, pairs: list[dict], summary: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    spawn = [r for r in summary["table"] if r["kind"] == "spawn"]
    ks = np.array([max(r["k"], 1) for r in spawn], float)
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.5))
    ax[0].plot(ks, [r["loss_barrier"] for r in spawn], "o-", label="train-loss barrier")
    ax[0].plot(ks, [r["eval_error_barrier"] for r in spawn], "s-", label="eval-error barrier")
    ax[0].plot(ks, [r["B_q"] for r in spawn], "x--", label="B_q (quadrature)")
    ax[0].plot(ks, [r["B_H"] for r in spawn], "+:", label="B_H (midpoint Hessian)")
    for r in summary["table"]:
        if r["kind"] == "control_independent":
            ax[0].axhline(r["loss_barrier"], color="r", lw=0.8, ls="--", label="independent inits (loss)")
        if r["kind"] == "control_final":
            ax[0].axhline(r["loss_barrier"], color="g", lw=0.8, ls="--", label="children of the final step")
    ax[0].set(xscale="log", xlabel="spawn step k (0 drawn at 1)", ylabel="barrier", title=f"{part}: barrier vs k")
    ax[0].legend(fontsize=7)
    ax[1].plot(ks, [r["angle"] for r in spawn], "o-")
    ax[1].set(xscale="log", xlabel="spawn step k", ylabel="degrees", title="displacement angle of the children")
    for name in [k.split(":", 1)[1] for k in spawn[0] if k.startswith("layer:")] if spawn else []:
        ax[2].plot(ks, [r[f"layer:{name}"] for r in spawn], "o-", label=name)
    ax[2].plot(ks, [r["loss_barrier"] for r in spawn], "k--", label="whole network")
    ax[2].set(xscale="log", xlabel="spawn step k", ylabel="train-loss barrier", title="layer-wise barriers")
    ax[2].legend(fontsize=6)
    meas = [r["train"]["loss_barrier"]["barrier"] for r in pairs]
    gap = [_mid_gap(r["train"]) for r in pairs]
    ax[3].scatter(gap, [r["predictors"]["B_q"] for r in pairs], label="B_q vs chord gap at 1/2")
    ax[3].scatter(meas, [r["predictors"]["B_H"] for r in pairs], marker="+", label="B_H vs barrier")
    lm = [v["train"]["loss_barrier"]["barrier"] for r in pairs for v in r.get("layers", {}).values()
          if "predictors" in v]
    lq = [v["predictors"]["B_q"] for r in pairs for v in r.get("layers", {}).values() if "predictors" in v]
    ax[3].scatter(lm, lq, marker=".", label="layer B_q vs layer barrier")
    lim = max([1e-3] + meas + gap)
    ax[3].plot([0, lim], [0, lim], "k:", lw=0.8)
    ax[3].set(xlabel="measured", ylabel="predicted", title="predictors")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv):
    del argv
    o = SimpleNamespace(**{k: FLAGS[k].value for k in DEFAULTS})
    import jax
    from experiments.common import quiet_logging
    from sqattn.analysis import lmc
    from sqattn.train.trainer import enable_compilation_cache
    quiet_logging()
    enable_compilation_cache()
    jax.config.update("jax_default_matmul_precision", "highest")
    os.makedirs(o.workdir, exist_ok=True)
    path = os.path.join(o.workdir, "results.json")
    results: dict[str, Any] = {}
    if os.path.exists(path):               # keep the parts not rerun now
        with open(path) as f:
            results = json.load(f)
    run_flags = vars(o)
    t0 = time.perf_counter()
    for part in o.parts:
        if part == "teacher":
            spawn = sorted(int(k) for k in o.spawn_steps)
            cfgs = {int(s): teacher_parent_config(int(s), o.steps, o.n_train, o.lr, o.width,
                                                len(spawn))
                    for s in o.parent_seeds}
            nb, enb = o.num_batches, o.eval_num_batches
            tail = o.tail
        elif part == "lm":
            spawn = sorted(int(k) for k in o.lm_spawn_steps)
            cfgs = {int(s): lm_parent_config(int(s), o.lm_steps, o.lm_d_model, o.lm_layers,
                                             o.lm_seq_len, len(spawn)) for s in o.parent_seeds}
            nb = enb = o.lm_num_batches
            tail = max(o.lm_steps // 10, 1)
        else:
            raise app.UsageError(f"unknown part {part!r}; expected teacher or lm")
        print(f"== {part}: spawn at {spawn}, parents {sorted(cfgs)}", flush=True)
        spawn_from = None if part == "teacher" else [int(x) for x in o.lm_spawn_from]
        rec = run_part(part, os.path.join(o.workdir, part), cfgs, spawn, tail, nb, enb, o.alphas,
                       o.progress, spawn_from=spawn_from)
        rec["flags"] = run_flags
        rec["summary"] = summarise(rec["pairs"])
        rec["plot"] = plot(part, rec["pairs"], rec["summary"], os.path.join(o.workdir, f"lmc_{part}.png"))
        results[part] = rec
        print_table(part, rec["summary"])
        results[f"{part}_wall_s"] = time.perf_counter() - t0
        lmc.write_json(path, results)
    print(json.dumps({p: results[p]["summary"] for p in o.parts}, indent=1, default=float)[:6000])


def print_table(part: str, summary: dict) -> None:
    rows = summary["table"]
    layer_keys = [k for k in rows[0] if k.startswith("layer:")] if rows else []
    head = ["kind", "k", "loss_barrier", "eval_error_barrier", "eval_error_end", "a_star", "distance", "angle",
            "parent_loss_at_k", "B_H", "B_g", "B_q", "chord_gap_mid"] + layer_keys
    print(f"\n{part}:\n| " + " | ".join(h.replace("layer:", "L:") for h in head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h]) for h in head) + " |")
    print({k: round(v, 3) for k, v in summary.items() if k != "table"}, flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
