"""CAD / DistCA reproduction (papers/cad.md, "Small-scale reproduction"): balance, counted pairs, loss curves.

  python -m experiments.cad_balance --workdir=/tmp/cad_balance              # all parts (A, B, C)
  python -m experiments.cad_balance --workdir=/tmp/cad --parts=A --trials=20
  python -m experiments.cad_balance --workdir=/tmp/cad --quick              # seconds-scale smoke run (tests)

(A) Planner alone (numpy) on the cad.md length law (98% lognormal median 3K sigma 0.8 + 2% Pareto(1.2) x 10K,
    clipped to [64, 128K]) packed sequentially into D micro-batches of T tokens, for every D in --devices and
    T in --tokens: compute imbalance max/mean of causal pairs per device, naive placement vs CAD (two-sided
    scheduler, and DistCA's recipient-only greedy), fraction of query tokens moved, bytes moved (Llama-3-8B
    attention shape, bf16, exact deduplicated traffic) and per-doc CP all-gather bytes for reference, vs eps;
    plus the end-to-end proxy max_i(linear(T) + CA_i) with the linear cost set so CA is 50% of a layer at the
    largest T.
(B) The executed shard_map program on 8 simulated CPU devices (tiny model: 2 heads of 32) on the law scaled
    to --b_tokens per device: pairs each device's attention actually evaluated (unmasked mask entries),
    naive plan vs CAD plan, and the max-abs error of the output against a single-device per-document
    reference. Wall-clock on simulated devices is meaningless and not reported.
(C) A tiny LM trained on 8 simulated devices (mesh data=8) on packed long-tailed documents with
    ``mixers.attention.cad`` off and on, same seed, float32: the per-step losses and the final parameters.

Writes ``results.json``, ``results.md`` (tables) and ``cad_balance.png`` to --workdir and prints the JSON.
Measured on a shared 2-core CPU machine (load average 15-25): A 71 s, B 256 s, C 605 s (defaults). Expected:
naive max/mean 2-15 (grows with D), CAD <= 1 + eps (except eps below the task granularity set by min_rows,
e.g. D=512, T=32K, eps=0.02), 3-10% of query tokens moved; B: counted pairs naive ~2-4 vs CAD ~1.05 with
errors ~4e-7; C: identical loss curves (max |diff| ~5e-7).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", "/tmp/cad_balance", "Output directory.")
    flags.DEFINE_list("parts", ["A", "B", "C"], "Parts to run.")
    flags.DEFINE_list("devices", ["8", "16", "64", "512"], "(A) device counts D.")
    flags.DEFINE_list("tokens", ["32768", "131072", "524288"], "(A) tokens per device T.")
    flags.DEFINE_list("eps", ["0.02", "0.05", "0.1", "0.2"], "(A) scheduler tolerances.")
    flags.DEFINE_integer("trials", 5, "(A) random packs per (D, T).")
    flags.DEFINE_integer("min_rows", 128, "(A) smallest split-off CA-task in query rows (kernel tile).")
    flags.DEFINE_integer("b_tokens", 1024, "(B) tokens per device.")
    flags.DEFINE_integer("b_trials", 3, "(B) random packs.")
    flags.DEFINE_float("b_eps", 0.1, "(B) scheduler tolerance.")
    flags.DEFINE_integer("c_steps", 30, "(C) training steps per run.")
    flags.DEFINE_integer("c_batch", 16, "(C) sequences per step (2 per device).")
    flags.DEFINE_integer("c_seq_len", 256, "(C) tokens per sequence.")
    flags.DEFINE_float("c_capacity", 0.5, "(C) CADConfig.capacity of the in-graph plan.")
    flags.DEFINE_integer("seed", 0, "Base seed.")
    flags.DEFINE_bool("quick", False, "Tiny sizes for a smoke test.")


FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------------------------ part A
def part_a(devices, tokens, eps_list, trials: int, min_rows: int, seed: int) -> dict:
    """Planner-only balance sweep; returns {"rows": [...], "linear_pairs_per_token": c}."""
    import numpy as np
    from sqattn.parallel import cad
    cost = cad.LLAMA3_8B
    rows, naive_ca_per_token = [], {}
    for d in devices:
        for t in tokens:
            recs = []
            for trial in range(trials):
                rng = np.random.default_rng([seed, d, t, trial])
                lengths = cad.sample_doc_lengths(rng, d * t)
                pieces = cad.pack_pieces(lengths, d, t)
                res = cad.Residency.from_pieces(pieces)
                items = cad.Items.from_pieces(pieces)
                naive = cad.server_loads(items, d)
                naive_bytes = cad.traffic(items, res, d).bytes(cost)
                rec = {"naive": naive, "naive_bytes": naive_bytes, "eps": {}}
                for eps in eps_list:
                    out = {}
                    for name, two in (("cad", True), ("greedy", False)):
                        s = cad.schedule(items, d, eps=eps, cost=cost, min_rows=min_rows, two_sided=two)
                        tr = cad.traffic(s.items, res, d)
                        out[name] = (s.loads_after, tr.q_rows.sum() / (d * t), tr.bytes(cost), s.num_moves)
                    rec["eps"][eps] = out
                recs.append(rec)
            naive_ca_per_token[(d, t)] = float(np.mean([r["naive"].mean() / t for r in recs]))
            rows.append({"D": d, "T": t, "trials": recs})
    # Linear cost (in pair units per token): CA = 50% of the mean layer at the largest T, averaged over D.
    t_max = max(tokens)
    lin = float(np.mean([naive_ca_per_token[(d, t_max)] for d in devices]))
    table = []
    for row in rows:
        d, t, recs = row["D"], row["T"], row["trials"]
        imb = lambda f: np.array([x.max() / x.mean() for x in f])  # noqa: E731
        proxy = lambda f: np.array([(lin * t + x).max() / (lin * t + x).mean() for x in f])  # noqa: E731
        naive = [r["naive"] for r in recs]
        base = {"D": d, "T": t, "naive_max_over_mean": float(imb(naive).mean()),
                "naive_max_over_mean_worst": float(imb(naive).max()),
                "ca_share_of_layer": float(np.mean([x.mean() / (lin * t + x.mean()) for x in naive])),
                "naive_bytes_GB": float(np.mean([r["naive_bytes"] for r in recs]) / 1e9),
                "cp_allgather_GB": float((d - 1) * d * t * cost.kv_bytes / 1e9)}
        for eps in eps_list:
            cadl = [r["eps"][eps]["cad"][0] for r in recs]
            greedy = [r["eps"][eps]["greedy"][0] for r in recs]
            naive_max = np.array([(lin * t + x).max() for x in naive])
            cad_max = np.array([(lin * t + x).max() for x in cadl])
            table.append(dict(base, eps=eps,
                              cad_max_over_mean=float(imb(cadl).mean()),
                              cad_max_over_mean_worst=float(imb(cadl).max()),
                              greedy_max_over_mean=float(imb(greedy).mean()),
                              moved_token_frac=float(np.mean([r["eps"][eps]["cad"][1] for r in recs])),
                              cad_bytes_GB=float(np.mean([r["eps"][eps]["cad"][2] for r in recs]) / 1e9),
                              moves=float(np.mean([r["eps"][eps]["cad"][3] for r in recs])),
                              proxy_naive_max_over_mean=float(proxy(naive).mean()),
                              proxy_cad_max_over_mean=float(proxy(cadl).mean()),
                              proxy_speedup=float((naive_max / cad_max).mean())))
    return {"rows": table, "linear_pairs_per_token": lin, "trials": trials, "min_rows": min_rows,
            "cost_model": {"q_bytes": cost.q_bytes, "kv_bytes": cost.kv_bytes}}


# ------------------------------------------------------------------------------------------------ part B
def _doc_attention(qf, kf, vf, idx):
    """dot_product_attention of documents gathered by idx [nb, S] (-1 = padding) from flat q/k/v."""
    import jax.numpy as jnp
    from sqattn.mixers.attention import attention_mask, dot_product_attention
    safe = jnp.maximum(idx, 0)
    p = jnp.broadcast_to(jnp.arange(idx.shape[1]), idx.shape)
    mask = attention_mask(p, p) & (idx >= 0)[:, None, :]
    return dot_product_attention(qf[safe], kf[safe], vf[safe], mask)               # [nb,S,h,d]


def _per_doc_reference(q, k, v, doc, pos):
    """Single-device attention of each document on its own (dot_product_attention, causal), numpy [n,L,h,d]."""
    import jax
    import numpy as np
    from sqattn.parallel.cad import bucket
    doc, pos = np.asarray(doc).reshape(-1), np.asarray(pos).reshape(-1)
    qf, kf, vf = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
    out = np.zeros(qf.shape, np.float32)
    order = np.lexsort((pos, doc))
    _, first, counts = np.unique(doc[order], return_index=True, return_counts=True)
    sizes = np.array([bucket(c, 16) for c in counts])
    attend = jax.jit(_doc_attention)                         # one compile per bucket size
    for size in np.unique(sizes):
        sel = np.flatnonzero(sizes == size)
        idx = np.full((len(sel), size), -1, np.int64)
        for r, j in enumerate(sel):
            idx[r, :counts[j]] = order[first[j]:first[j] + counts[j]]
        o = np.asarray(attend(qf, kf, vf, idx))
        out[idx[idx >= 0]] = o[idx >= 0]
    return out.reshape(q.shape)


def part_b(tokens: int, trials: int, eps: float, seed: int) -> dict:
    """Executed program: counted pairs per device (naive vs CAD) and output error on 8 simulated devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sqattn.parallel import cad
    n, h, g, hd = 8, 2, 2, 32
    if jax.device_count() < n:
        raise RuntimeError(f"part B needs {n} devices, found {jax.device_count()} (set XLA_FLAGS before jax)")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("data",))
    scale = tokens / 32768.0                                # the law at (D=8, T=32K), shrunk to `tokens`
    min_rows = max(2, int(round(128 * scale)))
    tiny = cad.CostModel.from_dims(h, g, hd, 4)
    packs, plans = [], []
    for trial in range(trials):
        lengths = cad.sample_doc_lengths(np.random.default_rng([seed, 77, trial]), n * tokens, scale=scale)
        doc, pos = cad.pack_tokens(lengths, n, tokens)
        packs.append((lengths, doc, pos))
        plans.append({name: cad.plan_tokens(doc, pos, nano_batches=2, eps=eps, cost=tiny, min_rows=min_rows,
                                            balance=(name == "cad")) for name in ("naive", "cad")})
    caps = tuple(max(p[name].caps[i] for p in plans for name in p) for i in range(3))
    sh = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))  # noqa: E731

    @jax.jit
    def run(q, k, v, doc, pos, arrays):
        return cad.cad_attention(q, k, v, doc, pos, arrays, mesh=mesh, axes="data", count=True, q_block=256)

    out = []
    for trial, ((lengths, doc, pos), pl) in enumerate(zip(packs, plans)):
        keys = jax.random.split(jax.random.key(seed + trial), 3)
        q = jax.random.normal(keys[0], (n, tokens, h, hd))
        k = jax.random.normal(keys[1], (n, tokens, g, hd))
        v = jax.random.normal(keys[2], (n, tokens, g, hd))
        ref = _per_doc_reference(q, k, v, doc, pos)
        rec = {"trial": trial, "num_docs": int(len(lengths)), "longest_doc": int(lengths.max()),
               "docs_longer_than_shard": int((lengths > tokens).sum())}
        for name in ("naive", "cad"):
            p = pl[name].padded(caps)
            o, pairs = run(sh(q), sh(k), sh(v), sh(doc), sh(pos), tuple(sh(a) for a in p.arrays()))
            counted = np.asarray(pairs).sum(axis=1).astype(np.float64)                  # [n] over nano-batches
            planned = p.loads_after.sum(axis=0)
            rec[name] = {"pairs_per_device": counted.tolist(),
                         "max_over_mean": float(counted.max() / counted.mean()),
                         "counted_equals_planned": bool(np.array_equal(counted, planned)),
                         "max_abs_err": float(np.max(np.abs(np.asarray(o) - ref))),
                         "q_rows_moved": int(p.q_rows.sum()), "kv_rows_moved": int(p.kv_rows.sum()),
                         "bytes_moved_llama8b_GB": p.bytes_moved(cad.LLAMA3_8B) / 1e9}
        rec["cp_allgather_llama8b_GB"] = (n - 1) * n * tokens * cad.LLAMA3_8B.kv_bytes / 1e9
        out.append(rec)
    summary = {name: {"max_over_mean": float(np.mean([r[name]["max_over_mean"] for r in out])),
                      "max_abs_err": float(max(r[name]["max_abs_err"] for r in out)),
                      "bytes_moved_llama8b_GB": float(np.mean([r[name]["bytes_moved_llama8b_GB"] for r in out]))}
               for name in ("naive", "cad")}
    return {"devices": n, "tokens_per_device": tokens, "scale": scale, "eps": eps, "min_rows": min_rows,
            "caps": list(caps), "trials": out, "summary": summary,
            "cp_allgather_llama8b_GB": (n - 1) * n * tokens * cad.LLAMA3_8B.kv_bytes / 1e9}


