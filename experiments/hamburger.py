"""HAMburger small-scale reproduction (papers/hamburger.md, "Small-scale reproduction").

Pipeline: a byte-level base LM (``lm_tiny`` shrunk to ``--base_d_model``/``--base_layers``; trained in
``--base_workdir`` unless it already holds a checkpoint) -> entropies of the frozen base on held-in text ->
``decreasing_v2`` segmentation (mean group size = oracle KV compression) -> graft the compositional embedder,
micro-step decoder and stop head, fine-tune all weights (AdamW, lr 5e-4 base / 1e-3 grafted, cosine, clip 1)
with CE + 0.5 BCE(stop): a run of the one trainer (the registered config ``hamburger:base=<base run>``, in
``<workdir>/runs/finetune-<settings digest>``; killed, it resumes; finished, it is reused) -> evaluate on
held-out text:
  (a) teacher-forced NLL per response token (oracle segmentation) vs the frozen base's NLL on the same tokens;
  (b) per-micro-step accuracy, next to the base's accuracy on the tokens at the same micro index;
  (c) greedy generation from ``--num_prompts`` prompts at each confidence c: KV compression (tokens / macro
      steps = base forwards), agreement with the frozen base's greedy continuation (position-wise and common
      prefix), the rate at which an emitted token is the frozen base's argmax given the emitted prefix, and the
      frozen base's NLL of the emitted text. The fine-tuned base's own greedy decoding (c = 1, one token per
      macro step) is reported as a reference row.

  python -m experiments.hamburger --workdir=/tmp/hamburger
  python -m experiments.hamburger --workdir=/tmp/ham_smoke --base_steps=20 --steps=20 --num_prompts=4

Writes ``<workdir>/results.json`` (with two decoded samples per row) and ``<workdir>/hamburger.png``; prints
the table and one JSON line. Wall-clock speed is not meaningful at this size (the grafted modules dominate);
base forwards per token is the metric.

Measured with the defaults (first command, from nothing; 2 quiet CPU cores; seed 0; 6 min 12 s in all: base
d 64 x 4 blocks, 0.21M params, bf16, 500 steps in 81 s to 2.16 bits/byte; 300 fine-tuning steps in 132 s;
grafted embedder 21K + micro decoder 62K params; generation 69 s for 48 prompts of 32 bytes, 96 new bytes each,
all prompts decoded at once; teacher-forced eval and reading real text ~85 s). Oracle compression (decreasing_v2 mean group
size) 1.24 on train text, 1.29 on eval text. Teacher-forced on held-out text: HAMburger 1.447 nats/byte vs the
frozen base's 1.461 on the same tokens (fine-tuning is also 300 more LM steps for the base); micro-step
accuracy 0.51 / 0.97 / 0.99 / 1.00 vs the frozen base's 0.50 / 0.98 / 0.99 / 1.00 on the same tokens; stop
accuracy 0.92.

Greedy generation ("spaces" = share of space bytes in the output):

  | c               | KV compression | base fwd/token | agreement | common prefix | base-argmax | base NLL | spaces |
  |-----------------|----------------|----------------|-----------|---------------|-------------|----------|--------|
  | frozen base     | 1.00           | 1.00           | 1.000     | 1.000         | 0.999       | 0.560    | 0.54   |
  | fine-tuned base | 1.00           | 1.00           | 0.504     | 0.316         | 0.953       | 0.533    | 0.54   |
  | 0.1             | 2.49           | 0.475          | 0.565     | 0.226         | 0.960       | 0.400    | 0.77   |
  | 0.2             | 1.29           | 0.833          | 0.553     | 0.283         | 0.955       | 0.447    | 0.67   |
  | 0.3             | 1.09           | 0.923          | 0.472     | 0.284         | 0.950       | 0.556    | 0.51   |
  | 0.5             | 1.07           | 0.933          | 0.483     | 0.303         | 0.952       | 0.541    | 0.53   |
  | 0.7             | 1.04           | 0.964          | 0.491     | 0.303         | 0.952       | 0.540    | 0.53   |
  | 0.9             | 1.00           | 0.999          | 0.494     | 0.302         | 0.952       | 0.540    | 0.53   |

Greedy decoding of a base this small degenerates into runs of spaces (54% of the frozen base's own output;
the held-out text has 22%), and low c compresses exactly those runs, so the generation table overstates
what HAMburger saves on real text. Reading the real held-out continuations instead (``HAMburger.read_batch``:
the given tokens are emitted, the stop head ends each macro step; 4,608 tokens):

  | c               | KV compression | base fwd/token | argmax accuracy on the text |
  |-----------------|----------------|----------------|-----------------------------|
  | frozen base     | 1.00           | 1.00           | 0.560                       |
  | fine-tuned base | 1.00           | 1.00           | 0.578                       |
  | 0.1             | 1.59           | 0.649          | 0.440                       |
  | 0.2             | 1.31           | 0.773          | 0.506                       |
  | 0.3             | 1.24           | 0.816          | 0.533                       |
  | 0.5             | 1.18           | 0.855          | 0.549                       |
  | 0.7             | 1.11           | 0.905          | 0.563                       |
  | 0.9             | 1.00           | 0.998          | 0.578                       |

(KV compression is the per-prompt mean of tokens / macro steps, as in the paper; base fwd/token is the pooled
ratio.) As hamburger.md expects, compression trades off with c, monotonically in both tables. On real text,
compression passes 1.3 at c = 0.2 (1.31, the oracle's 1.29) for 0.07 argmax accuracy (0.578 -> 0.506), and
c = 0.5 gives 1.18 for 0.03. Teacher-forced NLL on the oracle segmentation does not rise (1.447 vs 1.461),
micro step 0 is as accurate as the base, and later micro steps are near-deterministic. Agreement with the
frozen base's greedy text is capped near 0.5 by the base weights' drift during fine-tuning, which the
fine-tuned base row measures. Single seed.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from experiments import common
from sqattn.models.hamburger_task import make_base_stats, segment_rows  # noqa: F401 (re-exported)

FLAGS = flags.FLAGS

RESULT_KEYS = ("settings", "base", "oracle_compression", "finetune", "teacher_forced", "generation",
               "reference", "reading", "plot", "wall_s")
SPACE = 32      # byte of " ": the share of spaces in the output flags degenerate (whitespace-run) text


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", "/tmp/sqattn/hamburger", "Output directory (results.json, hamburger.png).")
    flags.DEFINE_string("base_workdir", "", "Base LM run directory; '' = <workdir>/base. Trained there unless it "
                        "holds a checkpoint.")
    flags.DEFINE_integer("base_steps", 500, "Training steps of the base LM (when it is trained here).")
    flags.DEFINE_integer("base_d_model", 64, "Base LM width (lm_tiny override).")
    flags.DEFINE_integer("base_layers", 4, "Base LM depth (lm_tiny override).")
    flags.DEFINE_integer("seq_len", 128, "Bytes per text row (base training and fine-tuning).")
    flags.DEFINE_integer("batch_size", 16, "Rows per step (base training and fine-tuning).")
    flags.DEFINE_integer("steps", 300, "Fine-tuning steps of the HAMburger model.")
    flags.DEFINE_integer("train_prompt_len", 16, "Unmerged prompt bytes per fine-tuning row (the rest is response).")
    flags.DEFINE_integer("s_max", 4, "Most tokens per macro step.")
    flags.DEFINE_integer("micro_layers", 1, "Layers of the micro-step decoder.")
    flags.DEFINE_list("confidences", ["0.1", "0.2", "0.3", "0.5", "0.7", "0.9"], "Confidence levels c of generation.")
    flags.DEFINE_integer("num_prompts", 48, "Generation prompts (held-out text).")
    flags.DEFINE_integer("prompt_len", 32, "Bytes per generation prompt.")
    flags.DEFINE_integer("new_tokens", 96, "Bytes generated per prompt.")
    flags.DEFINE_integer("eval_batches", 8, "Held-out batches for the teacher-forced evaluation.")
    flags.DEFINE_integer("seed", 0, "Seed of the grafted modules and the fine-tuning data stream.")
    flags.DEFINE_bool("progress", True, "Progress bars.")


# ----------------------------------------------------------------------------------------------- helpers
def micro_index(lens: Sequence[int]) -> np.ndarray:
    """Index of each response token within its group: [2, 1, 3] -> [0, 1, 0, 0, 1, 2]."""
    return np.concatenate([np.arange(s) for s in lens]) if len(lens) else np.zeros((0,), int)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- pipeline
def finetune(base_workdir: str, run_dir: str, *, steps: int, batch_size: int, seq_len: int, prompt_len: int,
             s_max: int, micro_layers: int, seed: int, progress: bool = True):
    """Fine-tunes a HAMburger grafted onto the LM run in ``base_workdir``: a run of the one trainer in
    ``run_dir`` (``configs.hamburger.config_for``; resumed if it was interrupted, reused if finished).

    Returns:
      (trained ham, {"curve": loss records, "compile_s", "run_dir"}, oracle compression = response tokens /
      groups of the segmented fine-tuning text).
    """
    from sqattn import sample
    from sqattn.configs import hamburger as ham_configs
    from sqattn.models.hamburger_task import HAMburgerTask
    from sqattn.train import metrics as metrics_lib
    from sqattn.train import train_and_evaluate
    cfg = ham_configs.config_for(base_workdir, steps=steps, batch_size=batch_size, s_max=s_max,
                                 micro_layers=micro_layers, prompt_len=prompt_len, seed=seed)
    cfg.data.seq_len = seq_len
    out = train_and_evaluate(cfg, run_dir, progress=progress)
    if out.get("stopped_early"):
        raise RuntimeError(f"fine-tune in {run_dir} stopped at step {out['step']}; rerun to resume it")
    curve = [{k: r[k] for k in ("step", "loss", "ce", "bce", "accuracy")}
             for r in metrics_lib.read_metrics(run_dir) if "loss" in r]
    ham, _ = sample.load_model(run_dir)
    train_ds, _ = HAMburgerTask().make_datasets(cfg)
    oracle = train_ds.oracle_compression([cfg.data_offset + i for i in range(steps)])
    return ham, {"curve": curve, "compile_s": out.get("compile_s"), "run_dir": run_dir}, oracle


def teacher_forced_eval(ham, base_stats, eval_ds, *, batches: int, prompt_len: int) -> dict[str, Any]:
    """HAMburger NLL / per-micro-step accuracy on held-out text (oracle segmentation) vs the frozen base."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from sqattn.models import hamburger as hb
    graphdef, params = nnx.split(ham)
    s = ham.s_max
    loss_fn = jax.jit(lambda p, b: nnx.merge(graphdef, p).loss(b)[1])
    sums = dict(ce=0.0, weight=0.0, stop=0.0, groups=0)
    step_correct, step_w = np.zeros(s), np.zeros(s)
    base_nll, base_correct_step, base_w_step = 0.0, np.zeros(s), np.zeros(s)
    for i in range(batches):
        toks = eval_ds.batch(i)["inputs"]
        entropy, nll, correct = base_stats(toks)
        lens = segment_rows(entropy, prompt_len, s)
        batch = {k: jnp.asarray(v) for k, v in hb.layout_batch(toks, prompt_len, lens, s_max=s).items()}
        m = jax.device_get(loss_fn(params, batch))
        w = float(m["weight"])
        sums["ce"] += float(m["ce"]) * w
        sums["stop"] += float(m["stop_accuracy"]) * w
        sums["weight"] += w
        sums["groups"] += sum(len(x) for x in lens)
        step_correct += np.asarray(m["step_accuracy"]) * np.asarray(m["step_weight"])
        step_w += np.asarray(m["step_weight"])
        base_nll += float(nll[:, prompt_len - 1:].sum())
        for row, g in enumerate(lens):                   # base accuracy on the tokens at each micro index
            idx = micro_index(g)
            c = correct[row, prompt_len - 1:]
            for j in range(s):
                base_correct_step[j] += c[idx == j].sum()
                base_w_step[j] += (idx == j).sum()
    w = max(sums["weight"], 1.0)
    return {
        "tokens": int(sums["weight"]),
        "ham_nll": sums["ce"] / w, "base_nll": base_nll / w,
        "ham_bits_per_byte": sums["ce"] / w / math.log(2), "base_bits_per_byte": base_nll / w / math.log(2),
        "ham_step_accuracy": (step_correct / np.maximum(step_w, 1)).tolist(),
        "base_step_accuracy": (base_correct_step / np.maximum(base_w_step, 1)).tolist(),
        "step_tokens": step_w.astype(int).tolist(),
        "stop_accuracy": sums["stop"] / w,
        "oracle_compression": sums["weight"] / max(sums["groups"], 1),
    }


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if diff.size else int(a.size)


