"""One command that checks the kernel contract on an accelerator host (and, in interpret mode, on a CPU).

  python -m experiments.accelerator_check --workdir=/tmp/acc                  # GPU/TPU host: compiled kernels
  python -m experiments.accelerator_check --workdir=/tmp/acc --interpret --tiny   # CPU: the Pallas interpreter
  python -m experiments.accelerator_check --workdir=/tmp/acc --tiny --lower=cuda,tpu --sections=lowering

Sections (``--sections``, all by default):

* ``kernels``: for every kernel (gla, sse, selective_scan, ssd, segment_attention, causal_attention, moe) at
  production shapes (``sse_h_2b``, ``scout_swa_400m``, a 1B-class Mamba-2 layer, ``moe_tiny``'s MoE; ``--tiny``:
  small odd shapes), the forward output and the gradient of ``sum(sin(out))`` w.r.t. every float input of the
  compiled kernel (``impl="pallas"``; ``--interpret``: the interpreter) against the XLA path (``chunked`` /
  ``ref``): relative RMSE per output, and forward+backward time of both (``--repeats`` interleaved calls: min and
  median, ms).
* ``train_steps``: one train step of ``sse_h_tiny``, ``mamba2_tiny``, ``moe_tiny`` and ``scout_swa_tiny`` with
  ``impl="auto"`` under the config's mesh (``--interpret``: the mixers' ``impl`` set to ``"interpret"`` so the
  kernels run on CPU; ``--tiny``: one block of the pattern, batch 8, sequence 32): loss, finiteness, time, and
  which kernels (pallas_calls) the step's jaxpr contains.
* ``lowering``: the same train steps lowered for each platform in ``--lower`` from this host (no device needed),
  counting kernel custom calls and those outside a ``shard_map`` (manual) region; must be 0.

Output: ``<workdir>/accelerator_check.json`` (and the same object on stdout), with ``_meta`` (backend, devices,
jax version, load average). A parity entry passes when the relative RMSE is under 2e-5 (f32) / 2e-2 (bf16).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

DEFAULT_CONFIGS = ("sse_h_tiny", "mamba2_tiny", "moe_tiny", "scout_swa_tiny")
KERNELS = ("gla", "sse", "selective_scan", "ssd", "segment_attention", "causal_attention", "moe")
TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "Output directory (accelerator_check.json).", required=True)
    flags.DEFINE_bool("interpret", False, "Run the kernels with the Pallas interpreter (CPU).")
    flags.DEFINE_bool("tiny", False, "Small shapes and one block per model (CPU, tests).")
    flags.DEFINE_list("sections", ["kernels", "train_steps", "lowering"], "Which sections to run.")
    flags.DEFINE_list("kernels", list(KERNELS), "Kernels of the parity section.")
    flags.DEFINE_list("configs", list(DEFAULT_CONFIGS), "Configs of the train-step and lowering sections.")
    flags.DEFINE_list("lower", [], "Platforms to lower the train steps for (cuda, tpu); none by default.")
    flags.DEFINE_integer("repeats", 5, "Timed calls per implementation (interleaved).")


# ---- kernels ----------------------------------------------------------------------------------------------------

def kernel_cases(tiny: bool) -> dict[str, tuple[Callable, list, tuple[int, ...], str]]:
    """name -> (op(*args, impl=...), args, differentiated arg indices, XLA impl)."""
    import jax
    import jax.numpy as jnp

    from kernels.causal_attention import causal_attention
    from kernels.gla import gla
    from kernels.mamba import selective_scan, ssd
    from kernels.moe import moe_ffn
    from kernels.segment_attention import segment_attention
    from kernels.sse import sse

    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    f32, bf16 = jnp.float32, jnp.bfloat16
    dt = f32 if tiny else bf16

    def rnd(shape, dtype=dt, scale=1.0):
        return (scale * jax.random.normal(next(keys), shape, f32)).astype(dtype)

    cases = {}
    b, t, h, k, c = (2, 37, 2, 16, 16) if tiny else (1, 4096, 8, 256, 64)
    gate = jax.nn.log_sigmoid(rnd((b, t, h, k), f32)) / 16
    cases["gla"] = (functools.partial(gla, chunk_size=c), [rnd((b, t, h, k)), rnd((b, t, h, k)),
                                                             rnd((b, t, h, k)), gate], (0, 1, 2, 3), "chunked")
    n = 4
    w = jax.nn.softmax(rnd((b, t, n), f32), -1)
    w = jnp.where(jax.nn.one_hot(jnp.argmax(w, -1), n) > 0, w, 0.0)
    cases["sse"] = (functools.partial(sse, chunk_size=c), [rnd((b, t, h, k)), rnd((b, t, h, k)), rnd((b, t, h, k)),
                                                           gate, w], (0, 1, 2, 3, 4), "chunked")
    b2, t2, d2, n2 = (2, 37, 32, 8) if tiny else (1, 2048, 2048, 16)
    cases["selective_scan"] = (
        functools.partial(selective_scan, chunk_size=16 if tiny else 64),
        [rnd((b2, t2, d2)), jax.nn.softplus(rnd((b2, t2, d2), f32)) * 0.1, -jnp.exp(rnd((d2, n2), f32, 0.5)),
         rnd((b2, t2, n2)), rnd((b2, t2, n2)), rnd((d2,), f32)], (0, 1, 2, 3, 4, 5), "chunked")
    b3, t3, h3, p3, n3 = (2, 37, 4, 16, 16) if tiny else (1, 2048, 32, 64, 128)
    cases["ssd"] = (
        functools.partial(ssd, chunk_size=16 if tiny else 64),
        [rnd((b3, t3, h3, p3)), jax.nn.softplus(rnd((b3, t3, h3), f32)) * 0.1, -jnp.exp(rnd((h3,), f32, 0.5)),
         rnd((b3, t3, 1, n3)), rnd((b3, t3, 1, n3)), rnd((h3,), f32)], (0, 1, 2, 3, 4, 5), "chunked")
    b4, t4, h4, g4, d4, l4 = (2, 45, 4, 2, 16, 4) if tiny else (1, 2048, 16, 16, 64, 10)
    cases["segment_attention"] = (functools.partial(segment_attention, segment_len=l4),
                                  [rnd((b4, t4, h4, d4)), rnd((b4, t4, g4, d4)), rnd((b4, t4, g4, d4))],
                                  (0, 1, 2), "ref")
    b6, t6, h6, g6, d6 = (2, 45, 4, 2, 16) if tiny else (1, 4096, 16, 16, 128)  # sse_h_2b's full attention
    cases["causal_attention"] = (causal_attention,
                                 [rnd((b6, t6, h6, d6)), rnd((b6, t6, g6, d6)), rnd((b6, t6, g6, d6))],
                                 (0, 1, 2), "chunked")
    n5, h5, i5, e5 = (37, 24, 40, 4) if tiny else (2048, 128, 192, 8)
    ids = jax.lax.top_k(rnd((n5, e5), f32), 2)[1]
    cases["moe"] = (moe_ffn, [rnd((n5, h5)), ids, jax.nn.softmax(rnd((n5, 2), f32), -1),
                              rnd((e5, h5, i5), dt, h5 ** -0.5), rnd((e5, h5, i5), dt, h5 ** -0.5),
                              rnd((e5, i5, h5), dt, i5 ** -0.5)], (0, 2, 3, 4, 5), "ref")
    return cases


def _loss_grad(op, args, diff, impl):
    import jax
    import jax.numpy as jnp

    def loss(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        out = op(*full, impl=impl)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(diff))), has_aux=True))


def _rel_rmse(a, e) -> float:
    a = np.asarray(a, np.float64)
    e = np.asarray(e, np.float64)
    return float(np.sqrt(np.mean((a - e) ** 2)) / max(np.sqrt(np.mean(e ** 2)), 1e-30))


def _time(fns: dict[str, Callable], args, repeats: int) -> dict[str, dict[str, float]]:
    import jax
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"min_ms": min(v), "median_ms": statistics.median(v)} for k, v in times.items()}


def check_kernels(names, *, interpret: bool, tiny: bool, repeats: int) -> dict[str, Any]:
    cases = kernel_cases(tiny)
    impl = "interpret" if interpret else "pallas"
    out = {}
    for name in names:
        op, args, diff, xla_impl = cases[name]
        dtype = str(args[0].dtype)
        kern, xla = _loss_grad(op, args, diff, impl), _loss_grad(op, args, diff, xla_impl)
        xs = [args[i] for i in diff]
        ((_, o_k), g_k), ((_, o_x), g_x) = kern(*xs), xla(*xs)
        errs = {"out": _rel_rmse(o_k, o_x), **{f"grad{i}": _rel_rmse(a, b) for i, a, b in zip(diff, g_k, g_x)}}
        entry = {"dtype": dtype, "shapes": [list(a.shape) for a in args], "rel_rmse": errs,
                 "passed": max(errs.values()) <= TOL[dtype]}
        entry["time"] = _time({impl: kern, xla_impl: xla}, xs, repeats)
        out[name] = entry
    return out


# ---- train steps ------------------------------------------------------------------------------------------------

def tiny_config(name: str, *, interpret: bool, tiny: bool):
    """The registered config; ``tiny``: one block of the pattern, batch 8, sequence 32; ``interpret``: every
    mixer's ``impl`` set to ``"interpret"``."""
    from sqattn import configs
    cfg = configs.get(name)
    with cfg.unlocked():
        if tiny:
            cfg.model.num_layers = max(len(cfg.model.block_pattern), 1)
            cfg.batch_size = 8
            cfg.data.seq_len = 32
        if interpret:
            for mixer in cfg.model.get("mixers", {}).values():
                if "impl" in mixer:
                    mixer.impl = "interpret"
    return cfg


