"""Data formats (`lorakit.data.formats`): each format's rows become segments whose label mask
trains exactly the answer tokens."""

import pytest

from lorakit.data.formats import render_chat
from lorakit.data.pipeline import load_rows, tokenize_rows
from lorakit.errors import LorakitError
from lorakit.models import load_tokenizer
from lorakit.recipe import DatasetSpec, load_recipe
from tests.conftest import CONVERSATION, tokenize, trained_spans, write_jsonl

pytestmark = pytest.mark.usefixtures("private_cache")


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


def test_sharegpt_rows_tokenize_like_the_same_chat_rows(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {
        "conversations": [
            {"from": speakers[m["role"]], "value": m["content"]} for m in CONVERSATION
        ]
    }
    (chat,), _ = tokenize(tmp_path, [{"messages": CONVERSATION}], tokenizer)
    (share,), stats = tokenize(tmp_path, [sharegpt], tokenizer)
    assert (share.input_ids, share.labels) == (chat.input_ids, chat.labels)
    assert load_rows([DatasetSpec(path=str(tmp_path / "rows.jsonl"))])[0][1] == "sharegpt"


def test_last_turn_trains_only_the_final_reply_on_the_same_tokens(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    (every,), _ = tokenize(tmp_path, [{"messages": CONVERSATION}], tokenizer)
    (last,), _ = tokenize(tmp_path, [{"messages": CONVERSATION}], tokenizer, train_on="last_turn")
    assert last.input_ids == every.input_ids
    assert trained_spans(last, tokenizer) == ["The key is under the blue stone.<|im_end|>\n"]


def test_prompt_completion_strings_train_the_completion_and_eos(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    rows = [{"prompt": "Q: What color is the door?\nA:", "completion": " The door is red."}]
    (example,), _ = tokenize(tmp_path, rows, tokenizer)
    assert trained_spans(example, tokenizer) == [" The door is red.<|im_end|>"]
    assert tokenizer.decode(example.input_ids) == rows[0]["prompt"] + " The door is red.<|im_end|>"


def test_prompt_completion_messages_train_only_the_completion_turns(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    row = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    (example,), _ = tokenize(tmp_path, [row], tokenizer)
    assert trained_spans(example, tokenizer) == ["The key is under the blue stone.<|im_end|>\n"]
    assert example.input_ids == tokenizer(render_chat(tokenizer, CONVERSATION))["input_ids"]


def test_pretokenized_rows_keep_their_ids_and_labels(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11]},
        {"input_ids": [1, 100000]},
    ]
    examples, stats = tokenize(tmp_path, rows, tokenizer)
    assert [(e.input_ids, e.labels) for e in examples] == [
        ([5, 6, 7, 8], [-100, -100, 7, 8]),
        ([9, 10, 11], [9, 10, 11]),
    ]
    assert stats.skipped == 1
    assert stats.skip_reasons == [
        f"{tmp_path / 'rows.jsonl'}:3: 'input_ids' holds ids outside "
        f"the vocabulary ({len(tokenizer)})"
    ]


def test_columns_map_a_files_own_field_names(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    data = write_jsonl(
        tmp_path / "renamed.jsonl",
        [
            {
                "dialog": [
                    {"speaker": "user", "text": "What color is the door?"},
                    {"speaker": "assistant", "text": "The door is bright red."},
                ]
            }
        ],
    )
    spec = DatasetSpec(
        path=str(data), columns={"messages": "dialog", "role": "speaker", "content": "text"}
    )
    (example,), _ = tokenize_rows(load_rows([spec]), tokenizer, 256, "completions")
    assert trained_spans(example, tokenizer) == ["The door is bright red.<|im_end|>\n"]
    alpaca = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Say hi.", "answer": ""}])
    spec = DatasetSpec(path=str(alpaca), columns={"instruction": "question", "output": "answer"})
    with pytest.raises(LorakitError, match=r"field 'output' \(column 'answer'\) is empty"):
        load_rows([spec])


def test_unknown_column_field_is_a_recipe_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train:\n    - path: a.jsonl\n      columns: {answer: output}\n")
    with pytest.raises(LorakitError, match=r"r.yaml:4: data.train\[0\].columns: unknown field"):
        load_recipe(path)
