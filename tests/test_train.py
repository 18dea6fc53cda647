"""End-to-end training on tiny models built in the session, through the real libraries."""

import json

import pytest
import torch
from accelerate import Accelerator

from lorakit.commands.train import train
from lorakit.data import collate, prepare_data
from lorakit.loss import TokenNLL
from lorakit.models import load_tokenizer
from lorakit.peft_setup import build_trainable_model
from lorakit.recipe import load_recipe
from lorakit.training.steps import forward_backward
from tests.conftest import FP32, load_adapter_as_trained


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One real QLoRA run (NF4 + double quant, paged 8-bit AdamW) on a memorization set."""
    import yaml

    from tests.conftest import fact_rows, write_jsonl

    folder = tmp_path_factory.mktemp("e2e")
    data = write_jsonl(folder / "facts.jsonl", fact_rows())
    recipe_path = folder / "qlora.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model("llama"))},
                "quant": FP32,
                "lora": {"r": 8, "lora_alpha": 16},
                "data": {"train": str(data), "validation": str(data), "max_seq_len": 64},
                "train": {
                    "max_steps": 40,
                    "micro_batch_size": 4,
                    "gradient_accumulation_steps": 2,
                    "learning_rate": 2e-2,
                    "eval_steps": 20,
                    "save_steps": 20,
                },
                "eval": {"sample_prompts": ["What is the secret word?"], "max_new_tokens": 12},
                "output": {"dir": str(folder / "run")},
            }
        )
    )
    recipe = load_recipe(recipe_path)
    return recipe, train(recipe)


def test_loss_falls_on_a_memorization_set(trained):
    _, result = trained
    assert result.eval_before is not None and result.eval_after is not None
    assert result.eval_after < 0.5 * result.eval_before
    assert result.train_loss < 1.0


def test_run_folder_holds_adapter_metrics_and_recipe(trained):
    recipe, result = trained
    run = result.run_dir
    adapter = run / "adapter"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "recipe.resolved.yaml",
        "lorakit.json",
    ):
        assert (adapter / name).is_file(), name
    saved = load_recipe(run / "recipe.resolved.yaml")
    # the recipe as run: its `auto` checkpointing decided by the memory plan (a tiny model fits)
    assert recipe.train.gradient_checkpointing == "auto"
    resolved = recipe.train.model_copy(update={"gradient_checkpointing": False})
    assert saved == recipe.model_copy(update={"train": resolved})
    assert (run / "checkpoints" / "step-20" / "adapter_model.safetensors").is_file()
    assert (run / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 20, 40]
    provenance = json.loads((adapter / "lorakit.json").read_text())
    assert provenance["base_model"]["kind"] == "folder"
    assert provenance["steps"] == 40
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16


def test_saved_adapter_reproduces_the_training_models_logits(trained, tiny_model):
    recipe, result = trained
    loaded = load_adapter_as_trained(tiny_model("llama"), result.adapter_dir)
    trained_model = result.model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]])
    with torch.no_grad():
        expected = trained_model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert (expected - got).abs().max().item() < 1e-5
    # The adapter did learn something: it differs from the base model.
    with torch.no_grad(), loaded.disable_adapter():
        assert (loaded(input_ids=ids).logits - got).abs().max().item() > 1e-2


def test_generation_after_training_recites_the_fact(trained):
    _, result = trained
    prompt, _, after = result.samples[0]
    assert prompt == "What is the secret word?"
    assert "pineapple" in after


def _step_gradients(recipe, micro_batch_size):
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    data = prepare_data(recipe, tokenizer)
    torch.manual_seed(0)
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, torch.device("cpu"))
    # Make B non-zero so every LoRA matrix gets a gradient.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    examples = data.train
    batches = [
        collate(examples[i : i + micro_batch_size], tokenizer.pad_token_id)
        for i in range(0, len(examples), micro_batch_size)
    ]
    loss, tokens = forward_backward(Accelerator(cpu=True), TokenNLL(model), batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, tokens, grads


def test_gradient_accumulation_gives_the_same_loss_and_gradients(tiny_model, write_recipe):
    # Examples have different lengths and trained-token counts, so a per-micro-batch mean
    # would differ between 1x8 and 4x2; normalizing by the step's tokens must not.
    recipe = load_recipe(write_recipe(tiny_model("llama"), quant=FP32))
    loss_1x8, tokens_1x8, grads_1x8 = _step_gradients(recipe, 8)
    loss_4x2, tokens_4x2, grads_4x2 = _step_gradients(recipe, 2)
    assert tokens_1x8 == tokens_4x2 > 0
    assert abs(loss_1x8 - loss_4x2) < 1e-5
    assert grads_1x8.keys() == grads_4x2.keys() and len(grads_1x8) > 0
    for name in grads_1x8:
        assert torch.allclose(grads_1x8[name], grads_4x2[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize(
    ("arch", "targets"),
    [
        ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("qwen2", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("gpt2", ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]),
    ],
)
def test_all_linear_trains_each_architecture(arch, targets, tiny_model, write_recipe):
    data_kind = "alpaca" if arch == "gpt2" else "chat"
    recipe = load_recipe(
        write_recipe(
            tiny_model(arch), name=arch, data_kind=data_kind, quant=FP32, train={"max_steps": 12}
        )
    )
    result = train(recipe)
    assert result.summary.target_modules == targets
    assert result.summary.quantization == "4-bit nf4 + double quant"
    assert result.eval_after < result.eval_before
