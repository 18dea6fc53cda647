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


# --- tools, tool calls and reasoning ----------------------------------------------------------

GET_WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"c": "P"}}}


def test_tool_use_rows_are_normalized_to_openais_shape():
    from lorakit.data.formats import normalize

    row = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            # OpenAI's spelling: arguments as a JSON string, no content with the call.
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call00001",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"c": "P"}'},
                    }
                ],
            },
            {"role": "tool", "content": {"t": 18}, "tool_call_id": "call00001"},
            # A bare call beside text, and reasoning under another common name.
            {
                "role": "assistant",
                "content": "Checking again.",
                "reasoning": "Once more.",
                "tool_calls": [{"name": "get_weather", "arguments": {"c": "P"}}],
            },
            {"role": "ipython", "content": "18", "name": "get_weather"},
            {"role": "assistant", "content": "18 C.", "reasoning_content": " "},
        ],
        "tools": [GET_WEATHER],
    }
    assert normalize(row, "chat", {}) == {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{**WEATHER_CALL, "id": "call00001"}],
            },
            {"role": "tool", "content": '{"t": 18}', "tool_call_id": "call00001"},
            {
                "role": "assistant",
                "content": "Checking again.",
                "reasoning_content": "Once more.",
                "tool_calls": [WEATHER_CALL],
            },
            {"role": "tool", "content": "18", "name": "get_weather"},
            {"role": "assistant", "content": "18 C."},
        ],
        "tools": [{"type": "function", "function": GET_WEATHER}],
    }


def test_llama_factory_sharegpt_tool_turns_read_as_the_same_chat(tmp_path, tiny_model):
    """LLaMA-Factory's ShareGPT: `function_call` and `observation` turns, `system` and `tools`
    (a JSON string) beside the conversation."""
    import json

    from lorakit.data.formats import normalize

    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": json.dumps(WEATHER_CALL["function"])},
            {"from": "observation", "value": "18"},
            {"from": "gpt", "value": "18 C."},
        ],
        "system": "Be brief.",
        "tools": json.dumps([GET_WEATHER]),
    }
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
            {"role": "tool", "content": "18"},
            {"role": "assistant", "content": "18 C."},
        ],
        "tools": [{"type": "function", "function": GET_WEATHER}],
    }
    assert normalize(sharegpt, "sharegpt", {}) == chat


def test_bad_tool_and_reasoning_shapes_are_row_problems_naming_the_message(tmp_path):
    from lorakit.data.formats import RowProblem, normalize

    user = {"role": "user", "content": "Weather?"}

    def reply(**fields):
        return {"messages": [user, {"role": "assistant", **fields}]}

    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{bad"}}
    cases = [
        (
            reply(tool_calls=[{"function": {"arguments": {}}}]),
            "messages[1].tool_calls[0]: the tool call needs a function 'name'",
        ),
        (reply(tool_calls=[call]), "messages[1].tool_calls[0]: 'arguments' is not valid JSON"),
        (
            reply(tool_calls=[{"name": "f", "arguments": "[1]"}]),
            "messages[1].tool_calls[0]: 'arguments' must be a JSON object",
        ),
        (
            reply(tool_calls=[5]),
            'messages[1].tool_calls[0] must be a function call: {"type": '
            '"function", "function": {"name": ..., "arguments": {...}}}',
        ),
        (
            reply(tool_calls="get_weather"),
            "messages[1].tool_calls must be a tool call or a list of them (or JSON of either)",
        ),
        (reply(content=""), "messages[1] (assistant) has empty content"),
        (
            reply(content="Sunny.", reasoning_content=["a"]),
            "messages[1]: 'reasoning_content' must be a string",
        ),
        (
            {"messages": [user, {"role": "tool", "content": "18"}]},
            "messages[1] (tool) does not follow an assistant turn with tool calls",
        ),
        (
            {"messages": [{**user, "tool_calls": [call]}]},
            "messages[0] (user) has tool_calls: only replies call tools",
        ),
        (
            {"messages": [user, {"role": "assistant", "content": "Hi."}], "tools": [{"x": 1}]},
            "field 'tools' item 0 must be a function schema with a 'name'",
        ),
        (
            {"messages": [user, {"role": "assistant", "content": "Hi."}], "tools": "[{"},
            "field 'tools' is not valid JSON",
        ),
    ]
    for row, reason in cases:
        with pytest.raises(RowProblem) as caught:
            normalize(row, "chat", {})
        assert str(caught.value) == reason


def test_columns_map_tools_and_reasoning_fields(tmp_path):
    from lorakit.data.formats import normalize

    row = {
        "dialog": [
            {"speaker": "user", "text": "Where is the key?"},
            {"speaker": "assistant", "text": "Under a stone.", "thought": "I saw it."},
        ],
        "functions": [GET_WEATHER],
    }
    columns = {
        "messages": "dialog",
        "role": "speaker",
        "content": "text",
        "reasoning_content": "thought",
        "tools": "functions",
    }
    assert normalize(row, "chat", columns) == {
        "messages": [
            {"role": "user", "content": "Where is the key?"},
            {"role": "assistant", "content": "Under a stone.", "reasoning_content": "I saw it."},
        ],
        "tools": [{"type": "function", "function": GET_WEATHER}],
    }


def test_train_reasoning_masks_the_reasoning_but_not_the_answer(tmp_path, write_recipe):
    """Through the recipe key, on Qwen3's real template: same tokens, fewer trained."""
    from lorakit.data import prepare_data
    from tests.conftest import family_tokenizer

    reply = {"role": "assistant", "content": "Under a stone.", "reasoning_content": "I saw it."}
    rows = [{"messages": [{"role": "user", "content": "Where is the key?"}, reply]}]
    data = write_jsonl(tmp_path / "thinking.jsonl", rows)
    tokenizer = family_tokenizer("qwen3")
    prepared = {}
    for flag in (True, False):
        recipe = write_recipe(
            "tokenizer-only", data={"train": str(data), "validation": None, "train_reasoning": flag}
        )
        prepared[flag] = prepare_data(load_recipe(recipe), tokenizer).train[0]
    assert prepared[True].input_ids == prepared[False].input_ids
    assert trained_spans(prepared[True], tokenizer) == [
        "<think>\nI saw it.\n</think>\n\nUnder a stone.<|im_end|>\n"
    ]
    assert trained_spans(prepared[False], tokenizer) == ["Under a stone.<|im_end|>\n"]
