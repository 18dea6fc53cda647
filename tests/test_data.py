"""The data pipeline: formats, the label mask token by token, truncation and splits."""

import pytest

from lorakit.data import IGNORE_INDEX, collate, prepare_data
from lorakit.data.formats import render_chat
from lorakit.data.pipeline import SplitStats, load_rows, read_dataset, tokenize_rows
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
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "The sea", "completion": " be wide and deep."},
    ]
    examples, _ = tokenize(tmp_path, rows, tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert short < batch["input_ids"].shape[1]
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
        where = f"{tmp_path / name}:3" if name.endswith(".csv") else f"{tmp_path / name}: row 2"
        assert rows[1][0].where == where


# --- every format ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _private_data_cache(tmp_path, monkeypatch):
    """Each test gets its own cache root, so cache hits come only from the test itself."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


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


def test_multi_turn_mask_matches_the_template_token_by_token(tmp_path, tiny_model):
    """Rebuild the expected labels from independent renders: every reply's tokens (and its
    end-of-turn) trained, every other token masked."""
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    (example,), _ = tokenize(tmp_path, [{"messages": CONVERSATION}], tokenizer)
    expected_ids, expected_labels, done = [], [], ""
    for i, message in enumerate(CONVERSATION):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, CONVERSATION[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, CONVERSATION[: i + 1])
        prompt_ids = tokenizer(prompt[len(done) :], add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        expected_ids += prompt_ids + reply_ids
        expected_labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids
        done = full
    assert example.input_ids == expected_ids
    assert example.labels == expected_labels
    assert example.labels[-2:] == tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]


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


def test_text_documents_are_joined_with_eos_and_chunked(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    docs = ["The sea be wide and the wind be strong.", "Water boils at one hundred degrees."]
    stream = tokenizer(docs[0] + "<|im_end|>" + docs[1] + "<|im_end|>")["input_ids"]
    examples, stats = tokenize(tmp_path, [{"text": d} for d in docs], tokenizer, max_seq_len=8)
    assert [len(e.input_ids) for e in examples[:-1]] == [8] * (len(examples) - 1)
    assert [t for e in examples for t in e.input_ids] == stream[: len(stream) // 8 * 8] + (
        stream[len(stream) // 8 * 8 :] if len(stream) % 8 > 1 else []
    )
    assert all(e.labels == e.input_ids for e in examples)
    assert (stats.rows, stats.truncated, stats.examples) == (2, 0, len(examples))


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


# --- sources -----------------------------------------------------------------------------------


def test_json_arrow_saved_and_txt_folder_sources(tmp_path):
    import json

    from datasets import Dataset, DatasetDict

    rows = [
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye"},
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    table = Dataset.from_list(rows)
    table.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("First document.")
    (docs / "sub" / "b.txt").write_text("Second document.")

    for spec in (
        DatasetSpec(path=str(tmp_path / "rows.json")),
        DatasetSpec(path=str(arrow)),
        DatasetSpec(path=str(tmp_path / "saved")),
        DatasetSpec(path=str(tmp_path / "dict")),
    ):
        loaded = load_rows([spec])
        assert [(r.data["output"], fmt) for r, fmt in loaded] == [
            ("hi", "alpaca"),
            ("bye", "alpaca"),
        ]
    test_split = load_rows([DatasetSpec(path=str(tmp_path / "dict"), split="test")])
    assert [r.data["output"] for r, _ in test_split] == ["bye"]
    with pytest.raises(LorakitError, match="no split 'valid' \\(it has train, test\\)"):
        load_rows([DatasetSpec(path=str(tmp_path / "dict"), split="valid")])
    texts = load_rows([DatasetSpec(path=str(docs))])
    assert [(r.data["text"], fmt) for r, fmt in texts] == [
        ("First document.", "text"),
        ("Second document.", "text"),
    ]


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    # As with HF_HUB_OFFLINE=1 set before the libraries load (no network retries).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(LorakitError) as caught:
        load_rows([DatasetSpec(path="someone/some-dataset")])
    assert str(caught.value).startswith(
        "someone/some-dataset: cannot load the hub dataset (offline, or not a dataset id?): "
    )
    assert "\n" not in str(caught.value)


# --- bad rows ----------------------------------------------------------------------------------


def test_bad_rows_are_skipped_and_counted_or_stop_with_strict(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    good = {"messages": CONVERSATION[1:3]}
    rows = [
        good,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": ["a", "list"]}, CONVERSATION[2]]},
        {"messages": [{"role": "tool", "content": "x"}, CONVERSATION[2]]},
        {"instruction": "no messages here"},
        good,
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    loaded = load_rows([DatasetSpec(path=str(data))])
    assert len(loaded) == 2
    examples, stats = tokenize_rows(loaded, tokenizer, 256, "completions")
    assert len(examples) == 2
    source = read_dataset(DatasetSpec(path=str(data)))
    assert (source.stats.rows, source.stats.skipped) == (6, 4)
    assert source.stats.skip_reasons == [
        f"{data}:2: messages[1] (assistant) has empty content",
        f"{data}:3: messages[0] needs a string 'content'",
        f"{data}:4: messages[0] has role 'tool' (expected system, user, assistant, "
        "or ShareGPT's human, gpt)",
        f"{data}:5: missing required field 'messages'",
    ]
    with pytest.raises(LorakitError, match=f"^{data}:2: messages\\[1\\] \\(assistant\\) has empty"):
        read_dataset(DatasetSpec(path=str(data)), strict=True)


def test_a_dataset_with_no_usable_row_is_an_error(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}, {"messages": []}])
    with pytest.raises(LorakitError) as caught:
        load_rows([DatasetSpec(path=str(data))])
    assert str(caught.value) == (
        f"{data}:1: 'messages' is empty (2 of 2 rows of {data} have a problem, "
        "none is left to train on)"
    )


def test_template_errors_are_row_problems(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'owl' in m['content'] %}"
        "{{ raise_exception('no owls here') }}{% endif %}{% endfor %}" + tokenizer.chat_template
    )
    owl = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "An owl."}]
    rows = [{"messages": owl}, {"messages": CONVERSATION}, {"messages": CONVERSATION[2:]}]
    examples, stats = tokenize(tmp_path, rows, tokenizer)
    assert len(examples) == 1
    assert stats.skip_reasons == [
        f"{tmp_path / 'rows.jsonl'}:1: chat template error: no owls here",
        f"{tmp_path / 'rows.jsonl'}:3: the conversation starts with an assistant message",
    ]


# --- the fast chat path ------------------------------------------------------------------------


def test_one_render_per_row_after_the_first_of_each_shape(tmp_path, tiny_model, monkeypatch):
    from lorakit.data import chat

    tokenizer = load_tokenizer(str(tiny_model("llama")))
    calls = []
    reference = chat.split_by_prefixes
    monkeypatch.setattr(chat, "split_by_prefixes", lambda *a: calls.append(1) or reference(*a))
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("What?", "Red."), ("Where?", "Here."), ("Who?", "An owl.")] * 10
    ]
    examples, _ = tokenize(tmp_path, rows, tokenizer)
    assert len(calls) == 1  # the skeleton of the one (user, assistant) shape
    for example, row in zip(examples, rows, strict=True):
        assert example.input_ids == tokenizer(render_chat(tokenizer, row["messages"]))["input_ids"]


@pytest.mark.parametrize("template", ["chatml", "llama3", "alpaca", "upper"])
def test_fast_split_equals_prefix_renders(template, tiny_model):
    from lorakit.data.chat import NAMED_TEMPLATES, ChatSegmenter, split_by_prefixes

    tokenizer = load_tokenizer(str(tiny_model("llama")))
    tokenizer.chat_template = NAMED_TEMPLATES.get(template) or NAMED_TEMPLATES["chatml"].replace(
        "message['content']", "message['content'] | upper"
    )
    segmenter = ChatSegmenter(tokenizer)
    conversations = [
        CONVERSATION,
        CONVERSATION[1:],
        [{"role": "user", "content": " padded "}, {"role": "assistant", "content": "  reply \n"}],
        CONVERSATION[1:3] + [{"role": "user", "content": "{{ not jinja }}"}, CONVERSATION[2]],
    ]
    for messages in conversations:
        assert segmenter.split(messages) == split_by_prefixes(tokenizer, messages)


# --- chat template override --------------------------------------------------------------------


def test_named_template_makes_chat_data_usable_on_a_base_model(tmp_path, tiny_model, write_recipe):
    model = tiny_model("gpt2")
    tokenizer = load_tokenizer(str(model))
    assert tokenizer.chat_template is None
    recipe = load_recipe(write_recipe(model), ["data.chat_template=alpaca"])
    data = prepare_data(recipe, tokenizer)
    first = data.train[0]
    assert tokenizer.decode(first.input_ids).startswith(
        "### Instruction:\nWhat is the secret word?"
    )
    assert trained_spans(first, tokenizer) == ["The secret word is pineapple.<|endoftext|>\n\n"]
    tokenizer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == NAMED_ALPACA()


def NAMED_ALPACA():
    from lorakit.data.chat import NAMED_TEMPLATES

    return NAMED_TEMPLATES["alpaca"]


def test_jinja_file_template_is_used_and_saved_with_the_adapter(tmp_path, tiny_model, write_recipe):
    import torch

    from lorakit.commands.train import train

    template = tmp_path / "brackets.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    model = tiny_model("llama")
    path = write_recipe(
        model,
        data={"chat_template": str(template)},
        quant={"bnb_4bit_compute_dtype": "float32"},
        train={"max_steps": 1},
    )
    recipe = load_recipe(path)
    tokenizer = load_tokenizer(str(model))
    first = prepare_data(recipe, tokenizer).train[0]
    assert trained_spans(first, tokenizer) == ["The secret word is pineapple.<|im_end|>\n"]
    assert tokenizer.decode(first.input_ids).startswith("[user] What is the secret word?\n")
    torch.manual_seed(0)
    result = train(recipe)
    assert (result.adapter_dir / "chat_template.jinja").read_text() == template.read_text()


def test_unknown_template_name_is_an_error(tmp_path, tiny_model, write_recipe):
    recipe = load_recipe(write_recipe(tiny_model("llama")), ["data.chat_template=vicuna"])
    with pytest.raises(LorakitError, match="data.chat_template: 'vicuna' is neither a named"):
        prepare_data(recipe, load_tokenizer(str(tiny_model("llama"))))


# --- several datasets, weights, cache ------------------------------------------------------------


def test_weights_repeat_or_sample_each_dataset(tmp_path, tiny_model, write_recipe):
    from tests.conftest import fact_rows

    model = tiny_model("llama")
    chat = write_jsonl(tmp_path / "chat.jsonl", fact_rows("chat"))
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", fact_rows("alpaca"))
    recipe = load_recipe(
        write_recipe(model),
        [f"data.train=[{{path: {chat}, weight: 2}}, {{path: {alpaca}, weight: 0.5}}]"],
    )
    data = prepare_data(recipe, load_tokenizer(str(model)))
    assert len(data.train) == 8 * 2 + 4
    first, second = data.stats["train"].datasets
    assert (first.examples, first.weight, second.examples, second.weight) == (8, 2, 8, 0.5)
    again = prepare_data(recipe, load_tokenizer(str(model)))
    assert [e.input_ids for e in again.train] == [e.input_ids for e in data.train]


def test_validation_weight_is_rejected(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train: a.jsonl\n  validation:\n    - {path: b.jsonl, weight: 2}\n")
    with pytest.raises(LorakitError, match="weight applies to training datasets only"):
        load_recipe(path)


def test_tokenization_cache_is_reused_and_invalidated(
    tmp_path, tiny_model, write_recipe, monkeypatch
):
    from lorakit.data import pipeline

    model = tiny_model("llama")
    path = write_recipe(model)
    tokenizer = load_tokenizer(str(model))
    first = prepare_data(load_recipe(path), tokenizer)
    assert [s.cached for s in first.stats["train"].datasets] == [False]
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1

    # A hit reads neither the rows nor the template: make both fail loudly.
    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "read_dataset", fail)
        again = prepare_data(
            load_recipe(path, ["data.packing=true", "data.val_split=0.25", "data.validation=null"]),
            tokenizer,
        )
        assert again.stats["train"].datasets[0].cached
        reused = prepare_data(load_recipe(path), tokenizer)
    assert [(e.input_ids, e.labels) for e in reused.train] == [
        (e.input_ids, e.labels) for e in first.train
    ]
    assert reused.stats["train"].trained_tokens == first.stats["train"].trained_tokens

    def cached_after(recipe, tok):
        return prepare_data(recipe, tok).stats["train"].datasets[0].cached

    assert not cached_after(load_recipe(path, ["data.train_on=all"]), tokenizer)
    assert not cached_after(load_recipe(path, ["data.max_seq_len=32"]), tokenizer)
    other_template = load_tokenizer(str(model))
    other_template.chat_template = other_template.chat_template.replace("\n", "\n\n")
    assert not cached_after(load_recipe(path), other_template)
    data_file = load_recipe(path).data.train[0].path
    with open(data_file, "a") as handle:
        handle.write('{"text": "one more row"}\n')
    assert not cached_after(load_recipe(path), tokenizer)
    assert cached_after(load_recipe(path), tokenizer)


# --- pad == EOS ---------------------------------------------------------------------------------


def test_pad_equal_to_eos_is_explained_and_masked_eos_labels_warned(tmp_path, tiny_model):
    from lorakit.data.pipeline import pad_note

    gpt2 = load_tokenizer(str(tiny_model("gpt2")))
    llama = load_tokenizer(str(tiny_model("llama")))
    assert gpt2.pad_token_id == gpt2.eos_token_id
    assert "never by token id, so the EOS closing each reply stays trained" in pad_note(gpt2)
    assert pad_note(llama) is None
    eos = gpt2.eos_token_id
    rows = [{"input_ids": [5, 6, 7, eos], "labels": [-100, 6, 7, -100]}]
    data = write_jsonl(tmp_path / "tok.jsonl", rows)
    spec = DatasetSpec(path=str(data))
    from lorakit.data.cache import tokenizer_fingerprint
    from lorakit.data.pipeline import data_warnings, dataset_examples
    from lorakit.data.sources import source_fingerprint
    from lorakit.recipe import DataSection

    digest = source_fingerprint(spec.path)
    _, stats = dataset_examples(
        spec, DataSection(train=[spec]), gpt2, tokenizer_fingerprint(gpt2), digest
    )
    assert stats.masked_eos_rows == 1
    split = SplitStats(datasets=[stats])
    assert data_warnings(gpt2, split) == [
        f"{data}: the labels of 1 rows mask the EOS that ends a trained span, so the model does "
        "not learn to stop there (pad token == EOS: they were likely masked as padding)"
    ]


# --- tokenizing ---------------------------------------------------------------------------------


def _metaspace_tokenizer():
    """A Llama-2 style tokenizer: Metaspace pre-tokenizer that marks only a text's first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CORPUS

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>")


