"""The training objective: summed next-token NLL over trained (unmasked) tokens.

The output head runs only on positions that carry a label, in chunks, so the full
[tokens x vocab] logits tensor is never materialized (the vocab is 49k for SmolLM2: the logits of
one 4x512 batch alone would take 400 MB in fp32). In training, one pass over the chunks computes
the loss and its gradient together (`HeadNLLFunction`): no logits are kept for backward and
none are recomputed, so the head costs two matmuls per trained token instead of three.
Returning the *sum* and the token count lets the loop normalize by the trained tokens of a whole
optimizer step, so micro-batching and gradient accumulation do not change the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from lorakit.data import IGNORE_INDEX
from lorakit.shared_prefix import SharedPrefixLayout, backbone_forward

CHUNK_BYTES = 64 * 2**20
"""fp32 logits per chunk: ~340 positions for a 49k vocab, ~128 for a 128k one."""


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
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        order: torch.Tensor | None = None,  # which example is where: a sum needs no order
    ) -> tuple[torch.Tensor, torch.Tensor]:
        causal_lm = causal_lm_of(self.model)
        head = causal_lm.get_output_embeddings()
        layout = None
        if segments is not None:  # a shared-prefix row (lorakit.data.batching.collate)
            layout = SharedPrefixLayout.from_segments(segments, input_ids.device)
        hidden = backbone_forward(causal_lm, input_ids, attention_mask, position_ids, layout)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        hidden = hidden[:, :-1][keep]
        targets = targets[keep]
        softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        chunk = chunk_positions(head.weight.shape[0])
        wants_grad = hidden.requires_grad or head.weight.requires_grad
        if type(head) is nn.Linear and head.bias is None and torch.is_grad_enabled() and wants_grad:
            total = HeadNLLFunction.apply(hidden, targets, head.weight, softcap, chunk)
            return total, keep.sum()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk):
            part = (hidden[start : start + chunk], targets[start : start + chunk])
            if torch.is_grad_enabled() and hidden.requires_grad:
                total = total + checkpoint(_chunk_nll, *part, head, softcap, use_reentrant=False)
            else:
                total = total + _chunk_nll(*part, head, softcap)
        return total, keep.sum()


def chunk_positions(vocab_size: int) -> int:
    return max(64, min(1024, CHUNK_BYTES // (4 * vocab_size)))


def _chunk_nll(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None
) -> torch.Tensor:
    logits = head(hidden.to(head.weight.dtype)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


class HeadNLLFunction(torch.autograd.Function):
    """Summed NLL of `targets` under logits = hidden·Wᵀ, with its gradient computed in the
    same pass over the chunks (softmax − one-hot, times W): backward only scales it.

    The matmuls run in the head weight's dtype, the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, targets, weight, softcap, chunk):
        want_hidden, _, want_weight = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk):
            h = hidden[start : start + chunk].to(weight.dtype)
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(sum NLL)/d(logits) = softmax - one-hot, computed in place over the logits.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(t.numel(), device=t.device), t] -= 1
            if softcap:
                grad.mul_(1 - capped.square_())
            grad = grad.to(weight.dtype)
            if want_hidden:
                grad_hidden[start : start + chunk] = grad @ weight
            if want_weight:
                grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, None, grad_weight, None, None


# --- The loss over a dataset (evaluation) ---------------------------------------------------


@torch.no_grad()
def evaluate_loss(loss_module: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Mean NLL per trained token over the whole loader (all processes)."""
    return evaluate_loss_and_tokens(loss_module, loader, accelerator)[0]


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a compiled training model evaluates eager
def evaluate_loss_and_tokens(
    loss_module: nn.Module, loader: DataLoader, accelerator: Accelerator
) -> tuple[float, int]:
    was_training = loss_module.training
    loss_module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        nll, tokens = loss_module(**batch)
        total += torch.stack([nll.double(), tokens.double()])
    total = accelerator.reduce(total, reduction="sum")
    loss_module.train(was_training)
    loss = (total[0] / total[1]).item() if total[1] > 0 else math.nan
    return loss, int(total[1].item())


def perplexity(loss: float) -> float:
    """exp(mean token NLL); infinite rather than an overflow error for a hopeless model."""
    return math.exp(loss) if loss < 700 else math.inf
