"""MoE benchmarks (papers/flashmoe.md): layer throughput per dispatch path, all-to-all payload, drop rate.

  python -m experiments.bench_moe --workdir=/tmp/bench_moe          # defaults below, ~5 min on 2 CPU cores
  python -m experiments.bench_moe --paths=dense_mlp,sorted_tiled --steps=3

Three measurements, one JSON object (printed, and written to ``<workdir>/bench_moe.json``):

* ``layer``: tokens/s of one MoE layer (router + dispatch + experts + combine; forward, and forward+backward
  w.r.t. the input and every weight) for each path in ``--paths``: ``dense`` (one-hot einsum with capacity, the
  reference), ``sorted_tiled`` / ``sorted_ragged`` (sort + grouped matmul by tiles / by ``jax.lax.ragged_dot`` +
  unsort), ``expert_parallel`` (the ``shard_map`` all-to-all program on ``--devices`` simulated devices, padded
  exchange), against ``dense_mlp``: a SwiGLU of width ``top_k * mlp_dim`` on the same tokens, i.e. the same
  active FLOPs. Each path is jitted and run ``--warmup`` times, then all paths are timed round-robin ``--steps``
  times (median per path; a load change on a shared machine hits every path alike). The
  ``target`` entry checks the issue's goal: the sorted path within 1.5x of the dense MLP's time. For the
  expert-parallel program the all-to-all bytes per device are read from the compiled HLO and compared with
  ``rows * H * (dtype bytes out + 4 bytes back)``, ``rows = E * groups_per_device * C`` (XLA:CPU carries a bf16
  all-to-all as float32, so a bf16 run measures ``rows * H * 8`` on CPU).
* ``payload`` (flashmoe.md experiment A): ``--payload_tokens`` tokens on each of ``--payload_devices`` devices
  (one capacity group per device, FlashMoE's semantics), ``--payload_experts`` experts, top-``--top_k``, logits
  ``N(0, 1) + skew * (-log rank_e)``; for each skew and capacity factor: rows a capacity-padded all-to-all
  sends (``E * C`` per device) vs the rows actually kept (what an exact-count ``ragged_all_to_all`` sends),
  bytes at ``--payload_d_model`` in bf16, padding fraction ``1 - exact / padded``, drop rate, max/mean load.
* ``drop_rate``: dropped fraction of assignments vs capacity factor, uniform (skew 0) and skewed routing.

On CPU the simulated devices share the same cores, so the expert-parallel time shows the program's overhead,
not a speed-up; ``jax.lax.ragged_dot`` is expanded by XLA:CPU into a dense matmul over all experts, which is why
``sorted_tiled`` exists (see sqattn/moe/dispatch.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import sys
import time

from absl import app, flags


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_integer("groups", 8, "Capacity groups (sequences) per step; must split over --devices.")
    flags.DEFINE_integer("group_size", 512, "Tokens per group.")
    flags.DEFINE_integer("d_model", 512, "Model width H.")
    flags.DEFINE_integer("num_experts", 16, "Experts E.")
    flags.DEFINE_integer("top_k", 2, "Experts per token.")
    flags.DEFINE_integer("mlp_dim", 512, "Expert hidden width I (the dense MLP gets top_k * I).")
    flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor of the layer benchmark (<= 0: dropless).")
    flags.DEFINE_string("dtype", "bfloat16", "Compute dtype: bfloat16 | float32.")
    flags.DEFINE_list("paths", ["dense_mlp", "dense", "sorted_tiled", "sorted_ragged", "expert_parallel"],
                      "Layer paths to time.")
    flags.DEFINE_integer("block_m", 128, "Tile rows of the tiled grouped matmul.")
    flags.DEFINE_integer("devices", 8, "Simulated CPU devices for the expert-parallel program (set before jax).")
    flags.DEFINE_integer("warmup", 2, "Untimed calls (the first compiles).")
    flags.DEFINE_integer("steps", 5, "Timed calls.")
    flags.DEFINE_integer("payload_tokens", 4096, "Tokens per device in the payload experiment.")
    flags.DEFINE_integer("payload_experts", 32, "Experts in the payload experiment.")
    flags.DEFINE_integer("payload_devices", 8, "Devices in the payload experiment.")
    flags.DEFINE_integer("payload_d_model", 2048, "Row width for the payload byte counts (bf16).")
    flags.DEFINE_list("skews", ["0", "0.5", "1.0"], "Routing skews of the payload experiment.")
    flags.DEFINE_list("payload_cfs", ["1.0", "1.25", "2.0"], "Capacity factors of the payload experiment.")
    flags.DEFINE_list("drop_cfs", ["0.5", "0.75", "1.0", "1.25", "1.5", "2.0", "3.0"], "Capacity factors swept.")
    flags.DEFINE_float("drop_skew", 0.5, "Skew of the skewed routing in the drop-rate sweep.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("workdir", None, "If set, also write bench_moe.json there.")


FLAGS = flags.FLAGS

LAYER_PATHS = ("dense_mlp", "dense", "sorted_tiled", "sorted_ragged", "expert_parallel")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1}


def _time_round_robin(fns: dict, warmup: int, steps: int) -> dict:
    """``{name: (compile + first call s, median s)}`` for ``fns = {name: (fn, args)}``.

    After compiling and warming every function, the timed calls go round-robin over all of them, so a change of
    load on a shared machine hits every path alike instead of whichever happened to run then.
    """
    import jax
    first, times = {}, {name: [] for name in fns}
    for name, (fn, args) in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first[name] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            jax.block_until_ready(fn(*args))
    for _ in range(steps):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: (first[name], statistics.median(times[name])) for name in fns}


def all_to_all_bytes(hlo_text: str) -> int:
    """Bytes produced by every ``all-to-all`` in an HLO module's text (per device; tuple results summed)."""
    total = 0
    for line in hlo_text.splitlines():
        lhs, sep, _ = line.partition(" all-to-all(")
        if not sep or "=" not in lhs:
            continue
        for dtype, dims in _SHAPE.findall(lhs.split("=", 1)[1]):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _BYTES.get(dtype, 4)
    return total


