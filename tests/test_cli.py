"""Bad input at the command line: one `error:` line per problem, exit 2, no traceback, and no
run folder left behind."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from tests.conftest import fact_rows, write_jsonl


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_recipe(tmp_path):
    code, _, err = run("train", tmp_path / "missing.yaml")
    assert code == 2
    assert_one_error_line(err, "missing.yaml", "recipe file not found")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: [x.jsonl\nlora: {r: 8}\n")
    code, _, err = run("train", path)
    assert code == 2
    assert_one_error_line(err, f"{path}:3:", "malformed YAML")


def test_unknown_key(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"), lora={"rank": 8})
    code, _, err = run("train", path)
    assert code == 2
    assert_one_error_line(err, "lora.rank: unknown key (did you mean 'r'?)")
    assert not (tmp_path / "runs").exists()


def test_bad_model_path(tmp_path, write_recipe):
    path = write_recipe(tmp_path / "no-such-model")
    code, _, err = run("train", path)
    assert code == 2
    assert_one_error_line(err, "model.name_or_path", "no-such-model")
    assert not (tmp_path / "runs").exists()


def test_dataset_row_missing_a_field_names_file_and_line(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"))
    rows = fact_rows("alpaca")
    del rows[2]["output"]
    data = write_jsonl(tmp_path / "broken.jsonl", rows)
    args = ["train", path, "--set", f"data.train={data}", "--set", "data.validation=null"]
    code, _, err = run(*args, "--set", "data.strict=true")
    assert code == 2
    assert_one_error_line(err, f"{data}:3", "missing required field 'output'")
    assert not (tmp_path / "runs").exists()


def test_bad_row_is_skipped_counted_and_named_without_strict(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"), train={"max_steps": 1})
    rows = fact_rows("alpaca")
    del rows[2]["output"]
    data = write_jsonl(tmp_path / "broken.jsonl", rows)
    code, _, err = run(
        "train", path, "--set", f"data.train={data}", "--set", "data.validation=null"
    )
    assert code == 0, err
    assert "7 train examples" in err
    err = " ".join(err.split())  # undo the console's line wrapping
    assert (
        "skipped 1 of 8 rows with problems (data.strict: true makes them errors): "
        f"{data}:3: missing required field 'output'"
    ) in err


def test_malformed_json_line(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"))
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "fine"}\n{"text": oops}\n')
    code, _, err = run("train", path, "--set", f"data.train={data}")
    assert code == 2
    assert_one_error_line(err, f"{data}:2", "malformed JSON")


def test_existing_run_is_not_overwritten_without_flag(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"), train={"max_steps": 1})
    run_dir = tmp_path / "runs" / "recipe"
    run_dir.mkdir(parents=True)
    (run_dir / "precious.txt").write_text("keep me")
    code, _, err = run("train", path)
    assert code == 2
    assert_one_error_line(err, "already holds a run", "--overwrite")
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_train_command_writes_a_run(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"), train={"max_steps": 2})
    code, _, err = run("train", path, "--set", "quant.bnb_4bit_compute_dtype=float32")
    assert code == 0, err
    assert (tmp_path / "runs" / "recipe" / "adapter" / "adapter_model.safetensors").is_file()
    assert "trainable parameters" in err


def test_validate_checks_without_training(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"))
    code, _, err = run("validate", path)
    assert code == 0, err
    assert "8 training rows (chat)" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.train=nowhere.jsonl", "nowhere.jsonl: dataset file not found"),
        ("model.name_or_path=./missing-folder", "is not a local model folder"),
        ("train.optimizer=sgd", "train.optimizer"),
    ],
)
def test_validate_reports_problems(override, expected, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"))
    code, _, err = run("validate", path, "--set", override)
    assert code == 2
    assert_one_error_line(err, expected)


def test_help_lists_commands():
    code, out, _ = run("--help")
    assert code == 0
    assert "train" in out and "validate" in out
    assert Path(__file__).exists()


def test_hub_id_while_offline_is_a_clear_error(tmp_path, write_recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_recipe(tmp_path / "x")
    code, _, err = run("train", path, "--set", "model.name_or_path=lorakit-tests/no-such-model")
    assert code == 2
    assert_one_error_line(err, "model.name_or_path", "lorakit-tests/no-such-model")
    assert not (tmp_path / "runs").exists()
