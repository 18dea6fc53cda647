"""The trainable model (`lorakit.peft_setup`): compute dtype from the hardware, target-module
presets per architecture, the trainable-parameter count PEFT reports, and frozen embeddings
kept in bf16."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.data import collate, prepare_data
from lorakit.decoding import generate
from lorakit.errors import LorakitError
from lorakit.loss import TokenNLL
from lorakit.models import load_tokenizer
from lorakit.peft_setup import build_trainable_model, choose_compute_dtype, resolve_target_modules
from lorakit.recipe import load_recipe


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


def _expected_lora_parameters(model_dir, r, targets):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, torch.nn.Linear):
            total += r * (module.in_features + module.out_features)
    base = sum(p.numel() for p in model.parameters())
    return total, base


def test_trainable_parameter_count_at_r8(tiny_model, write_recipe):
    model_dir = tiny_model("llama")
    recipe = load_recipe(write_recipe(model_dir, lora={"r": 8}, quant={"load_in_4bit": False}))
    _, summary = build_trainable_model(recipe, str(model_dir), torch.device("cpu"))
    targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected, base = _expected_lora_parameters(model_dir, 8, targets)
    assert summary.trainable_parameters == expected
    assert summary.base_parameters == base
    assert summary.trainable_percent == pytest.approx(100 * expected / (expected + base))
    assert sorted(summary.target_modules) == sorted(targets)


def test_auto_compute_dtype_follows_the_cpu_and_names_win(monkeypatch):
    import lorakit.peft_setup as peft_setup

    cpu = torch.device("cpu")
    for fast_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(peft_setup, "cpu_has_fast_bf16", lambda fast=fast_bf16: fast)
        assert choose_compute_dtype("auto", cpu) == expected
        assert choose_compute_dtype("float16", cpu) == torch.float16


@pytest.mark.parametrize(
    ("arch", "preset", "expected"),
    [
        ("llama", "attention", ["k_proj", "o_proj", "q_proj", "v_proj"]),
        ("llama", "mlp", ["down_proj", "gate_proj", "up_proj"]),
        ("gpt2", "attention", ["attn.c_proj", "c_attn"]),
        ("gpt2", "mlp", ["c_fc", "mlp.c_proj"]),
    ],
)
def test_presets_resolve_per_architecture(arch, preset, expected, tiny_model):
    """GPT-2's c_proj is in both attention and MLP: the preset names it with its parent."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch))
    assert resolve_target_modules(model, preset) == expected


def test_a_listed_module_that_does_not_exist_is_named(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    with pytest.raises(LorakitError, match="'qkv_proj' matches no linear module of this model"):
        resolve_target_modules(model, ["q_proj", "qkv_proj"])