def score_continuations(base_stats, prompts: np.ndarray, conts: np.ndarray, reference: np.ndarray) -> dict:
    """Agreement of ``conts [k, m]`` with ``reference [k, m]`` and the frozen base's view of ``conts``."""
    _, nll, correct = base_stats(np.concatenate([prompts, conts], axis=1))
    p = prompts.shape[1]
    return {
        "agreement": float(np.mean(conts == reference)),
        "prefix_agreement": float(np.mean([_common_prefix(c, r) for c, r in zip(conts, reference)])
                                  / conts.shape[1]),
        "base_argmax_rate": float(np.mean(correct[:, p - 1:])),
        "base_nll": float(np.mean(nll[:, p - 1:])),
    }


def _texts(prompts: np.ndarray, conts: np.ndarray, k: int = 2) -> list[str]:
    """The first ``k`` prompts with their continuations, as text (the base LMs here are byte-level)."""
    from sqattn import sample
    return [sample.decode(np.concatenate([p, c])) for p, c in zip(prompts[:k], conts[:k])]


def generation_eval(ham, frozen_base, base_stats, prompts: np.ndarray, *, new_tokens: int,
                    confidences: Sequence[float], progress: bool = True) -> tuple[list[dict], dict]:
    """Greedy generation at each confidence; returns (rows per c, reference rows)."""
    from sqattn import sample
    base_greedy = sample.generate(frozen_base, prompts, new_tokens)          # [k, m]
    tuned_greedy = sample.generate(ham.base, prompts, new_tokens)
    reference = {
        "frozen_base": {"kv_compression": 1.0, **score_continuations(base_stats, prompts, base_greedy, base_greedy),
                        "space_fraction": float(np.mean(base_greedy == SPACE)),
                        "samples": _texts(prompts, base_greedy)},
        "finetuned_base": {"kv_compression": 1.0,
                           **score_continuations(base_stats, prompts, tuned_greedy, base_greedy),
                           "space_fraction": float(np.mean(tuned_greedy == SPACE)),
                           "samples": _texts(prompts, tuned_greedy)},
    }
    rows = []
    bar = _progress(len(confidences), "generate", progress)
    for c in confidences:
        outs_a, macros_a = ham.generate_batch(prompts, new_tokens, confidence=float(c))   # all prompts at once
        if bar is not None:
            bar.update(1)
        rows.append({
            "confidence": float(c),
            "kv_compression": float(np.mean(new_tokens / macros_a)),      # per-prompt average (the paper's)
            "base_forwards_per_token": float(macros_a.sum() / (new_tokens * len(prompts))),
            **score_continuations(base_stats, prompts, outs_a, base_greedy),
            "space_fraction": float(np.mean(outs_a == SPACE)),
            "samples": _texts(prompts, outs_a),
        })
        if bar is not None:
            bar.write(f"c={c}: " + ", ".join(f"{k}={v:.3f}" for k, v in rows[-1].items()
                                             if k not in ("confidence", "samples")))
    if bar is not None:
        bar.close()
    return rows, reference


