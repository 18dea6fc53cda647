"""`lorakit eval` on tiny models built in the session: the adapter's loss equals training's,
memorized answers, the comparison table, the harness, and one-line errors for bad input."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lorakit.artifacts import resolve_target
from lorakit.cli import app
from lorakit.commands.evaluate import EvalOptions, load_eval_rows, prompt_token_ids, run_eval
from tests.conftest import FACTS, fact_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, input: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_adapter_loss_equals_the_training_runs_final_eval_loss(memorized):
    # Same data file as training's validation set, settings read from the saved recipe.
    result, data = memorized
    report = run_eval([str(result.adapter_dir)], [str(data)], EvalOptions(metrics=["loss"]))
    (scores,) = report.results
    assert scores.kind == "adapter"
    assert scores.precision == "4-bit nf4 + double quant, float32"
    assert scores.scores["loss"] == pytest.approx(result.eval_after, abs=1e-5)


def test_exact_match_is_one_after_memorization(memorized, tiny_model):
    result, data = memorized
    options = EvalOptions(
        metrics=["exact_match", "contains", "chrf"], max_new_tokens=16, dtype="float32"
    )
    report = run_eval([str(result.run_dir), str(tiny_model("llama"))], [str(data)], options)
    adapter, base = report.results
    assert adapter.predictions == [answer for _, answer in FACTS]
    assert adapter.scores == {"exact_match": 1.0, "contains": 1.0, "chrf": 100.0}
    assert base.scores["exact_match"] == 0.0
    assert base.scores["chrf"] < 50


def test_prompt_tokens_are_the_training_tokens_before_the_answer(memorized):
    result, data = memorized
    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    rows = load_eval_rows([str(data)], "auto", None)
    (prompt,) = prompt_token_ids(rows[:1], tokenizer)
    question, _ = FACTS[0]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(prompt) == text


def _merged_folder(base_dir, adapter_dir, folder):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(folder)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(folder)
    (folder / "lorakit.json").write_text("{}")
    return folder


def test_comparison_table_lists_every_target(memorized, tiny_model, tmp_path):
    result, data = memorized
    base_dir = tiny_model("llama")
    merged = _merged_folder(base_dir, result.adapter_dir, tmp_path / "merged")
    out = tmp_path / "report"
    code, _, err = run(
        "eval",
        base_dir,
        result.run_dir,
        result.adapter_dir,
        merged,
        "--data",
        data,
        "--metrics",
        "loss,perplexity,exact_match",
        "--max-new-tokens",
        "12",
        "--dtype",
        "float32",
        "--out",
        out,
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    labels = [t["label"] for t in report["targets"]]
    assert labels == [base_dir.name, "run", "run#2", "merged"]
    assert [t["kind"] for t in report["targets"]] == ["model", "adapter", "adapter", "merged"]
    # The run folder and its adapter/ are the same adapter.
    assert report["targets"][1]["loss"] == report["targets"][2]["loss"]
    assert report["targets"][1]["exact_match"] == 1.0
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == len(FACTS)
    assert list(lines[0]["outputs"]) == labels
    assert lines[0]["reference"] == FACTS[0][1]

    # The rich table on stderr has one row per target.
    rows = [line for line in err.splitlines() if line.startswith("│ ")]
    for label in labels:
        assert sum(line.startswith(f"│ {label} ") for line in rows) == 1, label


def test_harness_is_skipped_with_a_message_when_not_installed(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    code, _, err = run("eval", tiny_model("llama"), "--harness", "hellaswag")
    assert code == 0, err
    assert "--harness skipped: lm-evaluation-harness is not installed" in err


def test_harness_runs_base_and_unmerged_adapter(memorized, tiny_model, tmp_path):
    result, _ = memorized
    facts = write_jsonl(tmp_path / "harness" / "facts.jsonl", [{"q": q, "a": a} for q, a in FACTS])
    (tmp_path / "harness" / "facts.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "lorakit_facts",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(facts)}},
                "test_split": "test",
                "output_type": "loglikelihood",
                "doc_to_text": "<|im_start|>user\n{{q}}<|im_end|>\n<|im_start|>assistant\n",
                "doc_to_target": "{{a}}",
                "target_delimiter": "",
                "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
            }
        )
    )
    code, _, err = run(
        "eval",
        tiny_model("llama"),
        result.run_dir,
        "--harness",
        "lorakit_facts",
        "--harness-include",
        tmp_path / "harness",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, err
    harness = json.loads((tmp_path / "out" / "report.json").read_text())["harness"]
    base, adapter = harness[tiny_model("llama").name], harness["run"]
    assert set(base["lorakit_facts"]) == {"perplexity", "acc"}
    # The adapter is active in the harness: the memorized answers are far likelier under it.
    # (The harness scores the template's trailing newline too, which training masks, so the
    # adapter's figure is not near 1.)
    assert adapter["lorakit_facts"]["perplexity"] < 1e-6 * base["lorakit_facts"]["perplexity"]


def _assert_one_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def facts_file(tmp_path):
    return write_jsonl(tmp_path / "facts.jsonl", fact_rows())


def test_target_that_is_neither_model_nor_adapter(tmp_path, facts_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code, _, err = run("eval", empty, "--data", facts_file, "--out", out)
    _assert_one_error(code, err, str(empty), "neither a model folder")
    code, _, err = run("eval", facts_file, "--data", facts_file, "--out", out)
    _assert_one_error(code, err, str(facts_file), "not a model or adapter")
    code, _, err = run("generate", empty, "--prompt", "hi")
    _assert_one_error(code, err, "neither a model folder")
    assert not out.exists()


def test_data_in_an_unknown_shape(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    code, _, err = run("eval", tiny_model("llama"), "--data", data, "--out", tmp_path / "out")
    _assert_one_error(code, err, f"{data}:1", "cannot tell the dataset format")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--metrics", "loss,bleu"], ["unknown metric 'bleu'", "chrf"]),
        (["--metrics", "regex"], ["--regex PATTERN"]),
        (["--metrics", "regex", "--regex", "(unclosed"], ["--regex: invalid pattern"]),
        (["--normalize", "stem"], ["--normalize: unknown option 'stem'"]),
        (["--format", "sharegpt-ish"], ["--format: unknown format"]),
        (["--dtype", "int3"], ["--dtype: 'int3' is not one of"]),
    ],
)
def test_bad_options(args, fragments, tiny_model, facts_file, tmp_path):
    code, _, err = run("eval", tiny_model("llama"), "--data", facts_file, *args)
    _assert_one_error(code, err, *fragments)


def test_generation_metrics_on_text_rows_name_the_row(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "plain.jsonl", [{"text": "just text"}])
    code, _, err = run("eval", tiny_model("llama"), "--data", data, "--metrics", "exact_match")
    _assert_one_error(code, err, f"{data}:1", "need rows with a prompt and a reference")


def test_eval_without_data(tiny_model):
    code, _, err = run("eval", tiny_model("llama"))
    _assert_one_error(code, err, "--data")


def test_data_settings_come_from_the_adapters_recipe(memorized):
    from lorakit.commands.evaluate import data_settings

    result, _ = memorized
    trained_with = resolve_target(str(result.run_dir)).data_settings
    assert data_settings(EvalOptions(), trained_with) == (64, "completions")
    assert data_settings(EvalOptions(max_seq_len=8, train_on="all"), trained_with) == (8, "all")
    assert data_settings(EvalOptions(), None) == (512, "completions")


@pytest.mark.slow
def test_eval_and_generate_on_the_embedded_model(tmp_path):
    data = ROOT / "examples" / "eval" / "capitals.jsonl"
    code, _, err = run(
        "eval",
        "smollm2-135m-instruct",
        "--data",
        data,
        "--limit",
        "8",
        "--max-new-tokens",
        "24",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    (target,) = json.loads((tmp_path / "report.json").read_text())["targets"]
    assert target["kind"] == "model" and target["examples"] == 8
    # The instruct model names the capital in a sentence (7 of these 8 on the machine this was
    # written on: it calls Portugal its own capital): contained, never an exact match.
    assert target["contains"] >= 0.75
    assert target["exact_match"] == 0.0
    assert 1.0 < target["perplexity"] < 100.0
    code, out, err = run(
        "generate", "smollm2-135m-instruct", "--prompt", "What is the capital of France?"
    )
    assert code == 0, err
    assert "Paris" in out
