"""Run logging: ``metrics.jsonl`` (one JSON object per record), TensorBoard events, a loss plot."""

from __future__ import annotations

import json
import math
import os


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

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_after(workdir: str, step: int) -> None:
    """Drops records after ``step`` (a resumed run rewrites them)."""
    recs = [r for r in read_metrics(workdir) if r.get("step", 0) <= step]
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)


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
