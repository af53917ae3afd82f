"""The experiments.train binary as a user runs it: errors, dry run, SIGTERM handling."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_config_exits_with_message():
    r = _run("--config=nope")
    assert r.returncode != 0
    assert "unknown config 'nope'; known configs:" in r.stderr


def test_bad_override_exits_with_message():
    r = _run("--config=lm_tiny", "--config.model.nope=1")
    assert r.returncode != 0 and "unknown key 'nope' under model" in r.stderr


def test_dry_run_last_line_is_json():
    r = _run("--config=lm_tiny", "--dry_run")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"params", "bytes_per_device", "flops_per_token"} <= set(rep)
    assert rep["activations_target"] == "cpu" and rep["activation_bytes_per_device"] > 0


def test_dry_run_target_traces_that_platforms_kernels():
    """On TPU the SSE mixer runs its Pallas kernel, which saves less than the chunked jnp form on CPU."""
    reps = {}
    for target in ("cpu", "tpu"):
        r = _run("--config=sse_h_tiny", "--dry_run", f"--dry_run_target={target}")
        assert r.returncode == 0, r.stderr[-2000:]
        reps[target] = json.loads(r.stdout.strip().splitlines()[-1])
        assert reps[target]["activations_target"] == target
    assert 0 < reps["tpu"]["activation_bytes_per_device"] < reps["cpu"]["activation_bytes_per_device"]


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
    wd = str(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--config=lm_tiny:runlocal", "--config.num_steps=100000",
         "--config.checkpoint_every=100000", f"--workdir={wd}", "--noprogress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    steps = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 1
    assert '"stopped_early": true' in out


def test_every_binary_imports_alongside_the_others_and_defines_its_flags():
    """pytest imports many binaries into one process: none may define absl flags at import time (the first
    duplicate `--workdir` breaks collection of the whole suite), and each one's `define_flags` must still work."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments"))
                   if f.endswith(".py") and not f.startswith("_") and f != "common.py")
    code = (
        "import importlib, sys\n"
        "from absl import flags\n"
        f"names = {names!r}\n"
        "before = set(flags.FLAGS)\n"
        "mods = [importlib.import_module('experiments.' + n) for n in names]\n"
        "new = set(flags.FLAGS) - before\n"
        "mine = sorted(k for k in new if (flags.FLAGS.find_module_defining_flag(k) or '').startswith('experiments'))\n"
        "assert not mine, f'experiments flags defined at import time: {mine}'\n"
        "before = set(flags.FLAGS)\n"
        "import experiments.train as t\n"
        "for n, m in zip(names, mods):\n"
        "    d = getattr(m, 'define_flags', None)\n"
        "    if d is None:\n"
        "        continue\n"
        "    for k in list(flags.FLAGS):\n"
        "        if k not in before:\n"
        "            delattr(flags.FLAGS, k)\n"
        "    d()\n"
        "print('ok', len(names))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[:1] == ["ok"]
