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
from lorakit.recipe import DataSection

ATTENTION = "lorakit_shared_prefix_sdpa"
"""The attention implementation name: SDPA, plus the shared-prefix layout when a batch has one."""
LAYOUT_KWARG = "lorakit_shared_prefix"


@dataclass
class SharedPrefixLayout:
    """Where each example's tokens sit in the shared row, for the attention function."""

    prefix: int
    lengths: list[int]
    """Each example's own tokens (after the prefix), in row order."""
    mask: torch.Tensor
    """[B, 1, S, prefix + S] (S: the longest example): True where a query may attend."""
    calls: int = 0

    @classmethod
    def from_segments(cls, segments: torch.Tensor, device: torch.device) -> SharedPrefixLayout:
        prefix, *lengths = (int(s) for s in segments.tolist())
        slot = torch.arange(max(lengths))
        real = slot[None, :] < torch.tensor(lengths)[:, None]  # [B, S]
        own_keys = (slot[:, None] >= slot[None, :]) & real[:, None, :]  # causal, no padding
        # Padding queries see the prefix (never an empty row: no NaN); their outputs are dropped.
        prefix_keys = torch.ones(len(lengths), len(slot), prefix, dtype=torch.bool)
        mask = torch.cat([prefix_keys, own_keys], 2)[:, None]
        return cls(prefix=prefix, lengths=lengths, mask=mask.to(device))

    def per_example(self, states: torch.Tensor) -> torch.Tensor:
        """[1, H, T, D] row -> [B, H, S, D], each example's own tokens, zero-padded. Slices and
        copies only, so the backward is deterministic (no scatter-add)."""
        own = states[0, :, self.prefix :].transpose(0, 1).split(self.lengths)
        return torch.nn.utils.rnn.pad_sequence(own, batch_first=True).transpose(1, 2)

    def with_prefix(self, states: torch.Tensor) -> torch.Tensor:
        """[1, H, T, D] row -> [B, H, prefix + S, D]: the prefix, then the example's tokens."""
        head = states[:, :, : self.prefix].expand(len(self.lengths), -1, -1, -1)
        return torch.cat([head, self.per_example(states)], 2)

    def to_row(self, head: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Prefix output [1, p, H, D] and per-example outputs [B, S, H, D] -> [1, T, H, D]."""
        parts = [head[0]] + [own[b, :n] for b, n in enumerate(self.lengths)]
        return torch.cat(parts)[None]


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
    if not torch.compiler.is_compiling():  # a side effect would break a compiled graph
        layout.calls += 1
    kwargs.pop("is_causal", None)
    p = layout.prefix
    head, _ = sdpa_attention_forward(
        module, query[:, :, :p], key[:, :, :p], value[:, :, :p], None, is_causal=True, **kwargs
    )
    q, k, v = layout.per_example(query), layout.with_prefix(key), layout.with_prefix(value)
    own, _ = sdpa_attention_forward(module, q, k, v, layout.mask, is_causal=False, **kwargs)
    return layout.to_row(head, own), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def backbone_forward(
    causal_lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    layout: SharedPrefixLayout | None = None,
) -> torch.Tensor:
    """Last hidden states of a padded (or packed) batch, or of a shared-prefix row."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    extra = {} if layout is None else {LAYOUT_KWARG: layout}
    # No KV cache: with one, transformers ignores packed position_ids and masks causally only.
    return backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **extra,
    ).last_hidden_state


def enable_shared_prefix(causal_lm: nn.Module, data: DataSection, sharded: bool) -> str:
    """`on` when the recipe asks for shared prefixes and they are exact for this model (it is
    then switched to the shared-prefix attention), else `off` with the reason (the model is
    left as it was)."""
    if not data.shared_prefix:
        return "off"
    problem = _unsupported(causal_lm, data, sharded)
    if problem is None:
        register_attention()
        try:
            causal_lm.set_attn_implementation(ATTENTION)
            problem = _probe(causal_lm)
        # Any failure of an architecture this was not written for means: do not share.
        except Exception as exc:  # noqa: BLE001
            problem = f"the check failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        if problem:
            causal_lm.set_attn_implementation("sdpa")
    return f"off ({problem})" if problem else "on"


def _unsupported(causal_lm: nn.Module, data: DataSection, sharded: bool) -> str | None:
    if data.packing:
        return "packing"
    if sharded:
        return "FSDP"
    config = causal_lm.config
    if config._attn_implementation != "sdpa":
        return f"attention is {config._attn_implementation}, not sdpa"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < data.max_seq_len:
        return f"sliding-window attention ({window} < max_seq_len)"
    if getattr(config, "attn_logit_softcapping", None):
        return "soft-capped attention"
    dropout = model_dropout(config)
    if dropout:
        # The prefix would draw one dropout mask for all examples instead of one each.
        return f"the model applies dropout ({', '.join(dropout)})"
    return None


# Dropout probabilities transformers configs use for the backbone (not LoRA's own dropout).
_DROPOUT_KEYS = (
    "attention_dropout",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


def model_dropout(config: object) -> list[str]:
    """The backbone's non-zero dropout settings, as `name value`."""
    found = []
    for key in _DROPOUT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int | float) and value > 0:
            found.append(f"{key} {value:g}")
    return found


def _probe(causal_lm: nn.Module) -> str | None:
    """The tokens after the prefix must get the hidden states they get in a padded batch."""
    vocab = causal_lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [  # longest first: the row keeps this order
        Example(ids[:5] + ids[8:12], [IGNORE_INDEX] * 6 + ids[9:12]),
        Example(ids[:5] + ids[5:8], [IGNORE_INDEX] * 6 + ids[6:8]),
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
            want = backbone_forward(causal_lm, padded["input_ids"], padded["attention_mask"])
            got = backbone_forward(
                causal_lm,
                shared["input_ids"],
                shared["attention_mask"],
                shared["position_ids"],
                layout,
            )
    finally:
        causal_lm.train(was_training)
    if layout.calls == 0:
        return "its attention layers do not receive the layout"
    # The first example follows the prefix in the row, so plain causal attention would get it
    # right too: the check is on the second and third.
    expected = torch.cat([want[1, 5:8], want[2, 5:6]]).float()
    error = (got[0, 9:].float() - expected).norm() / expected.norm()
    if not error < 1e-2:
        return f"shared and padded hidden states differ (relative error {error:.2g})"
    return None