def build_step(cfg):
    """(jitted train step, abstract or concrete inputs factory, setup, task) as the trainer builds them."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sqattn.train import state as state_lib, tasks as tasks_lib
    from sqattn.train.trainer import make_train_step

    setup = state_lib.make_setup(cfg)
    task = tasks_lib.get_task(cfg.task)
    train_ds, _ = task.make_datasets(cfg, shard_index=0, shard_count=1)
    batch = train_ds.batch(0)
    shard = {k: NamedSharding(setup.mesh, P(("data", "fsdp"), *([None] * (v.ndim - 1)))) for k, v in batch.items()}
    step = jax.jit(make_train_step(setup.graphdef, task, setup.tx, setup.schedule, cfg.optim.grad_accum, cfg.seed),
                   in_shardings=(setup.state_shardings, shard), out_shardings=(setup.state_shardings, None))
    return step, batch, shard, setup


KERNEL_NAMES = ("gla_fwd", "gla_states", "gla_bwd", "gla_bwd_dv", "sse_fwd", "mamba_selective_scan_fwd",
                "mamba_ssd_fwd", "segment_attention_fwd", "segment_attention_bwd_dq", "segment_attention_bwd_dkdv",
                "moe_ffn_fwd_up", "moe_ffn_fwd_down", "flash_attention_fwd", "flash_attention_dq",
                "flash_attention_dkdv")


def kernels_in(text: str) -> dict[str, int]:
    """Kernel name -> number of pallas_calls in a jaxpr's text, or of kernel custom calls in lowered text."""
    import re
    out = {}
    for n in KERNEL_NAMES:
        count = len(re.findall(rf'(?<![\w/]){n}(?![\w/])', text)) if "stablehlo" not in text else text.count(f'"{n}"')
        if count:
            out[n] = count
    return out