# ------------------------------------------------------------------------------------------------ part C
C_MESH = {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1, "rules": "dp"}


def lm_config(*, cad_on: bool, steps: int, batch: int, seq_len: int, capacity: float, seed: int,
              mesh: dict | None = None):
    """The tiny LM of part C (d=64, 2 heads, 2 layers), float32, on ``mesh`` (default data=8)."""
    from sqattn import configs
    c = configs.get("lm_tiny:runlocal")
    with c.unlocked():
        c.seed = seed
        c.batch_size = batch
        c.num_steps = steps
        c.data.seq_len = seq_len
        c.model.update(vocab_size=64, d_model=64, num_layers=2, mlp_dim=128, dtype="float32")
        c.model.mixers.attention.update(num_heads=2, num_kv_heads=2)
        with c.model.mixers.attention.ignore_type():  # the config field is a bool; a dict sets CADConfig fields
            c.model.mixers.attention.cad = dict(capacity=capacity, min_rows=4) if cad_on else False
        c.mesh.update(**(mesh or C_MESH))
        c.optim.warmup_steps = 5
    return c


def lm_batch(step: int, batch: int, seq_len: int, seed: int) -> dict:
    import numpy as np
    from sqattn.parallel import cad
    return cad.packed_lm_batch(np.random.default_rng([seed, 5, step]), batch, seq_len, 64, scale=1.0 / 32)


