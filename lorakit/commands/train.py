"""`lorakit train`: the whole training run, top to bottom.

`setup` (recipe → base model + tokenizer → data → 4-bit base + LoRA → loaders, optimizer,
schedule, resume) → the loop in `train` (micro-batches, step, evaluate, save, log) → `finish`
(final adapter, samples, summary). The loop reads on one screen; setup and finish are the named
steps below it, and the machinery only training uses lives in `lorakit.training`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from peft import PeftModel
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from torch.utils.data import DataLoader
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from lorakit.advice import compile_advice, data_advice, recipe_advice
from lorakit.data import make_loader, prepare_data
from lorakit.data.batching import EpochShuffle, collate_pairs
from lorakit.data.pipeline import Example, PreferencePair, PreparedData
from lorakit.decoding import generate
from lorakit.errors import LorakitError
from lorakit.files import check_writable
from lorakit.loss import causal_lm_of, evaluate_loss
from lorakit.memory_plan import MemoryPlan
from lorakit.models import ResolvedModel, load_config, load_tokenizer, loadable, resolve_model
from lorakit.peft_setup import (
    ModelSummary,
    build_trainable_model,
    check_attention,
)
from lorakit.planning import (
    PeakMeter,
    available_memory,
    check_compiler,
    check_fits,
    device_kind,
    plan_of,
    resolve_auto,
)
from lorakit.preference import PreferenceObjective
from lorakit.recipe import Recipe
from lorakit.resume import (
    CHECKPOINTS_DIR,
    Checkpoint,
    TrainingState,
    best_checkpoint,
    describe_changes,
    find_checkpoint,
    fingerprints,
    restore_adapter,
    restore_rng_state,
)
from lorakit.run_folder import (
    RECIPE_FILE,
    check_run_dir,
    prepare_run_dir,
    provenance,
    starting_adapter,
)
from lorakit.tracking import (
    LOGS_DIR,
    MetricsLog,
    check_trackers,
    plot_losses,
    read_metrics,
    start_trackers,
    truncate_metrics,
)
from lorakit.training.display import (
    RunResult,
    data_line,
    model_table,
    printer,
    progress,
    result_table,
    sample_table,
)
from lorakit.training.objective import training_objective
from lorakit.training.optim import build_optimizer, build_scheduler, count_optimizer_steps
from lorakit.training.saving import load_optimizer_state, save_checkpoint, save_final_adapter
from lorakit.training.signals import SIGNAL_NAMES, StopOnSignal, TrainingStopped
from lorakit.training.steps import (
    batch_stream,
    clip_gradients,
    forward_backward,
    launched_one_cpu_process,
    record_evaluation,
    skip_step,
)

__all__ = ["RunResult", "TrainingStopped", "train"]


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    force: bool = False,
    console: Console | None = None,
    check_memory: bool = True,
) -> RunResult:
    """Train as the recipe says. `resume`: `auto` (the run folder's newest intact checkpoint,
    or a new run when there is none) or a checkpoint / run folder; `force` resumes even when
    the recipe, data or tokenizer changed since the checkpoint (`--ignore-changes`);
    `check_memory` refuses, before loading, a recipe whose memory plan exceeds what is free."""
    run = setup(recipe, overwrite, resume, force, console or Console(stderr=True), check_memory)
    state, tcfg = run.state, recipe.train
    batches = batch_stream(run.train_loader, run.sampler, state.epoch, state.batches_in_epoch)
    trainable = [p for p in run.loss_module.parameters() if p.requires_grad]
    max_norm = tcfg.max_grad_norm or float("inf")
    run.loss_module.train()
    run.meter.start()
    run.restart_clock()
    with StopOnSignal(run.main) as stop, progress(run.console, run.main) as bar:
        task = bar.add_task(
            "train", total=run.total_steps, completed=state.step, loss=math.nan, lr=0.0, tps=0.0
        )
        while state.step < run.total_steps and state.stop_reason is None:
            step = state.step + 1
            micro_batches = [next(batches) for _ in range(tcfg.gradient_accumulation_steps)]
            inputs = [batch for _, _, batch in micro_batches]
            loss, tokens = forward_backward(run.accelerator, run.loss_module, inputs)
            grad_norm = clip_gradients(run.accelerator, trainable, max_norm)
            lr = run.scheduler.get_last_lr()[0]
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                run.optimizer.step()
            else:
                run.skip_step(step, loss, grad_norm, lr)
            # A skipped step still moves the schedule, so the learning rate stays a function of
            # the step number (and of nothing that happened before a resume).
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            epoch, consumed, _ = micro_batches[-1]
            run.advance(step, epoch, consumed)
            if finite:
                run.log_step(bar, task, step, loss, lr, grad_norm, tokens)
            state.eval_loss = run.evaluate(step) if run.evaluation_due(step) else None
            signum = stop.agreed(run.accelerator)
            if signum:
                state.stop_reason = f"stopped by {SIGNAL_NAMES[signum]}"
            if step == run.total_steps or state.stop_reason or run.save_due(step):
                run.save_checkpoint()
            if signum:
                raise TrainingStopped(signum, step, run.last_saved)
        run.save_final_adapter()
    return finish(run)


@dataclass
class Run:
    """One training run, as `setup` leaves it for the loop, and what the loop does to it."""

    recipe: Recipe
    accelerator: Accelerator
    console: Console
    say: Callable[[Any], None]
    resolved: ResolvedModel
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    model: PeftModel
    summary: ModelSummary
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: EpochShuffle
    """The training loader's own sampler (Accelerate's prepared loader wraps it): it orders
    each epoch from its seed."""
    total_steps: int
    state: TrainingState
    metrics: MetricsLog
    fingerprints: dict[str, Any]
    prompts: list[str]
    before_samples: list[str]
    started: float
    clock: float = 0.0
    """When the loop last started timing (start, or after the last checkpoint write)."""
    clocked_tokens: int = 0
    """Trained tokens since `clock`, for the tokens/s shown."""
    last_saved: Path | None = None
    plan: MemoryPlan | None = None
    """The memory plan the run was checked against."""
    meter: PeakMeter = field(init=False)

    def __post_init__(self) -> None:
        self.meter = PeakMeter(self.accelerator.device)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.output.dir)

    def restart_clock(self) -> None:
        self.clock, self.clocked_tokens = time.perf_counter(), 0

    def advance(self, step: int, epoch: int, consumed: int) -> None:
        """The data position after `step`: a finished epoch moves on to the next one."""
        self.state.step = step
        per_epoch = len(self.train_loader)
        done = consumed == per_epoch
        self.state.epoch, self.state.batches_in_epoch = (
            (epoch + 1, 0) if done else (epoch, consumed)
        )

    def skip_step(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        """The NaN guard: no update, counted and logged; abort after too many in a row."""
        skip_step(
            self.state,
            step,
            loss,
            grad_norm,
            lr,
            self.loss_module,
            self.recipe,
            self.metrics,
            self.say,
        )

    @property
    def preference(self) -> bool:
        return self.recipe.train.method != "sft"

    def method_metrics(self) -> dict[str, float]:
        """A preference objective's metrics since the last call (rewards, accuracies, …)."""
        objective = self.accelerator.unwrap_model(self.loss_module)
        if not isinstance(objective, PreferenceObjective):
            return {}
        return objective.pop_metrics(lambda t: self.accelerator.reduce(t, reduction="sum"))

    def log_step(
        self, bar: Progress, task: Any, step: int, loss: float, lr: float, norm: float, count: int
    ) -> None:
        """`count`: the step's trained tokens (SFT) or pairs (preference tuning)."""
        state, logging_steps = self.state, self.recipe.train.logging_steps
        unit = "pairs" if self.preference else "trained_tokens"
        state.bad_steps_in_a_row = 0
        state.last_loss = loss
        if self.preference:
            state.trained_pairs += count
        else:
            state.trained_tokens += count
        self.clocked_tokens += count
        elapsed = time.perf_counter() - self.clock
        tps = self.clocked_tokens / elapsed
        method_metrics = self.method_metrics()
        if step % logging_steps == 0 or step == self.total_steps:
            epochs = state.epoch + state.batches_in_epoch / len(self.train_loader)
            self.metrics.write(
                {
                    "step": step,
                    "epoch": round(epochs, 4),
                    "loss": loss,
                    **method_metrics,
                    "lr": lr,
                    "grad_norm": norm,
                    unit: count,
                    f"{unit}_per_s": tps,
                    "elapsed_s": round(state.train_seconds + elapsed, 3),
                }
            )
        bar.update(task, completed=step, loss=loss, lr=lr, tps=tps)
        if self.main and not self.console.is_terminal and step % logging_steps == 0:
            accuracy = method_metrics.get("rewards/accuracies")
            shown = f"  reward accuracy {accuracy:.2f}" if accuracy is not None else ""
            speed = f"{tps:.2f} pairs/s" if self.preference else f"{tps:.0f} trained tok/s"
            self.say(
                f"step {step}/{self.total_steps}  loss {loss:.4f}{shown}  lr {lr:.2e}  {speed}"
            )

    def evaluation_due(self, step: int) -> bool:
        every = self.recipe.train.eval_steps
        return bool(self.data.validation) and (
            step == self.total_steps or bool(every and step % every == 0)
        )

    def evaluate(self, step: int) -> float:
        """The eval loss at `step`, logged; early stopping decides here."""
        state, rule = self.state, self.recipe.train.early_stopping
        self.method_metrics()  # the training steps' metrics are logged already
        eval_loss = evaluate_loss(self.loss_module, self.val_loader, self.accelerator)
        method_metrics = {f"eval_{k}": v for k, v in self.method_metrics().items()}
        self.metrics.write({"step": step, "eval_loss": eval_loss, **method_metrics})
        accuracy = method_metrics.get("eval_rewards/accuracies")
        shown = f", reward accuracy {accuracy:.2f}" if accuracy is not None else ""
        self.say(f"step {step}: eval loss {eval_loss:.4f}{shown}")
        if record_evaluation(state, eval_loss, rule):
            state.stop_reason = (
                f"early stopping: no eval loss improvement over {rule.min_delta:g} in "
                f"{rule.patience} evaluations (best {state.best_eval_loss:.4f} at step "
                f"{state.best_eval_step})"
            )
            self.say(state.stop_reason)
        return eval_loss

    def save_due(self, step: int) -> bool:
        every = self.recipe.train.save_steps
        return bool(every and step % every == 0)

    def adapter_provenance(self, **extra: Any) -> dict[str, Any]:
        """What an adapter needs to be reproduced or merged without the training YAML."""
        return provenance(
            self.resolved,
            tokenizer=self.tokenizer.name_or_path,
            data=self.fingerprints["data"],
            **extra,
        )

    def save_checkpoint(self) -> None:
        saving = time.perf_counter()
        self.state.train_seconds += saving - self.clock
        self.last_saved = save_checkpoint(
            self.accelerator,
            self.loss_module,
            self.optimizer,
            self.scheduler,
            self.tokenizer,
            self.recipe,
            self.adapter_provenance(steps=self.state.step),
            self.state,
            self.fingerprints,
        )
        self.restart_clock()
        if self.main:
            size = sum(f.stat().st_size for f in self.last_saved.iterdir()) / 2**20
            self.say(f"saved {self.last_saved} ({size:.1f} MiB, {self.clock - saving:.2f} s)")

    def save_final_adapter(self) -> None:
        state = self.state
        extra: dict[str, Any] = {
            "steps": state.step,
            "trained_tokens": state.trained_tokens,
            "final_loss": state.last_loss,
            "stop_reason": state.stop_reason or "completed",
            "skipped_steps": state.skipped_steps,
            "resumed_from": state.resumed_from,
        }
        best = best_checkpoint(self.run_dir) if self.main else None
        if best is not None:
            extra |= {"best_checkpoint": str(best[0]), "best_eval_loss": best[1]}
        save_final_adapter(
            self.accelerator,
            self.loss_module,
            self.tokenizer,
            self.recipe,
            self.adapter_provenance(**extra),
        )


