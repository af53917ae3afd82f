"""Launch plans for a config on pod slices and GPU hosts, from the dry run (nothing allocated, nothing typed).

  python -m experiments.launch_plan                       # sse_h_2b: the markdown table of WORKSPACE.md
  python -m experiments.launch_plan --config=sse_h_2b --measure   # + the XLA check of the activation figure

For each plan (TPU v5p-64, v5e-256, 8 x H100, 8 x H200, 4 hosts x 8 H100) it builds the config's state on
that many simulated devices with the plan's mesh (``sqattn.train.dryrun``): parameters, Adam state and
gradients per device from the shardings, activations per device from ``activation_memory`` traced with that
platform's kernels (``target``), at the smallest ``optim.grad_accum`` whose step fits 90% of the chip's
memory. Tokens per step and FLOPs per step (training, 6 x active params + mixer terms) come from the config.
Prints the markdown table (and, with ``--json``, one JSON line per plan). ``--measure`` compiles the
reduced-size check (``measure_activations``: minutes on 2 cores) and prints its ratio under the table.
"""

from __future__ import annotations

import os
import sys

MAX_DEVICES = 256
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={MAX_DEVICES}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    platform: str          # "tpu" | "gpu": which kernels the activation estimate traces
    devices: int           # chips (a v5p chip is one JAX device with two TensorCores: v5p-64 = 32 chips)
    hbm_gib: float         # memory per device
    mesh: dict             # config.mesh overrides
    hosts: int
    launch: str            # how the command is started


PLANS = (
    Plan("TPU v5p-64", "tpu", 32, 95.0, {"fsdp": -1}, 8,
         "gcloud compute tpus tpu-vm ssh $TPU --worker=all --command='{cmd} --distributed'"),
    Plan("TPU v5e-256", "tpu", 256, 16.0, {"fsdp": -1}, 64,
         "gcloud compute tpus tpu-vm ssh $TPU --worker=all --command='{cmd} --distributed'"),
    Plan("8 x H100 80GB, 1 host", "gpu", 8, 80.0, {"fsdp": -1}, 1, "{cmd}"),
    Plan("8 x H200 141GB, 1 host", "gpu", 8, 141.0, {"fsdp": -1}, 1, "{cmd}"),
    Plan("4 hosts x 8 H100 80GB", "gpu", 32, 80.0, {"data": 4, "fsdp": 8}, 4,
         "srun --nodes=4 --ntasks-per-node=1 {cmd} --distributed"),   # jax.distributed reads SLURM's env
)
FIT = 0.9   # fraction of device memory a plan may fill
_ACT_CACHE: dict = {}   # (platform, rows per device) -> activation_memory (same model and sequence length)


