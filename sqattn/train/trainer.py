"""``train_and_evaluate(config, workdir)``: the one trainer, generic over tasks.

Sections: setup (mesh, task, data) -> state (init or resume) -> compiled steps -> loop (log, eval, hooks,
checkpoint, SIGTERM) -> final eval, plot. Every step's data and randomness are functions of (seed, step), so
an interrupted run resumed from its checkpoint reproduces the uninterrupted run exactly.

Host hooks (rank allocators, adapter expansion, fade-in ramps) come from the task (``task.make_hooks(config)``)
and from the peft method's module (``make_hook(config)``). A hook has

- ``every``: it is called after each step ``s`` with ``s % every == 0``, before that step's checkpoint;
- ``__call__(step, state, ctx) -> new_state | None``: ``state`` is the train state (``{"step", "params",
  "opt_state"}``) and ``ctx`` a ``HookContext``. A returned state must have the same shapes (change values, e.g.
  masks, never shapes, so nothing recompiles); it is put back into the state's shardings;
- ``events``: a list of dicts the trainer drains into ``metrics.jsonl`` as ``{"step": s, "event": ..., ...}``;
- ``state_dict() -> dict`` (JSON) saved in every checkpoint's metadata, and ``load_state_dict(d)`` called on
  resume, so a run stopped mid-schedule resumes exactly.

Cumulative FLOPs: each train record carries ``train_flops``, the run's training FLOPs so far plus, for a run
started from another (``config.init.workdir``), the source run's ``train_flops`` at the source step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sqattn.configs.validate import validate
from sqattn.parallel import sharding
from sqattn.train import checkpoint as ckpt_lib
from sqattn.train import flops as flops_lib
from sqattn.train import metrics as metrics_lib
from sqattn.train import state as state_lib
from sqattn.train import tasks as tasks_lib
from sqattn.train import workdir as workdir_lib

log = logging.getLogger("sqattn.train")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the last good checkpoint is untouched."""


class MemoryBudgetError(MemoryError):
    """The configured model does not fit the devices present."""


