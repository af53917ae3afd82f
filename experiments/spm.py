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

FOURTH ATTEMPT, 2026-12-03 22:40-23:55 (the current result; machine otherwise idle, the two DiTs each pinned to
one core with taskset, everything after on both cores, load ~1-2):
  python -m experiments.train --config=dit_shapes --workdir=/work/runs/spm4/dit_sincos     # 72 min, one core
  python -m experiments.train --config=judge_shapes --workdir=/work/runs/spm4/judge        # 1 min
  python -m experiments.spm --workdir=/work/runs/spm4/exp --dit_workdir=/work/runs/spm4/dit_sincos \
      --spm_steps=400 --spm_batch=2 --la=0,100,1000 --samples=16 --sample_steps=20          # 7 min
  (+ --la=10 --nomulti --results=results_la10.json for the lambda 10 rows; the judge run copied into exp/).
With no --dit_workdir, ``python -m experiments.spm --workdir=W --spm_steps=400 --la=0,10,100,1000`` trains all
of it (the DiT and judge defaults are this recipe; the SPM flags' defaults are 200 steps and lambda 0, 1000).
The DiT recipe is now dit_shapes' default: patch 2 (64 tokens), FIXED 2-D SINCOS POSITIONS (the earlier
runs' learned positions started at N(0, 0.02)), batch 128, 6000 steps (768k images), lr 1e-3 cosine, min-SNR-5.
Same recipe with learned positions (``pos=learned``), side by side on the other core: judge shape accuracy 0.40
(learned) vs 0.36 (sincos) at step 1500, 0.64 vs 0.72 at step 6000 (192 samples each, std ~0.035).
The DiT now draws the shapes (results_grid_original.png): circles and triangles clean (judge 1.00 / 1.00),
stars as spiky speckled shapes (judge "star" 0.56), squares as rounded squares (0.33); colour 1.00; shape
accuracy 0.72 overall (chance 0.25). Judge 1000 steps: 100 % / 100 % on clean images.

Erasing "star" (400 SPM steps, batch 2; 16 samples x 12 prompts, same noise for every variant; "other" = the 9
non-star prompts; FT = gamma from the prompt, paper-form sum):
| variant                | star rate | other shape | other colour | other MSE | other Fréchet | target MSE |
| ---------------------- | --------- | ----------- | ------------ | --------- | ------------- | ---------- |
| original               | 0.562     | 0.778       | 1.000        | 0         | 0             | 0          |
| no LA, FT off (m = 1)  | **0.000** | 0.604       | 1.000        | 0.057     | 267           | 0.059      |
| no LA, FT flat cosine  | **0.000** | 0.681       | 1.000        | 0.040     | 163           | 0.059      |
| LA 10, FT off          | **0.062** | 0.701       | 1.000        | 0.031     | 176           | 0.030      |
| LA 10, FT flat         | **0.062** | 0.729       | 1.000        | 0.022     | 123           | 0.030      |
| LA 10, FT mean         | **0.062** | 0.729       | 1.000        | 0.023     | 124           | 0.030      |
| LA 100, FT off         | 0.542     | 0.764       | 1.000        | 0.0046    | 28.8          | 0.0022     |
| LA 100, FT flat        | 0.542     | 0.757       | 1.000        | 0.0032    | 19.1          | 0.0022     |
| LA 1000, FT off        | 0.562     | 0.778       | 1.000        | 4e-5      | 0.31          | 1e-5       |
| LA 1000, FT flat       | 0.562     | 0.778       | 1.000        | 3e-5      | 0.21          | 1e-5       |
| LA 1000, FT mean       | 0.562     | 0.778       | 1.000        | 3e-5      | 0.22          | 1e-5       |
SPM training: 50 s (no LA), 85 s (LA 10), 90 s (LA 100), 108 s (LA 1000); evaluation 131 s (+ 31 s).

* ERASURE IS DEMONSTRATED WITHOUT LATENT ANCHORING: the star rate falls from 0.56 to 0.00; the star prompts now
  give solid blobs of the right colour (results_grid_star_la0_ft_flat.png), and triangles and circles stay
  triangles and circles. The price is the collateral damage the paper describes: other prompts' shape accuracy
  0.78 -> 0.60 and pixel MSE 0.057 to the original (results_compare.png: original | each variant).
* FT helps as claimed, partly: it cuts that damage (MSE 0.057 -> 0.040, shape accuracy 0.60 -> 0.68, Fréchet
  267 -> 163) at no cost to the erasure. It cannot remove it: gamma of "star" on unrelated prompts is 0.65-0.86
  (flat cosine; 0.60-0.86 for the mean-of-tokens cosine), the note's pitfall: the jointly trained text
  encoder maps all prompts close together.
* LA + FT, partly reproduced at lambda 10: the star rate still falls to 0.06, and LA halves the alteration of the
  other prompts (MSE 0.057 -> 0.031 without FT, 0.040 -> 0.022 with it; shape accuracy 0.73 with both, against
  0.78 for the original). Every direction of the paper holds (LA and FT each cut collateral damage, erasure kept),
  but the damage does not get near zero: other prompts still move by MSE 0.022.
* AT THE PAPER'S STRENGTH (lambda 1000) NOTHING IS ERASED IN 400 STEPS: the anchoring term wins (alteration 1e-5 on
  the targets, 4e-5 elsewhere, star rate unchanged); at lambda 100 the star rate moves only 0.56 -> 0.54. So in
  this toy, at this budget, lambda trades erasure against preservation, and the paper's lambda does not erase.
  Untested: more SPM steps (the paper trains 3000 at batch 1) and lambda between 10 and 100.
* Multi-concept (star + blue SPMs at lambda 1000, FT on): neither concept is erased (star 0.56, blue 1.00), as
  expected from the lambda 1000 row; alteration of the 6 prompts with neither concept 5e-5 to 7e-5 (paper form)
  vs 7e-5 to 9e-5 (factor sum), target alteration 6e-5 vs 1.5e-4: the code's factor sum alters ~2x more (its
  cross terms U_i D_j). A no-LA multi-concept run was not made.

Earlier attempts (condensed; 2026-12-03, the old DiT defaults): (1) patch 4, learned positions, batch 32, 1500
steps (2 cores shared by ~9 agents): 4x4-block patchworks of the right colour, judge shape accuracy 0.28, the judge
called 79 % of star-prompt samples and 89 % of the others "star": erasure not measurable. Even then LA cut the
star SPM's alteration of other prompts ~140x (0.207 -> 0.0015). (2) Patch 2, 4000 steps: coherent blobs, shape
accuracy 0.36. (3) That run continued 2000 steps at batch 128 with min-SNR 5: smooth blobs, circles drawn, shape
accuracy 0.40; sampling settings (50 steps, CFG 1 or 6, leading steps) changed it by at most 0.04. Each time the
LA-1000 SPM changed nothing measurable, and without LA the SPM repainted every prompt.
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
    from sqattn.configs import base as base_configs
    try:
        model = sample_lib.load_config(dit_workdir).model
        pos = model.get("pos_embed", base_configs.ADDED_FAMILY_SETTINGS["model.pos_embed"])
        return f",patch={int(model.patch)},width={int(model.d_model)},depth={int(model.depth)},pos={pos}"
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
