"""Anchor: HF ``peft``'s AdaLoRA beside our AdaLoRA-style adapter on the synthetic heterogeneous-rank task.

Same task (``rank_synth``: base = teacher A, planted perturbations of true rank 1, 4, 8, 0 on fc1, fc2, fc3,
head), same base weights (loaded into an equivalent torch MLP: ``nn.Linear`` with our kernels transposed, zero
biases, tanh-GELU as ``jax.nn.gelu``), same initial adapters (our P, Q copied into peft's ``lora_A``/``lora_B``,
lambda = 0), same batches (``SynthBatches.batch(step)``), same loss (MSE relative to the base's train MSE + 0.1 x the mean Frobenius
orthogonality penalty, computed by hand on the torch side because peft adds it only to a ``ModelOutput.loss``),
same optimizer (AdamW b2 0.999, no weight decay, global-norm clip 1, the optax warmup-cosine learning rate
evaluated per step), same AdaLoRA schedule (init_r 6 -> target_r 4 per module, i.e. 24 -> 16 in total, tinit 10 %,
tfinal 20 %, deltaT, beta1 = beta2 = 0.85) and scale (our alpha / rank = 8 / 4 = peft's lora_alpha / init_r =
12 / 6). Ours runs through the trainer (``sqattn.configs.adaptive_rank.synth_run_config("adalora", ...)``); peft's in
its documented loop (``loss.backward(); optimizer.step(); update_and_allocate(step); zero_grad()``).

Known differences: peft scores on the gradient of the step just taken (before the update), ours on the next
step's batch after it; peft's orthogonality penalty covers pruned components too (ours only active ones); peft
smooths sensitivities per element, ours per row (allocator docstring).

  pip install peft torch           # optional peers (extra ``peers``); not needed by the package
  python -m experiments.bench_peft_anchor --workdir=/tmp/peft_anchor --steps=1000 --seed=0

Prints one JSON line: final test MSE (absolute and relative to the unadapted base), per-layer final ranks,
Spearman with the true ranks and wall time for both.

Measured (``python -m experiments.bench_peft_anchor --workdir=/tmp/ar/anchor --steps=1000 --seed=0``; 2 shared
cores at load average ~21; peft 0.21.2, torch 2.14.1 on 1 thread; true ranks fc1,fc2,fc3,head = 1,4,8,0; base
test MSE 6.36e-3):

  |                       | test MSE  | / base | final ranks fc1,fc2,fc3,head | Spearman | wall (s) |
  |-----------------------|-----------|--------|------------------------------|----------|----------|
  | ours (adalora)        | 4.997e-4  | 0.0785 | 1, 6, 6, 3                   | +0.74    | 74       |
  | HF peft AdaLoRA       | 4.987e-4  | 0.0784 | 1, 6, 6, 3                   | +0.74    | 62       |

Same final allocation and test error within 0.2 % despite the known differences above. Wall times are not
comparable (ours: trainer with compile, checkpoint and per-step logging; peft: a bare torch loop) and the
machine was shared. One seed.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags



def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", None, "output directory", required=True)
    flags.DEFINE_integer("steps", 1000, "training steps")
    flags.DEFINE_integer("seed", 0, "seed")
FLAGS = flags.FLAGS


def torch_mlp(weights, names):
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.names = list(names)
            for name, w in zip(names, weights):
                lin = nn.Linear(w.shape[0], w.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w.T.copy()))
                    lin.bias.zero_()
                setattr(self, name, lin)
            self.act = nn.GELU(approximate="tanh")

        def forward(self, x):
            for k, name in enumerate(self.names):
                x = getattr(self, name)(x)
                if k < len(self.names) - 1:
                    x = self.act(x)
            return x
    return MLP()


def run_peft(cfg, init_adapters: dict, names) -> dict:
    import numpy as np
    import torch
    from peft import AdaLoraConfig, get_peft_model
    from sqattn.peft.rank_task import RankSynthTask, teacher_weights
    from sqattn.train import optim
    torch.manual_seed(0)
    torch.set_num_threads(1)          # a shared 2-core machine: no oversubscription
    p = cfg.peft
    steps = int(cfg.num_steps)
    model = torch_mlp(teacher_weights(cfg.model.sizes, cfg.model.teacher_seed), names)
    init_r = int(p.init_rank)
    hf_cfg = AdaLoraConfig(init_r=init_r, target_r=int(p.rank), tinit=int(p.warmup), tfinal=int(p.final),
                           deltaT=int(p.interval), beta1=float(p.beta1), beta2=float(p.beta2),
                           orth_reg_weight=float(p.orth_reg if p.orth_reg >= 0 else 0.1), total_step=steps,
                           target_modules=list(names), lora_alpha=float(p.alpha) / int(p.rank) * init_r,
                           lora_dropout=0.0)
    pm = get_peft_model(model, hf_cfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for name in names:
            mod = getattr(inner, name)
            a, b = init_adapters[name]
            mod.lora_A["default"].copy_(torch.from_numpy(np.ascontiguousarray(a.T)))      # [r, in]
            mod.lora_B["default"].copy_(torch.from_numpy(np.ascontiguousarray(b.T)))      # [out, r]
            mod.lora_E["default"].zero_()
    params = [q for q in pm.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.optim.lr), betas=(float(cfg.optim.b1), float(cfg.optim.b2)),
                            eps=float(cfg.optim.eps), weight_decay=0.0)
    sched = optim.lr_schedule(cfg.optim, steps)
    task = RankSynthTask()
    train, evals = task.make_datasets(cfg)
    orth = hf_cfg.orth_reg_weight

    def reg():
        terms = []
        for n, q in pm.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and q.requires_grad:
                cov = q @ q.T if "lora_A" in n else q.T @ q
                terms.append(torch.linalg.norm(cov - torch.eye(cov.shape[0]), "fro"))
        return sum(terms) / len(terms)

    t0 = time.perf_counter()
    alloc_s = 0.0
    pm.train()
    for i in range(steps):
        b = train.batch(i)
        x, y = torch.from_numpy(b["x"]), torch.from_numpy(b["y"])
        loss = torch.mean((pm(x) - y) ** 2) * task.loss_scale + orth * reg()      # as RankSynthTask.loss_fn
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(cfg.optim.grad_clip))
        for g in opt.param_groups:
            g["lr"] = float(sched(i))
        opt.step()
        ta = time.perf_counter()
        pm.base_model.update_and_allocate(i + 1)
        alloc_s += time.perf_counter() - ta
        opt.zero_grad()
    wall = time.perf_counter() - t0
    pm.eval()
    se, n = 0.0, 0
    with torch.no_grad():
        for i in range(evals.num_batches):
            b = evals.batch(i)
            err = ((pm(torch.from_numpy(b["x"])) - torch.from_numpy(b["y"])) ** 2).mean(-1).numpy()
            se += float((err * b["weights"]).sum())
            n += float(b["weights"].sum())
    pattern = pm.peft_config["default"].rank_pattern or {}
    ranks = {}
    for name in names:
        key = next((k for k in pattern if name in k.split(".")), None)        # "fc1.lora_E.default"
        ranks[name] = int(sum(pattern[key])) if key is not None else init_r
    return {"eval_mse": se / n, "ranks": ranks, "wall_s": wall, "alloc_s": alloc_s}


def main(argv):
    del argv
    import numpy as np
    from scipy import stats
    from experiments import common
    from sqattn.configs.adaptive_rank import synth_run_config
    from sqattn.peft.rank_task import run_summary
    from sqattn.peft import adaptive
    from sqattn.peft.rank_task import build_data, layer_names
    from sqattn.train import state as state_lib
    from sqattn.train import train_and_evaluate
    common.quiet_logging()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    cfg = synth_run_config("adalora", FLAGS.seed, FLAGS.steps, 1)
    names = layer_names(len(cfg.model.sizes) - 1)
    d = build_data(cfg.model, cfg.data)
    model = state_lib.build_model(cfg)
    init = {p: (np.asarray(m.ada_a[...]), np.asarray(m.ada_b[...])) for p, m in adaptive.adapter_modules(model)}
    run_dir = os.path.join(FLAGS.workdir, f"ours-s{FLAGS.seed}-{FLAGS.steps}")
    t0 = time.perf_counter()
    out = train_and_evaluate(cfg, run_dir, progress=False)
    ours_wall = time.perf_counter() - t0
    ours = run_summary(run_dir, d["true_ranks"])
    ours.update(eval_mse=float(out["eval_mse"]), wall_s=ours_wall)
    hf = run_peft(cfg, init, names)
    final = [hf["ranks"][n] for n in names]
    hf["spearman"] = float(stats.spearmanr(final, d["true_ranks"]).statistic) if len(set(final)) > 1 else None
    res = {"true_ranks": dict(zip(names, d["true_ranks"])), "base_mse": d["base_test_mse"], "steps": FLAGS.steps,
           "seed": FLAGS.seed}
    for key, r in (("ours", ours), ("peft_adalora", hf)):
        res[key] = {"eval_mse": r["eval_mse"], "rel_mse": r["eval_mse"] / d["base_test_mse"], "ranks": r["ranks"],
                    "spearman": r.get("spearman"), "wall_s": r["wall_s"]}
    with open(os.path.join(FLAGS.workdir, f"anchor-s{FLAGS.seed}-{FLAGS.steps}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    define_flags()
    app.run(main)