def _layer_fn(path: str, *, top_k: int, capacity: int, block_m: int, mesh):
    """``f(x [G,S,H], router [H,E], params) -> out [G,S,H]`` for one path (``dense_mlp`` ignores the router)."""
    from sqattn.moe import dispatch, expert_parallel, router

    def moe(x, router_w, params):
        r = router.route(router.router_logits(x, router_w), top_k)
        if path == "dense":
            out, _ = dispatch.dense_dispatch(x, r.expert_ids, r.weights, params, capacity=capacity)
        elif path in ("sorted_tiled", "sorted_ragged"):
            out, _ = dispatch.sorted_dispatch(x, r.expert_ids, r.weights, params, capacity=capacity,
                                              gmm=path.split("_")[1], block_m=block_m)
        else:
            out, _ = expert_parallel.expert_parallel_dispatch(
                x, r.expert_ids, r.weights, params, capacity=capacity, mesh=mesh, exchange="padded")
        return out.astype(x.dtype)

    def mlp(x, router_w, params):
        del router_w
        g, s, h = x.shape
        return dispatch.expert_ffn(x.reshape(1, g * s, h), params).reshape(g, s, h).astype(x.dtype)

    return mlp if path == "dense_mlp" else moe


def layer_benchmark(*, groups: int, group_size: int, d_model: int, num_experts: int, top_k: int, mlp_dim: int,
                    capacity_factor: float, dtype: str, paths, block_m: int, warmup: int, steps: int,
                    seed: int = 0) -> dict:
    """Times each layer path forward and forward+backward; returns the ``layer`` record."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sqattn.moe import dispatch, router
    from sqattn.parallel import sharding

    bad = [p for p in paths if p not in LAYER_PATHS]
    if bad:
        raise ValueError(f"unknown layer paths {bad}; known: {LAYER_PATHS}")
    dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
    h, e, k, i = d_model, num_experts, top_k, mlp_dim
    n = groups * group_size
    cap = router.capacity(group_size, e, k, capacity_factor)
    keys = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(keys[0], (groups, group_size, h), jnp.float32).astype(dt)
    router_w = jax.random.normal(keys[1], (h, e), jnp.float32) * h ** -0.5
    moe_params = dispatch.ExpertParams(*(jax.random.normal(kk, s, jnp.float32) * s[1] ** -0.5 for kk, s in
                                         zip(keys[2:5], ((e, h, i), (e, h, i), (e, i, h)))))
    mlp_params = dispatch.ExpertParams(*(jax.random.normal(kk, s, jnp.float32) * s[1] ** -0.5 for kk, s in
                                         zip(keys[5:8], ((1, h, k * i), (1, h, k * i), (1, k * i, h)))))
    mesh = None
    if "expert_parallel" in paths:
        d = jax.device_count()
        if e % d or groups % d:
            raise ValueError(f"expert_parallel needs num_experts ({e}) and groups ({groups}) divisible by the "
                             f"{d} devices")
        mesh = sharding.make_mesh({"expert": d, "fsdp": 1})
    fns, extra, compile_s = {}, {}, {}
    for path in paths:
        fn = _layer_fn(path, top_k=k, capacity=cap, block_m=block_m, mesh=mesh)
        params = mlp_params if path == "dense_mlp" else moe_params
        args = (x, router_w, params)
        if path == "expert_parallel":
            tok = NamedSharding(mesh, P("expert", None, None))
            wsh = NamedSharding(mesh, P("expert", None, None))
            args = (jax.device_put(x, tok), jax.device_put(router_w, NamedSharding(mesh, P())),
                    jax.device_put(params, dispatch.ExpertParams(wsh, wsh, wsh)))
        t0 = time.perf_counter()
        fwd = jax.jit(fn).lower(*args).compile()  # compiled once, also read for its all-to-all bytes
        compile_s[path] = time.perf_counter() - t0
        fns[(path, "fwd")] = (fwd, args)
        fns[(path, "fwd_bwd")] = (jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32)),
                                                   argnums=(0, 1, 2))), args)
        if path == "expert_parallel":
            d = int(mesh.shape["expert"])
            rows = e * (groups // d) * cap  # capacity-padded rows each device sends, per direction
            extra[path] = dict(
                devices=d, all_to_all_rows_per_device=rows,
                all_to_all_bytes_per_device_fwd=all_to_all_bytes(fwd.as_text()),
                all_to_all_bytes_per_device_expected=rows * h * (jnp.dtype(dt).itemsize + 4))
    timed = _time_round_robin(fns, warmup, steps)
    results = {path: dict(extra.get(path, {})) for path in paths}
    for (path, mode), (first, t) in timed.items():
        first += compile_s[path] if mode == "fwd" else 0.0
        results[path][mode] = {"step_time_s": t, "tokens_per_s": n / t, "compile_and_first_s": first}
    for path, rec in results.items():
        if "dense_mlp" in results and path != "dense_mlp":
            for mode in ("fwd", "fwd_bwd"):
                base = results["dense_mlp"][mode]["step_time_s"]
                rec[mode]["time_vs_dense_mlp"] = rec[mode]["step_time_s"] / base
    out = {"tokens": n, "groups": groups, "group_size": group_size, "d_model": h, "num_experts": e, "top_k": k,
           "mlp_dim": i, "dense_mlp_dim": k * i, "capacity_factor": capacity_factor, "capacity": cap,
           "dtype": dtype, "block_m": block_m, "active_matmul_flops_per_token_fwd": 2 * 3 * h * k * i,
           "results": results}
    sorted_paths = [p for p in ("sorted_tiled", "sorted_ragged") if p in results]
    if "dense_mlp" in results and sorted_paths:
        best = min(sorted_paths, key=lambda p: results[p]["fwd_bwd"]["time_vs_dense_mlp"])
        ratio = results[best]["fwd_bwd"]["time_vs_dense_mlp"]
        out["target"] = {"goal": "sorted path within 1.5x of the dense MLP at equal active FLOPs (fwd+bwd)",
                         "path": best, "time_vs_dense_mlp": ratio, "met": bool(ratio <= 1.5)}
    return out


def skewed_logits(key, tokens: int, num_experts: int, skew: float):
    """``N(0, 1) + skew * (-log rank_e)`` with expert ``e`` at rank ``e + 1`` (flashmoe.md experiment A)."""
    import jax
    import jax.numpy as jnp
    rank = jnp.arange(1, num_experts + 1, dtype=jnp.float32)
    return jax.random.normal(key, (tokens, num_experts), jnp.float32) - skew * jnp.log(rank)


@functools.lru_cache(maxsize=None)
def _ids_fn(devices: int, tokens: int, num_experts: int, top_k: int):
    """Jitted ``(key, skew) -> expert ids [devices, tokens, k]`` of ``skewed_logits`` (one group per device)."""
    import jax
    from sqattn.moe import router

    def ids(key, skew):
        logits = skewed_logits(key, devices * tokens, num_experts, skew)
        return router.route(logits, top_k).expert_ids.reshape(devices, tokens, top_k)

    return jax.jit(ids)


def _routing_stats(ids, num_experts: int, capacity: int, d_model: int) -> dict:
    import numpy as np
    from sqattn.moe import expert_parallel
    rows = expert_parallel.exchange_rows(ids, num_experts, capacity)
    load = np.bincount(np.asarray(ids).reshape(-1), minlength=num_experts).astype(np.float64)
    return {"capacity": capacity, "padded_rows": rows["padded"], "exact_rows": rows["exact"],
            "routed_rows": rows["routed"], "padded_bytes": rows["padded"] * d_model * 2,
            "exact_bytes": rows["exact"] * d_model * 2,
            "padding_fraction": 1.0 - rows["exact"] / rows["padded"],
            "payload_efficiency_gain": rows["padded"] / max(rows["exact"], 1),
            "drop_rate": rows["dropped"] / rows["routed"], "max_over_mean_load": float(load.max() / load.mean())}


def payload_table(*, tokens: int, num_experts: int, devices: int, top_k: int, d_model: int, skews, cfs,
                  seed: int = 0) -> list[dict]:
    """Experiment A: padded vs exact-count all-to-all rows for each (skew, capacity factor)."""
    import jax
    from sqattn.moe import router
    out = []
    for skew in skews:
        ids = _ids_fn(devices, tokens, num_experts, top_k)(jax.random.key(seed), float(skew))
        for cf in cfs:
            cap = router.capacity(tokens, num_experts, top_k, float(cf))
            out.append({"skew": float(skew), "capacity_factor": float(cf),
                        **_routing_stats(ids, num_experts, cap, d_model)})
    return out


def drop_rate_table(*, tokens: int, num_experts: int, devices: int, top_k: int, skew: float, cfs,
                    seed: int = 0) -> list[dict]:
    """Dropped fraction vs capacity factor for uniform and skewed routing."""
    import jax
    from sqattn.moe import router
    out = []
    for name, s in (("uniform", 0.0), ("skewed", skew)):
        ids = _ids_fn(devices, tokens, num_experts, top_k)(jax.random.key(seed + 1), s)
        for cf in cfs:
            cap = router.capacity(tokens, num_experts, top_k, float(cf))
            st = _routing_stats(ids, num_experts, cap, 1)
            out.append({"routing": name, "skew": s, "capacity_factor": float(cf), "capacity": cap,
                        "drop_rate": st["drop_rate"], "max_over_mean_load": st["max_over_mean_load"]})
    return out


def main(argv):
    del argv
    if "jax" not in sys.modules:
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={FLAGS.devices}")
    import flax
    import jax
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        record = {
            "layer": layer_benchmark(
                groups=FLAGS.groups, group_size=FLAGS.group_size, d_model=FLAGS.d_model,
                num_experts=FLAGS.num_experts, top_k=FLAGS.top_k, mlp_dim=FLAGS.mlp_dim,
                capacity_factor=FLAGS.capacity_factor, dtype=FLAGS.dtype, paths=FLAGS.paths,
                block_m=FLAGS.block_m, warmup=FLAGS.warmup, steps=FLAGS.steps, seed=FLAGS.seed),
            "payload": payload_table(
                tokens=FLAGS.payload_tokens, num_experts=FLAGS.payload_experts, devices=FLAGS.payload_devices,
                top_k=FLAGS.top_k, d_model=FLAGS.payload_d_model, skews=FLAGS.skews, cfs=FLAGS.payload_cfs,
                seed=FLAGS.seed),
            "drop_rate": drop_rate_table(
                tokens=FLAGS.payload_tokens, num_experts=FLAGS.payload_experts, devices=FLAGS.payload_devices,
                top_k=FLAGS.top_k, skew=FLAGS.drop_skew, cfs=FLAGS.drop_cfs, seed=FLAGS.seed),
        }
    except ValueError as e:
        sys.exit(f"error: {e}")
    record.update(devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
                  backend=jax.default_backend(), jax=jax.__version__, flax=flax.__version__)
    line = json.dumps(record, sort_keys=True)
    if FLAGS.workdir:
        os.makedirs(FLAGS.workdir, exist_ok=True)
        with open(os.path.join(FLAGS.workdir, "bench_moe.json"), "w") as f:
            f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(line)


if __name__ == "__main__":
    define_flags()
    app.run(main)
