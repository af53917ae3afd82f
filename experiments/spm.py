"""SPM reproduction (papers/spm.md, issue 18): erase "star" from a tiny text-conditioned DiT of the shapes world.

One command trains (or resumes) every run through the one trainer, then evaluates:
  python -m experiments.spm --workdir=/work/runs/spm

Runs (each a normal trainer run under --workdir, resumable):
  dit/                 the DiT (config dit_shapes:steps=N)
  judge/               the judge CNN (judge_shapes)
  spm_star_la{L}/      SPM erasing "star" from dit/, latent anchoring lambda = L (L = 0: no LA)
  spm_blue_la{L}/      SPM erasing "blue" (the second concept of the multi-concept test)
Evaluation (fixed seeds; --samples samples per prompt for the 12 prompts "a {colour} {shape}"; every variant
starts from the same initial noise; DDIM --sample_steps steps at CFG --guidance):
  * erasure: the judge's star rate on the 3 target prompts;
  * preservation on the 9 other prompts: judge shape / colour accuracy, alteration = pixel MSE to the
    original model's sample from the same noise, and the Fréchet distance between judge features of the
    variant's and the original's samples;
  * the {LA on/off} x {FT off (m = 1) / FT on (gamma from the prompt, paper-form sum)} grid, FT's cosine over
    flattened padded text states (as the official code) and, as a second row, over mean non-padding states;
  * multi-concept: the "star" and "blue" SPMs combined (paper form and the code's factor sum, FT on);
  * the FT gammas per prompt; image grids (PNG and TensorBoard) of every variant.
Writes results.json, grid_*.png, compare.png and tb/ under --workdir, and prints the JSON.

Measured 2026-12-03, 2 CPU cores shared by ~9 agents (load average 19-27 throughout), no accelerator:
  python -m experiments.train --config=dit_shapes:steps=1500 --workdir=/work/runs/spm/dit        # 30 min wall
  python -m experiments.spm --workdir=/work/runs/spm/exp --dit_workdir=/work/runs/spm/dit --spm_steps=150 \
      --spm_batch=2 --la=1000 --samples=16 --sample_steps=20 [--notrain]   (+ --la=0 --nomulti for the LA row)
Wall times are dominated by XLA compilation under that load (SPM train step 171-551 s to compile, ~0.2 s/step
to run; DiT step 0.6 s; evaluation 460 s of which most is compiling 4 samplers).

Runs: DiT 1500 steps (final eval eps-MSE 0.038); judge 1000 steps (eval accuracy 100 % shape, 100 % colour on
clean images); SPMs 150 steps, batch 2 (the note asks 400-800; time).

HONEST SUMMARY: at this size and training budget the DiT does NOT draw recognisable shapes. Its samples have
the right colour (judge colour accuracy 100 % on all 12 prompts) but are blocky blobs in the 4x4 patch grid
(results_grid_original.png); the judge calls 79 % of "star"-prompt samples and 89 % of the other prompts'
samples "star" (shape accuracy 28 % overall, 11 % on non-star prompts). So the erasure numbers below measure
nothing about "star": with no star drawn, there is no star to erase. The SPM machinery runs end to end (the
adapters train, the combination and FT change samples measurably), but the table cannot show erasure.

Original model (16 samples x 12 prompts): star rate on star prompts 0.79; other prompts: shape acc 0.11,
colour acc 1.00.

{LA} x {FT} grid, erasing "star" (lambda 1000; FT gamma from the prompt, paper-form sum):
| variant            | star rate (target) | other shape acc | other colour acc | other MSE | other Fréchet | target MSE |
|--------------------|--------------------|-----------------|------------------|-----------|---------------|------------|
| original           | 0.792              | 0.111           | 1.000            | 0         | 0             | 0          |
| LA, FT off (m = 1) | 0.792              | 0.111           | 1.000            | 0.0015    | 5.35          | 0.0013     |
| LA, FT flat cosine | 0.792              | 0.111           | 1.000            | 0.0012    | 4.71          | 0.0013     |
| LA, FT mean cosine | 0.792              | 0.111           | 1.000            | 0.0012    | 4.86          | 0.0013     |
| no LA, FT off      | 0.833              | 0.049           | 0.819            | 0.207     | 2502          | 0.218      |
| no LA, FT flat     | 0.833              | 0.049           | 0.868            | 0.192     | 2077          | 0.218      |
| no LA, FT mean     | 0.833              | 0.042           | 0.861            | 0.197     | 2198          | 0.218      |
(no-LA rows: --la=0 --nomulti --results=results_la0.json, same noise.) The one direction this toy does show:
latent anchoring cuts the alteration of non-target prompts ~140x in pixel MSE (0.207 -> 0.0015) and keeps the
colours (0.82 -> 1.00 colour accuracy); without LA the star SPM repaints every prompt (results_la0_grid_*.png).

FT gammas (pitfall reproduced): with the official flattened-padded-state cosine, gamma_star is 0.87-0.92 for
prompts without "star" (1.0 with it); the mean-of-non-padding cosine is no better here (0.89-0.95), because the
jointly trained 2-layer text encoder maps every prompt to similar states. FT therefore barely scales the SPMs
down on unrelated prompts (other MSE 0.0015 -> 0.0012).

Multi-concept (star SPM + blue SPM, lambda 1000, FT on); non-target = the 6 prompts with neither concept:
| combination        | star rate | blue rate (blue prompts) | other MSE | other Fréchet | target MSE (star+blue prompts) | "a blue circle" MSE |
|--------------------|-----------|--------------------------|-----------|---------------|-----------------|---------------------|
| flat, paper form   | 0.688     | 1.000                    | 0.0018    | 9.2           | 0.027           | 0.042               |
| flat, factor sum   | 0.667     | 1.000                    | 0.0046    | 20.8          | 0.065           | 0.097               |
| mean, paper form   | 0.688     | 1.000                    | 0.0017    | 9.0           | 0.028           | 0.043               |
| mean, factor sum   | 0.667     | 1.000                    | 0.0041    | 18.1          | 0.066           | 0.100               |
"Blue" is not erased (the judge still sees blue in 100 % of blue-prompt samples), though the blue SPM changes
blue-prompt samples ~20x more than others; the code's factor-sum combination alters everything ~2.5x more than
the paper form (cross terms U_i D_j). "a green square" stays close to the original (MSE 0.002 paper form).
What would be needed: a DiT that draws shapes (patch 2, more steps: the 64-token model was 3x slower per step
here), and the note's 400-800 SPM steps.

Second attempt, 2026-12-03 14:12-14:45, load ~2 (this job alone): that recipe, patch 2 (64 tokens), 4000 steps,
and 400 SPM steps:
  python -m experiments.train --config=dit_shapes:patch=2,steps=4000 --workdir=/work/runs/spm2/dit   # 24 min
  python -m experiments.spm --workdir=/work/runs/spm2/exp --dit_workdir=/work/runs/spm2/dit --spm_steps=400 \
      --spm_batch=2 --la=0,1000 --samples=16 --sample_steps=20     # SPMs 85 / 119 / 80 s, evaluation 125 s
  (the judge run copied from the first attempt). Eval eps-MSE 0.0216 (0.038 before). The samples are now
  single coherent blobs of the right colour, no longer patchworks of 4x4 blocks, but still not recognisable
  shapes: judge shape accuracy 0.36 overall (chance 0.25), 0.17 on the 9 non-star prompts, and the judge calls
  0.92 of star-prompt samples "star" (red/green/blue star 0.81 / 1.00 / 0.94). So erasure is STILL NOT
  DEMONSTRABLE:
| variant             | star rate (target) | other shape acc | other colour acc | other MSE | other Fréchet | target MSE |
|---------------------|--------------------|-----------------|------------------|-----------|---------------|------------|
| original            | 0.917              | 0.174           | 1.000            | 0         | 0             | 0          |
| LA 1000, FT off     | 0.917              | 0.174           | 1.000            | 7.0e-5    | 0.31          | 5.1e-5     |
| LA 1000, FT flat    | 0.917              | 0.174           | 1.000            | 6.4e-5    | 0.28          | 5.1e-5     |
| LA 1000, FT mean    | 0.917              | 0.174           | 1.000            | 6.7e-5    | 0.29          | 5.1e-5     |
| no LA, FT off       | 0.917              | 0.056           | 0.993            | 0.060     | 520           | 0.042      |
| no LA, FT flat      | 0.917              | 0.056           | 0.993            | 0.055     | 448           | 0.042      |
  With LA the star SPM now changes the target prompts' samples as little as the others' (MSE 5e-5 vs 7e-5):
  against a model that draws no distinct star, the anchoring term wins and the adapter learns almost nothing;
  without LA it repaints every prompt (~850x the alteration), as before. The multi-concept rows (star + blue)
  alter non-target prompts by 6e-5 (paper form) to 9.5e-5 (factor sum) and leave "blue" at a 1.00 blue rate.
  The next step is the data, not the SPM: at 16 x 16 with shapes of radius 3-5 px the judge itself is 100 %
  accurate on clean images, but a 0.5M-parameter DiT at this budget does not render the shape boundary; a
  larger image (32 x 32) or a larger DiT needs hours of this CPU or an accelerator.

Third attempt, 2026-12-03 17:00-18:02 (the DiT shared the 2 cores with a CTR benchmark for ~45 min, load 4-6):
the DiT's loss was dominated by the nearly clean timesteps (eps-MSE 0.06 at t = 50 vs 0.006 at t = 800), and its
x0 prediction at t >= 700 was noise-shaped fragments rather than a blurred shape, so sampling committed to
ragged layouts. Two changes: min-SNR-5 weighting of the eps loss (``dit_shapes:minsnr=5``) and batch 128
(a DiT step on this CPU is overhead-bound: batch 32 / 128 / 256 gave 20 / 63 / 75 images/s in one process at
load 5), continuing the patch-2 run above for 2000 steps at lr 1e-3:
  python -m experiments.train --config=dit_shapes:patch=2,steps=2000,batch=128,minsnr=5,lr=0.001 \
      --config.init.workdir=/work/runs/spm2/dit --workdir=/work/runs/spm3/dit          # 60 min at load 4-6
  python -m experiments.spm --workdir=/work/runs/spm3/exp --dit_workdir=/work/runs/spm3/dit --spm_steps=400 \
      --spm_batch=2 --la=1000 --nomulti --samples=16 --sample_steps=20                # SPM 400 steps + eval, 4 min
  (judge copied from the first attempt). Eval eps-MSE 0.0192 (0.0216). The samples are now smooth, solid blobs
  of the right colour (results_grid_original.png), and circles are drawn (judge: 0.81-0.94 "circle"), but
  squares come out rounded, triangles small and stars speckled: judge shape accuracy 0.40 (circle 0.875,
  square 0.21, triangle 0.15, star 0.375). Sampling settings do not rescue the previous model: its 0.36 (20
  steps, CFG 3) was 0.35 with 50 steps, 0.28 / 0.40 at CFG 1 / 6, 0.375 with leading instead of trailing steps. Erasing "star" (LA 1000) moved the star
  rate on the star prompts from 0.375 to 0.333 with alteration 7e-5 on them and 1.4e-4 elsewhere: still NO
  demonstrable erasure. The DiT is on the right path but needs more training than this CPU gave it.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from sqattn import configs
from sqattn.data import shapes
from sqattn.diffusion import ddim_sample
from sqattn.diffusion.tasks import schedule_of
from sqattn.peft import spm

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", None, "output directory (runs, results.json, PNGs)")
    flags.DEFINE_integer("dit_steps", 6000, "DiT training steps (the dit_shapes recipe: 72 min on one CPU core)")
    flags.DEFINE_string("dit_workdir", "", "use this finished (or stopped) DiT run as is instead of training <workdir>/dit")
    flags.DEFINE_integer("judge_steps", 1000, "judge training steps")
    flags.DEFINE_integer("spm_steps", 200, "SPM training steps per concept")
    flags.DEFINE_integer("spm_batch", 2, "target prompts per SPM step")
    flags.DEFINE_string("la", "0,1000", "latent-anchoring strengths of the star SPMs (comma-separated)")
    flags.DEFINE_integer("samples", 16, "samples per prompt")
    flags.DEFINE_integer("sample_steps", 20, "DDIM steps (sampling and SPM rollouts)")
    flags.DEFINE_float("guidance", 3.0, "CFG scale when sampling")
    flags.DEFINE_integer("seed", 0, "noise seed of the evaluation")
    flags.DEFINE_bool("runlocal", False, "tiny runs (smoke test)")
    flags.DEFINE_bool("train", True, "train (or resume) the runs first; --notrain evaluates the runs already there")
    flags.DEFINE_bool("multi", True, "train and evaluate the second concept (blue) and the star + blue combination")
    flags.DEFINE_string("results", "results.json", "file name of the results under --workdir")


PROMPTS = shapes.all_prompts()                       # 12 (colour, shape), colour-major


# ----------------------------------------------------------------------------------------------- runs
def _train(name: str, workdir: str, train: bool = True) -> dict:
    from sqattn.train.trainer import train_and_evaluate
    if not train:
        return _existing(workdir)
    t0 = time.time()
    rec = train_and_evaluate(configs.get(name), workdir, progress=False)
    return {"config": name, "workdir": workdir, "seconds": round(time.time() - t0, 1),
            **{k: v for k, v in rec.items() if k.startswith("eval_") or k in ("loss", "step")}}


def _existing(workdir: str) -> dict:
    from sqattn.train import metrics
    recs = [r for r in metrics.read_metrics(workdir) if "loss" in r or "eval_loss" in r]
    return {"workdir": workdir, "reused": True, **(recs[-1] if recs else {})}


def train_all(workdir: str, *, train: bool, multi: bool, dit_workdir: str, dit_steps: int, judge_steps: int, spm_steps: int, spm_batch: int,
              la_values: list[float], sample_steps: int, runlocal: bool) -> dict:
    rl = ",runlocal" if runlocal else ""
    dit = dit_workdir or os.path.join(workdir, "dit")
    runs = {"dit": _existing(dit) if dit_workdir else _train(f"dit_shapes:steps={dit_steps}{rl}", dit),
            "judge": _train(f"judge_shapes:steps={judge_steps}{rl}", os.path.join(workdir, "judge"), train)}
    jobs = [("star", la) for la in la_values] + ([("blue", max(la_values))] if multi else [])
    shape = "" if runlocal else dit_shape_args(dit)
    for concept, la in jobs:
        key = f"spm_{concept}_la{la:g}"
        runs[key] = _train(f"spm_shapes:init={dit},concept={concept},la={la},steps={spm_steps},"
                           f"batch={spm_batch},rollout={sample_steps}{shape}{rl}", os.path.join(workdir, key),
                           train)
    return runs


def dit_shape_args(dit_workdir: str) -> str:
    """``",patch=P,width=W,depth=D,pos=E"`` of the DiT run (its config.json), so the SPM runs build the same
    DiT (a run saved before ``pos_embed`` existed has learned positions)."""
    from sqattn import sample as sample_lib
    try:
        model = sample_lib.load_config(dit_workdir).model
        return (f",patch={int(model.patch)},width={int(model.d_model)},depth={int(model.depth)}"
                f",pos={model.get('pos_embed', 'learned')}")
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"spm: cannot read the DiT's model shape from {dit_workdir}/config.json: {e}") from e


# ----------------------------------------------------------------------------------------------- sampling
def make_sampler(model, schedule, *, steps: int, guidance: float):
    """``sample(noise, tokens, gamma, form)`` -> images; ``gamma`` None (m = 1), or [b, K] SPM multipliers."""
    graphdef, state = nnx.split(model)

    def run(state, noise, tokens, gamma, form):
        m = nnx.merge(graphdef, state)
        ctx, unc = m.encode_text(tokens), m.encode_text(jnp.zeros_like(tokens))
        with spm.multiplier(gamma, form=form):
            return ddim_sample(lambda x, t, c: m(x, t, context=c), schedule, noise, ctx, unc, num_steps=steps,
                               guidance=guidance)
    jitted = jax.jit(run, static_argnums=(4,))
    return lambda noise, tokens, gamma=None, form="paper": np.asarray(jitted(state, noise, tokens, gamma, form))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [n, F] and b [m, F]."""
    import scipy.linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2 * covmean))