# --- Setup ----------------------------------------------------------------------------------


def setup(
    recipe: Recipe,
    overwrite: bool,
    resume: str | None,
    force: bool,
    console: Console,
    check_memory: bool = True,
) -> Run:
    """Everything before the first step. What can fail on user input fails before the run
    folder is touched and before the model loads."""
    started = time.perf_counter()
    accelerator = start_accelerator(recipe)
    say = printer(console) if accelerator.is_main_process else (lambda message: None)
    if launched_one_cpu_process(accelerator.num_processes):
        say(
            "[yellow]warning:[/yellow] `accelerate launch --cpu` started ONE process: Accelerate "
            "starts several CPU processes only through mpirun (--mpirun_hostfile). For N "
            "processes (gloo) use `accelerate launch --multi_gpu --num_processes N -m lorakit "
            "train …` or `torchrun --nproc_per_node N -m lorakit train …`"
        )
    set_seed(recipe.train.seed)
    check_writable(Path(recipe.output.dir), "output.dir")
    checkpoint = checkpoint_to_resume(resume, Path(recipe.output.dir), overwrite, say)
    resolved, tokenizer, data, config = load_inputs(recipe)
    run_fingerprints = fingerprints(recipe, data)  # of the recipe as written (`auto` kept)
    if checkpoint is not None:
        check_resumable(checkpoint, run_fingerprints, accelerator.num_processes, force, say)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    recipe, plan = plan_memory(recipe, config, accelerator, data.train, check_memory, say)
    if sharded:
        check_fsdp_recipe(recipe)
    model, summary = build_trainable_model(recipe, resolved.location, accelerator.device, sharded)
    show_start(say, recipe, resolved, summary, data)
    # Under FSDP the model is whole on no GPU until `prepare`, and sharded after: no samples.
    prompts = [] if sharded else list(recipe.eval.sample_prompts)
    main = accelerator.is_main_process
    before = generate(model, tokenizer, prompts, recipe.eval.max_new_tokens) if main else []
    if checkpoint is not None:
        restore_adapter(model, checkpoint.adapter_weights())  # before FSDP shards the weights
    loss_module, optimizer, train_loader, val_loader, sampler = prepare_for_training(
        accelerator, recipe, model, tokenizer, data, summary
    )
    total_steps = count_optimizer_steps(recipe.train, len(train_loader))
    for note in compile_advice(recipe.train, total_steps):
        say(f"[yellow]warning:[/yellow] {escape(note)}")
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    state = TrainingState()
    if checkpoint is not None:
        state = restore_training_state(accelerator, loss_module, optimizer, scheduler, checkpoint)
    resumed_at = state.step if checkpoint is not None else None
    run = Run(
        recipe=recipe,
        accelerator=accelerator,
        console=console,
        say=say,
        resolved=resolved,
        tokenizer=tokenizer,
        data=data,
        model=model,
        summary=summary,
        loss_module=loss_module,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        total_steps=total_steps,
        state=state,
        metrics=open_run_folder(accelerator, recipe, overwrite, resumed_at),
        fingerprints=run_fingerprints,
        prompts=prompts,
        before_samples=before,
        started=started,
        plan=plan,
    )
    if recipe.train.method == "dpo" and recipe.train.precompute_ref_log_probs:
        precompute_reference(run)
    if checkpoint is None:
        evaluate_before_training(run)
    else:
        say(f"resuming from {checkpoint.path} at step {state.step}/{total_steps}")
        rng = checkpoint.rng_state(accelerator.process_index)
        if rng is not None:
            restore_rng_state(rng)
    return run


