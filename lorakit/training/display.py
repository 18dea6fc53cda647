"""What `lorakit train` shows: the model and data tables at start, the progress bar, the result
table and the before/after samples."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lorakit.data.pipeline import PreparedData
from lorakit.models import (
    ResolvedModel,
)
from lorakit.peft_setup import ModelSummary
from lorakit.recipe import Recipe, TrainSection


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    train_loss: float
    eval_before: float | None
    eval_after: float | None
    trained_tokens: int
    trained_tokens_per_second: float
    wall_seconds: float
    summary: ModelSummary
    model: torch.nn.Module
    """The trained PEFT model, still in memory."""
    samples: list[tuple[str, str, str]] = field(default_factory=list)
    """(prompt, before, after) greedy generations."""
    stop_reason: str = "completed"
    skipped_steps: int = 0
    best: tuple[Path, float] | None = None
    """The checkpoint with the lowest eval loss, and that loss."""
    resumed_from: list[str] = field(default_factory=list)
    method: str = "sft"
    trained_pairs: int = 0
    """Preference tuning: the pairs trained on (SFT counts tokens)."""
    pairs_per_second: float = 0.0
    eval_accuracy: tuple[float, float] | None = None
    """Preference tuning: held-out reward accuracy before and after training."""
    memory: tuple[int | None, int | None, str] = (None, None, "loop")
    """The memory plan's estimate, the measured peak, and what the peak covers (`loop`, or the
    whole `process` where the high-water mark cannot be reset)."""


def printer(console: Console):
    def say(message: Any) -> None:
        # Log lines stay whole (paths included) when stderr is a file or a pipe.
        console.print(message, soft_wrap=isinstance(message, str))

    return say


def progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
    )


def model_table(recipe: Recipe, resolved: ResolvedModel, summary: ModelSummary) -> Table:
    table = Table(title="lorakit train", show_header=False, title_justify="left")
    table.add_row("base model", f"{resolved.reference} ({resolved.kind})")
    for name, value in summary.rows():
        table.add_row(name, value)
    table.add_row("LoRA", summary.lora)
    tcfg = recipe.train
    table.add_row(
        "optimization",
        f"{tcfg.optimizer} lr={tcfg.learning_rate:g} {tcfg.lr_scheduler_type} "
        f"batch={tcfg.micro_batch_size}x{tcfg.gradient_accumulation_steps} "
        f"checkpointing={checkpointing(tcfg)}",
    )
    return table


def data_line(data: PreparedData) -> str:
    t, v = data.stats["train"], data.stats["validation"]
    packed = (
        f", packed into {t.packed_rows} rows ({t.packing_efficiency:.1%} full)"
        if t.packed_rows
        else ""
    )
    unit = "pairs" if t.format == "preference" else "examples"
    return "\n".join(
        [
            f"data: {t.examples} train {unit} ({t.tokens} tokens, {t.trained_tokens} trained, "
            f"{t.truncated} truncated, {t.dropped} dropped, {t.skipped} rows skipped){packed}, "
            f"{v.examples} validation {unit}",
            *(f"warning: {escape(note)}" for note in data.warnings),
        ]
    )


def checkpointing(train: TrainSection) -> str:
    if not train.gradient_checkpointing:
        return "off"
    n = train.checkpoint_every_n_layers
    return "on" if n == 1 else f"1 layer in {n}"


def result_table(result: RunResult) -> Table:
    table = Table(title="result", show_header=False, title_justify="left")
    table.add_row("steps", f"{result.steps} ({result.stop_reason})")
    if result.resumed_from:
        table.add_row("resumed from", ", ".join(result.resumed_from))
    table.add_row("final train loss", f"{result.train_loss:.4f}")
    if result.eval_before is not None and result.eval_after is not None:
        change = f"{result.eval_before:.4f} → {result.eval_after:.4f}"
        if result.eval_accuracy is not None:
            before, after = result.eval_accuracy
            change += f" (reward accuracy {before:.2f} → {after:.2f})"
        elif result.method == "sft":
            ppl = f"{math.exp(result.eval_before):.2f} → {math.exp(result.eval_after):.2f}"
            change += f" (perplexity {ppl})"
        table.add_row("eval loss", change)
    if result.best is not None:
        table.add_row("best checkpoint", f"{result.best[0]} (eval loss {result.best[1]:.4f})")
    if result.skipped_steps:
        table.add_row("skipped steps", f"{result.skipped_steps} (NaN/inf loss or gradient)")
    if result.method == "sft":
        table.add_row("trained tokens", f"{result.trained_tokens:,}")
        table.add_row("trained tokens/s", f"{result.trained_tokens_per_second:.1f}")
    else:
        table.add_row("trained pairs", f"{result.trained_pairs:,} ({result.method})")
        table.add_row("pairs/s", f"{result.pairs_per_second:.2f}")
    planned, peak, scope = result.memory
    if peak is not None:
        what = "training loop" if scope == "loop" else "whole process"
        shown = f"{peak / 2**30:.2f} GiB measured ({what})"
        if planned:
            shown += f", {planned / 2**30:.2f} GiB planned ({peak / planned:.2f}x)"
        table.add_row("peak memory", shown)
    table.add_row("wall time", f"{result.wall_seconds:.1f} s")
    table.add_row("adapter", str(result.adapter_dir))
    return table


def sample_table(prompt: str, before: str, after: str) -> Table:
    table = Table(title=f"prompt: {prompt}", title_justify="left", expand=True)
    table.add_column("before training", ratio=1)
    table.add_column("after training", ratio=1)
    table.add_row(before, after)
    return table