def judge_fn(judge):
    graphdef, state = nnx.split(judge)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda x: jax.tree.map(np.asarray, f(state, x))


def evaluate_variant(images, original, judged, judged_orig, shape_ids, colour_ids, target_rows, other_rows,
                     erased: list[tuple[str, str]]) -> dict:
    """Erasure rates on ``target_rows`` (for each (kind, name) in ``erased``) and preservation on
    ``other_rows``."""
    pred_s, pred_c = judged["shape"].argmax(-1), judged["colour"].argmax(-1)
    out = {}
    for kind, name in erased:
        rows = target_rows[name]
        hit = pred_s[rows] == shapes.SHAPES.index(name) if kind == "shape" else \
            pred_c[rows] == shapes.COLOURS.index(name)
        out[f"{name}_rate_target"] = float(np.mean(hit))
    o = other_rows
    out["other_acc_shape"] = float(np.mean(pred_s[o] == shape_ids[o]))
    out["other_acc_colour"] = float(np.mean(pred_c[o] == colour_ids[o]))
    out["other_alteration_mse"] = float(np.mean((images[o] - original[o]) ** 2))
    out["other_frechet"] = frechet_distance(judged["features"][o], judged_orig["features"][o])
    all_t = np.concatenate([target_rows[n] for _, n in erased])
    out["target_alteration_mse"] = float(np.mean((images[all_t] - original[all_t]) ** 2))
    return out