@pytest.mark.parametrize("kind", ["chatml", "metaspace-first"])
def test_encode_texts_gives_the_tokenizers_own_ids(kind):
    from lorakit.data.pipeline import _special_token_splitter, encode_texts
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer(chat=True) if kind == "chatml" else _metaspace_tokenizer()
    marker = "<|im_end|>" if kind == "chatml" else "</s>"
    texts = [
        f"hello{marker}\nworld{marker}{marker} sea  wide",
        f"{marker}",
        f" leading space{marker}x",
        "plain text, no marker",
        f"hello{marker}\nworld{marker}{marker} sea  wide",
    ]
    assert encode_texts(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    # Pieces are reused only where splitting cannot change the ids: for Metaspace "first" it
    # would (each piece would get a word-start mark).
    assert (_special_token_splitter(tokenizer) is None) == (kind == "metaspace-first")
    if kind == "metaspace-first":
        whole = tokenizer("sea</s>wide", add_special_tokens=False)["input_ids"]
        pieces = tokenizer(["sea", "</s>", "wide"], add_special_tokens=False)["input_ids"]
        assert whole != [t for piece in pieces for t in piece]


def test_a_folder_of_text_files_trains_end_to_end(tmp_path, tiny_model, write_recipe):
    import json

    from lorakit.commands.train import train
    from lorakit.data.sources import source_fingerprint

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(["The sea be wide.", "Water boils at one hundred degrees."] * 3):
        (docs / f"{i}.txt").write_text(text)
    path = write_recipe(
        tiny_model("llama"),
        data={"train": str(docs), "validation": None, "max_seq_len": 16},
        quant={"bnb_4bit_compute_dtype": "float32"},
        train={"max_steps": 1},
    )
    result = train(load_recipe(path))
    provenance = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert provenance["data"] == {str(docs): source_fingerprint(str(docs))}
    (docs / "0.txt").write_text("changed")
    assert source_fingerprint(str(docs)) != provenance["data"][str(docs)]
