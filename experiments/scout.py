"""SCOUT small-scale reproduction (papers/scout.md "Small-scale reproduction"), three parts.

(a) ``lm``: byte-level LMs on the local text corpus (CPython stdlib sources) at one depth/width and step
    budget: full attention ("AA"), SWA-only ("AA", window W), Mamba-only ("MM"), SCOUT-SWA ("AC") and
    SCOUT-Mamba ("MC"), every one a ``sqattn/configs/scout.py`` config trained by
    ``sqattn.train.train_and_evaluate`` in ``<workdir>/runs/<model>``. Reported: eval bits/byte over all
    positions and over positions ``t >= W`` (the long-range part, whose context exceeds the window).
    Expected (scout.md): SCOUT <= SWA-only at t >= W and close to full attention. ``--repeat_fraction=F`` adds
    a long-range component to the text (that fraction of rows is one span of ~T/2 bytes twice, so the second
    copy is predictable from T/2 bytes back, beyond W; sqattn/data/text.py) and splits the eval into the
    repeated spans and plain text at t >= W; ``--seeds`` gives several runs per model (mean ± std).
(b) ``recall``: the associative-recall probe. Each sequence is BOS, 4 key/value pairs (16 keys, 16 values),
    48 noise tokens, then the 4 keys re-queried in random order, each followed by its value (64 inputs);
    the loss and accuracy count only the value after each query key, whose pair is >= 49 tokens back, beyond
    the W=16 window. 2 SCOUT layers ([SWA(16)+MLP, X+MLP] x 2, d 64, 2 heads, SwiGLU 256, RoPE, f32), X =
    SWA (``swa_only``), checkpoint attention with segment length L (``scout_L<L>``) or full attention for
    both sub-blocks (``full``); AdamW 3e-3 with warmup + cosine, batch 16. Chance = 1/16. Expected: SWA-only
    stays at chance, SCOUT with small L recovers the values, accuracy drops for large L. Each probe is a run
    of the one trainer (config ``scout_recall:model=<name>,seed=<s>,steps=<n>`` on the "recall" data source)
    in ``<workdir>/recall_runs/``, so it checkpoints and resumes like any run.
(c) ``memory``: decode-cache K/V entries per SCOUT layer (two blocks) vs T, read from the shapes of
    ``LM.init_cache`` (``jax.eval_shape``, nothing allocated): full attention 2T (T per attention block),
    SWA-only 2W, SCOUT-SWA W + T//L, SCOUT-Mamba T//L (+ the constant Mamba state), Mamba-only 0; and the
    attention score entries of SCOUT vs causal attention (ratio -> L).

  python -m experiments.scout --workdir=/tmp/scout                              # all three parts
  python -m experiments.scout --workdir=/tmp/scout --parts=recall --seeds=0,1,2
  python -m experiments.scout --workdir=/tmp/scout_smoke --runlocal --steps=4 --recall_steps=20
  python -m experiments.scout --workdir=/work/runs/scout_lm --parts=lm --models=full,swa_only,swa --seeds=0,1 \
      --seq_len=512 --lm_batch=8 --repeat_fraction=0.5 --steps=600          # (a) with a long-range component

Writes ``<workdir>/results.json`` and ``<workdir>/scout.png``; prints a markdown table and, last, one JSON
line. Finished LM runs (``runs/<model>/result.json``) are reused.

Measured 2026-12-03, (a) with the long-range component (the command above; 30 min per seed, each process pinned
to one of the 2 cores with ``taskset -c 1`` while an MQAR grid ran on the other, load average 2.1-2.7; 7-12 min
per run, ~4k tokens/s). T = 512, batch 8, 600 steps (2.5M bytes), repeat_fraction 0.5 (span 257 bytes > W = 64),
eval 64 rows (32 repeated), mean ± std over seeds 0 and 1:

    | LM model (d 128, 4 blocks) | params  | bits/byte       | t >= 64         | repeated span   | text t >= 64    |
    |----------------------------|---------|-----------------|-----------------|-----------------|-----------------|
    | full attention (AA)        | 885,888 | 1.5594 ± 0.0353 | 1.4718 ± 0.0361 | 0.1131 ± 0.0382 | 2.0226 ± 0.0378 |
    | SWA-only (AA, W=64)        | 885,888 | 1.9584 ± 0.0190 | 1.9436 ± 0.0178 | 2.0083 ± 0.0202 | 1.9149 ± 0.0166 |
    | SCOUT-SWA (AC, L=16)       | 885,888 | 2.0474 ± 0.0211 | 2.0304 ± 0.0205 | 2.0465 ± 0.0209 | 2.0222 ± 0.0227 |

    The precondition holds: full attention beats SWA at t >= W (1.47 vs 1.94), entirely through the repeated
    spans, which it copies (0.11 bits/byte; per seed 0.075 / 0.151); on plain text it is still worse than SWA
    (2.02 vs 1.91), as at T = 256 below. SCOUT-SWA does not use the context beyond W at this budget: on the
    repeated spans it is no better than SWA-only (2.05 vs 2.01, worse on both seeds) and it is worst on plain
    text too. So the note's expectation (SCOUT between SWA and full, close to full) is not reproduced here;
    copying through checkpoints (one summary every L = 16 positions) is a harder circuit than attention's
    exact-offset copy, and 600 steps may be too few for it to form (longer runs not done: ~10 min per 600 steps
    per run on one core). T = 1024 was measured at ~2.2k tokens/s per core (full attention, batch 8), too slow
    for 2 seeds x 3 models here.

Measured (2026-11-29, 2 CPU cores shared with other jobs, load average 2-9; seed 0, one run each):

(a) ``--parts=lm,memory --steps=300`` (34 min; 3-6 min per attention model, 6-14 min per Mamba model),
    T=256, batch 16, 32768 eval bytes (24576 at t >= 64):

    | LM model (d 128, 4 blocks) | params  | bits/byte | bits/byte t >= 64 |
    |----------------------------|---------|-----------|-------------------|
    | full attention (AA)        | 885,888 | 2.162     | 2.114             |
    | SWA-only (AA, W=64)        | 885,888 | 2.079     | 2.030             |
    | Mamba-only (MM)            | 1,089,664 | 1.859   | 1.814             |
    | SCOUT-SWA (AC, L=16)       | 885,888 | 2.215     | 2.169             |
    | SCOUT-Mamba (MC, L=16)     | 987,776 | 1.959     | 1.915             |

    At 150 steps the order was the same (full 2.700, SWA 2.573, Mamba 2.128, SCOUT-SWA 2.749, SCOUT-Mamba
    2.242). Not the note's expectation (SCOUT <= SWA, close to full): at this budget every model is far from
    converged (~2 bits/byte) and full attention itself is worse than SWA, i.e. context beyond W is not yet
    used by any model; the comparison needs (much) longer training (not run).
(b) ``--parts=recall --recall_steps=2000`` (35 min; 7-12 min per model), held-out accuracy on 640 queries
    (measured with the probe's former private loop and jax.random data, before it became a trainer config
    with the numpy "recall" source; not re-measured since):
    SWA-only 0.058 (chance 0.0625), SCOUT L=4 0.577, SCOUT L=16 0.572, full attention 0.587. As in the note:
    SWA-only stays at chance, SCOUT recovers full attention's accuracy; unlike the note, L=16 did not drop
    (its first checkpoint, row 15, sees all 4 pairs through the W=16 window; single seed).
(c) cache entries per SCOUT layer at T = 256 / 1024 / 4096 / 16384 / 65536: full 512 / 2048 / 8192 / 32768 /
    131072, SWA-only 128, SCOUT-SWA 80 / 128 / 320 / 1088 / 4160, SCOUT-Mamba 16 / 64 / 256 / 1024 / 4096
    (matching the formulas); causal / SCOUT score entries 15.1 / 15.8 / 15.9 / 16.0 / 16.0 (-> L = 16).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Sequence

from absl import app, flags

LM_MODELS = ("full", "swa_only", "mamba_only", "swa", "mamba")
LM_LABELS = {"full": "full attention (AA)", "swa_only": "SWA-only (AA, W)", "mamba_only": "Mamba-only (MM)",
             "swa": "SCOUT-SWA (AC)", "mamba": "SCOUT-Mamba (MC)"}
RECALL_MODELS = ("swa_only", "scout_L4", "scout_L16", "full")
MEMORY_LENGTHS = (256, 1024, 4096, 16384, 65536)

# Associative-recall probe (scout.md): queries per sequence and value vocabulary, from the "recall" data source's defaults.
NUM_PAIRS, NUM_VALUES = 4, 16

log = logging.getLogger("sqattn.scout")


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", "/tmp/sqattn/scout", "Output directory (runs/, results.json, scout.png).")
    flags.DEFINE_list("parts", ["lm", "recall", "memory"], "Parts to run: lm, recall, memory.")
    flags.DEFINE_list("models", list(LM_MODELS), "LM part: scout config mixers (full, swa_only, mamba_only, "
                      "swa, mamba).")
    flags.DEFINE_integer("steps", 300, "LM part: training steps per model.")
    flags.DEFINE_integer("seq_len", 0, "LM part: bytes per row (0 = the config's T=256).")
    flags.DEFINE_bool("runlocal", False, "LM part: the configs' runlocal variant (smoke test).")
    flags.DEFINE_list("recall_models", list(RECALL_MODELS), "Recall part: swa_only, full, scout_L<L>.")
    flags.DEFINE_integer("recall_steps", 2000, "Recall part: training steps per model and seed.")
    flags.DEFINE_float("recall_lr", 3e-3, "Recall part: peak learning rate.")
    flags.DEFINE_list("seeds", ["0"], "LM and recall parts: seeds (init and data); the tables average over them.")
    flags.DEFINE_float("repeat_fraction", 0.0, "LM part: fraction of text rows that are one span twice (a "
                       "long-range component; sqattn/data/text.py). 0 = plain text.")
    flags.DEFINE_integer("lm_batch", 0, "LM part: batch size (0 = the config's 16).")
    flags.DEFINE_bool("progress", True, "Progress bars.")


FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------------------
# (a) byte-level LM.
# ----------------------------------------------------------------------------------------------------------


def lm_config(model: str, *, steps: int, seq_len: int = 0, runlocal: bool = False, seed: int = 0,
              repeat_fraction: float = 0.0, batch: int = 0):
    """The ``sqattn.configs.scout`` config of one LM run (eval only at the end, one checkpoint every 500 steps).

    ``seed`` seeds the parameters and the train windows; ``repeat_fraction`` is the text source's long-range
    component (that fraction of rows is one span twice, sqattn/data/text.py); ``batch`` 0 keeps the config's.
    """
    import importlib
    mod = importlib.import_module("sqattn.configs.scout")
    cfg = mod.get_config(f"mixer={model},size=tiny" + (",runlocal" if runlocal else ""))
    cfg.name = f"scout:{model}"
    cfg.num_steps = steps
    cfg.eval_every = 0
    cfg.checkpoint_every = max(min(steps, 500), 1)
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps // 10, 1))
    cfg.seed = seed
    cfg.data.seed = seed
    cfg.data.repeat_fraction = repeat_fraction
    if seq_len:
        cfg.data.seq_len = seq_len
    if batch:
        cfg.batch_size = batch
    return cfg


def lm_run_name(model: str, *, steps: int, seq_len: int = 0, runlocal: bool = False, seed: int = 0,
                repeat_fraction: float = 0.0, batch: int = 0) -> str:
    """``runs/`` subdirectory of one LM run (settings at their defaults leave no suffix)."""
    return (f"{model}_steps{steps}" + (f"_T{seq_len}" if seq_len else "") + (f"_b{batch}" if batch else "")
            + (f"_repeat{repeat_fraction:g}" if repeat_fraction else "") + (f"_seed{seed}" if seed else "")
            + ("_runlocal" if runlocal else ""))


@functools.lru_cache(maxsize=None)
def _position_nll_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def nll(model, inputs, targets, weights):
        logits, _ = model(inputs)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [b, t]
        return tok * weights  # [b, t]
    return nll


def position_bits_per_byte(model, cfg, *, long_from: int) -> dict[str, float]:
    """Eval bits/byte over all positions and over positions ``t >= long_from`` (same eval rows as the
    trainer: ``cfg.eval_batches`` batches of the text source's eval split).

    With a long-range component (``cfg.data.repeat_fraction`` > 0) also: ``bpb_copy``, over the second copy of
    the repeated rows (targets one span after their source, t + 1 >= span), and ``bpb_text_long``, over the
    other rows at ``t >= long_from`` (plain text).
    """
    import math

    import numpy as np

    from sqattn.data import text
    from sqattn.train import tasks as tasks_lib
    task = tasks_lib.get_task(cfg.task)
    _, eval_ds = task.make_datasets(cfg)
    nll_fn = _position_nll_fn()
    nlls, weights = [], []
    for i in range(cfg.eval_batches):
        batch = eval_ds.batch(i)
        w = batch["weights"].astype(np.float32)
        nlls.append(np.asarray(nll_fn(model, batch["inputs"], batch["targets"], w), np.float64))
        weights.append(w.astype(np.float64))
    nll, weight = np.concatenate(nlls), np.concatenate(weights)  # [rows, t]

    def bpb(mask) -> float:
        return float((nll * mask).sum() / max((weight * mask).sum(), 1.0) / math.log(2))

    t = np.arange(nll.shape[1])[None, :]
    long = np.broadcast_to(t >= long_from, nll.shape)
    out = {"bpb": bpb(1.0), "bpb_long": bpb(long),
           "eval_bytes": int(weight.sum()), "eval_bytes_long": int((weight * long).sum())}
    if float(cfg.data.get("repeat_fraction", 0.0)) > 0:
        repeated = text.repeated_rows(cfg.data, nll.shape[0])[:, None]
        copy = repeated & (t + 1 >= text.span_length(cfg.data.seq_len))
        out.update(bpb_copy=bpb(copy), bpb_text_long=bpb(long & ~repeated), repeated_rows=int(repeated.sum()),
                   eval_bytes_copy=int((weight * copy).sum()))
    return out


def lm_one(model: str, workdir: str, *, steps: int, seq_len: int = 0, runlocal: bool = False, seed: int = 0,
           repeat_fraction: float = 0.0, batch: int = 0, progress: bool = True) -> dict[str, Any]:
    """Trains one LM (or loads its finished record; an unfinished one resumes) and evaluates it per position."""
    from sqattn import sample
    from sqattn.train import state as state_lib
    from sqattn.train import train_and_evaluate
    settings = dict(steps=steps, seq_len=seq_len, runlocal=runlocal, seed=seed, repeat_fraction=repeat_fraction,
                    batch=batch)
    cfg = lm_config(model, **settings)
    run_dir = os.path.join(workdir, "runs", lm_run_name(model, **settings))
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    t0 = time.perf_counter()
    out = train_and_evaluate(cfg, run_dir, progress=progress)
    wall = time.perf_counter() - t0
    trained, _ = sample.load_model(run_dir)
    window = int(lm_config("swa", steps=1, runlocal=runlocal).model.mixers.attention.window)  # W
    evals = position_bits_per_byte(trained, cfg, long_from=window)
    _, params = state_lib.abstract_model(cfg)
    rec = dict(model=model, label=LM_LABELS.get(model, model), block_pattern=cfg.model.block_pattern,
               seed=seed, repeat_fraction=repeat_fraction, batch_size=int(cfg.batch_size),
               steps=int(out["step"]), train_loss=float(out["loss"]),
               trainer_eval_bpb=float(out["eval_bits_per_byte"]), window=window,
               segment_len=int(cfg.model.mixers.scout.segment_len), seq_len=int(cfg.data.seq_len),
               params=state_lib.param_count(params), wall_s=wall, load_avg=list(os.getloadavg()), **evals)
    if not out["stopped_early"]:
        with open(done, "w") as f:
            json.dump(rec, f, indent=2)
    return rec


# ----------------------------------------------------------------------------------------------------------
# (b) associative recall.
# ----------------------------------------------------------------------------------------------------------


def recall_config(name: str, seed: int, *, steps: int, lr: float = 3e-3, batch: int = 16,
                  eval_sequences: int = 160):
    """The trainer config of one probe run (``sqattn/configs/scout_recall.py``, the "recall" data source)."""
    from sqattn import configs
    cfg = configs.get(f"scout_recall:model={name},seed={seed},steps={steps}")
    cfg.optim.lr = lr
    cfg.batch_size = batch
    cfg.eval_batches = max(1, eval_sequences // batch)
    return cfg


def recall_one(name: str, seed: int, *, steps: int, lr: float = 3e-3, batch: int = 16,
               eval_sequences: int = 160, workdir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Trains one probe model with the trainer (in ``<workdir>/recall_runs/<name>_s<seed>_steps<steps>``;
    a killed run resumes) and returns its held-out query accuracy (``4 * eval_sequences`` queries)."""
    import tempfile
    from sqattn.train import train_and_evaluate
    cfg = recall_config(name, seed, steps=steps, lr=lr, batch=batch, eval_sequences=eval_sequences)
    run_dir = (os.path.join(workdir, "recall_runs", f"{name}_s{seed}_steps{steps}_lr{lr:g}_b{batch}")
               if workdir else tempfile.mkdtemp(prefix="scout_recall_"))
    t0 = time.perf_counter()
    out = train_and_evaluate(cfg, run_dir, progress=progress)
    if out.get("stopped_early"):
        raise RuntimeError(f"recall run {run_dir} stopped at step {out['step']}; rerun to resume it")
    return dict(model=name, seed=seed, steps=steps, lr=lr, train_loss=float(out["ce"]),
                train_acc=float(out["accuracy"]), eval_loss=float(out["eval_loss"]),
                accuracy=float(out["eval_accuracy"]),
                eval_queries=NUM_PAIRS * batch * cfg.eval_batches, wall_s=time.perf_counter() - t0,
                run_dir=run_dir)


# ----------------------------------------------------------------------------------------------------------
# (c) decode memory.
# ----------------------------------------------------------------------------------------------------------


def cache_entries(cfg, length: int) -> dict[str, int]:
    """Decode-cache sizes per SCOUT layer (= two pattern letters) at ``length`` tokens, from the shapes of
    ``LM.init_cache`` (``jax.eval_shape``: nothing allocated).

    ``entries``: K/V time slots (attention-like caches hold ``k [b, slots, g, hd]``); ``state_floats``: the
    floats of caches without ``k`` (Mamba's conv + SSM state, constant in T).
    """
    import jax
    from flax import nnx

    from sqattn.train import state as state_lib
    graphdef, params = state_lib.abstract_model(cfg)
    model = nnx.merge(graphdef, params)
    caches = jax.eval_shape(lambda: model.init_cache(1, length))
    layers = len(caches) / 2
    slots = sum(int(c["k"].shape[1]) for c in caches if isinstance(c, dict) and "k" in c)
    state = sum(int(x.size) for c in caches if not (isinstance(c, dict) and "k" in c)
                for x in jax.tree.leaves(c))
    return {"entries": int(slots / layers), "state_floats": int(state / layers)}


def memory_table(lengths: Sequence[int] = MEMORY_LENGTHS) -> dict[str, Any]:
    """Decode-cache entries per SCOUT layer (tiny configs: W=64, L=16) and attention score entries vs T."""
    from kernels.segment_attention import score_entries
    rows = {}
    for model in LM_MODELS:
        cfg = lm_config(model, steps=1)
        rows[model] = {str(t): cache_entries(cfg, t)["entries"] for t in lengths}
    cfg = lm_config("swa", steps=1)
    window, seg_len = int(cfg.model.mixers.attention.window), int(cfg.model.mixers.scout.segment_len)
    expected = {"full": {str(t): 2 * t for t in lengths},
                "swa_only": {str(t): 2 * min(window, t) for t in lengths},
                "mamba_only": {str(t): 0 for t in lengths},
                "swa": {str(t): min(window, t) + t // seg_len for t in lengths},
                "mamba": {str(t): t // seg_len for t in lengths}}
    scores = {str(t): {"causal": t * (t + 1) // 2, "scout": score_entries(t, seg_len),
                       "ratio": t * (t + 1) / 2 / score_entries(t, seg_len)} for t in lengths}
    return {"window": window, "segment_len": seg_len, "lengths": list(lengths), "entries": rows,
            "entries_match_formula": rows == expected, "score_entries": scores}


# ----------------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------------


def summarize_recall(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    import numpy as np
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["model"] for r in records):
        accs = [r["accuracy"] for r in records if r["model"] == name]
        out[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "seeds": len(accs)}
    return out


LM_METRICS = ("bpb", "bpb_long", "bpb_copy", "bpb_text_long")


def summarize_lm(records: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per LM model (in record order): seeds, params, steps and the mean/std over seeds of each LM_METRICS
    value the records carry."""
    import statistics
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        out.setdefault(r["model"], {"label": r["label"], "params": r["params"], "steps": r["steps"], "runs": []})
        out[r["model"]]["runs"].append(r)
    for entry in out.values():
        runs = entry.pop("runs")
        entry["seeds"] = [r.get("seed", 0) for r in runs]
        for m in LM_METRICS:
            vals = [r[m] for r in runs if m in r]
            if vals:
                entry[m] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals)}
    return out


def format_tables(results: dict[str, Any]) -> str:
    lines = []
    if results.get("lm"):
        w = results["lm"][0]["window"]
        summary = summarize_lm(results["lm"])
        cols = [("bpb", "bits/byte"), ("bpb_long", f"t >= {w}"), ("bpb_copy", "repeated span (copy)"),
                ("bpb_text_long", f"plain text t >= {w}")]
        cols = [(m, name) for m, name in cols if any(m in e for e in summary.values())]
        lines += ["| LM model | params | steps | seeds | " + " | ".join(n for _, n in cols) + " |",
                  "|---|---|---|---|" + "---|" * len(cols)]
        for e in summary.values():
            cells = [f"{e[m]['mean']:.4f}" + (f" ± {e[m]['std']:.4f}" if len(e["seeds"]) > 1 else "")
                     if m in e else "" for m, _ in cols]
            lines.append(f"| {e['label']} | {e['params']:,} | {e['steps']} | {len(e['seeds'])} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if results.get("recall_summary"):
        lines += ["| recall model | accuracy (chance 0.0625) | seeds |", "|---|---|---|"]
        lines += [f"| {name} | {s['mean']:.3f} ± {s['std']:.3f} | {s['seeds']} |"
                  for name, s in results["recall_summary"].items()]
        lines.append("")
    if results.get("memory"):
        mem = results["memory"]
        lines += ["| cache entries per SCOUT layer | " + " | ".join(f"T={t}" for t in mem["lengths"]) + " |",
                  "|---|" + "---|" * len(mem["lengths"])]
        lines += [f"| {LM_LABELS[m]} | " + " | ".join(str(v) for v in row.values()) + " |"
                  for m, row in mem["entries"].items()]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    if results.get("lm"):
        recs = results["lm"]
        summary = summarize_lm(recs)
        bars = [("bpb", "all positions"), ("bpb_long", f"t >= W ({recs[0]['window']})"),
                ("bpb_copy", "repeated span"), ("bpb_text_long", "plain text, t >= W")]
        bars = [(m, name) for m, name in bars if all(m in e for e in summary.values())]
        x = np.arange(len(summary))
        width = 0.8 / len(bars)
        for i, (m, name) in enumerate(bars):
            axes[0].bar(x + (i - (len(bars) - 1) / 2) * width, [e[m]["mean"] for e in summary.values()], width,
                        yerr=[e[m]["std"] for e in summary.values()], label=name)
        axes[0].set_xticks(x, list(summary), rotation=20)
        axes[0].set_ylabel("eval bits / byte")
        axes[0].set_title(f"(a) byte LM, {recs[0]['steps']} steps, T={recs[0]['seq_len']}, "
                          f"{max(len(e['seeds']) for e in summary.values())} seed(s)")
        axes[0].set_ylim(0, 1.3 * max(e[m]["mean"] for e in summary.values() for m, _ in bars))
        axes[0].legend(fontsize=7, ncol=2, loc="upper center")
    if results.get("recall_summary"):
        s = results["recall_summary"]
        axes[1].bar(list(s), [v["mean"] for v in s.values()], yerr=[v["std"] for v in s.values()])
        axes[1].axhline(1 / NUM_VALUES, color="gray", linestyle=":", label="chance")
        axes[1].set_ylabel("held-out query accuracy")
        axes[1].set_title("(b) associative recall beyond the window")
        axes[1].legend(fontsize=8)
    if results.get("memory"):
        mem = results["memory"]
        for m, row in mem["entries"].items():
            axes[2].plot(mem["lengths"], [max(v, 0.5) for v in row.values()], marker="o", label=LM_LABELS[m])
        axes[2].set_xscale("log", base=2)
        axes[2].set_yscale("log", base=2)
        axes[2].set_xlabel("T (tokens)")
        axes[2].set_ylabel("K/V entries per SCOUT layer (0 plotted at 0.5)")
        axes[2].set_title(f"(c) decode cache (W={mem['window']}, L={mem['segment_len']})")
        axes[2].legend(fontsize=7)
    for ax, part in zip(axes, (results.get("lm"), results.get("recall_summary"), results.get("memory"))):
        if not part:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "(part not run)", ha="center", va="center", color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(workdir: str, *, parts: Sequence[str] = ("lm", "recall", "memory"),
        models: Sequence[str] = LM_MODELS, steps: int = 300, seq_len: int = 0, runlocal: bool = False,
        repeat_fraction: float = 0.0, lm_batch: int = 0,
        recall_models: Sequence[str] = RECALL_MODELS, recall_steps: int = 2000, recall_lr: float = 3e-3,
        seeds: Sequence[int] = (0,), memory_lengths: Sequence[int] = MEMORY_LENGTHS,
        progress: bool = True) -> dict[str, Any]:
    """Runs the requested parts, then writes ``results.json`` and ``scout.png`` under ``workdir``.

    Returns:
      ``{"settings", "lm" (one record per model), "recall" (one per model and seed), "recall_summary",
      "memory", "plot", "wall_s"}``; parts not run are empty.
    """
    unknown = set(parts) - {"lm", "recall", "memory"}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; expected lm, recall, memory")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    settings = dict(parts=list(parts), models=list(models), steps=steps, seq_len=seq_len, runlocal=runlocal,
                    repeat_fraction=repeat_fraction, lm_batch=lm_batch,
                    recall_models=list(recall_models), recall_steps=recall_steps, recall_lr=recall_lr,
                    seeds=[int(s) for s in seeds], load_avg_start=list(os.getloadavg()))
    results: dict[str, Any] = {"settings": settings, "lm": [], "lm_summary": {}, "recall": [],
                               "recall_summary": {}, "memory": {}}

    def write() -> dict[str, Any]:
        results["wall_s"] = time.perf_counter() - t0
        results["settings"]["load_avg_end"] = list(os.getloadavg())
        results["plot"] = plot(results, os.path.join(workdir, "scout.png"))
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        return results

    if "memory" in parts:
        results["memory"] = memory_table(memory_lengths)
    if "lm" in parts:
        for model in models:
            for seed in seeds:
                rec = lm_one(model, workdir, steps=steps, seq_len=seq_len, runlocal=runlocal, seed=int(seed),
                             repeat_fraction=repeat_fraction, batch=lm_batch, progress=progress)
                results["lm"].append(rec)
                results["lm_summary"] = summarize_lm(results["lm"])
                log.warning("lm %s seed %d: %.4f bits/byte, %.4f at t >= W (%.0f s)", model, seed, rec["bpb"],
                            rec["bpb_long"], rec["wall_s"])
                write()
    if "recall" in parts:
        for name in recall_models:
            for seed in seeds:
                rec = recall_one(name, int(seed), steps=recall_steps, lr=recall_lr, workdir=workdir,
                                 progress=progress)
                results["recall"].append(rec)
                log.warning("recall %s seed %d: accuracy %.3f (%.0f s)", name, seed, rec["accuracy"],
                            rec["wall_s"])
                results["recall_summary"] = summarize_recall(results["recall"])
                write()
    return write()


def main(argv):
    del argv
    from experiments import common
    common.quiet_logging()
    out = run(FLAGS.workdir, parts=FLAGS.parts, models=FLAGS.models, steps=FLAGS.steps, seq_len=FLAGS.seq_len,
              runlocal=FLAGS.runlocal, repeat_fraction=FLAGS.repeat_fraction, lm_batch=FLAGS.lm_batch,
              recall_models=FLAGS.recall_models, recall_steps=FLAGS.recall_steps,
              recall_lr=FLAGS.recall_lr, seeds=[int(s) for s in FLAGS.seeds], progress=FLAGS.progress)
    print(format_tables(out))
    print(json.dumps({k: v for k, v in out.items() if k not in ("recall",)}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