def evaluate(workdir: str, dit: str, runs: dict, *, multi: bool, prefix: str = "results", la_values: list[float], samples: int, sample_steps: int,
             guidance: float, seed: int) -> dict:
    from sqattn import sample as sample_lib
    base, base_cfg = sample_lib.load_model(dit)
    judge, _ = sample_lib.load_model(os.path.join(workdir, "judge"))
    sched = schedule_of(base_cfg)
    judge_all = judge_fn(judge)
    n = len(PROMPTS) * samples
    colour_ids = np.repeat([shapes.COLOURS.index(c) for c, _ in PROMPTS], samples)
    shape_ids = np.repeat([shapes.SHAPES.index(s) for _, s in PROMPTS], samples)
    tokens = jnp.asarray(np.repeat(np.stack([shapes.tokenize(shapes.prompt(c, s)) for c, s in PROMPTS]),
                                   samples, axis=0))
    size, ch = int(base_cfg.model.image_size), int(base_cfg.model.channels)
    noise = jax.random.normal(jax.random.key(seed), (n, size, size, ch), jnp.float32)
    kw = dict(steps=sample_steps, guidance=guidance)
    rows = {"star": np.flatnonzero(shape_ids == shapes.SHAPES.index("star")),
            "blue": np.flatnonzero(colour_ids == shapes.COLOURS.index("blue"))}
    others_star = np.flatnonzero(shape_ids != shapes.SHAPES.index("star"))
    others_both = np.setdiff1d(others_star, rows["blue"])
    res: dict = {"runs": runs}

    t0 = time.time()
    original = make_sampler(base, sched, **kw)(noise, tokens, jnp.ones((n, 1)))
    jo = judge_all(original)
    res["original"] = {
        "acc_shape_per_prompt": {f"{c} {s}": float(np.mean(jo["shape"].argmax(-1)[i * samples:(i + 1) * samples]
                                                          == shapes.SHAPES.index(s)))
                                 for i, (c, s) in enumerate(PROMPTS)},
        **evaluate_variant(original, original, jo, jo, shape_ids, colour_ids, rows, others_star,
                           [("shape", "star")])}
    res["original"]["acc_colour_all"] = float(np.mean(jo["colour"].argmax(-1) == colour_ids))
    res["original"]["acc_shape_all"] = float(np.mean(jo["shape"].argmax(-1) == shape_ids))
    grids = {"original": original}

    # FT gammas of every prompt for both concepts and both cosine definitions
    concept_tok = jnp.asarray(np.stack([shapes.tokenize("star"), shapes.tokenize("blue")]))
    uniq = jnp.asarray(np.stack([shapes.tokenize(shapes.prompt(c, s)) for c, s in PROMPTS]))
    gam = {mode: np.asarray(spm.permeability(base.encode_text, uniq, concept_tok, cosine=mode))
           for mode in ("flat", "mean")}
    res["gamma"] = {f"{c} {s}": {f"{k}_{mode}": round(float(gam[mode][i, j]), 3) for mode in gam
                                 for j, k in enumerate(("star", "blue"))} for i, (c, s) in enumerate(PROMPTS)}
    gamma_rows = {mode: np.repeat(g, samples, axis=0) for mode, g in gam.items()}   # [n, 2]

    # the {LA} x {FT} grid for "star"
    grid = {}
    for la in la_values:
        model, _ = sample_lib.load_model(os.path.join(workdir, f"spm_star_la{la:g}"))
        sampler = make_sampler(model, sched, **kw)
        for ft in ("off", "flat", "mean"):
            if ft == "mean" and la != max(la_values):
                continue
            # FT off: m = 1 (an array, so both share one compiled sampler)
            gamma = jnp.ones((n, 1)) if ft == "off" else jnp.asarray(gamma_rows[ft][:, :1])
            images = sampler(noise, tokens, gamma)
            key = f"la{la:g}_ft_{ft}"
            grid[key] = evaluate_variant(images, original, judge_all(images), jo, shape_ids, colour_ids, rows,
                                         others_star, [("shape", "star")])
            grids[f"star_{key}"] = images
    res["grid_star"] = grid

    res["eval_seconds_star"] = round(time.time() - t0, 1)
    if multi:
        res["multi"] = evaluate_multi(workdir, dit, base_cfg, sched, kw, noise, tokens, gamma_rows, original, jo,
                                      judge_all, shape_ids, colour_ids, rows, others_both, samples, grids,
                                      max(la_values))
    res["eval_seconds"] = round(time.time() - t0, 1)
    res["pngs"] = write_grids(workdir, grids, samples, prefix=prefix)
    return res