def start_accelerator(recipe: Recipe) -> Accelerator:
    check_trackers(recipe.train.report_to)
    run_dir = Path(recipe.output.dir)
    return Accelerator(
        # Without this a CPU-only machine ignores a multi-process launch (torchrun,
        # `accelerate launch --multi_gpu`): every process would train alone on all the data.
        cpu=not torch.cuda.is_available(),
        log_with=recipe.train.report_to or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / LOGS_DIR)
        ),
    )


def load_inputs(
    recipe: Recipe,
) -> tuple[ResolvedModel, PreTrainedTokenizerBase, PreparedData, PretrainedConfig]:
    """The base model's location, its tokenizer, the prepared data and the model's config. A
    GGUF source is converted (a minute for a real model) only once the data is known good:
    its tokenizer is read from the file."""
    resolved = resolve_model(recipe.model.name_or_path, convert=False)
    if recipe.model.adapter is not None:
        starting_adapter(recipe)
    tokenizer = load_tokenizer(resolved.location, recipe.model.trust_remote_code)
    data = prepare_data(recipe, tokenizer)
    resolved = loadable(resolved)
    config = load_config(resolved.location, recipe.model.trust_remote_code)
    check_attention(recipe.model.attn_implementation, config)
    return resolved, tokenizer, data, config


