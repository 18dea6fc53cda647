"""Shared-prefix micro-batches: the prompt prefix every example of a batch starts with is run once.

Chat data repeats a long prefix in every example: SmolLM2's template opens each conversation
with the same default system prompt, 24 of the 53 tokens of an average instruction example of
the benchmark set. When the examples of a micro-batch start with the same untrained tokens,
`lorakit.data.batching.collate` lays the batch out as one row (the prefix once, then each
example's own tokens) and the attention function below lets every example's tokens see the
prefix and their own earlier tokens only. Linear layers, norms and MLPs then process each prefix
token once instead of once per example; attention sums the gradients that reach the prefix from
every example. Loss and gradients are those of the padded batch (the prefix carries no label,
so nothing is counted once instead of B times).

The layout reaches the attention layers as a keyword argument of the backbone's forward, which
transformers passes down to its attention interface. `enable_shared_prefix` checks on the model
itself that this holds (hidden states of a shared batch equal those of the padded batch) before
any batch is shared, and leaves the model as it was when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.data.batching import collate, collate_shared
from lorakit.data.pipeline import IGNORE_INDEX, Example

ATTENTION = "lorakit_shared_prefix_sdpa"
"""The attention implementation name: SDPA, plus the shared-prefix layout when a batch has one."""
LAYOUT_KWARG = "lorakit_shared_prefix"


@dataclass
class SharedPrefixLayout:
    """Where each example's tokens sit in the shared row, for the attention function."""

    prefix: int
    query_index: torch.Tensor
    """[B, S]: row positions of each example's own tokens (S: the longest, shorter ones padded)."""
    key_index: torch.Tensor
    """[B, prefix + S]: the prefix, then the example's own tokens."""
    mask: torch.Tensor
    """[B, 1, S, prefix + S]: True where a query may attend."""
    real: torch.Tensor
    """[B * S]: which padded query slots hold a real token, in row order."""
    calls: int = 0

    @classmethod
    def from_segments(cls, segments: torch.Tensor, device: torch.device) -> SharedPrefixLayout:
        prefix, *own = (int(s) for s in segments.tolist())
        width = max(own)
        starts = torch.tensor([prefix + sum(own[:i]) for i in range(len(own))])
        lengths = torch.tensor(own)
        slot = torch.arange(width)
        real = slot[None, :] < lengths[:, None]  # [B, S]
        # Padding slots point at the example's last token; their outputs are dropped.
        query_index = starts[:, None] + torch.minimum(slot[None, :], lengths[:, None] - 1)
        key_index = torch.cat([torch.arange(prefix).expand(len(own), -1), query_index], 1)
        causal = slot[None, :, None] >= slot[None, None, :]  # [1, S, S]
        own_keys = causal & real[:, None, :]
        mask = torch.cat([torch.ones(len(own), width, prefix, dtype=torch.bool), own_keys], 2)
        return cls(
            prefix=prefix,
            query_index=query_index.to(device),
            key_index=key_index.to(device),
            mask=mask[:, None].to(device),
            real=real.flatten().nonzero().squeeze(1).to(device),
        )


def shared_prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; for a shared-prefix row, the prefix attends causally to
    itself and each example's tokens to the prefix and their own earlier tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout: SharedPrefixLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layout.calls += 1
    p = layout.prefix
    # [1, H, T, D] -> prefix part and [B, H, S(+p), D] per-example parts.
    head_out, _ = sdpa_attention_forward(
        module, query[:, :, :p], key[:, :, :p], value[:, :, :p], None, is_causal=True, **kwargs
    )
    q = query[0][:, layout.query_index].transpose(0, 1)
    k = key[0][:, layout.key_index].transpose(0, 1)
    v = value[0][:, layout.key_index].transpose(0, 1)
    own_out, _ = sdpa_attention_forward(module, q, k, v, layout.mask, is_causal=False, **kwargs)
    own_out = own_out.flatten(0, 1)[layout.real]  # [tokens after the prefix, H, D]
    return torch.cat([head_out[0], own_out])[None], None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def backbone_forward(
    causal_lm: nn.Module,
    batch: dict[str, torch.Tensor | None],
    layout: SharedPrefixLayout | None = None,
) -> torch.Tensor:
    """Last hidden states of a batch, padded or shared-prefix (`segments` in the batch)."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    segments = batch.get("segments")
    if layout is None and segments is not None:
        layout = SharedPrefixLayout.from_segments(segments, batch["input_ids"].device)
    extra = {} if layout is None else {LAYOUT_KWARG: layout}
    # No KV cache: with one, transformers ignores packed position_ids and masks causally only.
    return backbone(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **extra,
    ).last_hidden_state


def enable_shared_prefix(causal_lm: nn.Module, max_seq_len: int) -> str | None:
    """Switch the model to the shared-prefix attention when it is exact for it; the reason
    when it is not (the model is then left as it was)."""
    config = causal_lm.config
    if config._attn_implementation != "sdpa":
        return f"attention is {config._attn_implementation}, not sdpa"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_seq_len:
        return f"sliding-window attention ({window} < max_seq_len)"
    if getattr(config, "attn_logit_softcapping", None):
        return "soft-capped attention"
    register_attention()
    causal_lm.set_attn_implementation(ATTENTION)
    problem = _probe(causal_lm)
    if problem:
        causal_lm.set_attn_implementation("sdpa")
    return problem


def _probe(causal_lm: nn.Module) -> str | None:
    """The tokens after the prefix must get the hidden states they get in a padded batch."""
    vocab = causal_lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [
        Example(ids[:5] + ids[5:8], [IGNORE_INDEX] * 6 + ids[6:8]),
        Example(ids[:5] + ids[8:12], [IGNORE_INDEX] * 6 + ids[9:12]),
        Example(ids[:5] + ids[5:6], [IGNORE_INDEX] * 6),
    ]
    device = causal_lm.get_input_embeddings().weight.device
    padded = {k: v.to(device) for k, v in collate(examples, 0).items() if v is not None}
    shared = {k: v.to(device) for k, v in collate_shared(examples, 5).items()}
    layout = SharedPrefixLayout.from_segments(shared["segments"], device)
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        with torch.no_grad():
            want = backbone_forward(causal_lm, padded)
            got = backbone_forward(causal_lm, shared, layout)
    finally:
        causal_lm.train(was_training)
    if layout.calls == 0:
        return "its attention layers do not receive the layout"
    # The first example follows the prefix in the row, so plain causal attention would get it
    # right too: the check is on the second and third.
    expected = torch.cat([want[1, 5:9], want[2, 5:6]]).float()
    error = (got[0, 8:].float() - expected).norm() / expected.norm()
    if not error < 1e-2:
        return f"shared and padded hidden states differ (relative error {error:.2g})"
    return None
