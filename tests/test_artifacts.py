"""What `eval` and `generate` are pointed at (`lorakit.artifacts`): a base model, a run, adapter
or checkpoint folder (with the recipe and base it was trained with), or a merged model."""

import json

import pytest

from lorakit.artifacts import resolve_target
from lorakit.errors import LorakitError


def test_each_kind_of_target_is_told_apart(memorized, tiny_model, tmp_path):
    result, _ = memorized
    base = resolve_target(str(tiny_model("llama")))
    assert (base.kind, base.adapter_dir, base.recipe) == ("model", None, None)

    run = resolve_target(str(result.run_dir))
    assert run.kind == "adapter" and run.adapter_dir == result.run_dir / "adapter"
    assert run.model_location == str(tiny_model("llama").resolve())
    assert run.recipe.lora.r == 8 and run.tokenizer_location == str(run.adapter_dir)
    assert run.label() == result.run_dir.name

    checkpoint = next((result.run_dir / "checkpoints").iterdir())
    assert resolve_target(str(checkpoint)).adapter_dir == checkpoint

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (merged / "lorakit.json").write_text("{}")
    assert resolve_target(str(merged)).kind == "merged"


def test_a_folder_or_file_that_is_no_model_is_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="neither a model folder .* nor a run folder"):
        resolve_target(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LorakitError, match="not a model or adapter"):
        resolve_target(str(tmp_path / "notes.txt"))


def test_an_adapter_is_evaluated_as_it_was_trained_in_bf16(tiny_model, write_recipe, tmp_path):
    """eval loads an adapter with training's own loader (frozen embeddings in bf16, the fused
    LoRA path, the 4-bit layout training used): its loss is training's final eval loss within
    bf16 rounding of a different batch layout (the loader eval had before was 8e-4 off)."""
    from lorakit.commands.evaluate import EvalOptions, run_eval
    from lorakit.commands.train import train
    from lorakit.recipe import load_recipe

    recipe = load_recipe(
        write_recipe(
            tiny_model("llama"),
            quant={"bnb_4bit_compute_dtype": "bfloat16"},
            train={"max_steps": 6, "learning_rate": 2e-2},
        )
    )
    result = train(recipe)
    data = recipe.data.validation[0].path
    options = EvalOptions(metrics=["loss"], batch_size=recipe.train.micro_batch_size)
    report = run_eval([str(result.run_dir)], [data], options, out_dir=tmp_path / "eval")
    assert report.results[0].precision == "4-bit nf4 + double quant, bfloat16"
    assert abs(report.results[0].scores["loss"] - result.eval_after) < 1e-5
