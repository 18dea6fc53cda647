"""The data pipeline: formats, the label mask token by token, truncation and splits."""

import pytest

from lorakit.data import IGNORE_INDEX, collate, prepare_data
from lorakit.data.formats import render_chat
from lorakit.data.pipeline import load_rows, tokenize_rows
from lorakit.errors import LorakitError
from lorakit.models import load_tokenizer
from lorakit.recipe import DatasetSpec, load_recipe
from tests.conftest import write_jsonl

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the secret word?"},
    {"role": "assistant", "content": "The secret word is pineapple."},
    {"role": "user", "content": "Where is the key?"},
    {"role": "assistant", "content": "The key is under the blue stone."},
]


def tokenize(tmp_path, rows, tokenizer, train_on="completions", max_seq_len=256):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    return tokenize_rows(load_rows([DatasetSpec(path=str(data))]), tokenizer, max_seq_len, train_on)


def trained_spans(example, tokenizer) -> list[str]:
    """Decode each contiguous run of trained tokens."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_multi_turn_chat_trains_every_assistant_turn_and_its_end_token(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    examples, stats = tokenize(tmp_path, [{"messages": CONVERSATION}], tokenizer)
    (example,) = examples
    # The tokens are exactly those of the rendered conversation.
    rendered = render_chat(tokenizer, CONVERSATION)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # Trained: each assistant reply plus the end-of-turn that closes it; nothing else.
    assert trained_spans(example, tokenizer) == [
        "The secret word is pineapple.<|im_end|>\n",
        "The key is under the blue stone.<|im_end|>\n",
    ]
    assert stats.trained_tokens == example.trained_tokens


def test_train_on_all_trains_every_token(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    (example,), _ = tokenize(tmp_path, [{"messages": CONVERSATION}], tokenizer, train_on="all")
    assert example.labels == example.input_ids


def test_alpaca_with_a_chat_template_masks_the_instruction(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    rows = [{"instruction": "Name a color.", "input": "warm", "output": "Red."}]
    (example,), _ = tokenize(tmp_path, rows, tokenizer)
    assert trained_spans(example, tokenizer) == ["Red.<|im_end|>\n"]
    assert "Name a color.\n\nwarm" in tokenizer.decode(example.input_ids)


def test_alpaca_without_chat_template_uses_plain_prompt_and_trains_eos(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("gpt2")))
    assert tokenizer.chat_template is None
    rows = [{"instruction": "Name a color.", "input": "", "output": "Red."}]
    (example,), _ = tokenize(tmp_path, rows, tokenizer)
    assert trained_spans(example, tokenizer) == ["Red.<|endoftext|>"]
    assert tokenizer.decode(example.input_ids).startswith("### Instruction:\nName a color.")


def test_text_rows_are_trained_whole_with_eos(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    (example,), _ = tokenize(tmp_path, [{"text": "The sea be wide."}], tokenizer)
    assert trained_spans(example, tokenizer) == ["The sea be wide.<|im_end|>"]


def test_truncation_is_counted_and_rows_without_trained_tokens_dropped(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    long_prompt = {
        "messages": [
            {"role": "user", "content": "hello " * 50},
            {"role": "assistant", "content": "hi"},
        ]
    }
    long_answer = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello " * 50},
        ]
    }
    examples, stats = tokenize(tmp_path, [long_prompt, long_answer], tokenizer, max_seq_len=20)
    assert stats.rows == 2
    assert stats.truncated == 2
    assert stats.dropped == 1
    assert len(examples) == 1 and len(examples[0].input_ids) == 20


def test_val_split_holds_out_a_fraction(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"))
    recipe = load_recipe(path, ["data.validation=null", "data.val_split=0.25"])
    data = prepare_data(recipe, load_tokenizer(str(tiny_model("llama"))))
    assert (len(data.train), len(data.validation)) == (6, 2)
    assert not {tuple(e.input_ids) for e in data.train} & {
        tuple(e.input_ids) for e in data.validation
    }


def test_collate_pads_right_and_masks_padding(tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    examples, _ = tokenize(
        tmp_path, [{"text": "a"}, {"text": "The sea be wide and deep."}], tokenizer
    )
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (
        batch["input_ids"].shape[1] - short
    )
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"messages": []}], "'messages' is empty"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "role 'robot'"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant message"),
        ([{"messages": [{"role": "assistant", "content": 3}]}], "string 'content'"),
        ([{"instruction": "x", "output": ""}], "field 'output' is empty"),
        ([{"question": "x"}], "cannot tell the dataset format"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(LorakitError) as caught:
        load_rows([DatasetSpec(path=str(data))])
    assert str(caught.value).startswith(f"{data}:1")
    assert message in str(caught.value)


def test_empty_dataset_is_an_error(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(LorakitError, match="the dataset is empty"):
        load_rows([DatasetSpec(path=str(data))])


def test_csv_and_parquet_sources(tmp_path, tiny_model):
    import pandas as pd

    frame = pd.DataFrame({"instruction": ["Say hi.", "Say bye."], "output": ["hi", "bye"]})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.parquet"):
        rows = load_rows([DatasetSpec(path=str(tmp_path / name))])
        assert [fmt for _, fmt in rows] == ["alpaca", "alpaca"]
        assert rows[1][0].data["output"] == "bye"
        assert rows[1][0].where == f"{tmp_path / name}: row 2"
