"""Preference tuning math: per-sequence log-probs without full logits, and the DPO / ORPO / SimPO
losses, each equal to TRL 1.16's trainer on the same batch (tests/test_preference.py).

A preference batch holds 2P rows: the P chosen answers first, then the P rejected answers in the
same pair order (the layout TRL's collators produce), with `labels` = IGNORE_INDEX outside the
answer tokens. One forward runs all rows.

Like `lorakit.loss`, the output head runs only on the positions that are scored, in chunks, and
never keeps [tokens x vocab] logits for backward. Unlike the SFT loss, a preference loss is not a
sum over tokens: it is a non-linear function of per-row sums, so each token's gradient has its
own scale (that of its row, or of the NLL term ORPO adds over a different token set). The head
function therefore returns per-token log-probs and, in the same pass over the chunks, the
gradient of each log-prob with respect to its hidden state; backward multiplies each row of that
by the incoming per-token gradient. Per-row sums and means are then plain autograd on a
[rows x positions] tensor.

Names and parameters follow TRL (`beta`, `loss_type`, `label_smoothing`, `simpo_gamma` as
`gamma`, `cpo_alpha`); metrics carry TRL's log names (`rewards/chosen`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.data import IGNORE_INDEX
from lorakit.data.batching import collate_pairs
from lorakit.loss import causal_lm_of, chunk_positions
from lorakit.shared_prefix import SharedPrefixLayout, backbone_forward

DPO_LOSS_TYPES = ("sigmoid", "ipo")


# --- per-token log-probs through the head, chunk by chunk ------------------------------------


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk (matmul in the weight's dtype), soft-capped as the model does;
    also tanh(z / cap), which the gradient through the cap needs."""
    logits = (h.to(weight.dtype) @ weight.t()).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def _logit_grad_(
    logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, capped: torch.Tensor | None
) -> torch.Tensor:
    """d log p(target) / d(pre-cap logits) = one-hot - softmax (times the cap's derivative),
    computed in place over `logits`."""
    grad = logits.sub_(lse[:, None]).exp_().neg_()
    grad[torch.arange(targets.numel(), device=targets.device), targets] += 1
    if capped is not None:
        grad.mul_(1 - capped.square())
    return grad


class HeadLogProbFunction(torch.autograd.Function):
    """log p(target) of each position under logits = hidden·Wᵀ (soft-capped if the model caps).

    Frozen head (LoRA): the forward pass over the chunks also computes d log p / d hidden for
    every position ([N, hidden], the size of the hidden states), so backward only scales it by
    the incoming per-position gradient: two matmuls per token, no logits kept. A trainable head
    (e.g. `modules_to_save: [lm_head]`) needs Σ g·(one-hot − softmax)ᵀ·h, which depends on the
    per-position gradient g known only in backward: backward then recomputes the chunk's logits
    (one more matmul) instead of keeping them. Matmuls run in the weight's dtype, softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, targets, weight, softcap, chunk):
        want_hidden, _, want_weight = ctx.needs_input_grad[:3]
        recompute = want_weight
        grad_hidden = torch.empty_like(hidden) if want_hidden and not recompute else None
        log_probs = hidden.new_empty(targets.shape, dtype=torch.float32)
        for start in range(0, targets.numel(), chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits, capped = _chunk_logits(h, weight, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            log_probs[start : start + chunk] = logits.gather(1, t[:, None]).squeeze(1) - lse
            if grad_hidden is not None:
                grad = _logit_grad_(logits, lse, t, capped).to(weight.dtype)
                grad_hidden[start : start + chunk] = grad @ weight
        if recompute:
            ctx.save_for_backward(hidden, targets, weight)
        else:
            ctx.save_for_backward(grad_hidden)
        ctx.recompute, ctx.softcap, ctx.chunk = recompute, softcap, chunk
        ctx.want_hidden = want_hidden
        return log_probs

    @staticmethod
    def backward(ctx, grad_log_probs):
        if not ctx.recompute:
            (grad_hidden,) = ctx.saved_tensors
            if grad_hidden is not None:
                scale = grad_log_probs[:, None]
                grad_hidden = (grad_hidden.float() * scale).to(grad_hidden.dtype)
            return grad_hidden, None, None, None, None
        hidden, targets, weight = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, targets.numel(), ctx.chunk):
            h = hidden[start : start + ctx.chunk].to(weight.dtype)
            t = targets[start : start + ctx.chunk]
            logits, capped = _chunk_logits(h, weight, ctx.softcap)
            lse = torch.logsumexp(logits, dim=-1)
            grad = _logit_grad_(logits, lse, t, capped)
            grad = grad.mul_(grad_log_probs[start : start + ctx.chunk, None]).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.chunk] = grad @ weight
            grad_weight += grad.t() @ h
        return grad_hidden, None, grad_weight.to(weight.dtype), None, None


def _module_chunk_log_probs(
    h: torch.Tensor, t: torch.Tensor, head: nn.Module, softcap: float | None
) -> torch.Tensor:
    logits = head(h.to(head.weight.dtype)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(1, t[:, None]).squeeze(1)


def head_log_probs(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None = None
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for N positions ([N, hidden] → [N], fp32), chunked.

    A plain bias-free linear head goes through `HeadLogProbFunction`; any other head (a bias,
    a LoRA-wrapped head) runs as a module, each chunk checkpointed so its logits are not kept."""
    chunk = chunk_positions(head.weight.shape[0])
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    if type(head) is nn.Linear and head.bias is None and wants_grad:
        return HeadLogProbFunction.apply(hidden, targets, head.weight, softcap, chunk)
    parts = []
    for start in range(0, targets.numel(), chunk):
        part = (hidden[start : start + chunk], targets[start : start + chunk], head, softcap)
        if wants_grad:
            parts.append(checkpoint(_module_chunk_log_probs, *part, use_reentrant=False))
        else:
            parts.append(_module_chunk_log_probs(*part))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


