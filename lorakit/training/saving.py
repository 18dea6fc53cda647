"""Writing checkpoints and the final adapter from one or several processes: every process takes
part in gathering (FSDP), the main process writes, and all of them learn whether that worked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.recipe import Recipe
from lorakit.resume import (
    Checkpoint,
    TrainingState,
    capture_rng_state,
    checkpoint_dir,
    list_checkpoints,
    prune_checkpoints,
    write_checkpoint,
)
from lorakit.run_folder import ADAPTER_DIR, PROVENANCE_FILE, save_adapter


def load_optimizer_state(
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


def save_failure(target: Path, exc: OSError | SafetensorError, run_dir: Path) -> LorakitError:
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


def raise_if_any_failed(accelerator: Accelerator, failure: LorakitError | None) -> None:
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


def gathered_adapter_state(
    accelerator: Accelerator, loss_module: torch.nn.Module
) -> dict[str, torch.Tensor] | None:
    """Under FSDP each process holds a shard: gather the full weights (every process must
    take part). Elsewhere the main process saves its own replica."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    full = accelerator.get_state_dict(loss_module)
    return {name.removeprefix("model."): tensor for name, tensor in full.items()}


def gathered_optimizer_state(
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


def save_checkpoint(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    info: dict[str, Any],
    state: TrainingState,
    run_fingerprints: dict[str, Any],
) -> Path:
    """Every process contributes its random state (and, under FSDP, its shards); the main
    process writes the checkpoint with provenance `info` and prunes old ones. A failed write
    leaves earlier checkpoints as they were."""
    run_dir = Path(recipe.output.dir)
    target = checkpoint_dir(run_dir, state.step)
    rng_states = gather_object([capture_rng_state()])
    adapter_state = gathered_adapter_state(accelerator, loss_module)
    optimizer_state = gathered_optimizer_state(accelerator, loss_module, optimizer)
    failure = None
    if accelerator.is_main_process:
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
            failure = save_failure(target, exc, run_dir)
    raise_if_any_failed(accelerator, failure)
    return target


def save_final_adapter(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    info: dict[str, Any],
) -> Path:
    """`<run>/adapter/` and the run's `lorakit.json`, written by the main process."""
    run_dir = Path(recipe.output.dir)
    target = run_dir / ADAPTER_DIR
    adapter_state = gathered_adapter_state(accelerator, loss_module)
    failure = None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(loss_module).model
        try:
            save_adapter(target, model, tokenizer, recipe, info, adapter_state)
            (run_dir / PROVENANCE_FILE).write_text(
                (target / PROVENANCE_FILE).read_text(), encoding="utf-8"
            )
        except (OSError, SafetensorError) as exc:
            failure = save_failure(target, exc, run_dir)
    raise_if_any_failed(accelerator, failure)
    return target
