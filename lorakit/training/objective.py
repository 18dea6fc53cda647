"""What one forward of a training batch computes, by `train.method`: token NLL for SFT, the
preference loss for DPO / ORPO / SimPO. Both return (loss sum, count), so the loop normalizes
either by the count of its whole step."""

from __future__ import annotations

import torch
from peft import PeftModel

from lorakit.loss import TokenNLL
from lorakit.peft_setup import REFERENCE_ADAPTER
from lorakit.preference import PreferenceObjective
from lorakit.recipe import Recipe


def training_objective(recipe: Recipe, model: PeftModel) -> torch.nn.Module:
    """What one forward of a batch returns as (loss sum, count): token NLL for SFT, the
    preference loss for DPO / ORPO / SimPO."""
    tcfg = recipe.train
    if tcfg.method == "sft":
        return TokenNLL(model)
    reference = REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None
    return PreferenceObjective(
        model,
        tcfg.method,
        beta=tcfg.beta,
        loss_type=tcfg.loss_type,
        label_smoothing=tcfg.label_smoothing,
        gamma=tcfg.gamma,
        reference=reference,
    )
