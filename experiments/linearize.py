"""Liger linearisation at small scale (papers/liger.md §7): bits/byte of linearised variants vs the teacher.

1. Teacher: a byte-level softmax-attention LM (``lm_tiny``: 4 layers, d_model 128, 4 heads / 2 kv heads,
   SwiGLU, RoPE) trained on the Python stdlib sources in ``--teacher_workdir`` (default ``<workdir>/teacher``)
   by ``train_and_evaluate``; a teacher workdir that already holds a checkpoint is loaded instead.
2. Each variant (liger.md §7 (a)-(f)): ``linearize_config`` -> build -> ``transplant`` the teacher (every
   teacher weight is reused) -> LoRA rank 8 / alpha 8 on q, k, v -> fine-tune only the adapters (plus the new
   gate projection of ``fresh_gate``) with AdamW lr 1e-3 (no decay), grad clip 1, batch 8 on the teacher's
   train text -> merge LoRA (the merged eval loss is checked against the unmerged one).

   | variant      | Liger mixer config                          |
   |--------------|---------------------------------------------|
   | liger        | 0.5 GLA (gate from k, /16) + 0.5 SWA(window) |
   | no_swa       | window=0: GLA branch only                   |
   | swa_only     | recurrent=False: SWA branch only            |
   | fresh_gate   | gate from a new trainable projection        |
   | mamba2_gate  | scalar gate -softplus(mean_head(k))         |
   | no_finetune  | liger, 0 fine-tune steps                    |

3. Bits/byte on the eval split at each ``--eval_lengths`` (the same ``--eval_tokens`` at every length) for the
   teacher and every variant. At 1024 the SWA window (16) covers far less context, which probes the recurrent
   branch; the full-attention teacher was trained at 256 and must extrapolate RoPE there.

  python -m experiments.linearize --workdir=/tmp/linearize                     # teacher + all 6 variants
  python -m experiments.linearize --workdir=/tmp/lin2 --teacher_workdir=/tmp/linearize/teacher \
      --variants=liger,swa_only --steps=100

Writes ``<workdir>/results.json`` and ``<workdir>/linearize.png`` (bpb per variant per length, teacher line),
prints a markdown table and one JSON line. A finished variant (``<workdir>/variants/<name>.json`` with the same
settings) is not run again.

Measured with the defaults (first command; 2 CPU cores shared with other jobs, load average ~7; seed 0; teacher
600 steps x 16 x 256 bytes in 23 min, 0.84M params, bf16 compute; 300 LoRA steps per variant in 4-14 min;
65,536 eval bytes per length; every merged-LoRA eval within 1.5e-4 bpb of the unmerged one):

  | model                       | bpb@256 | bpb@1024 | Δ@256   | Δ@1024  | trainable params |
  |-----------------------------|---------|----------|---------|---------|------------------|
  | teacher (softmax attention) | 1.8171  | 3.4109   | 0       | 0       | -                |
  | liger                       | 1.9219  | 1.9024   | +0.1048 | -1.5085 | 20480            |
  | no_swa                      | 3.3009  | 3.2846   | +1.4838 | -0.1263 | 20480            |
  | swa_only                    | 1.8603  | 1.8425   | +0.0432 | -1.5684 | 20480            |
  | fresh_gate                  | 1.8914  | 1.8717   | +0.0743 | -1.5392 | 53248            |
  | mamba2_gate                 | 1.9149  | 1.8975   | +0.0978 | -1.5134 | 20480            |
  | no_finetune                 | 2.8845  | 5.3611   | +1.0674 | +1.9502 | 20480            |

As liger.md §7 expects: fine-tuned Liger recovers most of the gap (no_finetune +1.07 -> +0.10 bpb at 256),
dropping SWA is far worse (+1.48), and no fine-tuning is worst. Unlike the paper, at this scale and budget
SWA alone beats Liger at both lengths (the 0.5 GLA branch costs ~0.06 bpb) and the fresh gate (2.6x the
trainable parameters) beats the key-derived gate; the Mamba-2 scalar gate is on par with GLA's. At 1024 every
windowed variant stays flat while the teacher, trained at 256, fails to extrapolate RoPE (3.41 bpb), so the
1024 column compares the variants with each other, not with the teacher. One seed and no repeat, so the noise
level is unknown: differences of a few hundredths of a bpb are not established.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags
from flax import nnx

from sqattn.train.tasks import weighted_cross_entropy

VARIANTS: dict[str, dict[str, Any]] = {
    "liger": dict(mixer={}, finetune=True),
    "no_swa": dict(mixer=dict(window=0), finetune=True),
    "swa_only": dict(mixer=dict(recurrent=False), finetune=True),
    "fresh_gate": dict(mixer=dict(gate="fresh"), finetune=True),
    "mamba2_gate": dict(mixer=dict(gate="mamba2"), finetune=True),
    "no_finetune": dict(mixer={}, finetune=False),
}
LORA_TARGETS = ("q", "k", "v")
# Relative eval-loss difference allowed between merged and unmerged LoRA, by compute dtype.
MERGE_RTOL = {"float32": 1e-4, "bfloat16": 1e-2}
log = logging.getLogger("sqattn.linearize")


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", "/tmp/sqattn/linearize", "Output directory (results.json, linearize.png).")
    flags.DEFINE_string("teacher_workdir", "", "Teacher run directory (default <workdir>/teacher); trained there "
                        "if it holds no checkpoint, else loaded.")
    flags.DEFINE_string("teacher_config", "lm_tiny", "Registered config of the teacher (NAME[:arg]).")
    flags.DEFINE_integer("teacher_steps", 600, "Teacher training steps (when it is trained here).")
    flags.DEFINE_integer("teacher_seq_len", 256, "Teacher training sequence length (when trained here).")
    flags.DEFINE_integer("steps", 300, "LoRA fine-tune steps per variant.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, of {list(VARIANTS)}.")
    flags.DEFINE_integer("window", 16, "SWA window of the Liger branch (tokens, current included).")
    flags.DEFINE_list("eval_lengths", ["256", "1024"], "Eval sequence lengths.")
    flags.DEFINE_integer("eval_tokens", 65536, "Eval tokens per length (rows = eval_tokens // length).")
    flags.DEFINE_integer("batch_size", 8, "Fine-tune and eval batch size.")
    flags.DEFINE_float("lr", 1e-3, "Fine-tune learning rate (AdamW, constant).")
    flags.DEFINE_integer("chunk_size", 64, "Chunk size of the GLA op in the Liger mixer.")
    flags.DEFINE_integer("seed", 0, "Seed of the LoRA / fresh-gate init and of the fine-tune data order.")
    flags.DEFINE_bool("progress", True, "Progress bars.")


FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------
# Teacher.
# ----------------------------------------------------------------------------------------------


def _has_checkpoint(workdir: str) -> bool:
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def teacher_config(name: str, steps: int, seq_len: int) -> ml_collections.ConfigDict:
    """``name`` with the teacher overrides: ``num_steps=steps``, ``data.seq_len=seq_len``."""
    from sqattn import configs
    cfg = configs.get(name)
    cfg.num_steps = steps
    cfg.data.seq_len = seq_len
    cfg.eval_every = 0
    cfg.checkpoint_every = max(steps, 1)
    return cfg


def get_teacher(workdir: str, *, config_name: str, steps: int, seq_len: int,
                progress: bool) -> tuple[nnx.Module, ml_collections.ConfigDict, dict]:
    """Loads the teacher from ``workdir``, training it there first if it holds no checkpoint."""
    from sqattn import sample
    from sqattn.train import train_and_evaluate
    info: dict[str, Any] = {"workdir": workdir, "trained_here": False}
    if not _has_checkpoint(workdir):
        cfg = teacher_config(config_name, steps, seq_len)
        t0 = time.perf_counter()
        out = train_and_evaluate(cfg, workdir, progress=progress)
        info.update(trained_here=True, train_wall_s=time.perf_counter() - t0, config=config_name,
                    train_loss=float(out["loss"]))
    model, cfg = sample.load_model(workdir)
    if "A" not in cfg.model.block_pattern:
        raise ValueError(f"teacher in {workdir} has block_pattern {cfg.model.block_pattern!r} without "
                         "attention ('A') layers: nothing to linearise")
    info.update(steps=int(cfg.num_steps), seq_len=int(cfg.data.seq_len), dtype=cfg.model.dtype)
    return model, cfg, info


# ----------------------------------------------------------------------------------------------
# Evaluation and fine-tuning.
# ----------------------------------------------------------------------------------------------


@nnx.jit
def _eval_batch(model, inputs, targets, weights):
    """(sum of next-byte NLL in nats, sum of weights) of one batch."""
    logits, _ = model(inputs)
    nll, weight, _ = weighted_cross_entropy(logits, targets, weights)
    return nll, weight


def eval_bpb(model: nnx.Module, data_cfg, *, seq_len: int, eval_tokens: int, batch_size: int,
             progress: bool = False, desc: str = "eval") -> float:
    """Bits per byte of ``model`` over the first ``eval_tokens // seq_len`` eval windows of length ``seq_len``."""
    from sqattn import data
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.seq_len = seq_len
    ds = data.make_dataset(cfg, batch_size=batch_size, split="eval")
    n = max(1, eval_tokens // (seq_len * batch_size))
    if ds.num_batches is not None:
        n = min(n, ds.num_batches)
    nll = weight = 0.0
    it = range(n)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"{desc} @{seq_len}", unit="batch", leave=False, dynamic_ncols=True)
    for i in it:
        b = ds.batch(i)
        s, w = _eval_batch(model, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]), jnp.asarray(b["weights"]))
        nll, weight = nll + float(s), weight + float(w)
    return nll / max(weight, 1.0) / math.log(2.0)