def plan_memory(
    recipe: Recipe,
    config: PretrainedConfig,
    accelerator: Accelerator,
    train: Sequence[Example | PreferencePair],
    check: bool,
    say: Callable[[Any], None],
) -> tuple[Recipe, MemoryPlan]:
    """The recipe with its `auto` values decided from the memory plan on this machine (each
    said with its reason), the plan, and the refusal of a recipe that cannot fit."""
    device = device_kind(accelerator.device)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    shape = {
        "device": device,
        "processes": accelerator.num_processes,
        "fsdp": sharded,
        "longest": max((example.length for example in train), default=1),
    }
    budget = available_memory(str(accelerator.device))
    recipe, decisions = resolve_auto(
        recipe, config, budget=budget, train_examples=len(train), **shape
    )
    for decision in decisions:
        say(f"auto: {decision.key} = {decision.value} ({decision.why})")
    check_compiler(recipe, device)
    plan = plan_of(recipe, config, **shape)
    if check:
        check_fits(recipe, config, plan, budget, **shape)
    return recipe, plan


def show_start(
    say: Callable[[Any], None],
    recipe: Recipe,
    resolved: ResolvedModel,
    summary: ModelSummary,
    data: PreparedData,
) -> None:
    """The model and data tables, and the advice on settings that look unusual."""
    say(model_table(recipe, resolved, summary))
    say(data_line(data))
    stats = data.stats["train"]
    advice = recipe_advice(recipe) + data_advice(
        recipe, stats.examples, stats.trained_tokens, summary.trainable_parameters
    )
    for note in advice:
        say(f"[yellow]warning:[/yellow] {escape(note)}")


