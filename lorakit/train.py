"""`lorakit train`: the whole training run, top to bottom.

recipe → base model + tokenizer → data → 4-bit base + LoRA → Accelerate loop → run folder.
The loop lives in one function (`train`) so forward, loss, backward, step, eval and save read
in one sitting; the helpers below it are small and named for what they decide.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from transformers import get_scheduler

from lorakit.advice import compile_advice, data_advice, recipe_advice
from lorakit.checkpoint import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    PROVENANCE_FILE,
    RECIPE_FILE,
    Checkpoint,
    TrainingState,
    best_checkpoint,
    capture_rng_state,
    check_run_dir,
    check_writable,
    checkpoint_dir,
    data_fingerprint,
    describe_changes,
    find_checkpoint,
    fingerprints,
    list_checkpoints,
    prepare_run_dir,
    prune_checkpoints,
    restore_adapter,
    restore_rng_state,
    save_adapter,
    write_checkpoint,
)
from lorakit.data import IGNORE_INDEX, make_loader, prepare_data
from lorakit.data.batching import EpochShuffle
from lorakit.data.pipeline import PreparedData
from lorakit.errors import LorakitError
from lorakit.evaluate import evaluate_loss, generate
from lorakit.loss import TokenNLL, causal_lm_of
from lorakit.models import (
    ResolvedModel,
    load_tokenizer,
    loadable,
    provenance_header,
    resolve_model,
)
from lorakit.peft_setup import ModelSummary, build_trainable_model
from lorakit.recipe import EarlyStopping, Recipe, TrainSection
from lorakit.tracking import (
    LOGS_DIR,
    MetricsLog,
    check_trackers,
    plot_losses,
    start_trackers,
    truncate_metrics,
)

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


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


class TrainingStopped(Exception):
    """A signal stopped the run after a complete optimizer step and a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {SIGNAL_NAMES[signum]} after step {step}")


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


