"""The trainer never loses a run: settings, a second process, corrupt checkpoints, metrics, signals.

Each test is one case of issue 25 and failed on the trainer before it was fixed.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sqattn.configs.validate import ConfigError
from sqattn.train import checkpoint as ckpt_lib
from sqattn.train import metrics as metrics_lib
from sqattn.train import train_and_evaluate
from sqattn.train import trainer as trainer_lib
from sqattn.train import workdir as workdir_lib
from tests.experiments.test_train import _cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _steps(workdir):
    ck = ckpt_lib.Checkpointer(workdir)
    try:
        return sorted(ck.all_steps())
    finally:
        ck.close()


def _train_steps(workdir):
    return [r["step"] for r in metrics_lib.read_metrics(workdir) if "loss" in r]


def _eval_steps(workdir):
    return [r["step"] for r in metrics_lib.read_metrics(workdir) if "eval_loss" in r]


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("key,val", [("keep_checkpoints", 0), ("checkpoint_every", 0), ("log_every", 0),
                                     ("eval_batches", 0), ("optim.warmup_steps", -1), ("eval_every", -5)])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, key, val):
    wd = tmp_path / "run"
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        train_and_evaluate(_cfg(**{key: val}), str(wd), progress=False)
    assert not wd.exists()


def test_keep_zero_never_deletes_existing_checkpoints(tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(_cfg(num_steps=2, checkpoint_every=1, keep_checkpoints=3), wd, progress=False)
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        train_and_evaluate(_cfg(num_steps=4, keep_checkpoints=0), wd, progress=False)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        ckpt_lib.Checkpointer(wd, 0)
    assert _steps(wd) == [1, 2]


def test_workdir_that_is_a_file_or_empty_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(workdir_lib.WorkdirError, match="not a directory"):
        train_and_evaluate(_cfg(), str(f), progress=False)
    with pytest.raises(workdir_lib.WorkdirError, match="empty"):
        train_and_evaluate(_cfg(), "", progress=False)


# ----------------------------------------------------------------------------------------------- lock
_HOLDER = ("import sys, time; sys.path.insert(0, {root!r}); from sqattn.train.workdir import WorkdirLock; "
           "WorkdirLock({wd!r}).acquire(); print('held', flush=True); time.sleep(120)")


def test_second_process_on_a_busy_workdir_stops_at_once_naming_the_holder(tmp_path):
    wd = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=ROOT, wd=wd)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {holder.pid}"):
            train_and_evaluate(_cfg(), wd, progress=False)
        assert time.perf_counter() - t0 < 30
        assert not os.path.exists(os.path.join(wd, "config.json"))     # nothing written
    finally:
        holder.kill()                                                     # kill -9: the kernel drops the lock
        holder.wait()
    out = train_and_evaluate(_cfg(num_steps=1), wd, progress=False)     # a dead holder's lock is no obstacle
    assert out["step"] == 1


def test_pidfile_fallback_detects_live_and_stale_holders(tmp_path, monkeypatch):
    """Where flock is unsupported, the lock file's PID/host decide."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")                    # ENOSYS

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / workdir_lib.LOCK_NAME
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        path.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {live.pid}"):
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    finally:
        live.kill()
        live.wait()
    lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()              # that PID is gone: stale, taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


# ----------------------------------------------------------------------------------------------- config on resume
def test_refused_resume_leaves_config_json_untouched(tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    before = open(os.path.join(wd, "config.json")).read()
    metrics_before = open(os.path.join(wd, "metrics.jsonl")).read()
    with pytest.raises(ckpt_lib.CheckpointError, match="d_model"):
        train_and_evaluate(_cfg(num_steps=4, **{"model.d_model": 32}), wd, progress=False)
    with pytest.raises(workdir_lib.ConfigChangeError, match=r"optim.lr: 0.003 -> 0.01"):
        train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2, **{"optim.lr": 0.01}), wd, progress=False)
    with pytest.raises(workdir_lib.ConfigChangeError, match="batch_size"):
        train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2, batch_size=16), wd, progress=False)
    assert open(os.path.join(wd, "config.json")).read() == before
    assert open(os.path.join(wd, "metrics.jsonl")).read() == metrics_before