def token_log_probs(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    scored: torch.Tensor,
    head: nn.Module,
    softcap: float | None = None,
) -> torch.Tensor:
    """Next-token log-probs [B, T-1] (fp32): entry t is log p(input_ids[:, t+1] | ≤ t), computed
    only where `scored` [B, T-1] is True and 0 elsewhere; differentiable w.r.t. `hidden`."""
    values = head_log_probs(hidden[:, :-1][scored], input_ids[:, 1:][scored], head, softcap)
    return values.new_zeros(scored.shape).masked_scatter(scored, values)


def model_token_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scored: torch.Tensor,
) -> torch.Tensor:
    """`token_log_probs` of a (PEFT-wrapped) causal LM: its backbone, then its head on the
    scored positions only, with the config's `final_logit_softcapping`."""
    causal_lm = causal_lm_of(model)
    hidden = backbone_forward(causal_lm, input_ids, attention_mask)
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    return token_log_probs(hidden, input_ids, scored, causal_lm.get_output_embeddings(), softcap)


# --- per-row sums ----------------------------------------------------------------------------


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: the positions whose next token is an answer token (a label)."""
    return labels[:, 1:] != IGNORE_INDEX


def orpo_nll_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: the positions ORPO's NLL term scores, as TRL computes it: every attended token
    after the first of each chosen row, prompt included; nothing of the rejected rows."""
    mask = attention_mask[:, 1:].bool().clone()
    mask[mask.shape[0] // 2 :] = False
    return mask


@dataclass(frozen=True)
class SequenceLogProbs:
    """Per-row log-prob of the answer: `sums` [2P] (summed over its tokens) and `counts` [2P]
    (its tokens); rows are the P chosen answers, then the P rejected ones."""

    sums: torch.Tensor
    counts: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        """Length-normalized log-probs (mean per answer token), as SimPO and ORPO use them."""
        return self.sums / self.counts.clamp(min=1)


def sequence_log_probs(token_logps: torch.Tensor, labels: torch.Tensor) -> SequenceLogProbs:
    """Sum each row's answer-token log-probs out of `token_log_probs`' [B, T-1] output."""
    mask = answer_mask(labels)
    return SequenceLogProbs(sums=(token_logps * mask).sum(1), counts=mask.sum(1))


def chosen_mean_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the masked positions of the chosen rows (first half), pooled over rows as
    `nn.CrossEntropyLoss` pools them in TRL's ORPO and CPO trainers."""
    chosen = mask[: mask.shape[0] // 2]
    return -(token_logps[: mask.shape[0] // 2] * chosen).sum() / chosen.sum()


def policy_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    nll_mask: torch.Tensor | None = None,
) -> tuple[SequenceLogProbs, torch.Tensor | None]:
    """One forward of all rows: the answers' `SequenceLogProbs` and, when `nll_mask` is given
    (ORPO: `orpo_nll_mask`), the `chosen_mean_nll` over those positions; the head runs once
    on the union of both token sets."""
    scored = answer_mask(labels)
    if nll_mask is not None:
        scored = scored | nll_mask
    token_logps = model_token_log_probs(model, input_ids, attention_mask, scored)
    nll = None if nll_mask is None else chosen_mean_nll(token_logps, nll_mask)
    return sequence_log_probs(token_logps, labels), nll


# --- reference log-probs (DPO) ---------------------------------------------------------------


@contextmanager
def reference_adapter(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """The model as the DPO reference: with `adapter=None` every adapter is disabled (a new
    LoRA's reference is the base model); else that (frozen) adapter is active, and the one
    active before is set back afterwards (PEFT's `set_adapter` also restores which adapter
    requires grad)."""
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The reference is a fixed function: no dropout, and no activation checkpointing in a pass
    that keeps no activations. The model must have been built by `build_trainable_model`, whose
    4-bit layers stay differentiable after an eval-mode forward
    (`keep_4bit_layers_differentiable`)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def reference_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    adapter: str | None = None,
) -> SequenceLogProbs:
    """Answer log-probs of each row under the reference (`reference_adapter`), without grad."""
    with torch.no_grad(), reference_adapter(model, adapter), _eval_mode(model):
        token_logps = model_token_log_probs(model, input_ids, attention_mask, answer_mask(labels))
    return sequence_log_probs(token_logps, labels)


def add_reference_adapter(model: nn.Module, name: str = "reference") -> None:
    """Add a frozen copy of the active adapter under `name`: the reference when training goes on
    from an existing adapter (TRL 1.16 does the same under the name "ref"). PEFT leaves a
    non-active adapter without grad, so the trainable parameters do not change."""
    source = model.active_adapter
    model.add_adapter(name, model.peft_config[source])
    marker, copy_marker = f".{source}.", f".{name}."
    for param_name, param in model.named_parameters():
        if marker in param_name:
            model.get_parameter(param_name.replace(marker, copy_marker)).data.copy_(param.data)


# --- losses ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceLoss:
    """The batch loss (mean over pairs) and TRL's logged metrics (detached 0-d tensors)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _reward_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _smoothed_sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float):
    """−log σ(β·x), with a probability `label_smoothing` that the pair's label is flipped
    (conservative DPO; TRL's CPO/SimPO and pre-1.0 DPO sigmoid)."""
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )


def dpo_loss(
    policy: SequenceLogProbs,
    reference_sums: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO on summed answer log-probs; `reference_sums` [2P] in the same row order.

    `sigmoid`: −log σ(β·Δ), Δ = (log π/π_ref)(chosen) − (log π/π_ref)(rejected); with
    `label_smoothing` ε it is conservative DPO, (1−ε)·that + ε·(−log σ(−β·Δ)). TRL 1.16's
    DPOTrainer ignores `label_smoothing` for `sigmoid` (it uses it for `robust`/`exo_pair`/`aot`
    only), so the two agree at ε = 0; at ε > 0 this equals TRL's `aot` loss on a single pair.
    `ipo`: (Δ̄ − 1/(2β))², where Δ̄ uses log-ratios divided by each answer's token count, exactly
    as TRL 1.16 (the normalization its authors confirmed). Rewards are β·log π/π_ref of the
    summed log-probs for both types, as TRL logs them.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to loss_type 'sigmoid' only")
    chosen_logps, rejected_logps = policy.sums.chunk(2)
    reference_chosen, reference_rejected = reference_sums.to(policy.sums.dtype).chunk(2)
    chosen_logratios = chosen_logps - reference_chosen
    rejected_logratios = rejected_logps - reference_rejected
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(
            chosen_logratios - rejected_logratios, beta, label_smoothing
        )
    else:
        chosen_tokens, rejected_tokens = policy.counts.chunk(2)
        delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / (
            rejected_tokens.clamp(min=1)
        )
        losses = (delta - 1 / (2 * beta)) ** 2
    metrics = _reward_metrics(
        beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps
    )
    return PreferenceLoss(losses.mean(), metrics)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, switching form at −ln 2 to avoid cancellation."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_loss(
    policy: SequenceLogProbs, chosen_nll: torch.Tensor, *, beta: float = 0.1
) -> PreferenceLoss:
    """ORPO (no reference): NLL(chosen) − β·mean log σ(log odds(chosen) − log odds(rejected)),
    odds from the length-normalized log-probs p̄: log odds = log p̄ − log(1 − p̄). `beta` is the
    paper's λ. `chosen_nll` is TRL's: `chosen_mean_nll` over `orpo_nll_mask` (prompt included).
    Rewards are β·p̄, as TRL logs them."""
    chosen_logps, rejected_logps = policy.means.float().chunk(2)
    log_odds = (chosen_logps - rejected_logps) - (
        _log1mexp(chosen_logps) - _log1mexp(rejected_logps)
    )
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll - (beta * ratio).mean()
    metrics = _reward_metrics(
        beta * chosen_logps, beta * rejected_logps, chosen_logps, rejected_logps
    )
    metrics |= {
        "nll_loss": chosen_nll.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    }
    return PreferenceLoss(loss, metrics)


def simpo_loss(
    policy: SequenceLogProbs,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
) -> PreferenceLoss:
    """SimPO: −log σ(β·(p̄_chosen − p̄_rejected) − γ) on length-normalized log-probs p̄, no
    reference; `label_smoothing` as in conservative DPO. SimPO as published has no NLL term:
    `cpo_alpha` = 0 (TRL's CPOTrainer with `loss_type="simpo"` and `cpo_alpha=0`; TRL's default
    `cpo_alpha=1` is CPO's behaviour-cloning term, the mean NLL of the chosen answer tokens,
    which gives "CPO-SimPO"). Rewards are β·p̄, as TRL logs them."""
    chosen_logps, rejected_logps = policy.means.chunk(2)
    losses = _smoothed_sigmoid_loss(
        chosen_logps - rejected_logps - gamma / beta, beta, label_smoothing
    )
    loss = losses.mean()
    nll = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if cpo_alpha:
        chosen_sums, _ = policy.sums.chunk(2)
        chosen_tokens, _ = policy.counts.chunk(2)
        nll = -chosen_sums.sum() / chosen_tokens.sum()
        loss = loss + cpo_alpha * nll
    metrics = _reward_metrics(
        beta * chosen_logps, beta * rejected_logps, chosen_logps, rejected_logps
    )
    metrics["nll_loss"] = nll.detach()
    return PreferenceLoss(loss, metrics)


# --- the training objective --------------------------------------------------------------------


def example_index(
    labels: torch.Tensor, segments: torch.Tensor | None, order: torch.Tensor | None
) -> torch.Tensor:
    """[R, T]: which example each token belongs to (-1: a shared prompt prefix or padding).
    Padded rows are examples 0…R-1; a shared-prefix row (`collate_shared`) holds the prefix,
    then each example's own tokens, example `order[k]` in slot k."""
    rows, width = labels.shape
    if segments is None:
        return torch.arange(rows, device=labels.device)[:, None].expand(rows, width)
    prefix, *lengths = segments.tolist()
    owners = [torch.full((prefix,), -1, dtype=torch.long)]
    slots = zip(order.tolist(), lengths, strict=True)
    owners += [torch.full((n,), k, dtype=torch.long) for k, n in slots]
    index = torch.cat(owners)
    return torch.nn.functional.pad(index, (0, width - index.numel()), value=-1)[None].to(
        labels.device
    )


def pair_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    nll_mask: torch.Tensor | None = None,
) -> tuple[SequenceLogProbs, torch.Tensor | None]:
    """`policy_log_probs` for a collated preference batch in either layout: padded 2P rows, or
    one shared-prefix row whose prompt runs once. The scored positions are mapped back to their
    example (a position scores the token after it, which belongs to the same example: the
    first token of each example's own part is never scored)."""
    causal_lm = causal_lm_of(model)
    layout = None if segments is None else SharedPrefixLayout.from_segments(segments, labels.device)
    hidden = backbone_forward(causal_lm, input_ids, attention_mask, position_ids, layout)
    owner = example_index(labels, segments, order)[:, 1:]
    answer = labels[:, 1:] != IGNORE_INDEX
    scored = answer if nll_mask is None else answer | nll_mask
    head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    values = head_log_probs(hidden[:, :-1][scored], input_ids[:, 1:][scored], head, softcap)
    examples = int(owner.max()) + 1
    is_answer, owners = answer[scored], owner[scored]
    sums = values.new_zeros(examples).index_add(0, owners[is_answer], values[is_answer])
    counts = torch.bincount(owners[is_answer], minlength=examples)
    nll = None
    if nll_mask is not None:
        nll_positions = nll_mask[scored] & (owners < examples // 2)
        nll = -values[nll_positions].sum() / nll_positions.sum()
    return SequenceLogProbs(sums, counts), nll


class PreferenceObjective(nn.Module):
    """Wraps the (PEFT) model so that one forward of a preference batch returns (sum of the
    per-pair losses, pairs), as `lorakit.loss.TokenNLL` returns (sum of token NLL, tokens): the
    training loop normalizes either by its step's count, so micro-batches and processes do not
    change the loss. The method's metrics (TRL's names) accumulate, summed over pairs, until
    `pop_metrics`."""

    def __init__(
        self,
        model: nn.Module,
        method: str,
        *,
        beta: float,
        loss_type: str | None = None,
        label_smoothing: float | None = None,
        gamma: float | None = None,
        reference: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.method, self.beta, self.loss_type = method, beta, loss_type
        self.label_smoothing, self.gamma = label_smoothing or 0.0, gamma
        self.reference = reference
        """The adapter that is DPO's reference (None: the base with the adapter off)."""
        self._sums: dict[str, torch.Tensor] = {}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        pairs: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = {"position_ids": position_ids, "segments": segments, "order": order}
        nll_mask = None
        if self.method == "orpo":  # padded rows only: the loader does not share ORPO's prompts
            nll_mask = orpo_nll_mask(attention_mask)
        policy, nll = pair_log_probs(
            self.model, input_ids, attention_mask, labels, nll_mask=nll_mask, **layout
        )
        if self.method == "dpo":
            if reference is None:
                reference = self.reference_log_probs(input_ids, attention_mask, labels, **layout)
            result = dpo_loss(
                policy,
                reference,
                beta=self.beta,
                loss_type=self.loss_type or "sigmoid",
                label_smoothing=self.label_smoothing,
            )
        elif self.method == "orpo":
            result = orpo_loss(policy, nll, beta=self.beta)
        else:
            result = simpo_loss(
                policy, beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing
            )
        count = pairs.to(result.loss.device, torch.float32)
        for name, value in result.metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.float() * count
        self._sums["pairs"] = self._sums.get("pairs", 0.0) + count
        return result.loss * count, pairs

    @torch.no_grad()
    def reference_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        **layout: torch.Tensor | None,
    ) -> torch.Tensor:
        """Summed answer log-probs under the reference, per example (row order of the pairs)."""
        with reference_adapter(self.model, self.reference), _eval_mode(self.model):
            sums, _ = pair_log_probs(self.model, input_ids, attention_mask, labels, **layout)
        return sums.sums

    def pop_metrics(self, reduce=None) -> dict[str, float]:
        """The metrics since the last call, as means over pairs (`reduce` sums a tensor over
        processes, e.g. `accelerator.reduce`)."""
        if not self._sums:
            return {}
        names = sorted(self._sums)
        totals = torch.stack([torch.as_tensor(self._sums[n]).float() for n in names])
        if reduce is not None:
            totals = reduce(totals)
        self._sums = {}
        values = dict(zip(names, totals.tolist(), strict=True))
        pairs = values.pop("pairs")
        return {name: value / max(pairs, 1.0) for name, value in values.items()}


@torch.no_grad()
def preference_accuracy(
    model: nn.Module,
    pairs: list,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> float:
    """The share of pairs whose chosen answer the model gives the higher mean log-prob per
    answer token (length-normalized: a short answer is not preferred for being short)."""
    model.eval()
    wins = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate_pairs(chunk, pad_id)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        means = pair_log_probs(model, **inputs)[0].means
        chosen, rejected = means.chunk(2)
        wins += int((chosen > rejected).sum())
    return wins / len(pairs)