def train_losses(config, steps: int, seed: int) -> tuple[list[float], object]:
    """Per-step training loss of ``config`` on packed batches, built as the trainer builds its step."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sqattn.parallel import sharding
    from sqattn.train import state as state_lib
    from sqattn.train import tasks as tasks_lib
    from sqattn.train.trainer import make_train_step
    setup = state_lib.make_setup(config)
    state = state_lib.init_state(config, setup)
    task = tasks_lib.get_task("lm")
    batch_sh = NamedSharding(setup.mesh, P(("data", "fsdp")))
    with sharding.activation_sharding(setup.mesh, setup.rules):
        step_fn = jax.jit(make_train_step(setup.graphdef, task, setup.tx, setup.schedule, 1, config.seed),
                          in_shardings=(setup.state_shardings, None), out_shardings=(setup.state_shardings, None))
        losses = []
        for s in range(steps):
            b = {k: jax.device_put(v, batch_sh) for k, v in lm_batch(s, config.batch_size,
                                                                     config.data.seq_len, seed).items()}
            state, m = step_fn(state, b)
            losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"])


def part_c(steps: int, batch: int, seq_len: int, capacity: float, seed: int, mesh: dict | None = None) -> dict:
    """Trains the tiny LM with CAD off and on; returns both loss curves and their differences."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sqattn.parallel import cad
    mesh = dict(mesh or C_MESH)
    runs = {}
    for name, on in (("off", False), ("on", True)):
        cfg = lm_config(cad_on=on, steps=steps, batch=batch, seq_len=seq_len, capacity=capacity, seed=seed,
                        mesh=mesh)
        runs[name] = train_losses(cfg, steps, seed)
    (l_off, p_off), (l_on, p_on) = runs["off"], runs["on"]
    dp = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)))
    # The plans the in-graph path made for these batches (recomputed on the host): pairs per device.
    n, imb = mesh["data"] * mesh["fsdp"], {"naive": [], "cad": []}
    cfg = lm_config(cad_on=True, steps=steps, batch=batch, seq_len=seq_len, capacity=capacity, seed=seed,
                    mesh=mesh)
    opts = cad.CADConfig.from_arg(dict(cfg.model.mixers.attention.cad))
    length = batch // n * seq_len
    nano, caps = cad.graph_plan_caps(length, opts)
    for s in range(steps):
        seg = lm_batch(s, batch, seq_len, seed)["segment_ids"]
        doc, pos = (np.asarray(x).reshape(n, length) for x in cad.doc_pos_from_segments(jnp.asarray(seg)))
        pl = cad.plan_tokens(doc, pos, nano_batches=nano, eps=opts.eps, min_rows=opts.min_rows,
                             cost=cad.CostModel.from_dims(2, 2, 32, 4), caps=caps)
        for name, loads in (("naive", pl.loads_before.sum(0)), ("cad", pl.loads_after.sum(0))):
            imb[name].append(float(loads.max() / loads.mean()))
    return {"steps": steps, "batch": batch, "seq_len": seq_len, "capacity": capacity, "mesh": mesh,
            "loss_off": l_off, "loss_on": l_on,
            "max_abs_loss_diff": float(np.max(np.abs(np.array(l_on) - np.array(l_off)))),
            "max_abs_param_diff": dp,
            "lm_batches_max_over_mean": {k: float(np.mean(v)) for k, v in imb.items()}}