def _fresh_gate_filter(path, _):
    """The Liger mixer's fresh gate projection ``blocks/<i>/mixer/gate/kernel``."""
    return len(path) >= 3 and path[-3] == "mixer" and path[-2] == "gate"


def finetune(model: nnx.Module, data_cfg, wrt, *, steps: int, batch_size: int, lr: float, seed: int,
             progress: bool = False, desc: str = "finetune") -> dict[str, Any]:
    """Trains the variables selected by ``wrt`` with AdamW (no decay, clip 1.0) on next-byte cross-entropy."""
    from sqattn import data
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.seed = int(cfg.get("seed", 0)) + 1000 + seed   # another draw of train windows than the teacher's
    ds = data.make_dataset(cfg, batch_size=batch_size, split="train")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    opt = nnx.Optimizer(model, tx, wrt=wrt)

    @nnx.jit
    def train_step(model, opt, inputs, targets, weights):
        def loss_fn(m):
            logits, _ = m(inputs)
            nll, w, _ = weighted_cross_entropy(logits, targets, weights)
            return nll / jnp.maximum(w, 1.0)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return loss

    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    t_first = None
    try:
        for step in range(steps):
            b = ds.batch(step)
            loss = train_step(model, opt, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]),
                              jnp.asarray(b["weights"]))
            losses.append(float(loss))
            if step == 0:
                t_first = time.perf_counter()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
    steady = (time.perf_counter() - t_first) / (steps - 1) if steps > 1 else None
    k = max(1, min(10, steps // 10)) if steps else 0
    return {"steps": steps, "loss_first": sum(losses[:k]) / k if k else None,
            "loss_last": sum(losses[-k:]) / k if k else None, "s_per_step": steady,
            "wall_s": time.perf_counter() - t0}


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


def run_variant(name: str, teacher: nnx.Module, teacher_cfg, *, steps: int, window: int,
                eval_lengths: Sequence[int], eval_tokens: int, batch_size: int, lr: float, chunk_size: int,
                seed: int, progress: bool) -> dict[str, Any]:
    """Linearise, transplant, LoRA fine-tune, merge and evaluate one variant."""
    from sqattn import models
    from sqattn.models.convert import linearize_config, transplant
    from sqattn.peft import LoRAParam, apply_lora, count_params, merge_lora
    t0 = time.perf_counter()
    mixer = mixer_config(name, window=window, chunk_size=chunk_size)
    model_cfg = linearize_config(teacher_cfg.model, mixer_cfg=mixer)
    student = models.build("lm", model_cfg, nnx.Rngs(params=seed))
    report = transplant(teacher, student)
    if report["unused_in_src"]:
        raise ValueError(f"{name}: teacher weights not used by the student: {report['unused_in_src']}")
    wrapped = apply_lora(student, LORA_TARGETS, rank=8, alpha=8.0, rngs=nnx.Rngs(params=seed + 1))
    wrt = nnx.Any(LoRAParam, _fresh_gate_filter) if mixer["gate"] == "fresh" else LoRAParam
    rec: dict[str, Any] = {
        "mixer": mixer, "block_pattern": model_cfg.block_pattern, "lora_paths": len(wrapped),
        "new_params": report["missing_in_src"], "total_params": count_params(student),
        "trainable_params": count_params(student, wrt)}
    n_steps = steps if VARIANTS[name]["finetune"] else 0
    rec["finetune"] = finetune(student, teacher_cfg.data, wrt, steps=n_steps, batch_size=batch_size, lr=lr,
                               seed=seed, progress=progress, desc=name)
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
                     + f" | {rec['trainable_params']} |")
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


def run(workdir: str, *, teacher_workdir: str | None = None, teacher_config_name: str = "lm_tiny",
        teacher_steps: int = 600, teacher_seq_len: int = 256, steps: int = 300,
        variants: Sequence[str] = tuple(VARIANTS), window: int = 16, eval_lengths: Sequence[int] = (256, 1024),
        eval_tokens: int = 65536, batch_size: int = 8, lr: float = 1e-3, chunk_size: int = 64, seed: int = 0,
        progress: bool = True) -> dict[str, Any]:
    """Teacher (trained or loaded), every variant, evaluation; writes results.json and linearize.png.

    Returns:
      {"settings", "teacher" ({"bpb": {length: bpb}, ...}), "variants" ({name: record}), "table"
       ({name: {length: bpb}}, teacher included), "delta_vs_teacher", "plot"}.
    """
    for name in variants:
        mixer_config(name, window=window, chunk_size=chunk_size)   # unknown names fail before any work
    os.makedirs(os.path.join(workdir, "variants"), exist_ok=True)
    teacher_workdir = teacher_workdir or os.path.join(workdir, "teacher")
    eval_lengths = [int(n) for n in eval_lengths]
    teacher, tcfg, tinfo = get_teacher(teacher_workdir, config_name=teacher_config_name, steps=teacher_steps,
                                       seq_len=teacher_seq_len, progress=progress)
    settings = dict(teacher_workdir=teacher_workdir, teacher_steps=tinfo["steps"],
                    teacher_seq_len=tinfo["seq_len"], steps=steps, variants=list(variants), window=window,
                    eval_lengths=eval_lengths, eval_tokens=eval_tokens, batch_size=batch_size, lr=lr,
                    chunk_size=chunk_size, seed=seed, lora=dict(targets=list(LORA_TARGETS), rank=8, alpha=8.0))
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
            cache = os.path.join(workdir, "variants", f"{name}.json")
            rec = None
            if os.path.exists(cache):
                with open(cache) as f:
                    saved = json.load(f)
                rec = saved["record"] if saved.get("settings") == key else None
            if rec is None:
                rec = run_variant(name, teacher, tcfg, steps=steps, window=window, eval_lengths=eval_lengths,
                                  eval_tokens=eval_tokens, batch_size=batch_size, lr=lr, chunk_size=chunk_size,
                                  seed=seed, progress=progress)
                with open(cache, "w") as f:
                    json.dump({"settings": key, "record": rec}, f, indent=2)
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
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def main(argv):
    del argv
    logging.getLogger("sqattn").setLevel(logging.WARNING)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    out = run(FLAGS.workdir, teacher_workdir=FLAGS.teacher_workdir or None, teacher_config_name=FLAGS.teacher_config,
              teacher_steps=FLAGS.teacher_steps, teacher_seq_len=FLAGS.teacher_seq_len, steps=FLAGS.steps,
              variants=FLAGS.variants, window=FLAGS.window, eval_lengths=[int(n) for n in FLAGS.eval_lengths],
              eval_tokens=FLAGS.eval_tokens, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
              chunk_size=FLAGS.chunk_size, seed=FLAGS.seed, progress=FLAGS.progress)
    print(format_table(out))
    print(json.dumps({k: v for k, v in out.items() if k != "variants"}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