def evaluate_multi(workdir, dit, base_cfg, sched, kw, noise, tokens, gamma_rows, original, jo, judge_all,
                   shape_ids, colour_ids, rows, others_both, samples, grids, la) -> dict:
    """The "star" and "blue" SPMs combined with FT (flat and mean cosine), paper form and factor sum."""
    from sqattn import sample as sample_lib
    parts = [sample_lib.load_model(os.path.join(workdir, f"spm_{c}_la{la:g}"))[0] for c in ("star", "blue")]
    both = spm.combine(spm.apply_spm(sample_lib.load_model(dit)[0], num=2,
                                     rngs=nnx.Rngs(0)), parts)
    sampler = make_sampler(both, sched, **kw)
    multi = {}
    for ft in ("flat", "mean"):
        for form in ("paper", "factor_sum"):
            images = sampler(noise, tokens, jnp.asarray(gamma_rows[ft]), form)
            key = f"ft_{ft}_{form}"
            r = evaluate_variant(images, original, judge_all(images), jo, shape_ids, colour_ids, rows,
                                 others_both, [("shape", "star"), ("colour", "blue")])
            pred_s = judge_all(images)["shape"].argmax(-1)
            for c, s in (("red", "star"), ("blue", "circle"), ("green", "square")):
                i = PROMPTS.index((c, s))
                sl = slice(i * samples, (i + 1) * samples)
                r[f"{c}_{s}"] = {"star_rate": float(np.mean(pred_s[sl] == shapes.SHAPES.index("star"))),
                                 "blue_rate": float(np.mean(judge_all(images)["colour"].argmax(-1)[sl]
                                                            == shapes.COLOURS.index("blue"))),
                                 "mse_to_original": float(np.mean((images[sl] - original[sl]) ** 2))}
            multi[key] = r
            grids[f"multi_{key}"] = images
    return multi