def batch_stream(
    loader: DataLoader, sampler: EpochShuffle, epoch: int, consumed: int
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Micro-batches epoch after epoch, each epoch in its own seeded order, starting after
    `consumed` micro-batches of `epoch`. Yields (epoch, micro-batches consumed, batch)."""
    from accelerate.data_loader import skip_first_batches

    while True:
        epoch_loader = skip_first_batches(loader, consumed) if consumed else loader
        # Accelerate's loader sets the sampler's epoch from its own counter when iterated.
        epoch_loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for index, batch in enumerate(epoch_loader, start=consumed + 1):
            yield epoch, index, batch
        epoch, consumed = epoch + 1, 0


def launched_one_cpu_process(num_processes: int) -> bool:
    """True under `accelerate launch --cpu --num_processes N>1` without mpirun: Accelerate
    then runs the script once, leaving MASTER_ADDR set and no process count."""
    return (
        num_processes == 1
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
        and "MASTER_ADDR" in os.environ
        and not any(k in os.environ for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    )


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


def clip_gradients(
    accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float
) -> float:
    """Clip to `max_norm` and return the total gradient norm. Non-finite gradients are left
    as they are (the step is skipped anyway), so a diagnosis can name where they came from."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if torch.isfinite(total):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def provenance(
    recipe: Recipe,
    model: ResolvedModel,
    tokenizer_name: str,
    extra: dict[str, Any],
    data_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What an adapter needs to be reproduced or merged without the training YAML.
    `data_hashes`: the data files' sha256, when already computed."""
    return {
        **provenance_header(model),
        "tokenizer": tokenizer_name,
        "data": data_hashes if data_hashes is not None else data_fingerprint(recipe),
        **extra,
    }


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    force: bool = False,
    console: Console | None = None,
) -> RunResult:
    """Train as the recipe says. `resume`: `auto` (the run folder's latest checkpoint, or a
    new run when there is none) or a checkpoint / run folder; `force` resumes even when the
    recipe, data or tokenizer changed since the checkpoint."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    tcfg = recipe.train
    run_dir = Path(recipe.output.dir)
    check_trackers(tcfg.report_to)
    accelerator = Accelerator(
        # Without this a CPU-only machine ignores a multi-process launch (torchrun,
        # `accelerate launch --multi_gpu`): every process would train alone on all the data.
        cpu=not torch.cuda.is_available(),
        log_with=tcfg.report_to or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / LOGS_DIR)
        ),
    )
    main = accelerator.is_main_process
    say = _printer(console) if main else (lambda message: None)
    if launched_one_cpu_process(accelerator.num_processes):
        say(
            "[yellow]warning:[/yellow] `accelerate launch --cpu` started ONE process: Accelerate "
            "starts several CPU processes only through mpirun (--mpirun_hostfile). For N "
            "processes (gloo) use `accelerate launch --multi_gpu --num_processes N -m lorakit "
            "train …` or `torchrun --nproc_per_node N -m lorakit train …`"
        )
    set_seed(tcfg.seed)

    # Everything that can fail on user input happens before the run folder is touched.
    check_writable(run_dir, "output.dir")
    checkpoint = _checkpoint_to_resume(resume, run_dir, overwrite, say)
    resolved = resolve_model(recipe.model.name_or_path, convert=False)
    tokenizer = load_tokenizer(resolved.location, recipe.model.trust_remote_code)
    data = prepare_data(recipe, tokenizer)
    resolved = loadable(resolved)  # a GGUF source is converted once the data is known good
    run_fingerprints = fingerprints(recipe, data)
    if checkpoint is not None:
        _check_resumable(checkpoint, run_fingerprints, accelerator.num_processes, force, say)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:
        _check_fsdp_recipe(recipe)
    model, summary = build_trainable_model(recipe, resolved.location, accelerator.device, sharded)
    say(_model_table(recipe, resolved, summary))
    say(_data_line(data))
    stats = data.stats["train"]
    advice = recipe_advice(recipe) + data_advice(
        recipe, stats.examples, stats.trained_tokens, summary.trainable_parameters
    )
    for note in advice:
        say(f"[yellow]warning:[/yellow] {escape(note)}")
    # Under FSDP the model is whole on no GPU until `prepare`, and sharded after: no samples.
    prompts = [] if sharded else list(recipe.eval.sample_prompts)
    before_samples = generate(model, tokenizer, prompts, recipe.eval.max_new_tokens) if main else []
    if checkpoint is not None:
        # Before `prepare`, so FSDP shards the restored weights.
        restore_adapter(model, checkpoint.adapter_weights())

    pad_id = tokenizer.pad_token_id
    # flash-attention reads packed examples from one flattened row (its varlen path).
    flat = recipe.data.packing and recipe.model.attn_implementation == "flash_attention_2"
    share_prefix = summary.shared_prefix == "on"
    train_loader = make_loader(
        data.train,
        tcfg.micro_batch_size,
        pad_id,
        tcfg.seed,
        shuffle=True,
        flatten=flat,
        group_by_length=recipe.data.group_by_length,
        processes=accelerator.num_processes,
        share_prefix=share_prefix,
    )
    val_loader = make_loader(
        data.validation,
        tcfg.micro_batch_size,
        pad_id,
        tcfg.seed,
        shuffle=False,
        flatten=flat,
        share_prefix=share_prefix,
    )
    sampler = train_loader.sampler
    loss_module = TokenNLL(model)
    # FSDP's auto-wrap shards the layers the model names as unsplittable (its decoder layers).
    loss_module._no_split_modules = getattr(causal_lm_of(model), "_no_split_modules", None)
    loss_module, optimizer, train_loader, val_loader = accelerator.prepare(
        loss_module, build_optimizer(model, tcfg), train_loader, val_loader
    )
    total_steps = count_optimizer_steps(tcfg, len(train_loader))
    for note in compile_advice(tcfg, total_steps):
        say(f"[yellow]warning:[/yellow] {escape(note)}")
    # Not passed to `prepare`: Accelerate would step it once per process per optimizer step.
    scheduler = get_scheduler(
        tcfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(tcfg, total_steps),
        num_training_steps=total_steps,
    )
    state = TrainingState()
    if checkpoint is not None:
        _load_optimizer_state(accelerator, loss_module, optimizer, checkpoint)
        scheduler.load_state_dict(checkpoint.scheduler_state)
        state = checkpoint.state
        state.resumed_from.append(str(checkpoint.path))
        if state.stop_reason and state.stop_reason.startswith("stopped by"):
            state.stop_reason = None  # a signal only paused the run; early stopping is final
    if main:
        if checkpoint is None:
            prepare_run_dir(recipe.output.dir, overwrite)
        else:
            truncate_metrics(run_dir, state.step)
        (run_dir / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    accelerator.wait_for_everyone()
    start_trackers(accelerator, recipe, run_dir)
    metrics = MetricsLog(run_dir, enabled=main, accelerator=accelerator)

    has_validation = bool(data.validation)
    if checkpoint is None and has_validation:
        state.eval_before = evaluate_loss(loss_module, val_loader, accelerator)
        _record_evaluation(state, state.eval_before, tcfg.early_stopping)
        metrics.write({"step": 0, "eval_loss": state.eval_before})
        say(
            f"eval loss before training: {state.eval_before:.4f} "
            f"(perplexity {math.exp(state.eval_before):.2f})"
        )
    if checkpoint is not None:
        say(f"resuming from {checkpoint.path} at step {state.step}/{total_steps}")
        rng = checkpoint.rng_state(accelerator.process_index)
        if rng is not None:
            restore_rng_state(rng)

    batches = batch_stream(train_loader, sampler, state.epoch, state.batches_in_epoch)
    per_epoch = len(train_loader)
    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm else float("inf")
    loop_started = time.perf_counter()
    session_tokens = 0
    last_saved: Path | None = None
    loss_module.train()

    plain_log = main and not console.is_terminal
    with StopOnSignal(main) as stop, _progress(console, main) as progress:
        task = progress.add_task(
            "train", total=total_steps, completed=state.step, loss=math.nan, lr=0.0, tps=0.0
        )
        while state.step < total_steps and state.stop_reason is None:
            step = state.step + 1
            step_batches = []
            for _ in range(tcfg.gradient_accumulation_steps):
                epoch, consumed, batch = next(batches)
                step_batches.append(batch)
            loss, step_tokens = forward_backward(accelerator, loss_module, step_batches)
            grad_norm = clip_gradients(accelerator, trainable, max_norm)
            lr = scheduler.get_last_lr()[0]
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
            else:
                _skip_step(state, step, loss, grad_norm, lr, loss_module, recipe, metrics, say)
            # A skipped step still moves the schedule, so the learning rate stays a function
            # of the step number (and of nothing that happened before a resume).
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            state.epoch, state.batches_in_epoch = (
                (epoch + 1, 0) if consumed == per_epoch else (epoch, consumed)
            )

            if finite:
                state.bad_steps_in_a_row = 0
                state.last_loss = loss
                state.trained_tokens += step_tokens
                session_tokens += step_tokens
                elapsed = time.perf_counter() - loop_started
                tps = session_tokens / elapsed
                if step % tcfg.logging_steps == 0 or step == total_steps:
                    metrics.write(
                        {
                            "step": step,
                            "epoch": round(state.epoch + state.batches_in_epoch / per_epoch, 4),
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "trained_tokens": step_tokens,
                            "trained_tokens_per_s": tps,
                            "elapsed_s": round(state.train_seconds + elapsed, 3),
                        }
                    )
                progress.update(task, completed=step, loss=loss, lr=lr, tps=tps)
                if plain_log and step % tcfg.logging_steps == 0:
                    say(
                        f"step {step}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                        f"{tps:.0f} trained tok/s"
                    )

            state.eval_loss = None
            if has_validation and (
                step == total_steps or (tcfg.eval_steps and step % tcfg.eval_steps == 0)
            ):
                state.eval_loss = evaluate_loss(loss_module, val_loader, accelerator)
                metrics.write({"step": step, "eval_loss": state.eval_loss})
                say(f"step {step}: eval loss {state.eval_loss:.4f}")
                if _record_evaluation(state, state.eval_loss, tcfg.early_stopping):
                    state.stop_reason = (
                        f"early stopping: no eval loss improvement over "
                        f"{tcfg.early_stopping.min_delta:g} in {tcfg.early_stopping.patience} "
                        f"evaluations (best {state.best_eval_loss:.4f} at step "
                        f"{state.best_eval_step})"
                    )
                    say(state.stop_reason)
            signum = stop.agreed(accelerator)
            if signum:
                state.stop_reason = f"stopped by {SIGNAL_NAMES[signum]}"
            if (
                step == total_steps
                or state.stop_reason
                or (tcfg.save_steps and step % tcfg.save_steps == 0)
            ):
                saving = time.perf_counter()
                state.train_seconds += saving - loop_started
                last_saved = _save_checkpoint(
                    accelerator,
                    loss_module,
                    optimizer,
                    scheduler,
                    tokenizer,
                    recipe,
                    resolved,
                    state,
                    run_fingerprints,
                )
                loop_started, session_tokens = time.perf_counter(), 0
                if main:
                    size = sum(f.stat().st_size for f in last_saved.iterdir()) / 2**20
                    say(f"saved {last_saved} ({size:.1f} MiB, {loop_started - saving:.2f} s)")
            if signum:
                raise TrainingStopped(signum, step, last_saved)

        adapter_dir = run_dir / ADAPTER_DIR
        extra = {
            "steps": state.step,
            "trained_tokens": state.trained_tokens,
            "final_loss": state.last_loss,
            "stop_reason": state.stop_reason or "completed",
            "skipped_steps": state.skipped_steps,
            "resumed_from": state.resumed_from,
        }
        _save_final_adapter(
            accelerator, loss_module, tokenizer, recipe, resolved, extra, run_fingerprints["data"]
        )
    after_samples = generate(model, tokenizer, prompts, recipe.eval.max_new_tokens) if main else []
    metrics.close()
    if main:
        plot_losses(run_dir)
    result = RunResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        steps=state.step,
        train_loss=state.last_loss,
        eval_before=state.eval_before,
        eval_after=state.last_eval_loss if has_validation else None,
        trained_tokens=state.trained_tokens,
        trained_tokens_per_second=state.trained_tokens / max(state.train_seconds, 1e-9),
        wall_seconds=time.perf_counter() - started,
        summary=summary,
        model=model,
        samples=list(zip(prompts, before_samples, after_samples, strict=True)),
        stop_reason=state.stop_reason or "completed",
        skipped_steps=state.skipped_steps,
        best=best_checkpoint(run_dir),
        resumed_from=list(state.resumed_from),
    )
    say(_result_table(result))
    for prompt, before, after in result.samples:
        say(_sample_table(prompt, before, after))
    return result


# --- Resume -------------------------------------------------------------------------------


def _checkpoint_to_resume(
    resume: str | None, run_dir: Path, overwrite: bool, say
) -> Checkpoint | None:
    if resume is None:
        check_run_dir(str(run_dir), overwrite)
        return None
    if overwrite:
        raise LorakitError("--resume and --overwrite exclude each other")
    checkpoint, damaged = find_checkpoint(resume, run_dir)
    for note in damaged:
        say(f"[yellow]warning:[/yellow] {escape(note)}; passing over it")
    if checkpoint is None:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            what = "no intact checkpoint" if damaged else "no checkpoint"
            raise LorakitError(
                f"--resume: {run_dir} holds {what} to continue from "
                "(start it over with --overwrite instead of --resume)"
            )
        say(f"no checkpoint in {run_dir / CHECKPOINTS_DIR}: starting a new run")
        return None
    if damaged:
        say(f"resuming from the newest intact checkpoint, {checkpoint.path}")
    return checkpoint


def _check_resumable(
    checkpoint: Checkpoint, current: dict[str, Any], num_processes: int, force: bool, say
) -> None:
    """Refuse to continue a run under a different recipe, data or tokenizer (the result would
    match neither), naming each difference; `--force` turns the refusal into a warning."""
    changes = describe_changes(checkpoint.fingerprints, current)
    if checkpoint.num_processes != num_processes:
        changes.append(
            f"process count changed: the checkpoint was written by {checkpoint.num_processes} "
            f"process(es), this run has {num_processes} (the data position would not match)"
        )
    if not changes:
        return
    if not force:
        raise LorakitError(
            "\n".join(
                [f"--resume: {checkpoint.path} cannot be resumed exactly:"]
                + [f"  {change}" for change in changes]
                + ["pass --force to resume anyway"]
            )
        )
    for change in changes:
        say(f"[yellow]warning:[/yellow] resuming with --force although {change}")


def _check_fsdp_recipe(recipe: Recipe) -> None:
    """FSDP flattens tensors of one dtype, and bitsandbytes' 8-bit optimizer state cannot be
    gathered into a checkpoint: say so before loading anything."""
    quant = recipe.quant
    if quant.load_in_4bit and (
        quant.bnb_4bit_compute_dtype == "auto"
        or quant.bnb_4bit_quant_storage != quant.bnb_4bit_compute_dtype
    ):
        raise LorakitError(
            "quant.bnb_4bit_quant_storage: FSDP flattens tensors of one dtype, so the 4-bit "
            "weights must be stored in the compute dtype: set quant.bnb_4bit_compute_dtype and "
            "quant.bnb_4bit_quant_storage to the same dtype (bfloat16 on current GPUs); see "
            "configs/accelerate/fsdp-qlora.yaml"
        )
    if recipe.train.optimizer != "adamw_torch":
        raise LorakitError(
            f"train.optimizer: {recipe.train.optimizer} cannot be checkpointed under FSDP; use "
            "adamw_torch"
        )
    if recipe.train.torch_compile:
        raise LorakitError("train.torch_compile: not supported under FSDP yet; set it to false")


def _load_optimizer_state(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint: Checkpoint,
) -> None:
    saved = checkpoint.optimizer_state()
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            loss_module,
            optimizer.optimizer,
            saved,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
    else:
        optimizer.load_state_dict(saved)


# --- Numerics -----------------------------------------------------------------------------


def _skip_step(
    state: TrainingState,
    step: int,
    loss: float,
    grad_norm: float,
    lr: float,
    loss_module: torch.nn.Module,
    recipe: Recipe,
    metrics: MetricsLog,
    say,
) -> None:
    """Count and log a step whose loss or gradient is not finite (its update is dropped);
    abort with a diagnosis after `train.max_bad_steps` of them in a row."""
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    state.skipped_steps += 1
    state.bad_steps_in_a_row += 1
    metrics.write(
        {"step": step, "skipped": what, "lr": lr, "bad_steps_in_a_row": state.bad_steps_in_a_row}
    )
    say(f"[yellow]warning:[/yellow] step {step} skipped: {what}")
    if state.bad_steps_in_a_row < recipe.train.max_bad_steps:
        return
    first = step - state.bad_steps_in_a_row + 1
    culprit = _first_nonfinite_gradient(loss_module) if math.isfinite(loss) else None
    lines = [
        f"training diverged: steps {first}–{step} ({state.bad_steps_in_a_row} in a row, "
        f"train.max_bad_steps) had a non-finite loss or gradient ({what} at step {step}); "
        f"their updates were skipped, so the weights are those after step {first - 1}",
        f"last finite loss: {state.last_loss:.4f}; learning rate at step {step}: {lr:.3g}",
    ]
    if culprit:
        lines.append(f"first non-finite gradient: {culprit}")
    hints = [f"lower train.learning_rate (now {recipe.train.learning_rate:g})"]
    if recipe.train.max_grad_norm is None:
        hints.append("set train.max_grad_norm (e.g. 1.0)")
    if recipe.quant.bnb_4bit_compute_dtype == "float16":
        hints.append("use quant.bnb_4bit_compute_dtype bfloat16 or float32 (float16 overflows)")
    lines.append(
        "try: " + "; ".join(hints) + "; then continue from the last checkpoint with "
        "--resume --force"
    )
    raise LorakitError("\n".join(lines))


def _first_nonfinite_gradient(module: torch.nn.Module) -> str | None:
    for name, param in module.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return name.removeprefix("model.")
    return None


def _record_evaluation(state: TrainingState, eval_loss: float, rule: EarlyStopping | None) -> bool:
    """Track the best eval loss; True when early stopping says to stop. An evaluation improves
    when it beats the best so far by more than `min_delta`."""
    state.last_eval_loss = eval_loss
    min_delta = rule.min_delta if rule else 0.0
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss - min_delta:
        state.best_eval_loss, state.best_eval_step = eval_loss, state.step
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    return rule is not None and state.evals_without_improvement >= rule.patience


# --- Signals ------------------------------------------------------------------------------


class StopOnSignal:
    """SIGINT / SIGTERM during training: finish the current optimizer step, write a checkpoint
    and stop. A second Ctrl-C aborts at once. Repeated SIGTERMs are ignored: launchers
    (torchrun, SLURM) forward the same stop request to every process."""

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        if self.announce:
            print(
                f"\n{SIGNAL_NAMES[signum]}: finishing this optimizer step and writing a "
                "checkpoint (Ctrl-C again aborts at once)",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal any process received (0 for none), the same answer on every process so
        they all stop at the same step."""
        received = self.received or 0
        if accelerator.num_processes == 1:
            return received
        flags = accelerator.gather(torch.tensor([received], device=accelerator.device))
        return int(flags.max())


