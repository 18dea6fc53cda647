"""What a run records: metrics.jsonl (one line per step and per evaluation), the recipe's
trackers (TensorBoard, Weights & Biases, MLflow through Accelerate), and loss.png."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from lorakit.errors import LorakitError
from lorakit.files import atomic_write_text
from lorakit.recipe import Recipe

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
PROJECT_NAME = "lorakit"
LOGS_DIR = "logs"
"""Tracker files inside the run folder: logs/lorakit/ (TensorBoard), logs/wandb/, logs/mlflow.db."""

_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(report_to: list[str]) -> None:
    """Every tracker the recipe names must be installed; say how to install it if not."""
    from accelerate.utils import (
        is_mlflow_available,
        is_tensorboard_available,
        is_wandb_available,
    )

    available = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
    }
    for name in report_to:
        if not available[name]():
            raise LorakitError(
                f"train.report_to: {name} is not installed (pip install {_INSTALL[name]})"
            )
    if "mlflow" in report_to and "MLFLOW_TRACKING_URI" not in os.environ:
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if missing:
            raise LorakitError(
                f"train.report_to: mlflow's local store needs {' and '.join(missing)} "
                f"(pip install {' '.join(missing)}), or set MLFLOW_TRACKING_URI to a server"
            )


def start_trackers(accelerator: Accelerator, recipe: Recipe, run_dir: Path) -> None:
    """Open the recipe's trackers with the resolved recipe as their configuration. Files stay
    in the run folder, so offline modes (WANDB_MODE=offline, a local MLflow store) need no
    network."""
    if not recipe.train.report_to:
        return
    logs = (run_dir / LOGS_DIR).resolve()
    init_kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in recipe.train.report_to:
        logs.mkdir(parents=True, exist_ok=True)
        init_kwargs["wandb"] = {"name": run_dir.name, "dir": str(logs)}  # writes logs/wandb/
    if "mlflow" in recipe.train.report_to:
        init_kwargs["mlflow"] = {"run_name": run_dir.name}
        if accelerator.is_main_process and "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            # A local SQLite store (MLflow's file store is deprecated); `mlflow ui
            # --backend-store-uri sqlite:///<run>/logs/mlflow.db` shows it.
            logs.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{logs / 'mlflow.db'}")
    accelerator.init_trackers(PROJECT_NAME, config=tracker_config(recipe), init_kwargs=init_kwargs)


def tracker_config(recipe: Recipe) -> dict[str, str | int | float | bool]:
    """The recipe as flat `section.key` scalars, the form every tracker accepts."""
    flat: dict[str, str | int | float | bool] = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            if isinstance(value, bool | int | float | str):
                flat[f"{section}.{key}"] = value
            else:
                flat[f"{section}.{key}"] = json.dumps(value)
    return flat


class MetricsLog:
    """metrics.jsonl on the main process, and every numeric value to the open trackers."""

    def __init__(
        self, run_dir: Path, enabled: bool = True, accelerator: Accelerator | None = None
    ) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.accelerator = accelerator
        self._handle = self.path.open("a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            try:
                self._handle.write(json.dumps(record) + "\n")
                self._handle.flush()
            except OSError as exc:
                raise LorakitError(f"cannot write {self.path}: {exc.strerror}") from None
        if self.accelerator is not None and self.accelerator.trackers:
            numbers = {
                k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)
            }
            self.accelerator.log(numbers, step=record["step"])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.end_training()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records after `step`: a resumed run rewrites them, so the file reads as one
    uninterrupted run."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(run_dir: Path) -> Path:
    """Training loss, eval loss and learning rate against the optimizer step; for preference
    tuning, a second panel with the reward accuracy and margin (train and eval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    preference = any("rewards/accuracies" in r for r in steps)
    figure, axes = plt.subplots(
        2 if preference else 1, 1, figsize=(7, 7 if preference else 4), dpi=110, squeeze=False
    )
    loss_axis = axes[0][0]
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    if evals:
        loss_axis.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
        )
    skipped = [r["step"] for r in records if "skipped" in r]
    if skipped:
        for step in skipped:
            loss_axis.axvline(step, color="red", alpha=0.3, linewidth=1)
        loss_axis.plot([], [], color="red", alpha=0.3, label="skipped step (NaN/inf)")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss (per pair)" if preference else "loss (nats/token)")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="grey", alpha=0.4)
    lr_axis.set_ylabel("learning rate", color="grey")
    loss_axis.legend(loc="upper right")
    if preference:
        _plot_rewards(axes[1][0], steps, evals)
    figure.tight_layout()
    target = run_dir / PLOT_FILE
    figure.savefig(target)
    plt.close(figure)
    return target


def _plot_rewards(axis: Any, steps: list[dict], evals: list[dict]) -> None:
    """Reward accuracy (left axis) and reward margin (right axis), train and held out."""
    accuracy, margin = "rewards/accuracies", "rewards/margins"
    axis.plot([r["step"] for r in steps], [r[accuracy] for r in steps], label="train accuracy")
    held = [r for r in evals if f"eval_{accuracy}" in r]
    if held:
        axis.plot(
            [r["step"] for r in held],
            [r[f"eval_{accuracy}"] for r in held],
            "o-",
            label="eval accuracy",
        )
    axis.set_ylim(-0.05, 1.05)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("reward accuracy")
    margin_axis = axis.twinx()
    margin_axis.plot(
        [r["step"] for r in steps], [r[margin] for r in steps], color="grey", alpha=0.5
    )
    margin_axis.set_ylabel("reward margin", color="grey")
    axis.legend(loc="lower right")
