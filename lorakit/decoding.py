"""Greedy decoding for every command that generates (train's before/after samples, `eval`'s
generation metrics, `generate`, merge's verification): batched, KV-cached, stopping at EOS or the
chat template's end-of-turn token.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from lorakit.data.batching import MIN_SHARED_PREFIX, shared_prefix_length
from lorakit.data.formats import render_prompt
from lorakit.loss import causal_lm_of

# End-of-turn markers of common chat templates; a chat model stops at the one its template uses
# even when the tokenizer's EOS is another token (e.g. Qwen2 base: <|endoftext|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>")


# Cache layers whose rows can be dropped mid-generation (plain and sliding-window attention).
_ROW_SELECTABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS (tokenizer and generation config) and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if template:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab)
    return sorted(i for i in ids if i is not None)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # decoding shapes would recompile a compiled model
def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    share_prefix: bool = True,
) -> list[list[int]]:
    """Greedy new tokens for each prompt (token ids), cut at the first stop token.

    Prompts of similar length are batched together (less left padding). With `share_prefix`,
    the prefix all prompts of a batch share (a chat template's system prompt, few-shot examples)
    is computed once and its KV cache reused by every row."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    manual = _supports_manual_decoding(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [list(prompts[i]) for i in chunk]
        if manual:
            new = _greedy_batch(model, batch, max_new_tokens, stops, pad, share_prefix)
        else:
            new = _generate_batch(model, batch, max_new_tokens, stops, pad)
        for row, i in enumerate(chunk):
            results[i] = new[row]
    model.train(was_training)
    return results


def _supports_manual_decoding(model: nn.Module) -> bool:
    parameters = inspect.signature(causal_lm_of(model).forward).parameters
    return "position_ids" in parameters and "cache" in parameters


def _left_pad(
    prompts: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _greedy_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: Sequence[int],
    pad: int,
    share_prefix: bool,
) -> list[list[int]]:
    """Greedy decoding of one batch with a KV cache.

    Layout: [shared prefix, computed once] [left padding] [each prompt's own tokens]; the
    attention mask hides the padding and position ids count real tokens only. A row leaves the
    batch (and the cache) as soon as it emits a stop token, so a few long answers do not make
    every finished row pay for their remaining steps, as they do in `model.generate`."""
    causal_lm = causal_lm_of(model)
    device = _model_device(model)
    cache = DynamicCache(config=causal_lm.config)
    plain_cache = all(type(layer) in _ROW_SELECTABLE_LAYERS for layer in cache.layers)
    shared = shared_prefix_length(prompts) if share_prefix and plain_cache else 0
    if len(prompts) < 2 or shared < MIN_SHARED_PREFIX:
        shared = 0
    if shared:
        causal_lm(
            input_ids=torch.tensor([prompts[0][:shared]], device=device),
            position_ids=torch.arange(shared, device=device)[None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(len(prompts))
    input_ids, own_mask = _left_pad([p[shared:] for p in prompts], pad, device)
    attention_mask = torch.cat([own_mask.new_ones((len(prompts), shared)), own_mask], 1)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = causal_lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    stop_ids = torch.tensor(list(stops), device=device)
    rows = torch.arange(len(prompts), device=device)
    position = positions[:, -1]
    finished = torch.zeros_like(rows, dtype=torch.bool)
    new: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        done = torch.isin(tokens, stop_ids) | finished
        for row, token, stop in zip(rows.tolist(), tokens.tolist(), done.tolist(), strict=True):
            if not stop:
                new[row].append(token)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if plain_cache and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, position = rows[keep], tokens[keep], position[keep]
            attention_mask, done = attention_mask[keep], done[keep]
        finished = done
        position = position + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], 1)
        out = causal_lm(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=position[:, None],
            cache=cache,
            use_cache=True,
        )
    return new


def _generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: Sequence[int],
    pad: int,
) -> list[list[int]]:
    """transformers' generate, for models whose forward takes no cache/position_ids."""
    input_ids, attention_mask = _left_pad(prompts, pad, _model_device(model))
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=list(stops),
        pad_token_id=pad,
    )
    width = input_ids.shape[1]
    return [_cut_at_stop(row[width:].tolist(), stops) for row in output]


def _cut_at_stop(ids: list[int], stops: Sequence[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position]
    return ids


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to user prompts, batched with left padding and the KV cache."""
    if not prompts:
        return []
    texts = [render_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    new = greedy_continuations(model, tokenizer, ids, max_new_tokens, batch_size)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