# ----------------------------------------------------------------------------------------------- steps
def make_train_step(graphdef, task, tx, schedule, grad_accum: int, seed: int):
    def loss_of(params, batch, rng):
        model = nnx.merge(graphdef, params)
        loss, metrics = task.loss_fn(model, batch, rng)
        w = metrics["weight"]
        return loss * w, metrics     # sum-form so micro-batches average exactly by weight

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        params = state["params"]
        if grad_accum == 1:
            (lsum, metrics), grads = grad_fn(params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)   # [A, b/A, ...]

            def body(carry, xs):
                mb, i = xs
                (l, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
                acc_g, acc_l, acc_m = carry
                wm = {k: v * m["weight"] if k != "weight" else v for k, v in m.items()}
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + l,
                        jax.tree.map(jnp.add, acc_m, wm)), None

            zeros_m = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)[0][1])
            init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_m))
            (grads, lsum, msum), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
            metrics = {k: v / jnp.maximum(msum["weight"], 1.0) if k != "weight" else v for k, v in msum.items()}
        weight = jnp.maximum(metrics["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = lsum / weight
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = jax.tree.map(lambda p, u: p + u, params, updates)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
        out = dict(metrics, loss=loss, grad_norm=_global_norm(grads), lr=schedule(state["step"]),
                   params_finite=finite.astype(jnp.float32))
        return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, out

    return train_step


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_eval_step(graphdef, task):
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        _, m = task.loss_fn(model, batch, jax.random.key(0))
        w = m["weight"]
        return {k: (v * w if k != "weight" else v) for k, v in m.items()}
    return eval_step


# ----------------------------------------------------------------------------------------------- helpers
def _device_memory_budget() -> tuple[int, str]:
    """Bytes one device may hold, and a description of where the number comes from."""
    dev = jax.local_devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - not available on every backend
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    import psutil
    total = psutil.virtual_memory().total
    n = jax.local_device_count()
    return total // n, f"host RAM {total / 2**30:.1f} GiB shared by {n} local {dev.platform} device(s)"


_ACT_BYTES_BOUND = 1024


def _activation_bound(config, setup: state_lib.Setup) -> float:
    """A generous upper bound on one step's activation bytes per device (``inf`` where the config's shape
    is not an LM's: then the exact trace decides)."""
    from sqattn.train import dryrun
    m, data = config.get("model", {}), config.get("data", {})
    try:
        rows = dryrun.rows_per_device(config, setup.mesh.shape)
        width = int(m["d_model"]) * int(m["num_layers"]) + int(m.get("vocab_size", 0))
        return float(_ACT_BYTES_BOUND) * rows * int(data["seq_len"]) * width
    except (KeyError, TypeError, ValueError, AttributeError):
        return float("inf")


def check_memory(setup: state_lib.Setup, config) -> int:
    """Fails at once, with numbers, when one train step cannot fit one device: params + optimizer state +
    gradients, plus the step's activations (``dryrun.activation_bytes``, traced abstractly: a fraction of a
    second for a small model, seconds for a 2B one). The trace is skipped where even a generous bound on the
    activations (``_ACT_BYTES_BOUND`` bytes per token per residual-stream float, the largest measured ratio
    is ~230, sse_h on CPU) leaves half the device free."""
    state = state_lib.per_device_bytes(setup.abstract_state, setup.state_shardings)
    state += state_lib.per_device_bytes(setup.abstract_state["params"], setup.state_shardings["params"])  # grads
    budget, where = _device_memory_budget()
    act = 0
    if state <= budget and state + _activation_bound(config, setup) > budget / 2:
        from sqattn.train import dryrun
        act = dryrun.activation_bytes(config, setup)
    need = state + act
    if need > budget:
        what = ("params, optimizer state and gradients alone" if not act else
                f"params, optimizer state and gradients ({state / 2**30:.2f} GiB) and the activations of one "
                f"step ({act / 2**30:.2f} GiB; smaller batch_size or grad_accum > 1 cut these)")
        raise MemoryBudgetError(
            f"config {config.name!r} needs {need / 2**30:.2f} GiB per device for {what} "
            f"(mesh {dict(setup.mesh.shape)}), but this machine has {budget / 2**30:.2f} GiB per "
            f"device ({where}). Use more devices (config.mesh.*), a smaller model, or --dry_run to inspect it.")
    return need


@dataclasses.dataclass
class HookContext:
    """What a host hook may use besides the train state."""
    config: Any
    graphdef: Any
    task: Any
    mesh: jax.sharding.Mesh
    state_shardings: dict
    train_batch: Callable[[int], dict]     # step -> the global train batch of that step (device arrays)


def _run_hooks(hooks, step: int, state: dict, ctx: HookContext, writer) -> dict:
    for hook in hooks:
        if hook.every and step % hook.every == 0:
            new = hook(step, state, ctx)
            if new is not None:
                state = jax.device_put(new, ctx.state_shardings)
        events = getattr(hook, "events", None)
        if events:
            for ev in events:
                writer.write_event({"step": step, **ev})
            events.clear()
    return state


def _source_flops(config) -> float:
    """Training FLOPs of ``config.init.workdir``'s run up to the step this run starts from (0 when none).

    Read from the source's ``metrics.jsonl`` ``train_flops``: exact at a logged step, else extrapolated at the
    source's constant per-step rate from its last two records before the step."""
    init = config.get("init") or {}
    if not init.get("workdir") or init.get("state", "params") == "full":
        return 0.0           # init.state='full': the step counter continues the source's, its FLOPs included
    step = int(init.get("step", -1))
    if step < 0:
        ckpt = os.path.join(init.workdir, "checkpoints")
        steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
        if not steps:
            return 0.0
        step = max(steps)
    try:
        recs = [r for r in metrics_lib.read_metrics(init.workdir) if "train_flops" in r and r["step"] <= step]
    except (OSError, metrics_lib.MetricsFileError) as e:
        log.warning("init.workdir's metrics are unreadable (%s); its FLOPs are not counted", e)
        return 0.0
    if not recs:
        log.warning("init.workdir %r logged no train_flops up to step %d; its FLOPs are not counted",
                    init.workdir, step)
        return 0.0
    recs = sorted({r["step"]: r for r in recs}.values(), key=lambda r: r["step"])
    last = recs[-1]
    if last["step"] == step:
        return float(last["train_flops"])
    if len(recs) >= 2:
        rate = (last["train_flops"] - recs[-2]["train_flops"]) / (last["step"] - recs[-2]["step"])
    else:
        rate = last["train_flops"] / max(last["step"], 1)
    return float(last["train_flops"] + rate * (step - last["step"]))


class Preempted(BaseException):
    """SIGTERM/SIGINT arrived where there is nothing to save (start-up, restore, compile, the final eval).

    A ``BaseException`` (like ``KeyboardInterrupt``), so no ``except Exception`` on the way (orbax's, ours)
    mistakes it for a corrupt checkpoint.
    """

    def __init__(self, signum: int, phase: str):
        self.signum, self.phase = signum, phase
        super().__init__(f"{signal.Signals(signum).name} during {phase}")


class _Signals:
    """SIGTERM and SIGINT for the whole of ``train_and_evaluate``.

    In the training loop (``phase == "train"``) a signal sets ``requested``: the loop saves a checkpoint and
    returns. In the other phases nothing can be lost, so it raises ``Preempted`` at once. A second SIGINT in
    the loop raises ``KeyboardInterrupt`` (the impatient Ctrl-C). ``phase = "cleanup"`` ignores signals
    while files are being closed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.phase = "start-up"
        self._prev: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._prev[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase == "cleanup":
            return
        if self.phase != "train":
            raise Preempted(signum, self.phase)
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received: saving a checkpoint and exiting", name)
        self.requested = True

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        return False


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


_cache_choice: str | None = None


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache, so a rerun or restart loads its compiled steps.

    ``path``: the cache directory; ``None`` = ``$SQATTN_COMPILATION_CACHE`` or ``~/.cache/sqattn/jax``; ``""``
    (or the variable set to "") leaves the cache off. A cache directory configured before (e.g. by a test
    harness or the user's own ``jax.config``) is kept. Returns the directory in use, or ``None``.
    """
    global _cache_choice
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None and _cache_choice == "":
        return None               # turned off explicitly earlier (e.g. --compilation_cache=)
    if path is not None:
        _cache_choice = path
    if path is None:
        path = os.environ.get("SQATTN_COMPILATION_CACHE",
                              os.path.join(os.path.expanduser("~"), ".cache", "sqattn", "jax"))
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache %r unusable (%s); compiling without it", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# ----------------------------------------------------------------------------------------------- main
def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None,
                       progress: bool = True, allow_config_change: bool = False) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns final metrics.

    Args:
      config: a config from ``sqattn.configs.get`` (validated here before anything compiles).
      workdir: output directory: ``checkpoints/``, ``metrics.jsonl``, ``tb/``, ``loss.png``, ``config.json``.
      stop_after: simulate preemption after this step (as if SIGTERM arrived): save and return.
      progress: show a progress bar with loss, tokens/s and MFU.
      allow_config_change: resume even when the config differs from the checkpoint's in a way that changes
        what the run computes (data, optimizer, batch, steps, seed); the changes go to ``metrics.jsonl``.
        Without it such a resume raises ``ConfigChangeError`` and writes nothing. Model changes never resume.

    Raises:
      ConfigError, WorkdirError, WorkdirBusyError (another process holds the workdir), ConfigChangeError,
      CheckpointError (no intact checkpoint), NonFiniteLossError, MemoryBudgetError, and ``Preempted`` for a
      SIGTERM/SIGINT outside the training loop (inside it, a signal saves a checkpoint and returns).

    Returns:
      The last train record merged with the last eval record, plus ``"stopped_early"``.
    """
    with _Signals() as signals:
        validate(config)
        enable_compilation_cache()
        workdir_lib.prepare(workdir)
        is_main = jax.process_index() == 0
        lock = workdir_lib.WorkdirLock(workdir).acquire() if is_main else None
        closers: list = []          # what _train opened (checkpointer, metrics writer, progress bar)
        try:
            return _train(config, workdir, signals, closers, stop_after=stop_after,
                          progress=progress and is_main, allow_config_change=allow_config_change)
        finally:
            signals.phase = "cleanup"
            for close in reversed(closers):
                close()
            if lock is not None:
                lock.release()


def _resume_defaults(saved: dict, current: dict) -> dict:
    """What a checkpoint written before a setting existed implicitly used: every base setting's default, plus
    each later-added family setting whose family (``diffusion.`` of ``diffusion.min_snr_gamma``) either config
    has."""
    from sqattn.configs import base
    defaults = workdir_lib.flatten(base.base_config().to_dict())
    for key, val in base.ADDED_FAMILY_SETTINGS.items():
        family = key.split(".")[0]
        if family in saved or family in current:
            defaults[key] = val
    return defaults


def _resume_check(saved_config: dict | None, config_json: dict, allow: bool) -> tuple[dict, dict]:
    """Compares the checkpoint's config with the one asked for; raises ``ConfigChangeError`` if refused."""
    if saved_config is None:
        return {}, {}
    operational, altering = workdir_lib.config_changes(saved_config, config_json,
                                                       defaults=_resume_defaults(saved_config, config_json))
    model_keys = {k: v for k, v in altering.items() if k.startswith("model.") or k in ("model_name", "task")}
    if model_keys:        # never resumable: the checkpoint's arrays are another model's
        raise ckpt_lib.CheckpointError(
            "the checkpoint was written with a different model config; refusing to resume:\n"
            + workdir_lib.format_changes(model_keys) + "\nUse another --workdir, or the saved config.")
    if altering and not allow:
        raise workdir_lib.ConfigChangeError(
            "resuming with a config that changes what the run computes:\n" + workdir_lib.format_changes(altering)
            + "\nNothing was written. Use the saved config (config.json), another --workdir, or accept the "
              "change with --allow_config_change (it is recorded in metrics.jsonl).")
    return operational, altering


def _train(config, workdir: str, signals: _Signals, closers: list, *, stop_after, progress: bool,
           allow_config_change: bool) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    config_json = json.loads(config.to_json_best_effort())
    log.info("config:\n%s", config)

    # --- mesh, task, data
    setup = state_lib.make_setup(config)
    check_memory(setup, config)
    task = tasks_lib.get_task(config.task)
    train_ds, eval_ds = task.make_datasets(config, shard_index=jax.process_index(),
                                           shard_count=jax.process_count())
    hooks = state_lib.make_hooks(config, task)
    data_offset = int(config.get("data_offset", 0))
    vocab = getattr(config.model, "vocab_size", None)
    if vocab is not None and getattr(train_ds, "vocab_size", 0) > vocab:
        raise ValueError(f"data {config.data.name!r} has vocab_size {train_ds.vocab_size} but "
                         f"model.vocab_size={vocab}; raise --config.model.vocab_size")

    def to_global(np_batch):
        return {k: jax.make_array_from_process_local_data(
            NamedSharding(setup.mesh, P(("data", "fsdp"), *([None] * (v.ndim - 1)))), v)
            for k, v in np_batch.items()}

    # --- state: resume (newest intact checkpoint, config compared first) or init
    signals.phase = "restore"
    checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
    closers.append(checkpointer.close)
    changes: dict = {}

    def on_meta(step, meta):
        changes["operational"], changes["altering"] = _resume_check(
            (meta or {}).get("config"), config_json, allow_config_change)
        changes["hooks"] = (meta or {}).get("hooks")

    restored = checkpointer.restore_latest_good(setup.abstract_state, setup.state_shardings, config_json,
                                                on_meta=on_meta)
    if restored is not None:
        state = restored[1]
        log.info("resumed from %s/%d", checkpointer.directory, restored[0])
        saved_hooks = changes.get("hooks") or []
        if hooks and len(saved_hooks) != len(hooks):
            raise ckpt_lib.CheckpointError(
                f"the checkpoint at step {restored[0]} holds the state of {len(saved_hooks)} host hook(s) but this "
                f"run has {len(hooks)} ({[type(h).__name__ for h in hooks]}); refusing to resume without it")
        for hook, saved in zip(hooks, saved_hooks):
            hook.load_state_dict(saved)
    else:
        state = state_lib.init_state(config, setup)
    start = int(state["step"])
    # Only now, with the resume accepted, does anything in the workdir change.
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    closers.append(writer.close)
    if is_main:
        workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), config_json)
        metrics_lib.truncate_after(workdir, start)
        for kind in ("operational", "altering"):
            if changes.get(kind):
                writer.write_event({"step": start, "event": f"config_change_{kind}", "changes": changes[kind]})
                log.warning("resumed at step %d with %s config changes:\n%s", start, kind,
                            workdir_lib.format_changes(changes[kind]))
    signals.phase = "compile"

    # --- compiled steps
    with sharding.activation_sharding(setup.mesh, setup.rules):
        train_step = jax.jit(
            make_train_step(setup.graphdef, task, setup.tx, setup.schedule, config.optim.grad_accum, config.seed),
            in_shardings=(setup.state_shardings, None), out_shardings=(setup.state_shardings, None),
            donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(setup.graphdef, task),
                            in_shardings=(setup.state_shardings["params"], None))

        # Compiled ahead of the loop so its time is reported apart and kept out of tokens/s and MFU.
        # Tracing + lowering (Python: the model's code runs once) and XLA's compile (skipped by the cache)
        # are timed apart: the persistent cache only removes the second.
        t0 = time.perf_counter()
        lower_s = 0.0
        if start < config.num_steps:
            lowered = train_step.lower(state, to_global(train_ds.batch(start + data_offset)))
            lower_s = time.perf_counter() - t0
            train_step = lowered.compile()
        compile_s = time.perf_counter() - t0
    compiled_msg = (f"compiled the train step in {compile_s:.2f} s (trace + lower {lower_s:.2f} s, "
                    f"XLA {compile_s - lower_s:.2f} s)")
    log.info(compiled_msg)

    model_view = nnx.merge(setup.graphdef, setup.abstract_params)
    seq_len = int(getattr(train_ds, "seq_len", 1))
    fpt = state_lib.flops_per_token(model_view, setup.abstract_params, seq_len)
    peak = flops_lib.system_peak_flops(config.model.get("dtype", "float32"))
    tokens_per_step = config.batch_size * seq_len
    flops0 = _source_flops(config)
    ctx = HookContext(config, setup.graphdef, task, setup.mesh, setup.state_shardings,
                      lambda s: to_global(train_ds.batch(s + data_offset)))

    def evaluate(step: int, params) -> dict:
        sums = None
        with sharding.activation_sharding(setup.mesh, setup.rules):
            for i in range(config.eval_batches):
                out = eval_step(params, to_global(eval_ds.batch(i)))
                sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        rec = dict(task.eval_metrics(jax.device_get(sums)), step=step)
        writer.write(rec)
        return rec

    def save(step: int, st) -> None:
        meta = {"config": config_json}
        if hooks:
            meta["hooks"] = [h.state_dict() for h in hooks]
        checkpointer.save(step, st, meta)
        log.info("checkpoint %s/%d", checkpointer.directory, step)

    last_train: dict = {}
    last_eval: dict = {}
    stopped_early = False
    pending = None   # (step, metrics) of the previous step, fetched one step late to keep the device busy
    t_last, steps_since = time.perf_counter(), 0
    bar = _progress(config.num_steps, start, progress and is_main)
    if bar is not None:
        closers.append(bar.close)
        bar.write(compiled_msg)
    if is_main:
        writer.write_event({"step": start, "event": "compile", "train_step_s": round(compile_s, 3),
                            "trace_lower_s": round(lower_s, 3)})
    signals.phase = "train"
    with sharding.activation_sharding(setup.mesh, setup.rules):
        step = start
        while step < config.num_steps:
            batch = to_global(train_ds.batch(step + data_offset))
            state, m = train_step(state, batch)
            step += 1
            steps_since += 1
            if pending is not None:
                last_train = _check_and_log(pending, writer, config, bar, fpt, peak, tokens_per_step, flops0,
                                            t_last, steps_since) or last_train
            pending = (step, m)
            needs_sync = (step % config.checkpoint_every == 0 or step == config.num_steps
                          or (config.eval_every and step % config.eval_every == 0)
                          or signals.requested or step == stop_after)
            if needs_sync:
                last_train = _check_and_log(pending, writer, config, bar, fpt, peak, tokens_per_step, flops0,
                                            t_last, steps_since, force=True) or last_train
                pending = None
                t_last, steps_since = time.perf_counter(), 0
            if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
                last_eval = evaluate(step, state["params"])
                if bar is not None:
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()
                                                         if k != "step"))
            if hooks:
                state = _run_hooks(hooks, step, state, ctx, writer)
            if step % config.checkpoint_every == 0 or step == config.num_steps:
                save(step, state)
            if needs_sync:   # eval, hooks and saving are not training time: the next window starts now
                t_last, steps_since = time.perf_counter(), 0
            if signals.requested or step == stop_after:
                if step % config.checkpoint_every and step != config.num_steps:
                    save(step, state)
                stopped_early = step < config.num_steps
                break
        if pending is not None:
            last_train = _check_and_log(pending, writer, config, bar, fpt, peak, tokens_per_step, flops0,
                                        t_last, steps_since, force=True) or last_train
    signals.phase = "final eval"
    if not stopped_early:
        last_eval = _logged_eval(workdir, int(state["step"])) if start == config.num_steps else None
        if last_eval is None:
            last_eval = evaluate(int(state["step"]), state["params"])
        if not last_train:
            last_train = _logged_train(workdir, int(state["step"])) or {}
    signals.phase = "cleanup"
    plot = metrics_lib.plot_losses(workdir) if is_main else None
    result = {**last_train, **last_eval, "stopped_early": stopped_early, "step": int(state["step"]),
              "compile_s": compile_s,
              "checkpoints": checkpointer.directory, "metrics": writer.path, "plot": plot}
    return result


