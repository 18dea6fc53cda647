"""Shared-prefix micro-batches: the common untrained prefix runs once, with the padded batch's
loss and gradients."""

import pytest
import torch

from lorakit.data import IGNORE_INDEX, Example, collate
from lorakit.data.batching import trainable_shared_prefix
from lorakit.loss import TokenNLL
from lorakit.peft_setup import build_trainable_model
from lorakit.recipe import load_recipe
from tests.conftest import FP32

CPU = torch.device("cpu")


def chat_examples(prefix: int = 9) -> list[Example]:
    """Four examples that share `prefix` untrained tokens (a system prompt), then differ."""
    g = torch.Generator().manual_seed(1)
    head = torch.randint(5, 300, (prefix,), generator=g).tolist()
    examples = []
    for own, answer in ((4, 3), (7, 2), (2, 5), (6, 6)):
        prompt = head + torch.randint(5, 300, (own,), generator=g).tolist()
        reply = torch.randint(5, 300, (answer,), generator=g).tolist()
        examples.append(Example(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply))
    return examples


def test_collate_lays_out_the_prefix_once():
    examples = chat_examples(prefix=9)
    batch = collate(examples, pad_token_id=0, share_prefix=True)
    row = batch["input_ids"][0].tolist()
    assert row[:9] == examples[0].input_ids[:9]
    start = 9
    longest_first = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    assert batch["segments"].tolist() == [9] + [len(e.input_ids) - 9 for e in longest_first]
    for example in longest_first:
        own = example.input_ids[9:]
        assert row[start : start + len(own)] == own
        assert batch["position_ids"][0, start : start + len(own)].tolist() == list(
            range(9, len(example.input_ids))
        )
        assert batch["labels"][0, start : start + len(own)].tolist() == example.labels[9:]
        start += len(own)
    assert start == len(row) == sum(len(e.input_ids) for e in examples) - 3 * 9
    # Without the switch the batch stays padded.
    assert "segments" not in collate(examples, pad_token_id=0)


def test_a_trained_token_inside_the_common_prefix_is_not_shared():
    examples = chat_examples(prefix=9)
    assert trainable_shared_prefix(examples) == 9
    # A label on the 6th token: position 4 predicts it, so at most 4 tokens may be shared.
    examples[2].labels[5] = examples[2].input_ids[5]
    assert trainable_shared_prefix(examples) == 4
    examples[2].labels[3] = examples[2].input_ids[3]
    assert trainable_shared_prefix(examples) == 0  # shorter than MIN_SHARED_PREFIX
    assert "segments" not in collate(examples, pad_token_id=0, share_prefix=True)


def loss_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    nll, tokens = TokenNLL(model)(**batch)
    (nll / tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return nll.item(), int(tokens), grads


@pytest.mark.parametrize(
    ("arch", "quant", "train"),
    [
        ("llama", {"load_in_4bit": True}, {}),
        ("llama", {"load_in_4bit": False}, {}),
        ("qwen2", {}, {}),
        ("llama", {"load_in_4bit": True}, {"torch_compile": True}),  # compiled layers
    ],
)
def test_shared_batch_gives_the_padded_batchs_loss_and_gradients(
    tiny_model, write_recipe, arch, quant, train
):
    recipe = load_recipe(write_recipe(tiny_model(arch), quant={**FP32, **quant}, train=train))
    torch.manual_seed(0)
    model, summary = build_trainable_model(recipe, recipe.model.name_or_path, torch.device("cpu"))
    assert summary.shared_prefix == "on"
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give A a gradient too
            torch.nn.init.normal_(param, std=0.05)
    model.train()
    examples = chat_examples()
    shared = collate(examples, pad_token_id=0, share_prefix=True)
    padded = collate(examples, pad_token_id=0)
    assert "segments" in shared
    shared_nll, shared_tokens, shared_grads = loss_and_gradients(model, shared)
    padded_nll, padded_tokens, padded_grads = loss_and_gradients(model, padded)
    assert shared_tokens == padded_tokens == sum(e.trained_tokens for e in examples)
    assert shared_nll == pytest.approx(padded_nll, rel=1e-5)
    assert shared_grads.keys() == padded_grads.keys()
    for name, grad in shared_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, padded_grads[name], atol=1e-6, rtol=1e-4), name


def test_shared_prefix_is_off_where_it_cannot_be_exact(tiny_model, write_recipe):
    model_dir = tiny_model("llama")
    for changes, reason in (
        ({"model": {"attn_implementation": "eager"}}, "off (attention is eager, not sdpa)"),
        ({"data": {"packing": True}}, "off (packing)"),
        ({"data": {"shared_prefix": False}}, "off"),
    ):
        recipe = load_recipe(write_recipe(model_dir, quant=FP32, **changes))
        _, summary = build_trainable_model(recipe, str(model_dir), torch.device("cpu"))
        assert summary.shared_prefix == reason


def test_the_start_up_check_refuses_a_model_that_would_get_it_wrong(
    tiny_model, write_recipe, monkeypatch
):
    """Attention that never sees the layout, sees it and masks plain-causally (each example
    would attend to the ones before it in the row), or fails on it must leave sharing off."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import lorakit.shared_prefix as shared_prefix

    recipe = load_recipe(write_recipe(tiny_model("llama"), quant=FP32))

    def deaf(module, query, key, value, mask, **kwargs):
        kwargs.pop(shared_prefix.LAYOUT_KWARG, None)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    def plain_causal(module, query, key, value, mask, **kwargs):
        layout = kwargs.pop(shared_prefix.LAYOUT_KWARG, None)
        if layout is not None:
            layout.calls, mask = layout.calls + 1, None
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    def failing(module, query, key, value, mask, **kwargs):
        if shared_prefix.LAYOUT_KWARG in kwargs:
            raise RuntimeError("shapes do not match\nmore detail")
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    for attention, reason in (
        (deaf, "do not receive the layout"),
        (plain_causal, "hidden states differ"),
        (failing, "the check failed: RuntimeError: shapes do not match)"),
    ):
        monkeypatch.setattr(shared_prefix, "shared_prefix_attention", attention)
        model, summary = build_trainable_model(recipe, str(recipe.model.name_or_path), CPU)
        assert summary.shared_prefix.startswith("off") and reason in summary.shared_prefix
        assert model.get_base_model().config._attn_implementation == "sdpa"


def test_a_model_with_dropout_does_not_share(tiny_model, write_recipe):
    """GPT-2 drops out attention, embeddings and residuals in training: a shared prefix would
    draw one mask for every example of the row, where the padded batch draws one each."""
    recipe = load_recipe(write_recipe(tiny_model("gpt2"), data_kind="alpaca", quant=FP32))
    _, summary = build_trainable_model(recipe, str(recipe.model.name_or_path), CPU)
    assert summary.shared_prefix == (
        "off (the model applies dropout (attn_pdrop 0.1, embd_pdrop 0.1, resid_pdrop 0.1))"
    )
