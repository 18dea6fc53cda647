"""What a run records: metrics.jsonl (one line per step and per evaluation) and loss.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self._handle = self.path.open("a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path) -> Path:
    """Training loss, eval loss and learning rate against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    if evals:
        loss_axis.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
        )
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss (nats/token)")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="grey", alpha=0.4)
    lr_axis.set_ylabel("learning rate", color="grey")
    loss_axis.legend(loc="upper right")
    figure.tight_layout()
    target = run_dir / PLOT_FILE
    figure.savefig(target)
    plt.close(figure)
    return target
