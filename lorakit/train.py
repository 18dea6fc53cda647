"""`lorakit train`: the whole training run, top to bottom.

recipe → base model + tokenizer → data → 4-bit base + LoRA → Accelerate loop → run folder.
The loop lives in one function (`train`) so forward, loss, backward, step, eval and save read
in one sitting.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch.utils.data import DataLoader
from transformers import get_scheduler

import lorakit
from lorakit.advice import data_advice, recipe_advice
from lorakit.checkpoint import (
    PROVENANCE_FILE,
    RECIPE_FILE,
    check_run_dir,
    prepare_run_dir,
    save_adapter,
)
from lorakit.data import IGNORE_INDEX, make_loader, prepare_data
from lorakit.data.batching import EpochShuffle
from lorakit.data.pipeline import PreparedData
from lorakit.evaluate import evaluate_loss, generate
from lorakit.loss import TokenNLL
from lorakit.models import ResolvedModel, load_tokenizer, resolve_model
from lorakit.peft_setup import ModelSummary, build_trainable_model
from lorakit.recipe import Recipe, TrainSection
from lorakit.tracking import MetricsLog, plot_losses

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"


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


def build_optimizer(model: torch.nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    """AdamW variants; weight decay applies to matrices only (not biases or norm scales)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if train.optimizer == "adamw_torch":
        return torch.optim.AdamW(groups, lr=train.learning_rate)
    import bitsandbytes as bnb

    optimizer_class = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[train.optimizer]
    return optimizer_class(groups, lr=train.learning_rate)


def count_optimizer_steps(train: TrainSection, micro_batches_per_epoch: int) -> int:
    if train.max_steps:
        return train.max_steps
    return max(
        1, math.ceil(micro_batches_per_epoch * train.epochs / train.gradient_accumulation_steps)
    )