# --- Saving -------------------------------------------------------------------------------


def _save_checkpoint(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    tokenizer,
    recipe: Recipe,
    resolved: ResolvedModel,
    state: TrainingState,
    run_fingerprints: dict[str, Any],
) -> Path:
    """Every process contributes its random state; the main process writes the checkpoint
    and prunes old ones. A failed write leaves earlier checkpoints as they were."""
    run_dir = Path(recipe.output.dir)
    target = checkpoint_dir(run_dir, state.step)
    rng_states = gather_object([capture_rng_state()])
    adapter_state = _gathered_adapter_state(accelerator, loss_module)
    optimizer_state = _gathered_optimizer_state(accelerator, loss_module, optimizer)
    failure = None
    if accelerator.is_main_process:
        info = provenance(
            recipe,
            resolved,
            tokenizer.name_or_path,
            {"steps": state.step},
            run_fingerprints["data"],
        )
        try:
            write_checkpoint(
                target,
                accelerator.unwrap_model(loss_module).model,
                tokenizer,
                recipe,
                info,
                state=state,
                scheduler_state=scheduler.state_dict(),
                optimizer_state=optimizer_state,
                rng_states=rng_states,
                run_fingerprints=run_fingerprints,
                num_processes=accelerator.num_processes,
                adapter_state=adapter_state,
            )
            prune_checkpoints(run_dir, recipe.train.save_total_limit)
        except (OSError, SafetensorError) as exc:
            failure = _save_failure(target, exc, run_dir)
    _raise_if_any_failed(accelerator, failure)
    return target


