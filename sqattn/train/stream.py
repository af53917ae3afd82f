"""Continual-learning streams on the one trainer (SEMA and its baselines; ``sqattn.models.sema``).

``run_stream(config, workdir, backbone=...)`` walks the class-incremental stream of ``config.data.stream``. Every
step is an ordinary trainer run in its own directory under ``workdir`` (``t<task>_<i>_<phase>``), started from
the previous run's checkpoint through ``config.init.workdir`` + ``config.init.transform``:

* the first run starts from ``backbone`` (a trained ``vit`` run) with ``sqattn.models.sema:start``;
* every later run starts from the previous one with ``sqattn.models.sema:advance``, which freezes what the
  previous run trained and, for SEMA, runs detect-and-expand on the new task's data (seen through the run's
  ``config.data``). The driver calls the same ``sema.plan`` first to learn what the run will do (a deterministic
  function of the previous run and the config): when detection finds nothing more within a task that already
  expanded, the task is done and no run starts.

Per task (``config.init.args.method``):
  sema: task 0 = func run (every slot 0 + head) then rd run (the RDs). Task t > 0: repeat {detect; if a layer
    fires: train the new slot} until nothing fires; a task that added nothing trains the head only. An expansion
    is one ``joint`` run (the new adapter, its router column, the head and the new RD together; their gradients
    are disjoint, and the new RD's input at layer l depends only on frozen parameters, so this equals func then
    rd with one schedule) or, with ``joint=False``, a func run and an rd run.
  expand_every / ft_adapter: one func run per task.  prototypes: one 1-step run per task with nothing trainable
    (the transform writes the class means into the head; the run evaluates and checkpoints them).

Each run's epochs become ``num_steps = ceil(epochs * train examples / batch_size)``; its eval covers every class
seen so far (``eval_accuracy``; ``eval_accuracy_task<u>`` per task).

Resume: a finished run leaves ``result.json`` (its ``sema.plan`` info and final metrics) and is reused; an
unfinished one resumes from its checkpoint through the trainer; the plan of a run not yet started is recomputed
from the previous run's checkpoint. The task index and the adapter set live in each run's config (``data.task``)
and model (``SEMALayer.status``), so a stream killed anywhere continues where it stopped and ends with the same
parameters as an uninterrupted one (tests/sqattn/models/test_sema.py).
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np

from sqattn.data import images as images_lib
from sqattn.models import sema
from sqattn.train import workdir as workdir_lib

START = "sqattn.models.sema:start"
ADVANCE = "sqattn.models.sema:advance"


class StreamStopped(Exception):
    """The stream stopped early (a run was preempted); run it again to continue."""


def run_config(config, *, task: int, phase: str, init_workdir: str, transform: str, epochs: float):
    """The config of one run of the stream (``config`` is the stream's base config; not modified)."""
    c = copy.deepcopy(config)
    method = sema.stream_args(config)["method"]
    c.data.task = task
    c.init.workdir = init_workdir
    c.init.transform = transform
    c.init.step = -1
    c.init.args.phase = phase
    c.optim.trainable = sema.trainable_regex(method, phase)
    n_train = images_lib.examples(c.data, "train").labels.size
    c.num_steps = 1 if method == "prototypes" else max(1, math.ceil(epochs * n_train / c.batch_size))
    c.optim.warmup_steps = min(int(c.optim.warmup_steps), max(c.num_steps - 1, 0))
    c.checkpoint_every = c.num_steps
    c.log_every = min(int(c.log_every), c.num_steps)
    c.eval_every = 0
    c.eval_batches = math.ceil(images_lib.examples(c.data, "eval").labels.size / c.batch_size)
    return c


def _load(workdir: str):
    from sqattn import sample
    return sample.load_model(workdir)


def _result_path(run_dir: str) -> str:
    return os.path.join(run_dir, "result.json")


def _finished(run_dir: str) -> dict | None:
    path = _result_path(run_dir)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _plan(run_cfg) -> dict:
    """What the run of ``run_cfg`` will do: ``sema.plan`` on the previous run (``start``: slot 0 everywhere)."""
    src, src_cfg = _load(run_cfg.init.workdir)
    if run_cfg.init.transform == START:
        model = sema.start(src, src_cfg, run_cfg)
        info = {"method": sema.stream_args(run_cfg)["method"], "phase": run_cfg.init.args.phase, "task": 0,
                "expanded": [(l, 0) for l, n in enumerate(sema.adapter_counts(model)) if n]}
    else:
        model, info = sema.plan(src, src_cfg, run_cfg)
    info["adapters"] = sema.adapter_counts(model)
    info["trainable_params"] = sema.trainable_params(model, run_cfg.init.args.phase, info["method"])
    info["adapter_params"] = sema.adapter_params(model)
    return _jsonable(info)


class _Runner:
    def __init__(self, workdir: str, progress: bool, stop_after_run: tuple[int, int] | None):
        self.workdir, self.progress, self.stop_after_run = workdir, progress, stop_after_run
        self.count = 0
        self.log: list[dict] = []

    def __call__(self, run_cfg, name: str, plan: dict | None = None) -> dict:
        """Runs (or reuses) one run; returns its record {name, plan, result}."""
        from sqattn.train import train_and_evaluate
        run_dir = os.path.join(self.workdir, name)
        done = _finished(run_dir)
        index, self.count = self.count, self.count + 1
        if done is None:
            plan = plan if plan is not None else _plan(run_cfg)
            stop = self.stop_after_run[1] if self.stop_after_run and self.stop_after_run[0] == index else None
            out = train_and_evaluate(run_cfg, run_dir, progress=self.progress, stop_after=stop)
            if out["stopped_early"]:
                raise StreamStopped(f"run {name} stopped at step {out['step']}; run the stream again to resume")
            result = {k: v for k, v in out.items() if k.startswith("eval_") or k in ("step", "train_flops")}
            done = _jsonable({"name": name, "plan": plan, "result": result})
            workdir_lib.write_json_atomic(_result_path(run_dir), done)
        self.log.append(done)
        return done


def run_stream(config, workdir: str, *, backbone: str, func_epochs: float = 5, rd_epochs: float = 5,
               joint: bool = True, progress: bool = False,
               stop_after_run: tuple[int, int] | None = None) -> dict:
    """Runs (or resumes) the stream of ``config`` (a ``vit_sema`` config) in ``workdir``.

    Args:
      config: the stream's base config (``sema_digits`` or a variant); ``init.args.method`` picks the method.
      workdir: the stream's directory; one subdirectory per run, and ``stream.json`` (the summary) at the end.
      backbone: a finished ``vit`` run whose parameters become the backbone.
      func_epochs, rd_epochs: epochs over the task's training examples of func (and joint) / rd runs.
      joint: SEMA expansions at task t > 0 as one joint run (module docstring) instead of func + rd.
      stop_after_run: (k, s): preempt the k-th run of this call (0-based, reused runs count) after step s, as a
        kill would (tests); the call then raises ``StreamStopped``.

    Returns:
      The summary: ``tasks`` (per task: accuracy on all seen classes, per-task accuracies, adapters per layer,
      expansions, z-scores, trainable and held adapter parameters), ``average_accuracy`` (A-bar),
      ``final_accuracy`` (A_N) and ``runs`` (every run's record: name, plan, final metrics); JSON-able.
    """
    args = sema.stream_args(config)
    method = args["method"]
    num_tasks = len(images_lib.parse_stream(config.data.stream, images_lib.num_classes(config.data)))
    os.makedirs(workdir, exist_ok=True)
    run = _Runner(workdir, progress, stop_after_run)
    prev = backbone
    tasks = []
    for t in range(num_tasks):
        first = len(run.log)
        transform = START if t == 0 else ADVANCE
        if method == "sema":
            if t == 0:
                prev = _run(run, config, t, "func", prev, transform, func_epochs, "t0_0_func")
                prev = _run(run, config, t, "rd", prev, ADVANCE, rd_epochs, "t0_0_rd")
            else:
                i = 0
                while True:
                    phase = "joint" if joint else "func"
                    name = f"t{t}_{i}_{phase}"
                    run_cfg = run_config(config, task=t, phase=phase, init_workdir=prev, transform=ADVANCE,
                                         epochs=func_epochs)
                    done = _finished(os.path.join(workdir, name))
                    plan = done["plan"] if done else _plan(run_cfg)
                    if not plan["expanded"] and i > 0:
                        run.log.append({"name": f"t{t}_{i}_detect", "plan": plan, "result": None})
                        break                             # nothing more fires in this task
                    run(run_cfg, name, plan)
                    prev = os.path.join(workdir, name)
                    if not plan["expanded"]:
                        break                             # head-only task
                    if not joint:
                        prev = _run(run, config, t, "rd", prev, ADVANCE, rd_epochs, f"t{t}_{i}_rd")
                    i += 1
        else:
            prev = _run(run, config, t, "func", prev, transform, func_epochs, f"t{t}_0_func")
        tasks.append(_task_summary(t, run.log[first:]))
    summary = {
        "method": method, "num_tasks": num_tasks, "tasks": tasks,
        "average_accuracy": float(np.mean([s["accuracy"] for s in tasks])),
        "final_accuracy": tasks[-1]["accuracy"], "runs": run.log,
    }
    workdir_lib.write_json_atomic(os.path.join(workdir, "stream.json"), _jsonable(summary))
    return summary


def _run(run: _Runner, config, task: int, phase: str, prev: str, transform: str, epochs: float, name: str) -> str:
    run(run_config(config, task=task, phase=phase, init_workdir=prev, transform=transform, epochs=epochs), name)
    return os.path.join(run.workdir, name)


def _task_summary(t: int, records: list[dict]) -> dict:
    trained = [r for r in records if r["result"] is not None]
    last = trained[-1]["result"]
    plans = [r["plan"] for r in records]
    return {
        "task": t,
        "accuracy": last["eval_accuracy"],
        "task_accuracy": {k[len("eval_accuracy_task"):]: v for k, v in last.items()
                          if k.startswith("eval_accuracy_task")},
        "adapters": plans[-1]["adapters"],
        "expansions": [e for p in plans for e in (p.get("expanded") or [])],
        "z_scores": plans[0].get("task_scores"),
        "trainable_params": int(sum(p["trainable_params"] for p in plans[:len(trained)])),
        "adapter_params": plans[-1]["adapter_params"],
        "runs": [r["name"] for r in records],
    }
