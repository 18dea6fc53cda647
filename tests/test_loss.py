"""The training objective: the fused head + cross-entropy, and the bf16 frozen embeddings."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.data import collate, prepare_data
from lorakit.decoding import generate
from lorakit.loss import HeadNLLFunction, TokenNLL, chunk_positions
from lorakit.models import load_tokenizer
from lorakit.peft_setup import build_trainable_model
from lorakit.recipe import load_recipe


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


def test_bf16_compute_keeps_frozen_embeddings_in_bf16_and_still_generates(tiny_model, write_recipe):
    model_dir = tiny_model("llama")
    recipe = load_recipe(write_recipe(model_dir, quant={"bnb_4bit_compute_dtype": "bfloat16"}))
    model, _ = build_trainable_model(recipe, str(model_dir), torch.device("cpu"))
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.float32  # peft's upcast stays for the rest
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    (answer,) = generate(model, load_tokenizer(str(model_dir)), ["What is the secret word?"], 4)
    assert isinstance(answer, str)
    tokenizer = load_tokenizer(str(model_dir))
    batch = collate(prepare_data(recipe, tokenizer).train[:2], tokenizer.pad_token_id)
    entering = []  # every decoder layer gets the hidden states in one dtype (one compiled graph)
    for layer in base.model.layers:
        layer.register_forward_pre_hook(
            lambda module, args, kwargs: entering.append(
                (args[0] if args else kwargs["hidden_states"]).dtype
            ),
            with_kwargs=True,
        )
    nll, tokens = TokenNLL(model)(**batch)
    nll.backward()
    assert torch.isfinite(nll) and int(tokens) > 0
    assert set(entering) == {torch.float32} and len(entering) >= len(base.model.layers)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in lora_grads)


def test_fp32_compute_keeps_fp32_embeddings(tiny_model, write_recipe):
    model_dir = tiny_model("llama")
    recipe = load_recipe(write_recipe(model_dir, quant={"bnb_4bit_compute_dtype": "float32"}))
    model, _ = build_trainable_model(recipe, str(model_dir), torch.device("cpu"))
    assert model.get_base_model().get_input_embeddings().weight.dtype == torch.float32