def _save_final_adapter(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    tokenizer,
    recipe: Recipe,
    resolved: ResolvedModel,
    extra: dict[str, Any],
    data_hashes: dict[str, str],
) -> None:
    run_dir = Path(recipe.output.dir)
    target = run_dir / ADAPTER_DIR
    adapter_state = _gathered_adapter_state(accelerator, loss_module)
    failure = None
    if accelerator.is_main_process:
        best = best_checkpoint(run_dir)
        if best is not None:
            extra = {**extra, "best_checkpoint": str(best[0]), "best_eval_loss": best[1]}
        info = provenance(recipe, resolved, tokenizer.name_or_path, extra, data_hashes)
        model = accelerator.unwrap_model(loss_module).model
        try:
            save_adapter(target, model, tokenizer, recipe, info, adapter_state)
            (run_dir / PROVENANCE_FILE).write_text(
                (target / PROVENANCE_FILE).read_text(), encoding="utf-8"
            )
        except (OSError, SafetensorError) as exc:
            failure = _save_failure(target, exc, run_dir)
    _raise_if_any_failed(accelerator, failure)


def _save_failure(target: Path, exc: OSError | SafetensorError, run_dir: Path) -> LorakitError:
    # safetensors reports I/O errors as SafetensorError("...StorageFull...No space left...").
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    filename = exc.filename if isinstance(exc, OSError) else None
    saved = list_checkpoints(run_dir)
    kept = (
        f"the previous checkpoint {saved[-1][1]} is intact"
        if saved
        else "no earlier checkpoint exists"
    )
    return LorakitError(
        f"cannot write {target}: {reason}"
        + (f" ({filename})" if filename else "")
        + f"\n{kept}; free some space or fix the folder's permissions, then continue with "
        "--resume"
    )


