"""Shipped recipes, `lorakit init`, the generated recipe reference, and best-practice advice."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.advice import compile_advice, data_advice, recipe_advice
from lorakit.catalog import shipped_recipes
from lorakit.cli import app
from lorakit.commands.validate import validate
from lorakit.recipe import load_recipe, recipe_reference
from lorakit.training.optim import count_optimizer_steps

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_lists_every_shipped_recipe():
    names = {r.name for r in shipped_recipes()}
    expected = {
        p.relative_to(ROOT / "configs").with_suffix("").as_posix()
        for p in (ROOT / "configs").rglob("*.yaml")
        if p.parent.name != "accelerate"
    }
    assert names == expected
    assert {"quickstart", "starter", "gpu/llama3-8b-qlora"} <= names
    assert all(r.summary for r in shipped_recipes())


@pytest.mark.parametrize("name", [r.name for r in shipped_recipes() if r.name != "starter"])
def test_every_shipped_recipe_validates(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = Path("configs") / f"{name}.yaml"
    assert f"{path}: ok" in validate(path)


def test_init_writes_the_starter_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "mine.yaml"
    result = CliRunner().invoke(app, ["init", str(target)])
    assert result.exit_code == 0, result.stderr
    assert target.read_text() == (ROOT / "configs" / "starter.yaml").read_text()
    assert load_recipe(target).lora.r == 16
    again = CliRunner().invoke(app, ["init", str(target), "--template", "quickstart"])
    assert again.exit_code == 2
    assert "already exists" in again.stderr
    assert "--overwrite" in again.stderr
    forced = CliRunner().invoke(app, ["init", str(target), "-t", "quickstart", "--overwrite"])
    assert forced.exit_code == 0
    assert "pirate" in target.read_text()
    old_flag = CliRunner().invoke(app, ["init", str(target), "-t", "starter", "--force"])
    assert old_flag.exit_code == 0 and "--force is deprecated" in old_flag.stderr
    assert target.read_text() == (ROOT / "configs" / "starter.yaml").read_text()
    unknown = CliRunner().invoke(app, ["init", str(tmp_path / "x.yaml"), "-t", "nope"])
    assert unknown.exit_code == 2 and "unknown recipe 'nope'" in unknown.stderr


def test_recipe_reference_is_current():
    documented = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert documented == recipe_reference(), "run: lorakit reference > docs/recipe-reference.md"


def recipe_with(tmp_path, **sections):
    import yaml

    raw = {"data": {"train": "a.jsonl"}, **sections}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def test_advice_on_alpha_ratio_and_attention_only(tmp_path):
    assert recipe_advice(recipe_with(tmp_path)) == []
    notes = recipe_advice(recipe_with(tmp_path, lora={"r": 64, "lora_alpha": 8}))
    assert len(notes) == 1 and "alpha/r = 0.125" in notes[0]
    notes = recipe_advice(recipe_with(tmp_path, lora={"target_modules": ["q_proj", "v_proj"]}))
    assert len(notes) == 1 and "attention only" in notes[0]
    assert (
        recipe_advice(recipe_with(tmp_path, lora={"r": 256, "lora_alpha": 32, "use_rslora": True}))
        == []
    )


def test_advice_on_regularization_and_rank_versus_data(tmp_path):
    recipe = recipe_with(tmp_path)
    notes = data_advice(recipe, examples=100, trained_tokens=10_000, trainable_parameters=400_000)
    assert len(notes) == 1 and "overfit" in notes[0]
    regularized = recipe_with(tmp_path, train={"weight_decay": 0.01})
    assert data_advice(regularized, 100, 10_000, 400_000) == []
    notes = data_advice(regularized, 100, 10_000, 5_000_000)
    assert len(notes) == 1 and "far more capacity" in notes[0]


def test_advice_on_compiling_a_short_run(tmp_path):
    """Counted from the optimizer steps the run will take (train.count_optimizer_steps)."""
    settings = {"torch_compile": True, "gradient_accumulation_steps": 4}
    compiled = recipe_with(tmp_path, train=settings)
    notes = compile_advice(compiled.train, count_optimizer_steps(compiled.train, 24))
    assert len(notes) == 1 and "a run of 24 micro-batches" in notes[0]
    capped = recipe_with(tmp_path, train={**settings, "max_steps": 3})
    steps = count_optimizer_steps(capped.train, 100_000)
    assert "a run of 12 micro-batches" in compile_advice(capped.train, steps)[0]
    assert compile_advice(compiled.train, count_optimizer_steps(compiled.train, 1_250)) == []
    eager = recipe_with(tmp_path, train={"gradient_accumulation_steps": 4})
    assert compile_advice(eager.train, count_optimizer_steps(eager.train, 24)) == []
