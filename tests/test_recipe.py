from pathlib import Path

import pytest
import yaml

from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(LorakitError) as caught:
        load_recipe(path, overrides)
    return str(caught.value)


def test_minimal_recipe_fills_best_practice_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  train: a.jsonl\n"))
    assert recipe.quant.load_in_4bit is True
    assert recipe.quant.bnb_4bit_quant_type == "nf4"
    assert recipe.quant.bnb_4bit_use_double_quant is True
    assert recipe.train.optimizer == "paged_adamw_8bit"
    assert recipe.train.gradient_checkpointing == "auto"  # decided by the memory plan
    assert recipe.train.micro_batch_size == 4
    assert recipe.data.train[0].path == "a.jsonl"
    assert recipe.output.dir == "runs/recipe"


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\nlora:\n  r: 8\n  lora_alpah: 16\n")
    assert error_of(path) == f"{path}:5: lora.lora_alpah: unknown key (did you mean 'lora_alpha'?)"


def test_unknown_section_suggests_a_section(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\ntrian:\n  seed: 1\n")
    assert error_of(path) == f"{path}:3: trian: unknown key (did you mean 'train'?)"


def test_unknown_key_inside_a_dataset_entry(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    - path: a.jsonl\n      fromat: chat\n")
    assert error_of(path) == (
        f"{path}:4: data.train[0].fromat: unknown key (did you mean 'format'?)"
    )


def test_malformed_yaml_gives_line_and_column(tmp_path):
    path = write(tmp_path, "data:\n  train: [a.jsonl\nlora: {r: 8}\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3:")
    assert "malformed YAML" in message
    assert "\n" not in message


def test_each_wrong_value_gives_one_line(tmp_path):
    path = write(
        tmp_path,
        "data:\n  train: a.jsonl\nlora:\n  r: 0\n  lora_dropout: 1.5\n"
        "train:\n  learning_rate: fast\n",
    )
    lines = error_of(path).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:4: lora.r: ")
    assert lines[1].startswith(f"{path}:5: lora.lora_dropout: ")
    assert lines[2].startswith(f"{path}:7: train.learning_rate: ")
    assert "'fast'" in lines[2]


def test_missing_data_section(tmp_path):
    path = write(tmp_path, "train:\n  seed: 3\n")
    assert error_of(path) == f"{path}:1: data: missing required field"


def test_missing_recipe_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: recipe file not found"


def test_target_modules_preset_or_list(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\nlora:\n  target_modules: attn\n")
    assert "one of all-linear, attention, mlp" in error_of(path)
    path = write(tmp_path, "data:\n  train: a.jsonl\nlora:\n  target_modules: [q_proj, v_proj]\n")
    assert load_recipe(path).lora.target_modules == ["q_proj", "v_proj"]


def test_set_overrides_parse_values_and_report_unknown_keys(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\n")
    recipe = load_recipe(
        path,
        ["train.learning_rate=1e-4", "lora.target_modules=[q_proj]", "quant.load_in_4bit=false"],
    )
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.lora.target_modules == ["q_proj"]
    assert recipe.quant.load_in_4bit is False
    assert (
        error_of(path, ["train.lr=1"])
        == "--set: train.lr: unknown key (did you mean 'learning_rate'?)"
    )
    assert "expected KEY=VALUE" in error_of(path, ["train.lr"])


def test_validation_file_and_fraction_are_exclusive(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\n  validation: b.jsonl\n  val_split: 0.1\n")
    assert "either validation" in error_of(path)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  train: a.jsonl\nlora:\n  r: 4\n"))
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again) == recipe
    assert yaml.safe_load(recipe.to_yaml())["lora"]["r"] == 4


def test_recipe_is_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  train: a.jsonl\n"))
    with pytest.raises(Exception, match="frozen"):
        recipe.lora.r = 3