def prepare_for_training(
    accelerator: Accelerator,
    recipe: Recipe,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    summary: ModelSummary,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, DataLoader, EpochShuffle]:
    """Loaders, the loss module and the optimizer, passed through Accelerate (devices, DDP/FSDP
    wrapping, per-process data shards), and the training loader's own sampler."""
    tcfg = recipe.train
    # flash-attention reads packed examples from one flattened row (its varlen path).
    flat = recipe.data.packing and recipe.model.attn_implementation == "flash_attention_2"
    # ORPO's NLL term covers the prompt tokens of each chosen row: they stay in their rows.
    share_prefix = summary.shared_prefix == "on" and tcfg.method != "orpo"
    pad_id = tokenizer.pad_token_id
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
    loss_module = training_objective(recipe, model)
    # FSDP's auto-wrap shards the layers the model names as unsplittable (its decoder layers).
    loss_module._no_split_modules = getattr(causal_lm_of(model), "_no_split_modules", None)
    sampler = train_loader.sampler
    prepared = accelerator.prepare(
        loss_module, build_optimizer(model, tcfg), train_loader, val_loader
    )
    return (*prepared, sampler)


def restore_training_state(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    checkpoint: Checkpoint,
) -> TrainingState:
    load_optimizer_state(accelerator, loss_module, optimizer, checkpoint)
    scheduler.load_state_dict(checkpoint.scheduler_state)
    state = checkpoint.state
    state.resumed_from.append(str(checkpoint.path))
    if state.stop_reason and state.stop_reason.startswith("stopped by"):
        state.stop_reason = None  # a signal only paused the run; early stopping is final
    return state


