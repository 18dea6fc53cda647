"""The training objective: the fused head + cross-entropy, and the bf16 frozen embeddings."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.commands.evaluate import EvalOptions, run_eval
from lorakit.data import collate, prepare_data
from lorakit.loss import HeadNLLFunction, TokenNLL, chunk_positions
from lorakit.models import load_tokenizer
from lorakit.peft_setup import build_trainable_model
from lorakit.recipe import load_recipe
from tests.conftest import fact_rows, load_adapter_as_trained


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_head_matches_cross_entropy_and_its_gradients(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.5).requires_grad_(True)
    targets = torch.randint(0, 50, (37,))
    total = HeadNLLFunction.apply(hidden, targets, weight, softcap, 8)  # 5 chunks
    total.backward(torch.tensor(0.7))
    fused = (total.item(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.7).backward()
    assert fused[0] == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(fused[1], hidden.grad, atol=1e-6)
    assert torch.allclose(fused[2], weight.grad, atol=1e-6)


def test_chunk_size_keeps_fp32_logits_near_64_mib():
    assert chunk_positions(49152) == 341
    assert chunk_positions(128256) == 130
    assert chunk_positions(500) == 1024
    assert chunk_positions(10**7) == 64


def test_training_and_evaluation_paths_give_the_same_loss(tiny_model, write_recipe):
    recipe = load_recipe(
        write_recipe(tiny_model("llama"), quant={"bnb_4bit_compute_dtype": "float32"})
    )
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    batch = collate(prepare_data(recipe, tokenizer).train[:4], tokenizer.pad_token_id)
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, torch.device("cpu"))
    loss_module = TokenNLL(model)
    train_nll, train_tokens = loss_module(**batch)  # fused head (grad enabled)
    with torch.no_grad():
        eval_nll, eval_tokens = loss_module(**batch)  # chunked head
    assert int(train_tokens) == int(eval_tokens) > 0
    assert train_nll.item() == pytest.approx(eval_nll.item(), rel=1e-5)
    assert train_nll.grad_fn is not None


def _independent_nll(model, tokenizer, rows) -> tuple[float, int]:
    """Sum of -log p(token) over the assistant answers (and their end-of-turn), from the full
    logits in float64; prompt and answer are tokenized separately, as a chat template splits
    them."""
    total, count = 0.0, 0
    for row in rows:
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        for position in range(len(prompt_ids), ids.shape[1]):
            total -= log_probs[position - 1, ids[0, position]].item()
            count += 1
    return total, count


def test_perplexity_equals_exp_of_mean_token_nll_from_logits(memorized, tiny_model, tmp_path):
    result, data = memorized
    base_dir = tiny_model("llama")
    options = EvalOptions(metrics=["loss", "perplexity"], dtype="float32")
    report = run_eval([str(base_dir), str(result.run_dir)], [str(data)], options)
    base_scores, adapter_scores = report.results

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = fact_rows()
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    nll, count = _independent_nll(base_model, tokenizer, rows)
    assert base_scores.trained_tokens == count
    assert base_scores.scores["loss"] == pytest.approx(nll / count, abs=1e-5)
    # A random tiny model has a perplexity in the hundreds: compare it relatively.
    assert base_scores.scores["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)

    adapter = load_adapter_as_trained(base_dir, result.adapter_dir)
    nll, count = _independent_nll(adapter, tokenizer, rows)
    assert adapter_scores.trained_tokens == count
    assert adapter_scores.scores["perplexity"] == pytest.approx(math.exp(nll / count), abs=1e-5)
    assert adapter_scores.scores["perplexity"] < 0.1 * base_scores.scores["perplexity"]