def reading_eval(ham, base_stats, prompts: np.ndarray, texts: np.ndarray, *,
                 confidences: Sequence[float]) -> dict[str, Any]:
    """The model reading held-out text (``HAMburger.read_batch``): at each c, the KV compression its stop head
    reaches on real text and the accuracy of its micro-step argmax there, next to the base's accuracy on the
    same tokens (c = 1 reads one token per step: the fine-tuned base)."""
    _, _, correct = base_stats(np.concatenate([prompts, texts], axis=1))
    p, m = prompts.shape[1], texts.shape[1]
    tuned_macro, tuned_hits = ham.read_batch(prompts, texts, confidence=1.0)
    assert (tuned_macro == m).all(), tuned_macro
    rows = []
    for c in confidences:
        n_macro, hits = ham.read_batch(prompts, texts, confidence=float(c))
        rows.append({"confidence": float(c), "kv_compression": float(np.mean(m / n_macro)),
                     "base_forwards_per_token": float(n_macro.sum() / texts.size),
                     "accuracy": float(hits.mean())})
    return {"tokens": int(texts.size), "space_fraction": float(np.mean(texts == SPACE)),
            "frozen_base_accuracy": float(correct[:, p - 1:].mean()),
            "finetuned_base_accuracy": float(tuned_hits.mean()), "rows": rows}