def warmup_steps(train: TrainSection, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return train.warmup_steps
    return math.ceil(train.warmup_ratio * total_steps)


def endless(loader: DataLoader, sampler: EpochShuffle) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches epoch after epoch, each epoch in its own seeded order."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def forward_backward(
    accelerator: Accelerator, loss_module: torch.nn.Module, micro_batches: list[dict]
) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step.

    The loss is normalized by the trained tokens of the whole step (all micro-batches, all
    processes), so 1x16 and 8x2 give the same loss and the same gradients. Returns the step's
    mean loss per trained token and its trained-token count.
    """
    local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    step_tokens = int(accelerator.reduce(torch.tensor(local, device=accelerator.device)))
    # DDP averages gradients over processes, hence the world-size factor.
    scale = accelerator.num_processes / max(step_tokens, 1)
    step_nll = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(loss_module):
            nll, _ = loss_module(**batch)
            accelerator.backward(nll * scale)
        step_nll += nll.detach()
    total_nll = accelerator.reduce(step_nll, reduction="sum").item()
    return total_nll / max(step_tokens, 1), step_tokens


def provenance(
    recipe: Recipe, model: ResolvedModel, tokenizer_name: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """What an adapter needs to be reproduced or merged without the training YAML."""
    files = [spec.path for spec in recipe.data.train + (recipe.data.validation or [])]
    return {
        "lorakit_version": lorakit.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": {
            "reference": model.reference,
            "kind": model.kind,
            "location": model.location,
        },
        "tokenizer": tokenizer_name,
        "data": {path: _sha256(Path(path)) for path in files},
        "libraries": {
            name: version(name)
            for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
        },
        **extra,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(recipe: Recipe, *, overwrite: bool = False, console: Console | None = None) -> RunResult:
    console = console or Console(stderr=True)
    started = time.perf_counter()
    accelerator = Accelerator()
    main = accelerator.is_main_process
    say = console.print if main else (lambda *a, **k: None)
    set_seed(recipe.train.seed)
    tcfg = recipe.train

    # Everything that can fail on user input happens before the run folder is touched.
    check_run_dir(recipe.output.dir, overwrite)
    resolved = resolve_model(recipe.model.name_or_path)
    tokenizer = load_tokenizer(resolved.location, recipe.model.trust_remote_code)
    data = prepare_data(recipe, tokenizer)
    model, summary = build_trainable_model(recipe, resolved.location, accelerator.device)
    run_dir = Path(recipe.output.dir)
    if main:
        prepare_run_dir(recipe.output.dir, overwrite)
        (run_dir / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    accelerator.wait_for_everyone()

    say(_model_table(recipe, resolved, summary))
    say(_data_line(data))
    stats = data.stats["train"]
    advice = recipe_advice(recipe) + data_advice(
        recipe, stats.examples, stats.trained_tokens, summary.trainable_parameters
    )
    for note in advice:
        say(f"[yellow]warning:[/yellow] {note}", markup=True, highlight=False)
    pad_id = tokenizer.pad_token_id
    train_loader = make_loader(
        data.train,
        tcfg.micro_batch_size,
        pad_id,
        tcfg.seed,
        shuffle=True,
        group_by_length=recipe.data.group_by_length,
    )
    val_loader = make_loader(
        data.validation, tcfg.micro_batch_size, pad_id, tcfg.seed, shuffle=False
    )
    total_steps = count_optimizer_steps(tcfg, math.ceil(len(data.train) / tcfg.micro_batch_size))
    optimizer = build_optimizer(model, tcfg)
    scheduler = get_scheduler(
        tcfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(tcfg, total_steps),
        num_training_steps=total_steps,
    )
    sampler = train_loader.sampler
    loss_module, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        TokenNLL(model), optimizer, train_loader, val_loader, scheduler
    )
    has_validation = bool(data.validation)
    prompts = list(recipe.eval.sample_prompts)
    before_samples = generate(model, tokenizer, prompts, recipe.eval.max_new_tokens) if main else []
    eval_before = evaluate_loss(loss_module, val_loader, accelerator) if has_validation else None
    if eval_before is not None:
        say(
            f"eval loss before training: {eval_before:.4f} (perplexity {math.exp(eval_before):.2f})"
        )

    metrics = MetricsLog(run_dir, enabled=main)
    if eval_before is not None:
        metrics.write({"step": 0, "eval_loss": eval_before})
    batches = endless(train_loader, sampler)
    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    grad_accum = tcfg.gradient_accumulation_steps
    loop_started = time.perf_counter()
    trained_total = 0
    loss = math.nan
    eval_loss = eval_before
    loss_module.train()

    plain_log = main and not console.is_terminal
    with _progress(console, main) as progress:
        task = progress.add_task("train", total=total_steps, loss=math.nan, lr=0.0, tps=0.0)
        for step in range(1, total_steps + 1):
            step_batches = [next(batches) for _ in range(grad_accum)]
            loss, step_tokens = forward_backward(accelerator, loss_module, step_batches)
            max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm else float("inf")
            grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            trained_total += step_tokens
            elapsed = time.perf_counter() - loop_started
            record = {
                "step": step,
                "epoch": round(step * grad_accum / len(train_loader), 4),
                "loss": loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "trained_tokens": step_tokens,
                "trained_tokens_per_s": trained_total / elapsed,
                "elapsed_s": round(elapsed, 3),
            }
            if step % tcfg.logging_steps == 0 or step == total_steps:
                metrics.write(record)
            progress.update(task, advance=1, loss=loss, lr=lr, tps=trained_total / elapsed)
            if plain_log and step % tcfg.logging_steps == 0:
                say(
                    f"step {step}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                    f"{trained_total / elapsed:.0f} trained tok/s"
                )

            if (
                has_validation
                and tcfg.eval_steps
                and step % tcfg.eval_steps == 0
                and step < total_steps
            ):
                eval_loss = evaluate_loss(loss_module, val_loader, accelerator)
                metrics.write({"step": step, "eval_loss": eval_loss})
                say(f"step {step}: eval loss {eval_loss:.4f}")
            if tcfg.save_steps and step % tcfg.save_steps == 0 and step < total_steps:
                _save(
                    accelerator,
                    loss_module,
                    tokenizer,
                    recipe,
                    resolved,
                    run_dir / CHECKPOINTS_DIR / f"step-{step}",
                    {"step": step},
                )

    loop_seconds = time.perf_counter() - loop_started
    if has_validation:
        eval_loss = evaluate_loss(loss_module, val_loader, accelerator)
        metrics.write({"step": total_steps, "eval_loss": eval_loss})
    adapter_dir = run_dir / ADAPTER_DIR
    extra = {"steps": total_steps, "trained_tokens": trained_total, "final_loss": loss}
    _save(accelerator, loss_module, tokenizer, recipe, resolved, adapter_dir, extra)
    after_samples = generate(model, tokenizer, prompts, recipe.eval.max_new_tokens) if main else []
    metrics.close()
    if main:
        plot_losses(run_dir)
    result = RunResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        steps=total_steps,
        train_loss=loss,
        eval_before=eval_before,
        eval_after=eval_loss if has_validation else None,
        trained_tokens=trained_total,
        trained_tokens_per_second=trained_total / loop_seconds,
        wall_seconds=time.perf_counter() - started,
        summary=summary,
        model=model,
        samples=list(zip(prompts, before_samples, after_samples, strict=True)),
    )
    say(_result_table(result))
    for prompt, before, after in result.samples:
        say(_sample_table(prompt, before, after))
    return result


def _save(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    tokenizer,
    recipe: Recipe,
    resolved: ResolvedModel,
    target: Path,
    extra: dict[str, Any],
) -> None:
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(loss_module).model
        info = provenance(recipe, resolved, tokenizer.name_or_path, extra)
        save_adapter(target, model, tokenizer, recipe, info)
        if target.name == ADAPTER_DIR:
            (target.parent / PROVENANCE_FILE).write_text(
                (target / PROVENANCE_FILE).read_text(), encoding="utf-8"
            )
    accelerator.wait_for_everyone()


def _progress(console: Console, enabled: bool) -> Progress:
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


def _model_table(recipe: Recipe, resolved: ResolvedModel, summary: ModelSummary) -> Table:
    table = Table(title="lorakit train", show_header=False, title_justify="left")
    table.add_row("base model", f"{resolved.reference} ({resolved.kind})")
    for name, value in summary.rows():
        table.add_row(name, value)
    lora = recipe.lora
    table.add_row(
        "LoRA",
        f"r={lora.r} alpha={lora.lora_alpha:g} dropout={lora.lora_dropout:g}"
        + (" rslora" if lora.use_rslora else "")
        + (" dora" if lora.use_dora else ""),
    )
    tcfg = recipe.train
    table.add_row(
        "optimization",
        f"{tcfg.optimizer} lr={tcfg.learning_rate:g} {tcfg.lr_scheduler_type} "
        f"batch={tcfg.micro_batch_size}x{tcfg.gradient_accumulation_steps} "
        f"checkpointing={'on' if tcfg.gradient_checkpointing else 'off'}",
    )
    return table


def _data_line(data: PreparedData) -> str:
    t, v = data.stats["train"], data.stats["validation"]
    return (
        f"data: {t.examples} train examples ({t.tokens} tokens, {t.trained_tokens} trained, "
        f"{t.truncated} truncated, {t.dropped} dropped), {v.examples} validation examples"
    )


def _result_table(result: RunResult) -> Table:
    table = Table(title="result", show_header=False, title_justify="left")
    table.add_row("steps", str(result.steps))
    table.add_row("final train loss", f"{result.train_loss:.4f}")
    if result.eval_before is not None and result.eval_after is not None:
        table.add_row(
            "eval loss",
            f"{result.eval_before:.4f} → {result.eval_after:.4f} "
            f"(perplexity {math.exp(result.eval_before):.2f} → {math.exp(result.eval_after):.2f})",
        )
    table.add_row("trained tokens", f"{result.trained_tokens:,}")
    table.add_row("trained tokens/s", f"{result.trained_tokens_per_second:.1f}")
    table.add_row("wall time", f"{result.wall_seconds:.1f} s")
    table.add_row("adapter", str(result.adapter_dir))
    return table


def _sample_table(prompt: str, before: str, after: str) -> Table:
    table = Table(title=f"prompt: {prompt}", title_justify="left", expand=True)
    table.add_column("before training", ratio=1)
    table.add_column("after training", ratio=1)
    table.add_row(before, after)
    return table
