"""`lorakit prepare`: statistics that match the prepared data, a length histogram, the cache
filled and reused, and examples with the trained tokens marked."""

import pytest
from rich.text import Text
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.commands.prepare import highlight_example, length_histogram
from lorakit.data import Example, prepare_data
from lorakit.models import load_tokenizer
from lorakit.recipe import load_recipe
from tests.conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("private_cache")


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_prepare_prints_the_numbers_of_the_prepared_data(tiny_model, write_recipe):
    model = tiny_model("llama")
    path = write_recipe(model)
    code, out, err = run("prepare", path, "--preview", "2")
    assert code == 0, err
    data = prepare_data(load_recipe(path), load_tokenizer(str(model)))
    train = data.stats["train"]
    share = train.trained_tokens / train.tokens
    row = f"│ train      │ {train.examples:>8} │ {train.tokens:>6} │ {train.trained_tokens:>14} │"
    assert row in out
    assert f"{share:.1%}" in out
    assert "│ written │" in out and "│ reused │" not in out
    first = data.train[0]
    assert f"example 1: {len(first.input_ids)} tokens, {first.trained_tokens} trained" in out
    assert (
        "<|im_start|>user\nWhat is the secret word?<|im_end|>\n<|im_start|>assistant\n"
        "⟦The secret word is pineapple.<|im_end|>\n⟧"
    ) in out
    assert "⟦A grey owl guards the gate.<|im_end|>\n⟧" in out
    assert "example 3" not in out

    code, out, _ = run("prepare", path)
    assert code == 0
    assert "│ reused │" in out and "│ written │" not in out


def test_prepare_reports_packing_and_skips(tmp_path, tiny_model, write_recipe):
    from tests.conftest import fact_rows

    rows = fact_rows("chat") + [{"messages": [{"role": "user", "content": "no reply"}]}]
    data = write_jsonl(tmp_path / "facts.jsonl", rows)
    path = write_recipe(
        tiny_model("llama"),
        data={"train": str(data), "validation": None, "packing": True, "max_seq_len": 128},
    )
    code, out, err = run("prepare", path, "--preview", "8")
    assert code == 0, err
    prepared = prepare_data(load_recipe(path), load_tokenizer(str(tiny_model("llama"))))
    stats = prepared.stats["train"]
    assert f"│ {stats.packed_rows:>11} │ {stats.packing_efficiency:>7.1%} │" in out
    assert (
        f"warning: {data}: skipped 1 of 9 rows with problems (data.strict: true makes them "
        f"errors):\n  {data}:9: no assistant message to learn from"
    ) in out
    # Packed rows are shown as the examples they hold.
    assert out.count("<|im_end|>\n⟧") == 8 and "example 8:" in out


def test_prepare_of_unusable_data_is_one_error(tmp_path, tiny_model, write_recipe):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    path = write_recipe(tiny_model("llama"), data={"train": str(data), "validation": None})
    code, out, err = run("prepare", path)
    assert code == 2
    assert err.strip() == (
        f"error: {data}:1: messages[0] has role 'bot' (expected system, user, assistant, tool, "
        "or ShareGPT's human, gpt, function_call, observation) (1 of 1 rows of "
        f"{data} have a problem, none is left to train on)"
    )


def test_prepare_explains_pad_equal_to_eos(tiny_model, write_recipe):
    code, out, err = run("prepare", write_recipe(tiny_model("gpt2"), data_kind="alpaca"))
    assert code == 0, err
    assert "the pad token is the EOS token ('<|endoftext|>')" in out


def test_length_histogram_bins():
    bins = length_histogram([1, 8, 9, 64, 64, 30], max_seq_len=64)
    assert bins == [
        (1, 8, 2),
        (9, 16, 1),
        (17, 24, 0),
        (25, 32, 1),
        (33, 40, 0),
        (41, 48, 0),
        (49, 56, 0),
        (57, 64, 2),
    ]


def test_highlight_styles_trained_runs(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    ids = tokenizer("Where is the key?", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" Under the stone.", add_special_tokens=False)["input_ids"]
    example = Example(ids + answer, [-100] * len(ids) + answer)
    text = highlight_example(example, tokenizer)
    assert isinstance(text, Text)
    trained = [text.plain[s.start : s.end] for s in text.spans if s.style == "bold green"]
    assert trained == [" Under the stone."]
    plain = highlight_example(example, tokenizer, colors=False).plain
    assert plain == "Where is the key?⟦ Under the stone.⟧"
