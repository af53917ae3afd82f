"""G_stack at CPU scale (papers/gstack.md, "Small-scale reproduction"): scratch vs grown LMs at equal FLOPs.

Target: ``experiments.common.small_lm_config`` (byte-level ``lm_tiny`` on the stdlib text of the ``text``
source: d_model 64, ``--layers`` 4, T ``--seq_len`` 64, batch 16). Budget F = the FLOPs of ``--steps`` scratch
steps (the trainer's ``train_flops``: 6 x active matmul params + attention terms, per token). Every arm is a
run of the one trainer, in ``<workdir>/runs/<seed>/<arm>``:

* ``scratch``: the target for ``--steps`` steps.
* ``g{g}_d{f}``: G_stack (``op=direct``, ``order=stack``): a base of ``layers/g`` layers trained for a
  fraction f of F (one base run per g, checkpointed at each f), stacked g times, then trained on the rest of F
  with a fresh AdamW, a new warmup (5% of its steps) and cosine decay, continuing the base's data stream.
* ``zero_g{g}_d{f}`` (G_zero: repeats with zeroed residual outputs) and ``random_g{g}_d{f}`` (G_random: fresh
  layers faded in over 10% of the remaining steps), at ``--op_g`` / ``--op_fraction``.
* ``learn_g{g}_d{f}`` (G_learn, ``sqattn.growth.learn``): from the same base checkpoint, a ``--learn_steps`` run
  (``<arm>_maps``) that trains only the LiGO depth maps (started as G_stack's stacked identities; base frozen),
  then the fold into a plain LM trained on the rest of F like the G_stack arm (fresh AdamW, 5% warmup, the data
  stream continued after the phase's batches). The phase's FLOPs (the target's rate) count against F.

Every run evaluates bits/byte on the eval split every ``--steps``/8 target-steps' worth of FLOPs; the curves
are plotted against cumulative FLOPs (base included). Speedup of an arm (per seed, against that seed's
scratch): F_scratch / F_arm - 1, where F_arm = the FLOPs at which the arm's eval curve (linearly interpolated)
first reaches scratch's final eval bits/byte; "not reached" if never. ``speedup_excl_base`` counts only the
grown run's FLOPs. Same LR recipe for every run (lm_tiny's 3e-3 peak, cosine to 10%).

  nice -n 10 python -m experiments.gstack --workdir=/tmp/gstack

Writes ``results.json``, ``gstack.png`` and prints the speedup table and one JSON line. Finished runs are
reused (every run resumes from its workdir); ``--tabulate_only`` tabulates the finished runs and trains nothing.

Measured with the defaults (4 x d64 attention LM, T 64, batch 16, F = 160 scratch steps = 2.3e11 FLOPs; one
process per seed, ``--seeds=N``, then ``--seeds=0,1,2 --tabulate_only``; ~70 min wall under ``nice -n 10`` on 2
cores at load average 23-31 shared with other agents, almost all of it per-run start-up, not steps):

  | arm            | final bpb (mean ± std) | reached scratch final | speedup mean [min, max]  | excl. base |
  |----------------|------------------------|-----------------------|--------------------------|------------|
  | scratch        | 2.9783 ± 0.0063        | 3/3                   | +0.0%                    | +0.0%      |
  | g4_d0.1        | 3.0837 ± 0.0434        | 0/3                   | not reached              | -          |
  | g4_d0.2        | 2.9398 ± 0.0473        | 3/3                   | +16.6% [+0.3%, +47.2%]   | +54.6%     |
  | g4_d0.4        | 2.8802 ± 0.0458        | 3/3                   | +29.5% [+11.7%, +54.0%]  | +183.4%    |
  | zero_g4_d0.2   | 2.8545 ± 0.0545        | 3/3                   | +49.4% [+21.8%, +88.3%]  | +118.5%    |
  | random_g4_d0.2 | 2.8795 ± 0.0367        | 3/3                   | +44.1% [+20.3%, +80.5%]  | +107.0%    |
  | g2_d0.2        | 2.9635 ± 0.0107        | 3/3                   | +5.8% [+5.2%, +6.2%]     | +34.4%     |
  | learn_g4_d0.2  | 2.9722 ± 0.0569        | 1/3                   | +31.5% [+31.5%, +31.5%]  | +78.8%     |
  | learn5_g4_d0.2 | 2.9347 ± 0.0499        | 2/3                   | +25.4% [+10.9%, +39.9%]  | +68.7%     |
  | learn_g2_d0.2  | 3.0386 ± 0.0195        | 0/3                   | not reached              | -          |

The ``learn`` rows were added later, reusing the other arms' finished runs (copies of the table's workdir; only
the G_learn runs trained, under ``echo 15 > /proc/$$/autogroup``): ``--seeds=0,1,2`` with the default ``--ops``
(15 map steps; its 6 runs 407 s wall at load average 2.6-7), ``--ops=learn --learn_steps=5`` (row ``learn5``:
778 s at load 2.6-6) and ``--ops=learn --op_g=2`` (721 s at load 5-6). G_learn with 15 map steps ends behind
G_stack from the same base checkpoint on every seed (g = 4: 2.892 / 3.018 / 3.006 vs 2.873 / 2.970 / 2.977;
g = 2: 3.024 / 3.066 / 3.026 vs 2.948 / 2.971 / 2.971 bits/byte); with 5 map steps it is level with G_stack
(2.865 / 2.977 / 2.962: within the seed spread; 2 of 3 seeds reach scratch's final loss, where G_stack's third
seed reaches it by +0.3%). At this scale the phase buys little: with the LM's optimizer (peak 3e-3, cosine over
the phase) Adam moves each map entry by at most about the summed learning rate, ~0.025 in 15 steps, so the folded
model is G_stack with per-layer, per-tensor rescalings of a few percent (and, at g = 2, cross-layer weights of
~0.02), bought with target-sized FLOPs (15 steps = 9% of F) that full training of the stacked model uses better.
At the end of the 15-step phase eval bits/byte is 3.76-4.01 (g = 4), above the base's 3.25-3.39 (the stacking
spike, which the maps reduce only slowly: train loss 2.64 -> 2.32 nats over steps 5-15). The base has one layer
at g = 4, so its maps are [4, 1] per tensor (scalings only). Untested here: a larger learning rate for the maps
(LiGO trains its operator with its own), longer budgets where the phase is a small share of F.

As the note expects: stacking a trained base
beats scratch at equal FLOPs (base FLOPs counted) when the base has trained long enough (d = 0.2, 0.4 of F),
a too-early base (d = 0.1, 16 steps of a 1-layer model) never catches up, and the loss jumps right after
stacking (visible in gstack.png) before it falls below scratch. Unlike the paper, at this scale G_zero and
G_random (function-preserving at growth) are ahead of G_stack at the same d = 0.2, and g = 2 gains less than
g = 4. Caveats: the whole budget is 160 steps of a tiny model still far from converged (scratch ends at 2.98
bits/byte), eval points are 20 target-steps apart (speedups interpolate between them), the seed spread is
large (speedups from +0.3% to +88%), and the same peak LR (3e-3) was used for base and grown runs.

Beyond the papers, the project's hybrid (issue 13 item 5): ``sse_h_tiny`` ("SSSA", d_model 128, 4 layers; T 64,
batch 16, F = 160 scratch steps = 1.0e12 FLOPs) grown with G_stack from a half-depth base. A 2-layer base of the
same pattern would be "SS" (no attention), so the base is "SA" and grows by kind (``order="by_kind"``: S, S, S <-
the base's S layer, A <- its A layer). Command, one process for seed 0 and one for seeds 1-2, then tabulated:

  python -m experiments.gstack --workdir=/work/runs/gstack_sse_h --base=sse_h --gs=2 --fractions=0.2,0.4 \
      --ops= --seeds=0,1,2 --steps=160          # (+ --tabulate_only to tabulate); 2026-12-03

Seed 0: 296 s wall at load average 2-5; seeds 1-2: 569 s at load average ~5 (the test suite and a helper's
runs shared the 2 cores):

  | arm (sse_h_tiny) | final bpb (mean ± std) | reached scratch final | speedup mean [min, max]  | excl. base |
  |------------------|------------------------|-----------------------|--------------------------|------------|
  | scratch          | 2.6978 ± 0.0129        | 3/3                   | +0.0%                    | +0.0%      |
  | g2_d0.2          | 2.6064 ± 0.0191        | 3/3                   | +25.2% [+17.1%, +32.2%]  | +67.3%     |
  | g2_d0.4          | 2.5854 ± 0.0152        | 3/3                   | +22.3% [+16.5%, +28.0%]  | +140.8%    |

Growing the linear-attention hybrid works at least as well as growing the attention LM: G_stack from a base
trained for 20 % or 40 % of F reaches scratch's final loss with 17-32 % fewer FLOPs on every seed (base FLOPs
counted) and ends 0.09-0.11 bits/byte below it, where the attention LM's g = 2 arm gained only +5.8 %. Same
caveats as above (160 steps, far from converged; one learning rate for every run).
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", None, "output directory", required=True)
    flags.DEFINE_integer("steps", 160, "scratch steps (fixes the FLOP budget F)")
    flags.DEFINE_integer("layers", 4, "target depth")
    flags.DEFINE_integer("d_model", 64, "width")
    flags.DEFINE_integer("seq_len", 64, "bytes per row")
    flags.DEFINE_integer("batch_size", 16, "rows per step")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "init seeds")
    flags.DEFINE_list("gs", ["4", "2"], "growth factors")
    flags.DEFINE_list("fractions", ["0.1", "0.2", "0.4"], "growth points d as fractions of F")
    flags.DEFINE_list("g2_fractions", ["0.2"], "fractions for growth factors other than the first")
    flags.DEFINE_integer("op_g", 4, "g of the G_zero / G_random arms")
    flags.DEFINE_float("op_fraction", 0.2, "d of the G_zero / G_random arms")
    flags.DEFINE_list("ops", ["zero", "random", "learn"], "other operators to run")
    flags.DEFINE_integer("learn_steps", 15, "G_learn: steps of the map-learning phase before the fold")
    flags.DEFINE_string("base", "lm", "target family: lm (attention) or sse_h (sse_h_tiny: 'SSSA')")
    flags.DEFINE_string("order", "stack", "stacking order (stack | interleave | by_kind)")
    flags.DEFINE_integer("base_layers", 0, "base depth for --base=sse_h (0 = layers / g)")
    flags.DEFINE_boolean("progress", False, "progress bars")
    flags.DEFINE_boolean("tabulate_only", False, "tabulate the finished runs, train nothing (skip the others)")


def target_config(seed: int):
    from experiments.common import small_lm_config
    from sqattn import configs
    if FLAGS.base == "lm":
        cfg = small_lm_config(steps=FLAGS.steps, d_model=FLAGS.d_model, layers=FLAGS.layers,
                              seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size, seed=seed)
    elif FLAGS.base == "sse_h":
        cfg = configs.get("sse_h_tiny")
        cfg.num_steps, cfg.seed, cfg.batch_size = FLAGS.steps, seed, FLAGS.batch_size
        cfg.data.seq_len = FLAGS.seq_len
        cfg.model.num_layers = FLAGS.layers
        cfg.eval_every, cfg.mesh.fsdp = 0, 1
    else:
        raise ValueError(f"--base must be lm or sse_h, got {FLAGS.base!r}")
    cfg.optim.warmup_steps = max(1, FLAGS.steps // 20)
    cfg.eval_batches = 4
    cfg.log_every = 5
    cfg.checkpoint_every = cfg.num_steps
    cfg.eval_every = max(1, FLAGS.steps // 8)
    return cfg


def flops_per_step(cfg) -> float:
    from flax import nnx
    from sqattn.train import state as state_lib
    graphdef, params = state_lib.abstract_model(cfg)
    fpt = state_lib.flops_per_token(nnx.merge(graphdef, params), params, cfg.data.seq_len)
    return fpt * cfg.batch_size * cfg.data.seq_len


def base_config(target, layers: int, pattern: str | None, fractions, budget: float):
    from sqattn.configs import growth as gc
    cfg = gc.depth_config(target, layers)
    if pattern:
        cfg.model.block_pattern = pattern
    per = flops_per_step(cfg)
    # growth points on a common grid (multiples of the smallest), so every one of them is a kept checkpoint
    unit = max(1, round(min(fractions) * budget / per))
    steps = {f: unit * max(1, round(f / min(fractions))) for f in fractions}
    cfg.num_steps = max(steps.values())
    cfg.checkpoint_every = math.gcd(*steps.values())
    cfg.keep_checkpoints = cfg.num_steps // cfg.checkpoint_every + 1
    cfg.eval_every = cfg.checkpoint_every
    cfg.log_every = 1                     # train_flops at every growth point
    cfg.optim.warmup_steps = max(1, cfg.num_steps // 20)
    return cfg, steps


def run(cfg, wd) -> list[dict]:
    """The run's metrics records, training it first unless it already finished (final eval logged)."""
    from sqattn.train import metrics as metrics_lib
    from sqattn.train import train_and_evaluate
    if os.path.exists(os.path.join(wd, "metrics.jsonl")):
        recs = metrics_lib.read_metrics(wd)
        if any(r.get("step") == cfg.num_steps and "eval_bits_per_byte" in r for r in recs):
            return recs
    if FLAGS.tabulate_only:
        return None
    out = train_and_evaluate(cfg, wd, progress=FLAGS.progress)
    if out.get("stopped_early"):
        raise RuntimeError(f"{wd} stopped early; rerun to resume")
    return metrics_lib.read_metrics(wd)