def plot(results: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, ref = results["generation"], results["reference"]
    fig, (ax1, ax2, ax4, ax3) = plt.subplots(1, 4, figsize=(20, 4))
    x = [r["kv_compression"] for r in rows]
    for ax, key, label in ((ax1, "agreement", "agreement with the base's greedy output"),
                           (ax2, "base_nll", "frozen base NLL of the output (nats/byte)")):
        ax.plot(x, [r[key] for r in rows], marker="o", label="HAMburger")
        for r in rows:
            ax.annotate(f"c={r['confidence']:g}", (r["kv_compression"], r[key]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.scatter([1.0], [ref["finetuned_base"][key]], marker="s", color="C1", label="fine-tuned base (c=1)")
        if key == "base_nll":
            ax.scatter([1.0], [ref["frozen_base"][key]], marker="^", color="k", label="frozen base")
        ax.set_xlabel("KV compression (tokens / base forwards)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    reading = results["reading"]
    xr = [r["kv_compression"] for r in reading["rows"]]
    ax4.plot(xr, [r["accuracy"] for r in reading["rows"]], marker="o", label="HAMburger reading held-out text")
    for r in reading["rows"]:
        ax4.annotate(f"c={r['confidence']:g}", (r["kv_compression"], r["accuracy"]), fontsize=8,
                     textcoords="offset points", xytext=(4, 4))
    ax4.scatter([1.0], [reading["finetuned_base_accuracy"]], marker="s", color="C1", label="fine-tuned base (c=1)")
    ax4.scatter([1.0], [reading["frozen_base_accuracy"]], marker="^", color="k", label="frozen base")
    ax4.set_xlabel("KV compression on real text")
    ax4.set_ylabel("next-token argmax accuracy on real text")
    ax4.legend(fontsize=8)
    tf = results["teacher_forced"]
    idx = np.arange(len(tf["ham_step_accuracy"]))
    ax3.bar(idx - 0.2, tf["ham_step_accuracy"], 0.4, label="HAMburger")
    ax3.bar(idx + 0.2, tf["base_step_accuracy"], 0.4, label="frozen base, same tokens")
    ax3.set_xticks(idx)
    ax3.set_xlabel("micro step i")
    ax3.set_ylabel("teacher-forced accuracy")
    ax3.set_title(f"NLL/byte: HAMburger {tf['ham_nll']:.3f} vs base {tf['base_nll']:.3f}", fontsize=9)
    ax3.legend(fontsize=8)
    fig.suptitle(f"HAMburger on bytes of Python; oracle compression {results['oracle_compression']['eval']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(workdir: str, *, base_workdir: str | None = None, base_steps: int = 500, base_d_model: int = 64,
        base_layers: int = 4, seq_len: int = 128, batch_size: int = 16, steps: int = 300,
        train_prompt_len: int = 16, s_max: int = 4, micro_layers: int = 1,
        confidences: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9), num_prompts: int = 48, prompt_len: int = 32,
        new_tokens: int = 96, eval_batches: int = 8, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The whole pipeline (module docstring); writes ``results.json`` and ``hamburger.png`` under ``workdir``.

    Returns:
      The results dict with keys ``RESULT_KEYS``.
    """
    from flax import nnx
    from sqattn import data
    from sqattn.train import state as state_lib
    if not 1 <= train_prompt_len < seq_len:
        raise ValueError(f"train_prompt_len must be in [1, seq_len={seq_len}), got {train_prompt_len}")
    if not 1 <= prompt_len < seq_len:
        raise ValueError(f"prompt_len must be in [1, seq_len={seq_len}), got {prompt_len}")
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    base_workdir = base_workdir or os.path.join(workdir, "base")
    settings = dict(base_workdir=base_workdir, base_steps=base_steps, base_d_model=base_d_model,
                    base_layers=base_layers, seq_len=seq_len, batch_size=batch_size, steps=steps,
                    train_prompt_len=train_prompt_len, s_max=s_max, micro_layers=micro_layers,
                    confidences=[float(c) for c in confidences], num_prompts=num_prompts, prompt_len=prompt_len,
                    new_tokens=new_tokens, eval_batches=eval_batches, seed=seed)

    # --- base model (frozen copy kept for entropies and references)
    cfg = common.small_lm_config(steps=base_steps, d_model=base_d_model, layers=base_layers, seq_len=seq_len,
                                 batch_size=batch_size)
    frozen, config, base_info = common.train_or_load(base_workdir, cfg, progress=progress)
    base_stats = make_base_stats(frozen)
    data_cfg = config.data
    data_cfg.seq_len = seq_len
    eval_ds = data.make_dataset(data_cfg, batch_size=batch_size, split="eval")

    # --- graft + fine-tune: a trainer run per settings
    ft_settings = dict(steps=steps, batch_size=batch_size, seq_len=seq_len, prompt_len=train_prompt_len,
                       s_max=s_max, micro_layers=micro_layers, seed=seed)
    t_ft = time.perf_counter()
    ham, ft, oracle_train = finetune(base_workdir, os.path.join(workdir, "runs", f"finetune-{common.digest(ft_settings)}"),
                                     progress=progress, **ft_settings)
    counts = {name: state_lib.param_count(nnx.state(getattr(ham, name))) for name in ("base", "embedder", "decoder")}
    ft.update(wall_s=time.perf_counter() - t_ft, params=counts)

    # --- evaluation
    tf = teacher_forced_eval(ham, base_stats, eval_ds, batches=eval_batches, prompt_len=train_prompt_len)
    rows_needed = -(-num_prompts // batch_size)
    rows = np.concatenate([eval_ds.batch(eval_batches + i)["inputs"] for i in range(rows_needed)])
    prompts = rows[:num_prompts, :prompt_len].astype(np.int32)
    # the real continuations (up to new_tokens; the rows hold seq_len bytes)
    texts = rows[:num_prompts, prompt_len:prompt_len + new_tokens].astype(np.int32)
    reading = reading_eval(ham, base_stats, prompts, texts, confidences=confidences)
    t_gen = time.perf_counter()
    gen, reference = generation_eval(ham, frozen, base_stats, prompts, new_tokens=new_tokens,
                                     confidences=confidences, progress=progress)
    results = {"settings": settings, "base": base_info,
               "oracle_compression": {"train": oracle_train, "eval": tf["oracle_compression"]},
               "finetune": ft, "teacher_forced": tf, "generation": gen, "reference": reference, "reading": reading,
               "generation_wall_s": time.perf_counter() - t_gen}
    results["plot"] = plot(results, os.path.join(workdir, "hamburger.png"))
    results["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def format_table(results: dict) -> str:
    """Two markdown tables: greedy generation per c (with the base rows), and reading held-out text per c."""
    lines = ["Greedy generation:", "",
             "| c | KV compression | base fwd/token | agreement | common prefix | base-argmax rate | base NLL "
             "| spaces |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["reference"].items():
        lines.append(f"| {name} | 1.00 | 1.00 | {r['agreement']:.3f} | {r['prefix_agreement']:.3f} | "
                     f"{r['base_argmax_rate']:.3f} | {r['base_nll']:.3f} | {r['space_fraction']:.2f} |")
    for r in results["generation"]:
        lines.append(f"| {r['confidence']:g} | {r['kv_compression']:.2f} | {r['base_forwards_per_token']:.3f} | "
                     f"{r['agreement']:.3f} | {r['prefix_agreement']:.3f} | {r['base_argmax_rate']:.3f} | "
                     f"{r['base_nll']:.3f} | {r['space_fraction']:.2f} |")
    reading = results["reading"]
    lines += ["", f"Reading {reading['tokens']} held-out tokens ({reading['space_fraction']:.2f} spaces):", "",
              "| c | KV compression | base fwd/token | argmax accuracy |", "|---|---|---|---|",
              f"| frozen base | 1.00 | 1.00 | {reading['frozen_base_accuracy']:.3f} |",
              f"| fine-tuned base | 1.00 | 1.00 | {reading['finetuned_base_accuracy']:.3f} |"]
    for r in reading["rows"]:
        lines.append(f"| {r['confidence']:g} | {r['kv_compression']:.2f} | {r['base_forwards_per_token']:.3f} | "
                     f"{r['accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    common.quiet_logging()
    out = run(FLAGS.workdir, base_workdir=FLAGS.base_workdir or None, base_steps=FLAGS.base_steps,
              base_d_model=FLAGS.base_d_model, base_layers=FLAGS.base_layers, seq_len=FLAGS.seq_len,
              batch_size=FLAGS.batch_size, steps=FLAGS.steps, train_prompt_len=FLAGS.train_prompt_len,
              s_max=FLAGS.s_max, micro_layers=FLAGS.micro_layers,
              confidences=[float(c) for c in FLAGS.confidences], num_prompts=FLAGS.num_prompts,
              prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens, eval_batches=FLAGS.eval_batches,
              seed=FLAGS.seed, progress=FLAGS.progress)
    print(format_table(out))
    summary = {k: v for k, v in out.items() if k != "finetune"}
    print(json.dumps(summary | {"finetune_wall_s": out["finetune"]["wall_s"]}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
