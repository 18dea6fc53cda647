"""The optimizer, the learning-rate schedule and the number of optimizer steps a recipe implies
(train runs them; advice and planning count with them)."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from lorakit.recipe import TrainSection


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


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's schedule with warmup. Not passed to Accelerate's `prepare`: it would step
    the schedule once per process per optimizer step."""
    return get_scheduler(
        train.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(train, total_steps),
        num_training_steps=total_steps,
    )
