"""Liger linearisation at small scale (papers/liger.md §7): bits/byte of linearised variants vs the teacher.

1. Teacher: a byte-level softmax-attention LM trained on the Python stdlib sources in ``--teacher_workdir``
   (default ``<workdir>/teacher``) by the trainer, with the small recipe of ``experiments.common``
   (``lm_tiny`` at d_model 64, 4 layers, 4 heads / 2 kv heads, SwiGLU, RoPE, T 128, 500 steps). A teacher
   workdir that already holds a checkpoint is loaded instead: any softmax-attention run of
   ``experiments.train`` can be linearised.
2. Each variant (liger.md §7 (a)-(f)) is a run of the one trainer (``finetune_config``), in
   ``<workdir>/runs/<variant>-<settings digest>``: ``linearize_config`` -> ``init`` transplants the teacher
   (every teacher weight is reused) -> ``peft`` LoRA rank 8 / alpha 8 on q, k, v -> ``optim.trainable`` trains
   only the adapters (plus the new gate projection of ``fresh_gate``) with AdamW lr 1e-3 (constant, no decay),
   grad clip 1, batch 8 x 128 bytes of the teacher's train text; killed, it resumes from its checkpoint like
   any run -> merge LoRA (the merged eval loss is checked against the unmerged one) -> saved as a
   run in ``<workdir>/models/<variant>`` (``experiments.sample --workdir=...`` samples from it).

   | variant      | Liger mixer config                          |
   |--------------|---------------------------------------------|
   | liger        | 0.5 GLA (gate from k, /16) + 0.5 SWA(window) |
   | no_swa       | window=0: GLA branch only                   |
   | swa_only     | recurrent=False: SWA branch only            |
   | fresh_gate   | gate from a new trainable projection        |
   | mamba2_gate  | scalar gate -softplus(mean_head(k))         |
   | no_finetune  | liger, 0 fine-tune steps                    |

3. Bits/byte on the eval split at each ``--eval_lengths`` (the same ``--eval_tokens`` at every length) for the
   teacher and every variant. At 512 the SWA window (16) covers far less of the context, which probes the
   recurrent branch; the full-attention teacher was trained at 128 and must extrapolate RoPE there.

  python -m experiments.linearize --workdir=/tmp/linearize                     # teacher + all 6 variants
  python -m experiments.linearize --workdir=/tmp/lin2 --teacher_workdir=/tmp/linearize/teacher \
      --variants=liger,swa_only --steps=100

Writes ``<workdir>/results.json`` and ``<workdir>/linearize.png`` (bpb per variant per length, teacher line),
prints a markdown table and one JSON line. A finished variant (``<workdir>/variants/<name>.json`` with the same
settings) is not run again.

Measured with the defaults (first command, from nothing: the teacher is trained first; 2 quiet CPU cores; seed
0; 5 min 26 s in all: teacher 500 steps in ~85 s, 0.21M params, bf16 compute, 2.27 bpb; each variant 300 LoRA
steps at 0.05-0.10 s/step, 28-60 s with its evals; 32,768 eval bytes per length; every merged-LoRA eval within
2.7e-4 bpb of the unmerged one):

  | model                       | bpb@128 | bpb@512 | Δ@128   | Δ@512   | trainable params |
  |-----------------------------|---------|---------|---------|---------|------------------|
  | teacher (softmax attention) | 2.2700  | 3.7015  | 0       | 0       | -                |
  | liger                       | 2.3876  | 2.3740  | +0.1176 | -1.3275 | 10240            |
  | no_swa                      | 3.4415  | 3.4379  | +1.1716 | -0.2636 | 10240            |
  | swa_only                    | 2.2806  | 2.2531  | +0.0106 | -1.4484 | 10240            |
  | fresh_gate                  | 2.3409  | 2.3111  | +0.0709 | -1.3904 | 18432            |
  | mamba2_gate                 | 2.3387  | 2.3145  | +0.0688 | -1.3870 | 10240            |
  | no_finetune                 | 3.9787  | 5.4973  | +1.7087 | +1.7958 | -                |

As liger.md §7 expects: fine-tuned Liger recovers most of the gap (no_finetune +1.71 -> +0.12 bpb at 128, 93%
of it), dropping the window branch is by far the worst fine-tuned variant (+1.17), and no fine-tuning is
worst. Unlike the paper, at this scale SWA alone beats Liger (the 0.5 GLA branch costs ~0.1 bpb) and both the
fresh gate (1.8x the trainable parameters) and the Mamba-2 scalar gate beat the key-derived GLA gate. With 100
LoRA steps instead of 300 the order is the same (liger +0.25, swa_only +0.02, fresh +0.15, mamba2 +0.13,
no_swa +1.48). The same ablation with the d 128 lm_tiny teacher at T 256 (600 steps) gave the same order too
(liger +0.10, swa_only +0.04, fresh +0.07, mamba2 +0.10). At 512 every windowed variant stays flat while the
teacher fails to extrapolate RoPE (3.70 bpb), so that column compares the variants with each other, not with
the teacher. One seed: differences of a few hundredths of a bpb are not established.

After the fine-tune moved into the trainer (same command, 2026-12-02, 26 min 37 s wall on a machine shared with
other jobs at load 5-15; teacher identical, 2.2700 / 3.7015): liger 2.3946 / 2.3771, no_swa 3.4395 / 3.4334,
swa_only 2.2809 / 2.2532, fresh_gate 2.3471 / 2.3177, mamba2_gate 2.3461 / 2.3219, no_finetune 3.9787 / 5.4973
(bpb@128 / bpb@512). Every variant is within 0.007 bpb of the table above (LoRA A now drawn from another seed, and
the trainer's AdamW skips decay on vectors; decay is 0 here) and the order is unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx


VARIANTS: dict[str, dict[str, Any]] = {
    "liger": dict(mixer={}, finetune=True),
    "no_swa": dict(mixer=dict(window=0), finetune=True),
    "swa_only": dict(mixer=dict(recurrent=False), finetune=True),
    "fresh_gate": dict(mixer=dict(gate="fresh"), finetune=True),
    "mamba2_gate": dict(mixer=dict(gate="mamba2"), finetune=True),
    "no_finetune": dict(mixer={}, finetune=False),
}
from sqattn.configs.liger import LORA_TARGETS  # noqa: E402
# Relative eval-loss difference allowed between merged and unmerged LoRA, by compute dtype.
MERGE_RTOL = {"float32": 1e-4, "bfloat16": 1e-2}
log = logging.getLogger("sqattn.linearize")


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", "/tmp/sqattn/linearize", "Output directory (results.json, linearize.png).")
    flags.DEFINE_string("teacher_workdir", "", "Teacher run directory (default <workdir>/teacher): loaded if it "
                        "holds a checkpoint (any softmax-attention LM run of experiments.train), else trained there.")
    flags.DEFINE_integer("teacher_steps", 500, "Teacher training steps (when it is trained here).")
    flags.DEFINE_integer("teacher_d_model", 64, "Teacher width (when trained here; lm_tiny recipe).")
    flags.DEFINE_integer("teacher_layers", 4, "Teacher depth (when trained here).")
    flags.DEFINE_integer("teacher_seq_len", 128, "Teacher training sequence length (when trained here).")
    flags.DEFINE_integer("steps", 300, "LoRA fine-tune steps per variant.")
    flags.DEFINE_integer("finetune_seq_len", 128, "Fine-tune sequence length (bytes per row).")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, of {list(VARIANTS)}.")
    flags.DEFINE_integer("window", 16, "SWA window of the Liger branch (tokens, current included).")
    flags.DEFINE_list("eval_lengths", ["128", "512"], "Eval sequence lengths.")
    flags.DEFINE_integer("eval_tokens", 32768, "Eval tokens per length (rows = eval_tokens // length).")
    flags.DEFINE_integer("batch_size", 8, "Fine-tune and eval batch size.")
    flags.DEFINE_float("lr", 1e-3, "Fine-tune learning rate (AdamW, constant).")
    flags.DEFINE_integer("chunk_size", 32, "Chunk size of the GLA op in the Liger mixer.")
    flags.DEFINE_integer("seed", 0, "Seed of the LoRA / fresh-gate init and of the fine-tune data order.")
    flags.DEFINE_bool("save_models", True, "Save each merged variant as a loadable run, <workdir>/models/<name> "
                      "(sqattn.sample.load_model, experiments.sample, or resume training with experiments.train).")
    flags.DEFINE_bool("progress", True, "Progress bars.")


FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------
# Teacher.
# ----------------------------------------------------------------------------------------------


def get_teacher(workdir: str, *, steps: int, d_model: int, layers: int, seq_len: int,
                progress: bool) -> tuple[nnx.Module, ml_collections.ConfigDict, dict]:
    """Loads the teacher from ``workdir``, training the small recipe there first if it holds no checkpoint."""
    from experiments import common
    cfg = common.small_lm_config(steps=steps, d_model=d_model, layers=layers, seq_len=seq_len)
    model, cfg, info = common.train_or_load(workdir, cfg, progress=progress)
    if "A" not in cfg.model.block_pattern:
        raise ValueError(f"teacher in {workdir} has block_pattern {cfg.model.block_pattern!r} without "
                         "attention ('A') layers: nothing to linearise")
    return model, cfg, info


# ----------------------------------------------------------------------------------------------
# Evaluation and fine-tuning.
# ----------------------------------------------------------------------------------------------


def eval_bpb(model: nnx.Module, data_cfg, *, seq_len: int, eval_tokens: int, batch_size: int,
             progress: bool = False, desc: str = "eval") -> float:
    """``sqattn.sample.bits_per_byte`` (kept under this name for the experiment's callers)."""
    from sqattn import sample
    return sample.bits_per_byte(model, data_cfg, seq_len=seq_len, eval_tokens=eval_tokens, batch_size=batch_size,
                                progress=progress, desc=desc)


def finetune_config(name: str, teacher_workdir: str, teacher_cfg, *, steps: int, finetune_seq_len: int,
                    window: int, batch_size: int, lr: float, chunk_size: int, seed: int):
    """The trainer config of variant ``name``'s LoRA fine-tune (``sqattn.configs.liger.config_for`` with the
    variant's mixer options)."""
    from sqattn.configs import liger
    mixer = mixer_config(name, window=window, chunk_size=chunk_size)
    cfg = liger.config_for(teacher_workdir, teacher_config=teacher_cfg, mixer=mixer, steps=steps,
                           seq_len=finetune_seq_len, batch_size=batch_size, lr=lr, seed=seed)
    cfg.name = f"linearize:{name}"
    return cfg


def base_sections():
    from sqattn.configs import base
    return base.base_config()


def finetune(cfg, run_dir: str, *, progress: bool = False) -> dict[str, Any]:
    """Runs the fine-tune ``cfg`` through the trainer in ``run_dir`` (resuming it if interrupted) and
    summarises it from ``metrics.jsonl``; a run with 0 steps trains nothing."""
    from sqattn.train import metrics as metrics_lib
    from sqattn.train import train_and_evaluate
    t0 = time.perf_counter()
    if cfg.num_steps == 0:
        return {"steps": 0, "loss_first": None, "loss_last": None, "s_per_step": None, "wall_s": 0.0,
                "run_dir": None}
    out = train_and_evaluate(cfg, run_dir, progress=progress)
    if out.get("stopped_early"):
        raise RuntimeError(f"fine-tune in {run_dir} stopped at step {out['step']}; rerun to resume it")
    recs = [r for r in metrics_lib.read_metrics(run_dir) if "loss" in r]
    losses = [r["loss"] for r in recs]
    k = max(1, min(10, len(losses) // 10))
    steady = [r["tokens_per_s"] for r in recs[1:]]
    tokens = cfg.batch_size * cfg.data.seq_len
    return {"steps": int(out["step"]), "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
            "s_per_step": tokens / float(np.median(steady)) if steady else None,
            "wall_s": time.perf_counter() - t0, "run_dir": run_dir}


# ----------------------------------------------------------------------------------------------
# One variant.
# ----------------------------------------------------------------------------------------------


def mixer_config(name: str, *, window: int, chunk_size: int) -> dict[str, Any]:
    """The Liger mixer kwargs of variant ``name``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {list(VARIANTS)}")
    cfg = dict(window=window, gate="gla", gate_temperature=16.0, recurrent=True, mix=0.5,
               chunk_size=chunk_size, impl="auto")
    cfg.update(VARIANTS[name]["mixer"])
    return cfg


def run_variant(name: str, teacher_workdir: str, teacher_cfg, *, steps: int, finetune_seq_len: int, window: int,
                eval_lengths: Sequence[int], eval_tokens: int, batch_size: int, lr: float, chunk_size: int,
                seed: int, run_dir: str, save_dir: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Linearise, transplant, LoRA fine-tune (a trainer run in ``run_dir``), merge and evaluate one variant;
    with ``save_dir``, the merged student is saved there as a loadable run (``sqattn.sample.save_model``)."""
    from sqattn import sample
    from sqattn.peft import LoRAParam, count_params, merge_lora
    from sqattn.train import state as state_lib
    t0 = time.perf_counter()
    cfg = finetune_config(name, teacher_workdir, teacher_cfg, steps=steps if VARIANTS[name]["finetune"] else 0,
                          finetune_seq_len=finetune_seq_len, window=window, batch_size=batch_size, lr=lr,
                          chunk_size=chunk_size, seed=seed)
    rec: dict[str, Any] = {"mixer": cfg.model.mixers.liger.to_dict(), "block_pattern": cfg.model.block_pattern}
    rec["finetune"] = finetune(cfg, run_dir, progress=progress)
    if rec["finetune"]["steps"]:
        student, _ = sample.load_model(run_dir)
    else:
        student = state_lib.load_init_model(cfg)              # the transplanted, adapted, untrained student
    from sqattn.models.convert import transplant
    report = transplant(sample.load_model(teacher_workdir)[0], state_lib.build_base_model(cfg))
    if report["unused_in_src"]:
        raise ValueError(f"{name}: teacher weights not used by the student: {report['unused_in_src']}")
    import re
    trainable = re.compile(cfg.optim.trainable)
    rec.update(lora_paths=sum(1 for p, _ in nnx.to_flat_state(nnx.state(student, LoRAParam))
                              if p[-1] == "lora_a"),
               new_params=report["missing_in_src"], total_params=count_params(student),
               trainable_params=int(sum(np.size(v[...]) for p, v in nnx.to_flat_state(nnx.state(student, nnx.Param))
                                        if trainable.search("/".join(map(str, p))))))
    first = eval_lengths[0]
    unmerged = eval_bpb(student, teacher_cfg.data, seq_len=first, eval_tokens=eval_tokens,
                        batch_size=batch_size, progress=progress, desc=f"{name} unmerged")
    merge_lora(student)
    bpb = {str(length): eval_bpb(student, teacher_cfg.data, seq_len=length, eval_tokens=eval_tokens,
                                 batch_size=batch_size, progress=progress, desc=name)
           for length in eval_lengths}
    rtol = MERGE_RTOL.get(teacher_cfg.model.dtype, 1e-2)
    diff = abs(bpb[str(first)] - unmerged)
    rec["merge_check"] = {"length": first, "unmerged": unmerged, "merged": bpb[str(first)], "abs_diff": diff,
                          "rtol": rtol, "ok": diff <= rtol * abs(unmerged)}
    if not rec["merge_check"]["ok"]:
        log.warning("%s: merged LoRA eval %.5f differs from unmerged %.5f", name, bpb[str(first)], unmerged)
    rec["bpb"] = bpb
    if save_dir:
        student_cfg = ml_collections.ConfigDict(cfg.to_dict())
        student_cfg.peft.method, student_cfg.optim.trainable, student_cfg.init.workdir = "", "", ""
        if os.path.isdir(save_dir):           # a stale save of other settings (its record was just recomputed)
            shutil.rmtree(save_dir)
        rec["saved_to"] = sample.save_model(save_dir, student, student_cfg)
    rec["wall_s"] = time.perf_counter() - t0
    return rec


# ----------------------------------------------------------------------------------------------
# Summary and plot.
# ----------------------------------------------------------------------------------------------


def format_table(results: dict) -> str:
    lengths = results["settings"]["eval_lengths"]
    head = ("| model | " + " | ".join(f"bpb@{n}" for n in lengths) + " | "
            + " | ".join(f"Δ@{n}" for n in lengths) + " | trainable params |")
    lines = [head, "|" + "---|" * (2 * len(lengths) + 2)]
    t = results["teacher"]["bpb"]
    lines.append("| teacher (softmax attention) | " + " | ".join(f"{t[str(n)]:.4f}" for n in lengths) + " | "
                 + " | ".join("0" for _ in lengths) + " | - |")
    for name, rec in results["variants"].items():
        bpb = rec["bpb"]
        lines.append(f"| {name} | " + " | ".join(f"{bpb[str(n)]:.4f}" for n in lengths) + " | "
                     + " | ".join(f"{bpb[str(n)] - t[str(n)]:+.4f}" for n in lengths)
                     + f" | {rec['trainable_params'] if rec['finetune']['steps'] else '- (not fine-tuned)'} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = results["settings"]["eval_lengths"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    t = results["teacher"]["bpb"]
    ax.plot(lengths, [t[str(n)] for n in lengths], "k--", marker="s", label="teacher (softmax attention)")
    for name, rec in results["variants"].items():
        ax.plot(lengths, [rec["bpb"][str(n)] for n in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_xlabel("eval sequence length (bytes)")
    ax.set_ylabel("eval bits per byte")
    ax.set_title(f"Liger linearisation (window {results['settings']['window']}, "
                 f"{results['settings']['steps']} LoRA steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------


def run(workdir: str, *, teacher_workdir: str | None = None, teacher_steps: int = 500, teacher_d_model: int = 64,
        teacher_layers: int = 4, teacher_seq_len: int = 128, steps: int = 300, finetune_seq_len: int = 128,
        variants: Sequence[str] = tuple(VARIANTS), window: int = 16, eval_lengths: Sequence[int] = (128, 512),
        eval_tokens: int = 32768, batch_size: int = 8, lr: float = 1e-3, chunk_size: int = 32, seed: int = 0,
        save_models: bool = True, progress: bool = True) -> dict[str, Any]:
    """Teacher (trained or loaded), every variant, evaluation; writes results.json and linearize.png.

    Returns:
      {"settings", "teacher" ({"bpb": {length: bpb}, ...}), "variants" ({name: record}), "table"
       ({name: {length: bpb}}, teacher included), "delta_vs_teacher", "plot", "wall_s"}.
    """
    from experiments import common
    for name in variants:
        mixer_config(name, window=window, chunk_size=chunk_size)   # unknown names fail before any work
    t0 = time.perf_counter()
    os.makedirs(os.path.join(workdir, "variants"), exist_ok=True)
    teacher_workdir = teacher_workdir or os.path.join(workdir, "teacher")
    eval_lengths = [int(n) for n in eval_lengths]
    teacher, tcfg, tinfo = get_teacher(teacher_workdir, steps=teacher_steps, d_model=teacher_d_model,
                                       layers=teacher_layers, seq_len=teacher_seq_len, progress=progress)
    settings = dict(teacher_workdir=teacher_workdir, teacher_steps=tinfo["steps"],
                    teacher_seq_len=tinfo["seq_len"], teacher_d_model=tinfo["d_model"],
                    teacher_layers=tinfo["num_layers"], steps=steps, finetune_seq_len=finetune_seq_len,
                    variants=list(variants), window=window, eval_lengths=eval_lengths, eval_tokens=eval_tokens,
                    batch_size=batch_size, lr=lr, chunk_size=chunk_size, seed=seed,
                    lora=dict(targets=list(LORA_TARGETS), rank=8, alpha=8.0))
    tinfo["bpb"] = {str(n): eval_bpb(teacher, tcfg.data, seq_len=n, eval_tokens=eval_tokens,
                                     batch_size=batch_size, progress=progress, desc="teacher")
                    for n in eval_lengths}
    results: dict[str, Any] = {"settings": settings, "teacher": tinfo, "variants": {}}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(variants), desc="variants", unit="variant", dynamic_ncols=True)
    key = {k: v for k, v in settings.items() if k != "variants"}
    try:
        for name in variants:
            model_dir = os.path.join(workdir, "models", name) if save_models else None
            rec, _ = common.cached_record(
                os.path.join(workdir, "variants", f"{name}.json"), key,
                lambda: run_variant(name, teacher_workdir, tcfg, steps=steps, finetune_seq_len=finetune_seq_len,
                                    window=window, eval_lengths=eval_lengths, eval_tokens=eval_tokens,
                                    batch_size=batch_size, lr=lr, chunk_size=chunk_size, seed=seed,
                                    run_dir=os.path.join(workdir, "runs", f"{name}-{common.digest(key)}"),
                                    save_dir=model_dir,
                                    progress=progress))
            results["variants"][name] = rec
            if bar is not None:
                bar.update(1)
                bar.write(f"{name}: " + ", ".join(f"bpb@{n}={rec['bpb'][str(n)]:.4f}" for n in eval_lengths))
    finally:
        if bar is not None:
            bar.close()
    t = tinfo["bpb"]
    results["table"] = {"teacher": t, **{n: r["bpb"] for n, r in results["variants"].items()}}
    results["delta_vs_teacher"] = {n: {k: v - t[k] for k, v in r["bpb"].items()}
                                   for n, r in results["variants"].items()}
    results["plot"] = plot(results, os.path.join(workdir, "linearize.png"))
    results["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def main(argv):
    del argv
    from experiments import common
    common.quiet_logging()
    out = run(FLAGS.workdir, teacher_workdir=FLAGS.teacher_workdir or None, teacher_steps=FLAGS.teacher_steps,
              teacher_d_model=FLAGS.teacher_d_model, teacher_layers=FLAGS.teacher_layers,
              teacher_seq_len=FLAGS.teacher_seq_len, steps=FLAGS.steps, finetune_seq_len=FLAGS.finetune_seq_len,
              variants=FLAGS.variants, window=FLAGS.window, eval_lengths=[int(n) for n in FLAGS.eval_lengths],
              eval_tokens=FLAGS.eval_tokens, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
              chunk_size=FLAGS.chunk_size, seed=FLAGS.seed, save_models=FLAGS.save_models,
              progress=FLAGS.progress)
    print(format_table(out))
    print(json.dumps({k: v for k, v in out.items() if k != "variants"}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
