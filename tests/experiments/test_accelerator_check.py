"""experiments/accelerator_check.py on CPU: the interpreter at tiny shapes, and train steps lowered for GPU/TPU
with every kernel call inside a shard_map region (8 simulated devices, the configs' fsdp mesh)."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp

from experiments import accelerator_check as ac


def test_interpret_run_writes_parity_and_times(tmp_path):
    """Kernel parity (forward and every gradient) of the interpreted kernels against the XLA paths; the other
    kernels' interpreter parity is in their own tests (a full interpreted sweep takes minutes on 2 cores)."""
    res = ac.run(str(tmp_path), sections=["kernels"], kernels=["ssd", "segment_attention"], interpret=True,
                 tiny=True, repeats=1)
    with open(os.path.join(tmp_path, "accelerator_check.json")) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    for name in ("ssd", "segment_attention"):
        entry = res["kernels"][name]
        assert entry["passed"], entry["rel_rmse"]
        assert set(entry["rel_rmse"]) == {"out"} | {f"grad{i}" for i in (range(6) if name == "ssd" else range(3))}
        assert set(entry["time"]) == {"interpret", "chunked" if name == "ssd" else "ref"}


def test_train_step_section_with_auto(tmp_path):
    """One train step with impl="auto": on this CPU mesh auto is the XLA path, so the step has no kernel."""
    res = ac.run(str(tmp_path), sections=["train_steps"], configs=["mamba2_tiny"], tiny=True)
    step = res["train_steps"]["mamba2_tiny"]
    assert step["finite"] and step["kernels"] == {} and step["target"] == "cpu"


def test_train_steps_lower_for_gpu_and_tpu_with_kernels_in_shard_map():
    """scout_swa_tiny (segment attention, SWA attention) and sse_h_tiny (GLA; chunk 8: the kernel on TPU, the
    chunked path on GPU; full attention) lowered from this CPU host for both targets, forward and backward kernels."""
    res = ac.check_lowering(["scout_swa_tiny", "sse_h_tiny"], ["cuda", "tpu"], tiny=True)
    flash = {"flash_attention_fwd": 1, "flash_attention_dq": 1, "flash_attention_dkdv": 1}
    scout = {"segment_attention_fwd": 1, "segment_attention_bwd_dq": 1, "segment_attention_bwd_dkdv": 1}
    assert res["scout_swa_tiny cuda"]["kernels"] == scout | flash
    assert res["scout_swa_tiny tpu"]["kernels"] == scout | flash
    assert res["sse_h_tiny tpu"]["kernels"] == {"gla_fwd": 1, "gla_states": 1, "gla_bwd": 1} | flash
    assert res["sse_h_tiny cuda"]["kernels"] == flash  # chunk 8 is not a multiple of 16: GLA falls back
    for key, entry in res.items():
        assert entry["outside_shard_map"] == 0, key
        assert entry["kernel_calls"] == sum(entry["kernels"].values()), key


def test_kernel_call_outside_shard_map_is_counted():
    """The region check can fail: a kernel lowered under a sharded jit without a kernel context is outside."""
    from kernels.segment_attention import segment_attention
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.ShapeDtypeStruct((8, 64, 2, 16), jnp.bfloat16, sharding=sh)
    f = jax.jit(functools.partial(segment_attention, segment_len=4, impl="pallas", target="gpu"))
    text = f.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert ac.kernel_calls_outside_manual(text) == (1, 1)


def test_every_pallas_kernel_name_is_counted():
    """KERNEL_NAMES must name every pallas_call in kernels/ (a renamed or new kernel would go uncounted in the
    lowering and train-step sections): literal names, and the flash kernels' f"{name}_fwd/_dq/_dkdv" for both
    of their users (flash_attention, segment_attention_bwd)."""
    import pathlib
    import re
    root = pathlib.Path(ac.__file__).resolve().parents[1] / "kernels"
    names = set()
    for path in root.rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'\bname="([a-z0-9_]+)"', text))
    flash_users = {n for n in names if n.startswith("segment_attention_bwd")} | {"flash_attention"}
    names -= flash_users
    names |= {f"{u}_{s}" for u in flash_users for s in ("dq", "dkdv")} | {"flash_attention_fwd"}
    assert names == set(ac.KERNEL_NAMES)
