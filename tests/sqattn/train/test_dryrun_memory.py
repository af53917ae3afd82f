"""Dry-run memory: sse_h_2b per-device state near ideal on a pod slice; activation estimate vs autodiff and XLA."""

import json
import os
import subprocess
import sys

import pytest

from sqattn import configs
from sqattn.train import dryrun

# Runs with 256 simulated devices (XLA_FLAGS must be set before jax starts, hence a subprocess). Abstract only.
_POD = r"""
import json
from sqattn import configs
from sqattn.train import dryrun
out = {}
for n in (64, 256):
    c = configs.get("sse_h_2b")
    c.mesh.fsdp = n
    rep = dryrun.dry_run(c, check_devices=False, activations=(n == 256))
    out[n] = {k: rep.get(k) for k in ("params", "bytes_per_device", "param_bytes_per_device", "mesh",
                                      "activations", "tokens_per_step")}
print(json.dumps(out))
"""


def test_sse_h_2b_state_per_device_within_1_3x_of_ideal_at_64_and_256_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=256", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _POD], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for n in ("64", "256"):
        rep = out[n]
        assert rep["mesh"]["fsdp"] == int(n)
        ideal = 12 * rep["params"] / int(n)          # f32 params + Adam's two f32 moments, split n ways
        assert rep["bytes_per_device"] <= 1.3 * ideal, (n, rep["bytes_per_device"] / ideal)
        assert rep["bytes_per_device"] >= ideal * 0.999
    act = out["256"]["activations"]
    assert act["rows"] == 1 and act["seq_len"] == 4096
    # At least the log-softmax the loss keeps ([1, 4096, 151936] f32) and the residual stream.
    assert act["saved"] >= 4096 * 151936 * 4 + 18 * 4096 * 2048 * 2
    assert act["total"] == act["saved"] + act["transient"] + act["weights"]


def _small(remat: bool):
    c = configs.get("sse_h_2b:runlocal=True")
    c.model.remat = remat
    c.batch_size = 16
    return c


@pytest.mark.parametrize("remat", [True, False])
def test_parts_compose_to_the_whole_model_residuals(remat):
    """The estimate traced in parts (head, one block per kind) saves what autodiff of the whole loss saves."""
    c = _small(remat)
    parts = dryrun.activation_memory(c)
    whole = dryrun.activation_memory(c, whole=True)
    assert parts["rows"] == whole["rows"] >= 2
    assert parts["saved"] == pytest.approx(whole["saved"], rel=0.02)
    assert parts["weights"] == pytest.approx(whole["weights"], rel=0.02)
    assert parts["transient"] > 0
    if remat:   # remat keeps far less than keeping every block's intermediates
        assert parts["saved"] < 0.5 * dryrun.activation_memory(_small(False))["saved"]


def test_compiled_step_grows_at_least_like_the_estimate():
    """The estimate counts buffers XLA really allocates: with the sequence length, the compiled step's temp
    memory grows at least as much as the estimate (a lower bound; 10% slack for buffer reuse), at a reduced
    size. (For sse_h_2b the two grow alike, 1.04x: measured in sqattn/train/dryrun.py's docstring.)"""
    c = configs.get("lm_tiny")
    c.model.update(remat=True, num_layers=2)
    m = dryrun.measure_activations(c, seq_lens=(64, 128))
    assert m["layers"] == 1 and m["seq_lens"] == [64, 128]
    assert m["compiled_temp"][1] > m["compiled_temp"][0]
    assert m["ratio"] >= 1 / 1.1, m


def test_activation_bytes_for_the_trainer():
    from sqattn.train import state as state_lib
    c = configs.get("lm_tiny")
    setup = state_lib.make_setup(c)
    assert dryrun.activation_bytes(c, setup) == dryrun.activation_memory(c, setup)["total"] > 0
    c2 = configs.get("lm_tiny")
    c2.task = "bearing"      # a task whose batch layout the estimate does not know
    assert dryrun.activation_memory(c2, setup) is None and dryrun.activation_bytes(c2, setup) == 0


def test_rows_per_device():
    c = configs.get("lm_tiny")
    c.batch_size, c.optim.grad_accum = 256, 4
    assert dryrun.rows_per_device(c, {"data": 2, "fsdp": 8}) == 4
    assert dryrun.rows_per_device(c, {"data": 1, "fsdp": 256}) == 1