def plan_report(config, plan: Plan) -> dict:
    """The dry-run figures of ``config`` under ``plan`` (mesh from ``plan.mesh``; smallest fitting grad_accum)."""
    import jax
    import numpy as np

    from sqattn.parallel import sharding
    from sqattn.train import dryrun
    from sqattn.train import state as state_lib

    if plan.devices > jax.device_count():
        raise ValueError(f"plan {plan.name!r} needs {plan.devices} devices, {jax.device_count()} are simulated; "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={plan.devices} before jax starts")
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
        c.mesh.update(**plan.mesh)
    sizes = {a: int(c.mesh.get(a, 1)) for a in sharding.MESH_AXES}
    auto = [a for a, s in sizes.items() if s == -1]
    if auto:
        sizes[auto[0]] = plan.devices // int(np.prod([s for s in sizes.values() if s != -1]))
    devices = np.asarray(jax.devices()[:plan.devices]).reshape(tuple(sizes[a] for a in sharding.MESH_AXES))
    mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES)
    setup = state_lib.make_setup(c, mesh)
    state_b = state_lib.per_device_bytes(setup.abstract_state, setup.state_shardings)
    param_b = state_lib.per_device_bytes(setup.abstract_state["params"], setup.state_shardings["params"])
    dp = sizes["data"] * sizes["fsdp"]
    accum, act = 1, None
    while True:
        if c.batch_size % (dp * accum):
            raise ValueError(f"{plan.name}: no grad_accum fits (batch {c.batch_size}, {dp} data-parallel devices)")
        with c.unlocked():
            c.optim.grad_accum = accum
        key = (plan.platform, dryrun.rows_per_device(c, sizes))
        if key not in _ACT_CACHE:
            _ACT_CACHE[key] = dryrun.activation_memory(c, setup, target=plan.platform)
        act = _ACT_CACHE[key]
        if state_b + param_b + act["total"] <= FIT * plan.hbm_gib * GiB or c.batch_size // dp // accum == 1:
            break
        accum *= 2
    model_view = __import__("flax").nnx.merge(setup.graphdef, setup.abstract_params)
    seq = int(c.data.seq_len)
    fpt = state_lib.flops_per_token(model_view, setup.abstract_params, seq)
    total = state_b + param_b + act["total"]
    flags = " ".join(f"--config.mesh.{k}={v}" for k, v in plan.mesh.items())
    if accum > 1:
        flags += f" --config.optim.grad_accum={accum}"
    cmd = f"python -m experiments.train --config={config.name} --workdir=$WORKDIR {flags}"
    return {"plan": plan.name, "devices": plan.devices, "hosts": plan.hosts, "hbm_gib": plan.hbm_gib,
            "mesh": sizes, "grad_accum": accum, "rows_per_device": act["rows"],
            "params_gib": param_b / GiB, "opt_gib": (state_b - param_b) / GiB, "grads_gib": param_b / GiB,
            "activations_gib": act["total"] / GiB, "total_gib": total / GiB, "fits": total <= FIT * plan.hbm_gib * GiB,
            "tokens_per_step": int(c.batch_size) * seq, "step_flops": fpt * int(c.batch_size) * seq,
            "step_flops_per_device": fpt * int(c.batch_size) * seq / plan.devices,
            "command": plan.launch.format(cmd=cmd)}


def markdown(rows: list[dict], config_name: str) -> str:
    head = ("| plan | devices (hosts) | mesh | grad_accum (rows/device) | params | Adam | grads | activations | "
            "total / HBM | tokens/step | FLOPs/step (per device) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        lines.append(
            f"| {r['plan']} | {r['devices']} ({r['hosts']}) | {mesh} | {r['grad_accum']} ({r['rows_per_device']}) | "
            f"{r['params_gib']:.3f} GiB | {r['opt_gib']:.3f} GiB | {r['grads_gib']:.3f} GiB | "
            f"{r['activations_gib']:.2f} GiB | {r['total_gib']:.1f} / {r['hbm_gib']:.0f} GiB"
            f"{'' if r['fits'] else ' (does not fit)'} | {r['tokens_per_step']:,} | "
            f"{r['step_flops']:.3g} ({r['step_flops_per_device']:.3g}) |")
    lines.append("")
    lines.append(f"Commands ({config_name}; `$WORKDIR` e.g. gs://BUCKET/{config_name} or a shared filesystem path):")
    lines.append("")
    for r in rows:
        lines.append(f"- {r['plan']}: `{r['command']}`")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from sqattn import configs
    name, measure, as_json = "sse_h_2b", False, False
    for a in argv[1:]:
        if a.startswith("--config="):
            name = a.split("=", 1)[1]
        elif a == "--measure":
            measure = True
        elif a == "--json":
            as_json = True
        else:
            sys.exit(f"error: unknown argument {a!r}; usage: python -m experiments.launch_plan "
                     f"[--config=NAME] [--measure] [--json]")
    config = configs.get(name)
    rows = [plan_report(config, p) for p in PLANS]
    print(markdown(rows, name))
    if measure:
        from sqattn.train import dryrun
        m = dryrun.measure_activations(config)
        print(f"\nXLA check (CPU, {m['layers']} layers, seq {m['seq_lens']}, 1 row): compiled temp grew "
              f"{(m['compiled_temp'][1] - m['compiled_temp'][0]) / 2**20:.1f} MiB, the estimate "
              f"{(m['estimate'][1] - m['estimate'][0]) / 2**20:.1f} MiB (ratio {m['ratio']:.3f}).")
    if as_json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main(sys.argv)