def kernel_calls_outside_manual(text: str) -> tuple[int, int]:
    """(kernel custom calls, those not inside a shard_map region) in lowered StableHLO text.

    A call is inside when it is nested in an ``sdy.manual_computation`` region, or sits in a function
    (``func.func``) that is only ever called from inside such regions (jitted kernel wrappers are outlined).
    """
    import re
    kernel_call = re.compile(r"stablehlo\.custom_call @(__gpu\$xla\.gpu\.triton|tpu_custom_call)\(")
    call = re.compile(r"\bcall @([\w$.-]+)\(")
    func_start = re.compile(r"^\s*func\.func (?:public |private )?@([\w$.-]+)\(")
    kernels: list[tuple[str, bool]] = []  # (function, nested in a manual region there)
    callers: dict[str, list[tuple[str, bool]]] = {}
    func, func_indent, stack = None, 0, []
    for line in text.split("\n"):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        m = func_start.match(line)
        if m:
            func, func_indent, stack = m.group(1), indent, []
            continue
        if func is None:
            continue
        if indent <= func_indent:
            func = None
            continue
        while stack and indent <= stack[-1]:
            stack.pop()
        if kernel_call.search(line):
            kernels.append((func, bool(stack)))
        for c in call.findall(line):
            callers.setdefault(c, []).append((func, bool(stack)))
        if "sdy.manual_computation" in line:
            stack.append(indent)

    @functools.lru_cache(maxsize=None)
    def manual(fn: str) -> bool:
        sites = callers.get(fn, [])
        return bool(sites) and all(inside or (f != fn and manual(f)) for f, inside in sites)

    outside = sum(1 for f, inside in kernels if not (inside or manual(f)))
    return len(kernels), outside


