"""Greedy decoding (`lorakit.decoding`): batched, KV-cached and prefix-shared decoding gives the
tokens of one-by-one decoding and of transformers' generate, and stops at end of turn."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.artifacts import load_target, resolve_target
from lorakit.commands.evaluate import load_eval_rows, prompt_token_ids
from lorakit.data.batching import MIN_SHARED_PREFIX, shared_prefix_length
from lorakit.decoding import greedy_continuations, stop_token_ids
from tests.conftest import FACTS, build_tokenizer

CPU = torch.device("cpu")


def _generate_one_by_one(model, prompts, stops, max_new_tokens):
    """The reference: transformers' own greedy generate, one unpadded prompt at a time."""
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        ends = [i for i, token in enumerate(output) if token in stops]
        answers.append(output[: ends[0]] if ends else output)
    return answers


def test_batched_generation_gives_the_one_by_one_tokens(memorized):
    result, data = memorized
    loaded = load_target(resolve_target(str(result.run_dir)), CPU)
    rows = load_eval_rows([str(data)], "auto", None)
    prompts = prompt_token_ids(rows, loaded.tokenizer)
    # Prompts of different lengths, so the batch is left-padded.
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_continuations(loaded.model, loaded.tokenizer, prompts, 16, batch_size=8)
    stops = stop_token_ids(loaded.model, loaded.tokenizer)
    assert batched == _generate_one_by_one(loaded.model, prompts, stops, 16)
    # Answers end at different steps: rows left the batch one after another.
    assert len({len(ids) for ids in batched}) > 1
    assert loaded.tokenizer.batch_decode(batched) == [answer for _, answer in FACTS]


DIFFERENT_STARTS = [
    "The capital of France",
    "Water boils at one hundred",
    "Arr matey",
    "abc",
    "Ice",
]


SHARED_START = [
    "The capital of France is Paris. The capital of Italy",
    "The capital of France is Paris. Water boils at",
    "The capital of France is Paris. Arr",
    "The capital of France is Paris. The",
    "The capital of France is Paris. ABC abc",
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("texts", [DIFFERENT_STARTS, SHARED_START], ids=["own", "shared"])
def test_batched_decoding_matches_transformers_generate(arch, texts, tiny_model):
    model_dir = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    shared = shared_prefix_length(prompts)
    assert shared >= MIN_SHARED_PREFIX if texts is SHARED_START else shared < MIN_SHARED_PREFIX
    free = _generate_one_by_one(model, prompts, [-1], 12)
    # A random model never emits EOS: make a token it does generate a stop token, so rows stop
    # at different steps (or never) and leave the batch.
    model.generation_config.eos_token_id = free[0][4]
    stops = stop_token_ids(model, tokenizer)
    expected = _generate_one_by_one(model, prompts, stops, 12)
    assert len({len(ids) for ids in expected}) > 1
    assert greedy_continuations(model, tokenizer, prompts, 12, batch_size=5) == expected


def test_generation_stops_at_the_templates_end_of_turn_even_when_eos_differs(tiny_model):
    tokenizer = build_tokenizer(chat=True)
    tokenizer.eos_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stops = stop_token_ids(model, tokenizer)
    assert stops == sorted(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
