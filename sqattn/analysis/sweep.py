"""Sweeps: lists of config overrides, each run through the one trainer in its own workdir.

  results = run_sweep("teacher_reg", [{"data.n_train": 128, "model.hidden": 8}, ...], root="/tmp/sweep")

A run's workdir is ``<root>/<name>`` (``name`` from its overrides unless given). A finished run is reused: when
``<workdir>/sweep_result.json`` records the same config the trainer is not called at all; otherwise the trainer is
called, which resumes an interrupted run from its checkpoint and returns at once for a finished one. So a sweep can
be killed and rerun, or extended with more overrides, and only the missing work is done. A run that raises is
reported (``status="failed"`` with the error) and the others go on; a rerun retries it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import ml_collections

log = logging.getLogger("sqattn.analysis")

RESULT_FILE = "sweep_result.json"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted keys set ("data.n_train": 1024, "optim.lr": 1e-2).

    Raises:
      KeyError: a key that the config does not have (a typo would otherwise train the wrong thing silently).
    """
    c = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        node = c
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"override {key!r}: the config has no {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"override {key!r}: the config has no field {parts[-1]!r} (known: {sorted(node.keys())})")
        node[parts[-1]] = value
    return c


def run_name(overrides: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe name of a run from its overrides (last key components), hashed when long."""
    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())) or "base"
    text = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)
    if len(text) > 100:
        text = text[:80] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return text


@dataclasses.dataclass
class RunResult:
    """One run of a sweep.

    Attributes:
      name, workdir, overrides: which run.
      status: "trained" (trained or resumed now), "reused" (finished before), "failed".
      result: the trainer's returned record (final train and eval metrics) for a finished run.
      error: "Type: message" of a failed run.
      wall_s: seconds spent on it in this call.
    """
    name: str
    workdir: str
    overrides: dict
    status: str
    result: dict
    error: str = ""
    wall_s: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _jsonable(d: Mapping) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def run_one(config: ml_collections.ConfigDict, workdir: str, *, name: str = "", overrides: Mapping | None = None,
            progress: bool = False, train_fn: Callable | None = None) -> RunResult:
    """Trains ``config`` in ``workdir`` (or reuses it); never raises for a failed run (``status="failed"``)."""
    from sqattn.train import train_and_evaluate
    train_fn = train_fn or (lambda c, w: train_and_evaluate(c, w, progress=progress))
    cj = _config_json(config)
    path = os.path.join(workdir, RESULT_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("config") == cj and saved.get("status") in ("trained", "reused"):
                return RunResult(name, workdir, dict(overrides or {}), "reused", saved["result"])
        except (OSError, json.JSONDecodeError):
            pass
    t0 = time.perf_counter()
    try:
        out = train_fn(config, workdir)
    except Exception as e:  # noqa: BLE001 - a failed run is reported, the sweep goes on
        log.warning("run %s failed: %s\n%s", workdir, e, traceback.format_exc())
        return RunResult(name, workdir, dict(overrides or {}), "failed", {}, f"{type(e).__name__}: {e}",
                         time.perf_counter() - t0)
    res = RunResult(name, workdir, dict(overrides or {}), "trained", _jsonable(out), wall_s=time.perf_counter() - t0)
    if out.get("stopped_early"):
        res.status, res.error = "failed", f"stopped early at step {out.get('step')} (rerun to resume)"
        return res
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"config": cj, "status": "trained", "result": res.result, "overrides": res.overrides}, f, indent=1)
    os.replace(tmp, path)
    return res


def run_sweep(base: str | ml_collections.ConfigDict | Callable[[Mapping], ml_collections.ConfigDict],
              overrides: Sequence[Mapping[str, Any]], root: str, *, names: Sequence[str] | None = None,
              progress: bool = False, train_fn: Callable | None = None,
              on_result: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Runs every override set through the trainer; see the module docstring.

    Args:
      base: a registered config name ("teacher_reg:runlocal"), a ConfigDict, or a function overrides -> config
        (then the overrides are only used for naming and the record).
      overrides: one mapping of dotted keys -> values per run.
      root: directory of the run workdirs.
      names: run names (default ``run_name(overrides)``); must be unique.
      train_fn: (config, workdir) -> result record; default ``sqattn.train.train_and_evaluate``.
      on_result: called after each run (progress reporting).

    Returns:
      One ``RunResult`` per override set, in order. A bad override (unknown key) is a failed run too.
    """
    from sqattn import configs
    names = list(names) if names is not None else [run_name(o) for o in overrides]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"run names must be unique, got duplicates {dup[:5]}")
    base_cfg = configs.get(base) if isinstance(base, str) else base
    results = []
    for name, ov in zip(names, overrides):
        workdir = os.path.join(root, name)
        try:
            cfg = base_cfg(ov) if callable(base_cfg) and not isinstance(base_cfg, ml_collections.ConfigDict) \
                else apply_overrides(base_cfg, ov)
        except Exception as e:  # noqa: BLE001
            res = RunResult(name, workdir, dict(ov), "failed", {}, f"{type(e).__name__}: {e}")
        else:
            res = run_one(cfg, workdir, name=name, overrides=ov, progress=progress, train_fn=train_fn)
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results


def eval_records(workdir: str) -> list[dict]:
    """The eval records of a run's metrics.jsonl (those with an ``eval_*`` key), in step order."""
    from sqattn.train import metrics as metrics_lib
    return [r for r in metrics_lib.read_metrics(workdir) if any(k.startswith("eval_") for k in r)]


def best_eval(workdir: str, key: str = "eval_loss") -> tuple[float, int]:
    """(min of ``key`` over the run's evaluations, its step): early stopping on validation, after the fact."""
    recs = [r for r in eval_records(workdir) if key in r]
    if not recs:
        raise ValueError(f"{workdir}: no eval record with {key!r} in metrics.jsonl")
    best = min(recs, key=lambda r: r[key])
    return float(best[key]), int(best["step"])


# ----------------------------------------------------------------------------------------------- binaries
def define_flags(defaults: Mapping[str, tuple[Any, str]]) -> None:
    """absl flags ``name -> (default, help)``, typed by the default (list, bool, int, float, str). Experiment
    binaries call it under ``__main__`` only, so importing several of them (tests) defines nothing twice."""
    from absl import flags
    for name, (default, doc) in defaults.items():
        kind = {list: flags.DEFINE_list, bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                float: flags.DEFINE_float, str: flags.DEFINE_string}[type(default)]
        kind(name, default, doc)


def settings(defaults: Mapping[str, tuple[Any, str]], **overrides):
    """A namespace of the defaults with ``overrides`` (what the flags give when run as a program)."""
    from types import SimpleNamespace
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(defaults)}")
    return SimpleNamespace(**{k: overrides.get(k, v) for k, (v, _) in defaults.items()})
