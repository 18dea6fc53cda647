"""The training objective: summed next-token NLL over trained (unmasked) tokens.

The output head runs only on positions that carry a label, in chunks under activation
checkpointing, so the full [tokens x vocab] logits tensor is never materialized (the vocab is
49k for SmolLM2: the logits of one 4x512 batch alone would take 400 MB in fp32).
Returning the *sum* and the token count lets the loop normalize by the trained tokens of a whole
optimizer step, so micro-batching and gradient accumulation do not change the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from lorakit.data import IGNORE_INDEX

CHUNK_TOKENS = 1024


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a (possibly PEFT-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TokenNLL(nn.Module):
    """Wraps the (PEFT) model so one forward returns (sum of token NLL, trained tokens).

    Being a module, it is what Accelerate wraps for DDP/FSDP, so gradient sync sees the
    whole computation.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        causal_lm = causal_lm_of(self.model)
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        head = causal_lm.get_output_embeddings()
        # No KV cache: with one, transformers ignores packed position_ids and masks causally only.
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        hidden = hidden[:, :-1][keep]
        targets = targets[keep]
        softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), CHUNK_TOKENS):
            chunk = (hidden[start : start + CHUNK_TOKENS], targets[start : start + CHUNK_TOKENS])
            if torch.is_grad_enabled() and hidden.requires_grad:
                total = total + checkpoint(_chunk_nll, *chunk, head, softcap, use_reentrant=False)
            else:
                total = total + _chunk_nll(*chunk, head, softcap)
        return total, keep.sum()


def _chunk_nll(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None
) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")