def open_run_folder(
    accelerator: Accelerator, recipe: Recipe, overwrite: bool, resumed_at: int | None
) -> MetricsLog:
    """The run folder (new, or a resumed one whose metrics are cut back to the checkpoint's
    step), the trackers and metrics.jsonl."""
    run_dir = Path(recipe.output.dir)
    main = accelerator.is_main_process
    if main:
        if resumed_at is None:
            prepare_run_dir(recipe.output.dir, overwrite)
        else:
            truncate_metrics(run_dir, resumed_at)
        (run_dir / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    accelerator.wait_for_everyone()
    start_trackers(accelerator, recipe, run_dir)
    return MetricsLog(run_dir, enabled=main, accelerator=accelerator)


@torch.no_grad()
def precompute_reference(run: Run) -> None:
    """DPO's reference log-probs of every training pair, once: the reference never changes,
    so the steps need no reference forward. Deterministic (no dropout), so a resumed run
    computes the same values."""
    objective = run.accelerator.unwrap_model(run.loss_module)
    pairs = run.data.train
    size = run.recipe.train.micro_batch_size
    pad = run.tokenizer.pad_token_id
    for start in range(0, len(pairs), size):
        chunk = pairs[start : start + size]
        batch = collate_pairs(chunk, pad)
        batch = {k: v.to(run.accelerator.device) for k, v in batch.items() if k != "pairs"}
        sums = objective.reference_log_probs(**batch).tolist()
        for i, pair in enumerate(chunk):
            pair.reference = (sums[i], sums[len(chunk) + i])
    run.say(f"reference log-probs of {len(pairs)} training pairs computed")


def evaluate_before_training(run: Run) -> None:
    if not run.data.validation:
        return
    state = run.state
    state.eval_before = evaluate_loss(run.loss_module, run.val_loader, run.accelerator)
    record_evaluation(state, state.eval_before, run.recipe.train.early_stopping)
    method_metrics = {f"eval_{k}": v for k, v in run.method_metrics().items()}
    run.metrics.write({"step": 0, "eval_loss": state.eval_before, **method_metrics})
    if run.preference:
        accuracy = method_metrics.get("eval_rewards/accuracies", math.nan)
        run.say(
            f"eval loss before training: {state.eval_before:.4f} (reward accuracy {accuracy:.2f})"
        )
        return
    run.say(
        f"eval loss before training: {state.eval_before:.4f} "
        f"(perplexity {math.exp(state.eval_before):.2f})"
    )


# --- Resume ---------------------------------------------------------------------------------


def checkpoint_to_resume(
    resume: str | None, run_dir: Path, overwrite: bool, say: Callable[[Any], None]
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


def check_resumable(
    checkpoint: Checkpoint,
    current: dict[str, Any],
    num_processes: int,
    force: bool,
    say: Callable[[Any], None],
) -> None:
    """Refuse to continue a run under a different recipe, data or tokenizer (the result would
    match neither), naming each difference; `force` turns the refusal into a warning."""
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
                + ["pass --ignore-changes to resume anyway"]
            )
        )
    for change in changes:
        say(f"[yellow]warning:[/yellow] resuming with --ignore-changes although {change}")


def check_fsdp_recipe(recipe: Recipe) -> None:
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


# --- Finish ---------------------------------------------------------------------------------


def held_out_accuracy(run_dir: Path) -> tuple[float, float] | None:
    """The first and last held-out reward accuracy metrics.jsonl recorded."""
    key = "eval_rewards/accuracies"
    values = [record[key] for record in read_metrics(run_dir) if key in record]
    return (values[0], values[-1]) if values else None


def finish(run: Run) -> RunResult:
    """After the last step: the samples after training, the loss plot, the summary."""
    recipe, state = run.recipe, run.state
    peak = run.meter.peak()  # before the samples after training: the loop's peak
    planned = run.plan.allocated if run.plan else None  # what the meter measures
    run.metrics.write(
        {
            "step": state.step,
            "memory_planned_bytes": planned,
            "memory_peak_bytes": peak,
            "memory_peak_scope": run.meter.scope,
        }
    )
    max_new = recipe.eval.max_new_tokens
    after = generate(run.model, run.tokenizer, run.prompts, max_new) if run.main else []
    run.metrics.close()
    if run.main:
        plot_losses(run.run_dir)
    result = RunResult(
        run_dir=run.run_dir,
        adapter_dir=run.run_dir / "adapter",
        steps=state.step,
        train_loss=state.last_loss,
        eval_before=state.eval_before,
        eval_after=state.last_eval_loss if run.data.validation else None,
        trained_tokens=state.trained_tokens,
        trained_tokens_per_second=state.trained_tokens / max(state.train_seconds, 1e-9),
        wall_seconds=time.perf_counter() - run.started,
        summary=run.summary,
        model=run.model,
        samples=list(zip(run.prompts, run.before_samples, after, strict=True)),
        stop_reason=state.stop_reason or "completed",
        skipped_steps=state.skipped_steps,
        best=best_checkpoint(run.run_dir),
        resumed_from=list(state.resumed_from),
        method=recipe.train.method,
        trained_pairs=state.trained_pairs,
        pairs_per_second=state.trained_pairs / max(state.train_seconds, 1e-9),
        eval_accuracy=held_out_accuracy(run.run_dir) if run.preference else None,
        memory=(planned, peak, run.meter.scope),
    )
    run.say(result_table(result))
    for prompt, before, after_text in result.samples:
        run.say(sample_table(prompt, before, after_text))
    return result
