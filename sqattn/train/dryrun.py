"""``--dry_run``: build the model abstractly and report its size, memory and FLOPs without allocating it."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import jax
from flax import nnx

from sqattn.configs.validate import validate
from sqattn.moe import inactive_params
from sqattn.train import state as state_lib


def dry_run(config, *, check_devices: bool = True) -> dict:
    """Returns {"params", "bytes_per_device", "flops_per_token", ...} for ``config`` (nothing allocated)."""
    validate(config, check_devices=check_devices)
    setup = state_lib.make_setup(config)
    model_view = nnx.merge(setup.graphdef, setup.abstract_params)
    seq_len = int(config.data.get("seq_len", 1)) if "data" in config else 1
    params_bytes = state_lib.per_device_bytes(setup.abstract_state["params"], setup.state_shardings["params"])
    total_bytes = state_lib.per_device_bytes(setup.abstract_state, setup.state_shardings)
    groups: dict[str, int] = defaultdict(int)
    for path, x in jax.tree_util.tree_leaves_with_path(setup.abstract_state["params"]):
        groups[str(getattr(path[0], "key", path[0]))] += math.prod(x.shape)
    return {
        "config": config.name,
        "params": state_lib.param_count(setup.abstract_params),
        "matmul_params": state_lib.matmul_param_count(setup.abstract_params),
        "active_params": state_lib.param_count(setup.abstract_params) - inactive_params(model_view),
        "bytes_per_device": total_bytes,
        "param_bytes_per_device": params_bytes,
        "flops_per_token": state_lib.flops_per_token(model_view, setup.abstract_params, seq_len),
        "seq_len": seq_len,
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "devices": jax.device_count(),
        "param_groups": dict(groups),
    }


def format_report(rep: dict) -> str:
    """A human table followed, as its last line, by one JSON object."""
    rows = [("config", rep["config"]), ("parameters", f"{rep['params']:,}"),
            ("matmul parameters", f"{rep['matmul_params']:,}"),
            ("active parameters / token", f"{rep['active_params']:,}"),
            ("mesh", " x ".join(f"{k}={v}" for k, v in rep["mesh"].items())),
            ("params / device", f"{rep['param_bytes_per_device'] / 2**20:,.1f} MiB"),
            ("params+opt / device", f"{rep['bytes_per_device'] / 2**20:,.1f} MiB"),
            ("train FLOPs / token", f"{rep['flops_per_token']:.4g} (seq_len {rep['seq_len']})")]
    rows += [(f"  {k}", f"{v:,}") for k, v in sorted(rep["param_groups"].items())]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    summary = {k: rep[k] for k in ("config", "params", "active_params", "bytes_per_device", "flops_per_token",
                                   "mesh", "param_bytes_per_device", "seq_len")}
    return "\n".join(lines + [json.dumps(summary)])