# ------------------------------------------------------------------------------------------------ output
def markdown(results: dict) -> str:
    lines = []
    if "A" in results:
        a = results["A"]
        lines += [f"## A. Planner balance (trials={a['trials']}, min_rows={a['min_rows']}, Llama-3-8B bytes; "
                  f"linear cost {a['linear_pairs_per_token']:.0f} pairs/token)", "",
                  "| D | T | eps | naive max/mean (worst) | CAD max/mean (worst) | DistCA greedy max/mean | "
                  "moved tokens | CAD bytes GB | naive bytes GB | CP all-gather GB | CA share | proxy naive | "
                  "proxy CAD | proxy speedup |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            lines.append(f"| {r['D']} | {r['T'] // 1024}K | {r['eps']} | {r['naive_max_over_mean']:.2f} "
                         f"({r['naive_max_over_mean_worst']:.2f}) | {r['cad_max_over_mean']:.3f} "
                         f"({r['cad_max_over_mean_worst']:.3f}) | {r['greedy_max_over_mean']:.3f} | "
                         f"{100 * r['moved_token_frac']:.1f}% | {r['cad_bytes_GB']:.3g} | {r['naive_bytes_GB']:.3g} | "
                         f"{r['cp_allgather_GB']:.3g} | {100 * r['ca_share_of_layer']:.0f}% | "
                         f"{r['proxy_naive_max_over_mean']:.2f} | {r['proxy_cad_max_over_mean']:.3f} | "
                         f"{r['proxy_speedup']:.2f} |")
        lines.append("")
    if "B" in results:
        b = results["B"]
        lines += [f"## B. Executed program, {b['devices']} simulated devices, {b['tokens_per_device']} tokens/device "
                  f"(law x {b['scale']:.4g}), eps={b['eps']}, caps={b['caps']}", "",
                  "| trial | docs | longest | docs > shard | naive max/mean | CAD max/mean | counted == planned | "
                  "max abs err naive / CAD | bytes GB naive / CAD (Llama-8B) | CP all-gather GB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in b["trials"]:
            lines.append(f"| {r['trial']} | {r['num_docs']} | {r['longest_doc']} | {r['docs_longer_than_shard']} | "
                         f"{r['naive']['max_over_mean']:.3f} | {r['cad']['max_over_mean']:.3f} | "
                         f"{r['naive']['counted_equals_planned'] and r['cad']['counted_equals_planned']} | "
                         f"{r['naive']['max_abs_err']:.2e} / {r['cad']['max_abs_err']:.2e} | "
                         f"{r['naive']['bytes_moved_llama8b_GB']:.3g} / {r['cad']['bytes_moved_llama8b_GB']:.3g} | "
                         f"{r['cp_allgather_llama8b_GB']:.3g} |")
        lines.append("")
    if "C" in results:
        c = results["C"]
        mesh = ", ".join(f"{k}={v}" for k, v in c["mesh"].items() if k != "rules" and v != 1)
        lines += [f"## C. LM training, CAD off vs on ({c['steps']} steps, batch {c['batch']} x {c['seq_len']}, "
                  f"float32, mesh {mesh}, capacity {c['capacity']})", "",
                  f"max |loss_on - loss_off| = {c['max_abs_loss_diff']:.2e}; max |param diff| after training = "
                  f"{c['max_abs_param_diff']:.2e}; LM-batch pairs max/mean naive "
                  f"{c['lm_batches_max_over_mean']['naive']:.3f} -> CAD {c['lm_batches_max_over_mean']['cad']:.3f}",
                  "", "| step | loss off | loss on |", "|---|---|---|"]
        for i, (x, y) in enumerate(zip(c["loss_off"], c["loss_on"])):
            if i < 3 or i == len(c["loss_off"]) - 1 or (i + 1) % 10 == 0:
                lines.append(f"| {i + 1} | {x:.6f} | {y:.6f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (["A1", "A2"] if "A" in results else []) + [p for p in ("B", "C") if p in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "A1":
            rows = results["A"]["rows"]
            eps = 0.1 if any(r["eps"] == 0.1 for r in rows) else rows[0]["eps"]
            rs = [r for r in rows if r["eps"] == eps]
            x = range(len(rs))
            for off, key, label in ((-0.27, "naive_max_over_mean", "naive"),
                                    (0.0, "greedy_max_over_mean", f"DistCA greedy eps={eps}"),
                                    (0.27, "cad_max_over_mean", f"CAD eps={eps}")):
                ax.bar([i + off for i in x], [r[key] for r in rs], 0.27, label=label)
            ax.axhline(1 + eps, color="k", ls="--", lw=1)
            ax.set_xticks(list(x), [f"{r['D']}\n{r['T'] // 1024}K" for r in rs], fontsize=7)
            ax.set(yscale="log", ylabel="CA pairs max/mean", xlabel="devices D / tokens per device T",
                   title="A: planner balance")
            ax.legend(fontsize=7)
        elif panel == "A2":
            rows = results["A"]["rows"]
            for key in sorted({(r["D"], r["T"]) for r in rows}):
                rs = [r for r in rows if (r["D"], r["T"]) == key]
                ax.plot([r["eps"] for r in rs], [r["cad_max_over_mean"] for r in rs], "o-", ms=3,
                        label=f"D={key[0]}, T={key[1] // 1024}K")
            eps = sorted({r["eps"] for r in rows})
            ax.plot(eps, [1 + e for e in eps], "k--", lw=1, label="1 + eps")
            ax.set(xlabel="eps", ylabel="CAD max/mean", title="A: CAD balance vs eps")
            ax.legend(fontsize=6, ncol=2)
        elif panel == "B":
            r = results["B"]["trials"][0]
            x = range(len(r["naive"]["pairs_per_device"]))
            ax.bar([i - 0.2 for i in x], r["naive"]["pairs_per_device"], 0.4, label="naive")
            ax.bar([i + 0.2 for i in x], r["cad"]["pairs_per_device"], 0.4, label="CAD")
            ax.set(xlabel="device", ylabel="counted attention pairs", title="B: executed program (trial 0)")
            ax.legend()
        else:
            c = results["C"]
            steps = range(1, len(c["loss_off"]) + 1)
            ax.plot(steps, c["loss_off"], label="CAD off")
            ax.plot(steps, c["loss_on"], "--", label="CAD on")
            ax.set(xlabel="step", ylabel="train loss",
                   title=f"C: LM loss, max |diff| {c['max_abs_loss_diff']:.1e}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(workdir: str, parts, *, devices, tokens, eps_list, trials, min_rows, b_tokens, b_trials, b_eps,
        c_steps, c_batch, c_seq_len, c_capacity, seed, c_mesh: dict | None = None) -> dict:
    """Runs the requested parts and writes results.json, results.md and cad_balance.png to ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    results: dict = {"command": " ".join(sys.argv)}
    timings = {}
    if "A" in parts:
        t0 = time.time()
        results["A"] = part_a(devices, tokens, eps_list, trials, min_rows, seed)
        timings["A"] = time.time() - t0
    if "B" in parts:
        t0 = time.time()
        results["B"] = part_b(b_tokens, b_trials, b_eps, seed)
        timings["B"] = time.time() - t0
    if "C" in parts:
        t0 = time.time()
        results["C"] = part_c(c_steps, c_batch, c_seq_len, c_capacity, seed, c_mesh)
        timings["C"] = time.time() - t0
    results["seconds"] = timings
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(workdir, "cad_balance.png"))
    return results


def main(argv):
    del argv
    f = FLAGS
    kw = dict(devices=[int(x) for x in f.devices], tokens=[int(x) for x in f.tokens],
              eps_list=[float(x) for x in f.eps], trials=f.trials, min_rows=f.min_rows, b_tokens=f.b_tokens,
              b_trials=f.b_trials, b_eps=f.b_eps, c_steps=f.c_steps, c_batch=f.c_batch, c_seq_len=f.c_seq_len,
              c_capacity=f.c_capacity, seed=f.seed)
    if f.quick:
        kw.update(devices=[8, 16], tokens=[32768], eps_list=[0.1], trials=2, b_tokens=256, b_trials=1,
                  c_steps=3, c_batch=8, c_seq_len=64)
    results = run(f.workdir, [p.upper() for p in f.parts], **kw)
    print(json.dumps(results, default=float))
    print(markdown(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