def write_grids(workdir: str, grids: dict, samples: int, per_row: int = 8, prefix: str = "results") -> list[str]:
    """One PNG per variant (rows = prompts, ``per_row`` samples each), compare.png (original | each variant,
    4 samples per prompt), and the same images in TensorBoard (``<workdir>/tb``)."""
    per_row = min(per_row, samples)
    labels = [shapes.prompt(c, s) for c, s in PROMPTS]
    paths = []
    pick = lambda imgs, k: np.concatenate([imgs[i * samples:i * samples + k] for i in range(len(PROMPTS))])  # noqa
    for name, imgs in grids.items():
        paths.append(shapes.save_grid(os.path.join(workdir, f"{prefix}_grid_{name}.png"), pick(imgs, per_row), per_row,
                                      labels=labels))
    k = min(4, samples)
    cols = [pick(grids[n], k).reshape(len(PROMPTS), k, *grids[n].shape[1:]) for n in grids]
    canvas = np.concatenate(cols, axis=1).reshape(-1, *grids["original"].shape[1:])
    paths.append(shapes.save_grid(os.path.join(workdir, f"{prefix}_compare.png"), canvas, k * len(grids), labels=labels))
    try:
        from tensorboardX import SummaryWriter
        import matplotlib.image as mpimg
        writer = SummaryWriter(os.path.join(workdir, "tb"))
        for p in paths:
            writer.add_image(os.path.basename(p)[:-4], mpimg.imread(p)[..., :3], 0, dataformats="HWC")
        writer.close()
    except ImportError:                                   # TensorBoard is optional; the PNGs are the record
        pass
    return paths


