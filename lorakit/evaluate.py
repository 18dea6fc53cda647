"""Evaluation: token-weighted loss (masked exactly as in training) and greedy generations."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lorakit.data.formats import render_prompt


@torch.no_grad()
def evaluate_loss(loss_module: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Mean NLL per trained token over the whole loader (all processes)."""
    was_training = loss_module.training
    loss_module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        nll, tokens = loss_module(**batch)
        total += torch.stack([nll.double(), tokens.double()])
    total = accelerator.reduce(total, reduction="sum")
    loss_module.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else math.nan


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to user prompts, batched with left padding and the KV cache."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    texts = [render_prompt(tokenizer, p) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    output = model.generate(
        **batch.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