def _raise_if_any_failed(accelerator: Accelerator, failure: LorakitError | None) -> None:
    """The main process writes; every process must learn whether that worked, or the others
    would carry on (or wait) alone."""
    failed = failure is not None
    if accelerator.num_processes > 1:
        flags = accelerator.gather(torch.tensor([int(failed)], device=accelerator.device))
        failed = bool(flags.max())
    if failure is not None:
        raise failure
    if failed:
        raise LorakitError("the main process could not write to the run folder")


def _gathered_adapter_state(
    accelerator: Accelerator, loss_module: torch.nn.Module
) -> dict[str, torch.Tensor] | None:
    """Under FSDP each process holds a shard: gather the full weights (every process must
    take part). Elsewhere the main process saves its own replica."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    full = accelerator.get_state_dict(loss_module)
    return {name.removeprefix("model."): tensor for name, tensor in full.items()}


def _gathered_optimizer_state(
    accelerator: Accelerator, loss_module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    if accelerator.distributed_type != DistributedType.FSDP:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        loss_module,
        optimizer.optimizer,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )


# --- What the user sees -------------------------------------------------------------------


def _printer(console: Console):
    def say(message: Any) -> None:
        # Log lines stay whole (paths included) when stderr is a file or a pipe.
        console.print(message, soft_wrap=isinstance(message, str))

    return say


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
        f"checkpointing={_checkpointing(tcfg)}",
    )
    return table


def _data_line(data: PreparedData) -> str:
    t, v = data.stats["train"], data.stats["validation"]
    packed = (
        f", packed into {t.packed_rows} rows ({t.packing_efficiency:.1%} full)"
        if t.packed_rows
        else ""
    )
    return "\n".join(
        [
            f"data: {t.examples} train examples ({t.tokens} tokens, {t.trained_tokens} trained, "
            f"{t.truncated} truncated, {t.dropped} dropped, {t.skipped} rows skipped){packed}, "
            f"{v.examples} validation examples",
            *(f"warning: {escape(note)}" for note in data.warnings),
        ]
    )


def _checkpointing(train: TrainSection) -> str:
    if not train.gradient_checkpointing:
        return "off"
    n = train.checkpoint_every_n_layers
    return "on" if n == 1 else f"1 layer in {n}"


def _result_table(result: RunResult) -> Table:
    table = Table(title="result", show_header=False, title_justify="left")
    table.add_row("steps", f"{result.steps} ({result.stop_reason})")
    if result.resumed_from:
        table.add_row("resumed from", ", ".join(result.resumed_from))
    table.add_row("final train loss", f"{result.train_loss:.4f}")
    if result.eval_before is not None and result.eval_after is not None:
        table.add_row(
            "eval loss",
            f"{result.eval_before:.4f} → {result.eval_after:.4f} "
            f"(perplexity {math.exp(result.eval_before):.2f} → {math.exp(result.eval_after):.2f})",
        )
    if result.best is not None:
        table.add_row("best checkpoint", f"{result.best[0]} (eval loss {result.best[1]:.4f})")
    if result.skipped_steps:
        table.add_row("skipped steps", f"{result.skipped_steps} (NaN/inf loss or gradient)")
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