def curve(recs, base_recs=None, upto_step=None) -> list[tuple[float, float]]:
    """(cumulative FLOPs, eval bits/byte) of a run, the base run's points up to the growth step first."""
    pts = []
    for rs, last in ((recs, None), (base_recs or [], upto_step)):
        fl = flops_of(rs)
        pts += [(fl[r["step"]], r["eval_bits_per_byte"]) for r in rs if "eval_bits_per_byte" in r
                and r["step"] in fl and (last is None or r["step"] <= last)]
    return sorted(pts)


def flops_of(recs) -> dict:
    return {r["step"]: r["train_flops"] for r in recs if "train_flops" in r}


def flops_to_reach(pts, target: float) -> float | None:
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            if l0 <= target:
                return f0
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return pts[0][0] if pts and pts[0][1] <= target else None


def main(argv):
    del argv
    from experiments.common import quiet_logging
    from sqattn.configs import growth as gc
    from sqattn.train.trainer import enable_compilation_cache
    quiet_logging()
    enable_compilation_cache()
    t0 = time.time()
    gs = [int(g) for g in FLAGS.gs]
    spec = [(gs[0], float(f), "direct") for f in FLAGS.fractions]
    spec += [(g, float(f), "direct") for g in gs[1:] for f in FLAGS.g2_fractions]
    spec += [(FLAGS.op_g, FLAGS.op_fraction, op) for op in FLAGS.ops]
    arms: dict[str, dict] = {}
    for seed in [int(x) for x in FLAGS.seeds]:
        root = os.path.join(FLAGS.workdir, "runs", str(seed))
        target = target_config(seed)
        per_t = flops_per_step(target)
        budget = per_t * target.num_steps
        scratch = run(target, os.path.join(root, "scratch"))
        if scratch is None:
            continue
        arms.setdefault("scratch", {})[seed] = {"curve": curve(scratch), "base_flops": 0.0}
        for g in sorted({g for g, _, _ in spec}, reverse=True):
            layers = FLAGS.base_layers or FLAGS.layers // g
            # a base shallower than one period of a hybrid's pattern keeps one layer of each kind ("SA")
            pattern = "SA" if FLAGS.base == "sse_h" and layers < len(target.model.block_pattern) else None
            fracs = sorted({f for gg, f, _ in spec if gg == g})
            bcfg, bsteps = base_config(target, layers, pattern, fracs, budget)
            base_wd = os.path.join(root, f"base_g{g}")
            base_recs = run(bcfg, base_wd)
            if base_recs is None:
                continue
            base_flops = {r["step"]: r["train_flops"] for r in base_recs if "train_flops" in r}
            for _, f, op in [a for a in spec if a[0] == g]:
                s_b = bsteps[f]
                name = ("" if op == "direct" else f"{op}_") + f"g{g}_d{f:g}"
                src_wd, src_flops, learn_pts = base_wd, base_flops[s_b], []
                if op == "learn":     # G_learn: the maps' phase, then the fold continues like G_stack
                    lcfg = gc.grown_config(target, base_wd, op="learn", g=0 if pattern else g, source_step=s_b,
                                           learn_steps=FLAGS.learn_steps)
                    lcfg.eval_every, lcfg.checkpoint_every = target.eval_every, lcfg.num_steps
                    src_wd = os.path.join(root, name + "_maps")
                    lrecs = run(lcfg, src_wd)
                    if lrecs is None:
                        continue
                    src_flops, learn_pts = flops_of(lrecs)[lcfg.num_steps], curve(lrecs)
                steps = max(1, round((budget - src_flops) / per_t))
                cfg = gc.grown_config(target, src_wd, op="fold" if op == "learn" else op,
                                      order="by_kind" if pattern else FLAGS.order,
                                      g=0 if pattern else g, source_step=-1 if op == "learn" else s_b,
                                      num_steps=steps, warmup_steps=max(1, steps // 20),
                                      fade_steps=max(1, steps // 10) if op == "random" else 0)
                cfg.eval_every = target.eval_every
                cfg.checkpoint_every = steps
                recs = run(cfg, os.path.join(root, name))
                if recs is None:
                    continue
                arms.setdefault(name, {})[seed] = {"curve": sorted(curve(recs, base_recs, s_b) + learn_pts),
                                                   "base_flops": base_flops[s_b]}
        print(f"seed {seed} done at {time.time() - t0:.0f}s", flush=True)
    table = speedups(arms)
    results = {"settings": {k: FLAGS[k].value for k in ("steps", "layers", "d_model", "seq_len", "batch_size",
                                                         "seeds", "gs", "fractions", "g2_fractions", "op_g",
                                                         "op_fraction", "ops", "learn_steps", "base",
                                                         "order")},
               "wall_s": time.time() - t0, "arms": {k: {str(s): v for s, v in d.items()} for k, d in arms.items()},
               "table": table}
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    plot(arms, os.path.join(FLAGS.workdir, "gstack.png"))
    print(format_table(table))
    print(json.dumps({"table": table, "wall_s": results["wall_s"]}))


def speedups(arms: dict) -> dict:
    import numpy as np
    out = {}
    for name, per_seed in arms.items():
        rows = []
        for seed, rec in per_seed.items():
            ref = arms["scratch"][seed]["curve"]
            goal, f_scratch = ref[-1][1], ref[-1][0]
            f = flops_to_reach(rec["curve"], goal)
            rows.append({"final_bpb": rec["curve"][-1][1], "flops_to_scratch_final": f,
                         "speedup": None if f is None else f_scratch / f - 1,
                         # reached already during the base phase: no grown-run FLOPs to count
                         "speedup_excl_base": (None if f is None or f <= rec["base_flops"] else
                                               f_scratch / (f - rec["base_flops"]) - 1)})
        reached = [r["speedup"] for r in rows if r["speedup"] is not None]
        excl = [r["speedup_excl_base"] for r in rows if r["speedup_excl_base"] is not None]
        finals = [r["final_bpb"] for r in rows]
        out[name] = {"final_bpb_mean": float(np.mean(finals)), "final_bpb_std": float(np.std(finals)),
                     "reached": f"{len(reached)}/{len(rows)}",
                     "speedup_mean": float(np.mean(reached)) if reached else None,
                     "speedup_min": float(np.min(reached)) if reached else None,
                     "speedup_max": float(np.max(reached)) if reached else None,
                     "speedup_excl_base_mean": float(np.mean(excl)) if excl else None, "seeds": rows}
    return out


def format_table(table: dict) -> str:
    lines = ["| arm | final bpb (mean ± std) | reached scratch final | speedup mean [min, max] | excl. base |",
             "|---|---|---|---|---|"]
    for name, t in table.items():
        sp = ("not reached" if t["speedup_mean"] is None else
              f"{t['speedup_mean']:+.1%} [{t['speedup_min']:+.1%}, {t['speedup_max']:+.1%}]")
        ex = "-" if t["speedup_excl_base_mean"] is None else f"{t['speedup_excl_base_mean']:+.1%}"
        bpb = f"{t['final_bpb_mean']:.4f} ± {t['final_bpb_std']:.4f}"
        lines.append(f"| {name} | {bpb} | {t['reached']} | {sp} | {ex} |")
    return "\n".join(lines)


def plot(arms: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, per_seed) in enumerate(arms.items()):
        color = f"C{i % 10}"
        for j, rec in enumerate(per_seed.values()):
            xs, ys = zip(*rec["curve"])
            ax.plot(xs, ys, color=color, alpha=0.8, lw=2 if name == "scratch" else 1,
                    ls="-" if name == "scratch" or name.startswith("g") else "--", label=name if j == 0 else None)
    ax.set_xlabel("cumulative training FLOPs (base run included)")
    ax.set_ylabel("eval bits/byte")
    ax.set_ylim(top=min(4.5, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.set_title("G_stack at CPU scale: every arm at the same total FLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    define_flags()
    app.run(main)