def train_or_load(workdir: str, cfg, *, progress: bool = True):
    """Loads the model in ``workdir``, training ``cfg`` there first when it holds no checkpoint.

    A workdir that already holds a checkpoint is loaded whatever config it was trained with (``cfg`` is then
    unused): pass any finished run of ``experiments.train``.

    Returns:
      ``(model, config, info)``: the model on one device, the run's config, and ``{"workdir", "trained_here",
      "steps", "d_model", "num_layers", "seq_len", "dtype"}`` plus, when trained here, ``train_wall_s``,
      ``final_loss``, ``eval_loss`` and ``eval_bits_per_byte``.
    """
    from sqattn import sample
    info: dict[str, Any] = {"workdir": workdir, "trained_here": False}
    if not ckpt_lib.has_checkpoint(workdir):
        t0 = time.perf_counter()
        out = train_and_evaluate(cfg, workdir, progress=progress)
        if out.get("stopped_early"):
            raise RuntimeError(f"training in {workdir} stopped early at step {out['step']}; rerun to resume it")
        info.update(trained_here=True, train_wall_s=time.perf_counter() - t0, final_loss=float(out["loss"]))
        for key in ("eval_loss", "eval_bits_per_byte"):
            if key in out:
                info[key] = float(out[key])
    model, config = sample.load_model(workdir)
    info.update(steps=int(config.num_steps), d_model=int(config.model.d_model),
                num_layers=int(config.model.num_layers), seq_len=int(config.data.seq_len),
                dtype=str(config.model.dtype))
    return model, config, info


