"""One optimizer step's machinery: the stream of micro-batches across epochs, forward and backward
with the loss normalized over the whole step (all micro-batches, all processes), gradient
clipping that leaves non-finite gradients visible, the NaN guard that skips such a step, and the
early-stopping bookkeeping of an evaluation."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from lorakit.data import IGNORE_INDEX
from lorakit.data.batching import EpochShuffle
from lorakit.errors import LorakitError
from lorakit.recipe import EarlyStopping, Recipe
from lorakit.resume import TrainingState
from lorakit.tracking import MetricsLog


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

    The loss is normalized by the count of the whole step (all micro-batches, all processes):
    trained tokens for SFT, pairs for preference tuning, so 1x16 and 8x2 give the same loss and
    the same gradients. Returns the step's mean loss per token (or pair) and that count.
    """
    local = sum(batch_count(b) for b in micro_batches)
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


def batch_count(batch: dict[str, torch.Tensor]) -> int:
    """What a micro-batch's loss is a sum over: its preference pairs, or its trained tokens."""
    if "pairs" in batch:
        return int(batch["pairs"])
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


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


def skip_step(
    state: TrainingState,
    step: int,
    loss: float,
    grad_norm: float,
    lr: float,
    loss_module: torch.nn.Module,
    recipe: Recipe,
    metrics: MetricsLog,
    say: Callable[[str], None],
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
    culprit = first_nonfinite_gradient(loss_module) if math.isfinite(loss) else None
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
        "--resume auto --ignore-changes"
    )
    raise LorakitError("\n".join(lines))


def first_nonfinite_gradient(module: torch.nn.Module) -> str | None:
    for name, param in module.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return name.removeprefix("model.")
    return None


def record_evaluation(state: TrainingState, eval_loss: float, rule: EarlyStopping | None) -> bool:
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