def test_settings_added_later_are_not_changes_on_either_side():
    """A key one side lacks (a config saved, or built from a config.json written, before sqattn added the
    setting) is compared at its default; a real change still counts."""
    defaults = {"init": {"state": "params", "step": -1}}
    saved = {"init": {"step": -1}, "num_steps": 4}
    assert workdir_lib.config_changes(saved, {"init": {"step": -1, "state": "params"}, "num_steps": 4},
                                      defaults) == ({}, {})
    assert workdir_lib.config_changes({"init": {"step": -1, "state": "params"}, "num_steps": 4}, saved,
                                      defaults) == ({}, {})
    assert workdir_lib.config_changes(saved, {"init": {"step": -1, "state": "full"}, "num_steps": 4},
                                      defaults)[1] == {"init.state": ["params", "full"]}


def test_accepted_config_changes_are_recorded(tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    # operational (log cadence, eval batches): resumed silently but recorded; altering: needs the flag
    train_and_evaluate(_cfg(num_steps=3, checkpoint_every=2, log_every=2, **{"optim.lr": 0.002}), wd,
                       progress=False, allow_config_change=True)
    events = {r["event"]: r for r in metrics_lib.read_metrics(wd) if "event" in r}
    assert events["config_change_operational"]["changes"] == {"log_every": [1, 2]}
    assert events["config_change_altering"]["changes"] == {"num_steps": [2, 3], "optim.lr": [0.003, 0.002]}
    assert json.load(open(os.path.join(wd, "config.json")))["optim"]["lr"] == 0.002


# ----------------------------------------------------------------------------------------------- integrity
def _data_files(step_dir):
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        out += [os.path.join(root, f) for f in files]
    return sorted(out, key=os.path.getsize)


def test_flipped_bit_is_detected_and_the_previous_checkpoint_is_used(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    cfg = _cfg(num_steps=6, checkpoint_every=2)
    train_and_evaluate(cfg, full, progress=False)
    train_and_evaluate(cfg, cut, stop_after=4, progress=False)
    biggest = _data_files(os.path.join(cut, "checkpoints", "4"))[-1]
    raw = bytearray(open(biggest, "rb").read())
    raw[len(raw) // 2] ^= 0x10                                          # one bit, mid-file
    open(biggest, "wb").write(bytes(raw))
    with pytest.raises(ckpt_lib.CorruptCheckpointError):                 # the restore itself notices
        ck = ckpt_lib.Checkpointer(cut)
        try:
            setup = trainer_lib.state_lib.make_setup(cfg)
            ck.restore(4, setup.abstract_state, setup.state_shardings, json.loads(cfg.to_json_best_effort()))
        finally:
            ck.close()
    out = train_and_evaluate(cfg, cut, progress=False)                   # falls back to step 2, goes on
    assert out["step"] == 6
    aside = os.listdir(os.path.join(cut, "checkpoints.corrupt"))
    assert len(aside) == 1 and aside[0].startswith("4-")                 # moved aside, not deleted
    losses = lambda wd: {r["step"]: r["loss"] for r in metrics_lib.read_metrics(wd) if "loss" in r}  # noqa
    assert losses(cut) == losses(full)                                   # the same run, exactly


def test_all_checkpoints_corrupt_is_an_error_that_moves_nothing(tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    for f in _data_files(os.path.join(wd, "checkpoints", "2")):
        open(f, "wb").write(b"garbage")
    with pytest.raises(ckpt_lib.CheckpointError, match="no usable checkpoint"):
        train_and_evaluate(_cfg(num_steps=4, checkpoint_every=2), wd, progress=False, allow_config_change=True)
    assert _steps(wd) == [2] and not os.path.exists(os.path.join(wd, "checkpoints.corrupt"))


# ----------------------------------------------------------------------------------------------- metrics
def test_restart_before_the_first_checkpoint_does_not_duplicate_steps(tmp_path):
    wd = str(tmp_path)
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:     # a run killed at step 3, before any checkpoint
        f.writelines(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3))
    train_and_evaluate(_cfg(num_steps=3, checkpoint_every=3), wd, progress=False)
    assert _train_steps(wd) == [1, 2, 3]
    assert all(r["loss"] != 9.0 for r in metrics_lib.read_metrics(wd) if "loss" in r)


def test_rerunning_a_finished_run_logs_nothing_twice(tmp_path):
    wd = str(tmp_path)
    first = train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    again = train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    assert _train_steps(wd) == [1, 2] and _eval_steps(wd) == [2]
    assert again["eval_loss"] == first["eval_loss"] and again["loss"] == first["loss"]


def test_torn_last_line_is_dropped_and_a_malformed_line_is_named(tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    path = os.path.join(wd, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')                                   # killed mid-write
    train_and_evaluate(_cfg(num_steps=3, checkpoint_every=3), wd, progress=False, allow_config_change=True)
    assert _train_steps(wd) == [1, 2, 3]
    lines = open(path).read().splitlines()
    lines.insert(1, "not json")
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(metrics_lib.MetricsFileError, match=r"metrics.jsonl, line 2"):
        metrics_lib.read_metrics(wd)


# ----------------------------------------------------------------------------------------------- signals
def test_sigterm_at_start_up_raises_preempted_and_writes_nothing(tmp_path, monkeypatch):
    from sqattn.train import tasks as tasks_lib
    real = tasks_lib.LMTask.make_datasets

    def make_datasets(self, config, **kw):
        os.kill(os.getpid(), signal.SIGTERM)                         # arrives while the data is being built
        return real(self, config, **kw)

    monkeypatch.setattr(tasks_lib.LMTask, "make_datasets", make_datasets)
    wd = str(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(trainer_lib.Preempted) as info:
        train_and_evaluate(_cfg(), wd, progress=False)
    assert info.value.phase == "start-up"
    assert sorted(os.listdir(wd)) == [workdir_lib.LOCK_NAME]
    assert signal.getsignal(signal.SIGTERM) == before                 # the caller's handler is back


def test_sigterm_during_final_eval_keeps_the_final_checkpoint(tmp_path, monkeypatch):
    from sqattn.train import tasks as tasks_lib
    real = tasks_lib.LMTask.eval_metrics

    def eval_metrics(self, sums):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, sums)

    monkeypatch.setattr(tasks_lib.LMTask, "eval_metrics", eval_metrics)
    wd = str(tmp_path)
    with pytest.raises(trainer_lib.Preempted, match="final eval"):
        train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)
    assert _steps(wd) == [2]
    monkeypatch.setattr(tasks_lib.LMTask, "eval_metrics", real)
    out = train_and_evaluate(_cfg(num_steps=2, checkpoint_every=2), wd, progress=False)   # evaluates now
    assert np.isfinite(out["eval_loss"]) and _eval_steps(wd) == [2]


def test_cli_sigterm_at_start_up_exits_cleanly(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--config=lm_tiny:runlocal",
                             f"--workdir={tmp_path}", "--noprogress"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:                   # the trainer logs the config as it starts: signal it then
        seen.append(line)
        if "config:" in line:
            proc.send_signal(signal.SIGTERM)
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "stopped by SIGTERM during start-up" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_sample_cli_on_a_corrupt_checkpoint_prints_one_line(tmp_path):
    import shutil
    wd = str(tmp_path)
    train_and_evaluate(_cfg(num_steps=1, checkpoint_every=1), wd, progress=False)
    shutil.rmtree(os.path.join(wd, "checkpoints", "1", "state", "d"))       # the data files are gone
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={wd}", "--prompt=def "],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "CorruptCheckpointError" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_family_settings_added_later_resume_old_runs():
    """A diffusion-family run saved before ``diffusion.min_snr_gamma`` existed resumes with today's config
    (the default 0 it implicitly used); a real change of it, or the key in a config without that family, is not
    silently filled in."""
    from sqattn import configs
    from sqattn.train import trainer
    current = json.loads(configs.get("judge_shapes").to_json())
    saved = json.loads(configs.get("judge_shapes").to_json())
    del saved["diffusion"]["min_snr_gamma"]
    assert trainer._resume_check(saved, current, allow=False) == ({}, {})
    current["diffusion"]["min_snr_gamma"] = 5.0
    with pytest.raises(workdir_lib.ConfigChangeError, match=r"diffusion.min_snr_gamma: 0.0 -> 5.0"):
        trainer._resume_check(saved, current, allow=False)
    lm = json.loads(configs.get("lm_tiny").to_json())
    assert "diffusion.min_snr_gamma" not in trainer._resume_defaults(lm, lm)