def _logged_eval(workdir: str, step: int) -> dict | None:
    """The eval record already logged at ``step`` (a finished run run again), or ``None``."""
    recs = [r for r in metrics_lib.read_metrics(workdir)
            if r.get("step") == step and any(k.startswith("eval_") for k in r)]
    return recs[-1] if recs else None


def _logged_train(workdir: str, step: int) -> dict | None:
    recs = [r for r in metrics_lib.read_metrics(workdir) if r.get("step") == step and "loss" in r]
    return recs[-1] if recs else None


def _check_and_log(pending, writer, config, bar, fpt, peak, tokens_per_step, flops0, t_last, steps_since,
                   force=False):
    step, m = pending
    m = jax.device_get(m)
    loss = float(m["loss"])
    if not math.isfinite(loss) or not m["params_finite"]:
        what = f"loss {loss}" if not math.isfinite(loss) else "parameters (after the update)"
        raise NonFiniteLossError(
            f"non-finite {what} at step {step}; stopping. The last good checkpoint was kept "
            f"(none is written after training goes bad). Lower optim.lr or check the data.")
    rec = None
    dt = max(time.perf_counter() - t_last, 1e-9)
    tok_s = tokens_per_step * steps_since / dt
    mfu = fpt * tok_s / peak if peak else 0.0
    if step % config.log_every == 0 or force:
        rec = {"step": step, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0},
               "tokens_per_s": tok_s, "mfu": mfu, "train_flops": flops0 + fpt * tokens_per_step * step}
        rec.pop("weight", None)
        rec.pop("params_finite", None)
        if step % config.log_every == 0 or step == config.num_steps:
            writer.write(rec)
    if bar is not None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
        bar.refresh()
    return rec