def main(argv):
    del argv
    wd = FLAGS.workdir
    if not wd:
        raise app.UsageError("--workdir is required")
    os.makedirs(wd, exist_ok=True)
    # the SPM runs and samplers of one structure share compiled programs (minutes each on 2 loaded cores)
    jax.config.update("jax_compilation_cache_dir", os.path.join(wd, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    la_values = [float(x) for x in FLAGS.la.split(",") if x]
    if not la_values:
        raise app.UsageError("--la needs at least one value")
    dit = FLAGS.dit_workdir or os.path.join(wd, "dit")
    runs = train_all(wd, train=FLAGS.train, multi=FLAGS.multi, dit_workdir=FLAGS.dit_workdir, dit_steps=FLAGS.dit_steps, judge_steps=FLAGS.judge_steps, spm_steps=FLAGS.spm_steps,
                     spm_batch=FLAGS.spm_batch, la_values=la_values, sample_steps=FLAGS.sample_steps,
                     runlocal=FLAGS.runlocal)
    res = evaluate(wd, dit, runs, multi=FLAGS.multi, prefix=os.path.splitext(FLAGS.results)[0], la_values=la_values, samples=FLAGS.samples, sample_steps=FLAGS.sample_steps,
                   guidance=FLAGS.guidance, seed=FLAGS.seed)
    res["settings"] = {k: getattr(FLAGS, k) for k in ("dit_steps", "dit_workdir", "judge_steps", "spm_steps", "spm_batch", "la",
                                                       "samples", "sample_steps", "guidance", "seed", "runlocal", "train",
                                                       "multi")}
    with open(os.path.join(wd, FLAGS.results), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