def lower_train_step(cfg, platform: str) -> str:
    """StableHLO of ``cfg``'s train step lowered for ``platform`` from this host (abstract inputs)."""
    import jax

    from sqattn.parallel import sharding
    step, batch, shard, setup = build_step(cfg)
    astate = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), setup.abstract_state,
                          setup.state_shardings)
    abatch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard[k]) for k, v in batch.items()}
    with sharding.activation_sharding(setup.mesh, setup.rules, target=platform):
        return step.trace(astate, abatch).lower(lowering_platforms=(platform,)).as_text()


def check_train_steps(names, *, interpret: bool, tiny: bool) -> dict[str, Any]:
    import jax

    from sqattn.parallel import sharding
    from sqattn.train import state as state_lib
    out = {}
    for name in names:
        cfg = tiny_config(name, interpret=interpret, tiny=tiny)
        step, batch, shard, setup = build_step(cfg)
        state = state_lib.init_state(cfg, setup)
        gbatch = {k: jax.device_put(v, shard[k]) for k, v in batch.items()}
        with sharding.activation_sharding(setup.mesh, setup.rules):
            text = str(step.trace(state, gbatch).jaxpr)
            t0 = time.perf_counter()
            state, metrics = step(state, gbatch)
            loss = float(metrics["loss"])
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            state, metrics = step(state, gbatch)
            jax.block_until_ready(metrics["loss"])
            t_second = time.perf_counter() - t0
        out[name] = {"loss": loss, "finite": bool(np.isfinite(loss)), "first_call_s": t_first,
                     "step_s": t_second, "kernels": kernels_in(text),
                     "target": setup.mesh.devices.flat[0].platform}
    return out


def check_lowering(names, platforms, *, tiny: bool) -> dict[str, Any]:
    out = {}
    for name in names:
        cfg = tiny_config(name, interpret=False, tiny=tiny)
        for platform in platforms:
            t0 = time.perf_counter()
            text = lower_train_step(cfg, platform)
            total, outside = kernel_calls_outside_manual(text)
            out[f"{name} {platform}"] = {"kernel_calls": total, "outside_shard_map": outside,
                                         "kernels": kernels_in(text), "lower_s": time.perf_counter() - t0}
    return out


def run(workdir: str, *, sections, kernels=KERNELS, configs=DEFAULT_CONFIGS, lower=(), interpret=False,
        tiny=False, repeats=5) -> dict[str, Any]:
    import jax
    result: dict[str, Any] = {"_meta": {"backend": jax.default_backend(), "devices": jax.device_count(),
                                        "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
                                        "interpret": interpret, "tiny": tiny, "loadavg_before": os.getloadavg()}}
    t0 = time.perf_counter()
    if "kernels" in sections:
        result["kernels"] = check_kernels(kernels, interpret=interpret, tiny=tiny, repeats=repeats)
    if "train_steps" in sections:
        result["train_steps"] = check_train_steps(configs, interpret=interpret, tiny=tiny)
    if "lowering" in sections and lower:
        result["lowering"] = check_lowering(configs, lower, tiny=tiny)
    result["_meta"].update(wall_s=time.perf_counter() - t0, loadavg_after=os.getloadavg())
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "accelerator_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    res = run(f.workdir, sections=f.sections, kernels=f.kernels, configs=f.configs, lower=f.lower,
              interpret=f.interpret, tiny=f.tiny, repeats=f.repeats)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
