"""Run logging: ``metrics.jsonl`` (one JSON object per record), TensorBoard events, a loss plot."""

from __future__ import annotations

import json
import logging
import math
import os

log = logging.getLogger("sqattn.train")


class MetricsFileError(ValueError):
    """``metrics.jsonl`` holds a malformed record that is not a torn last line."""


class MetricsWriter:
    """Appends records to ``<workdir>/metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # TensorBoard output is optional
                self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (str, int)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def write_event(self, record: dict) -> None:
        """Appends a non-scalar record (e.g. ``{"step", "event": "config_change", "changes": {...}}``)."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl`` (``[]`` when there is none).

    A torn last line (a process killed mid-write) is dropped with a warning; a malformed line anywhere else
    raises ``MetricsFileError`` naming the file and line.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    recs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"a {type(rec).__name__}, not a JSON object")
        except ValueError as e:
            if i == last:
                log.warning("%s: dropping a torn last line %d (%r)", path, i + 1, line[:80])
                break
            raise MetricsFileError(f"{path}, line {i + 1}: malformed record ({e}); fix or remove that line") \
                from None
        recs.append(rec)
    return recs


def truncate_after(workdir: str, step: int) -> None:
    """Keeps only the records up to ``step`` (the restored step; 0 for a fresh start), rewriting the file
    atomically, so a resumed or restarted run never logs a step twice and a torn last line is repaired."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    recs = [r for r in read_metrics(workdir) if r.get("step", 0) <= step]
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    os.replace(tmp, path)


def plot_losses(workdir: str, filename: str = "loss.png") -> str | None:
    """Writes train loss and eval loss vs step to ``<workdir>/loss.png``; returns the path."""
    recs = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
