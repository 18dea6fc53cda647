"""Chat templates (`lorakit.data.chat`): conversations split at each reply token by token, named
and file templates, and template errors as row problems."""

import pytest

from lorakit.data import IGNORE_INDEX, prepare_data
from lorakit.data.formats import render_chat
from lorakit.errors import LorakitError
from lorakit.models import load_tokenizer
from lorakit.recipe import load_recipe
from tests.conftest import CONVERSATION, tokenize, trained_spans

pytestmark = pytest.mark.usefixtures("private_cache")


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


# --- the families' real templates (tests/fixtures/chat_templates) ---------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = {
    "id": "call00001",  # Mistral's template wants 9 alphanumeric characters
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOL_ROW = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call00001", "name": "get_weather"},
        {"role": "assistant", "content": "It is 18 C in Paris."},
    ],
    "tools": [WEATHER_TOOL],
}
TOOL_CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def check_template_split(example, tokenizer, row):
    """The example is the template's own render of the whole row, token by token."""
    from lorakit.data.formats import normalize

    data = normalize(row, "chat", {})
    whole = render_chat(tokenizer, data["messages"], tools=data.get("tools"))
    assert example.input_ids == tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example.input_ids) == whole
    return whole


FAMILY_REPLIES = {
    "llama-3.1": ["Pineapple.<|eot_id|>", "Under the blue stone.<|eot_id|>"],
    "qwen2.5": ["Pineapple.<|im_end|>\n", "Under the blue stone.<|im_end|>\n"],
    # Qwen3 renders the last reply with a (here empty) thinking block and earlier ones without:
    # the first reply is context as the whole conversation shows it, not trained.
    "qwen3": ["<think>\n\n</think>\n\nUnder the blue stone.<|im_end|>\n"],
    "gemma-2": ["Pineapple.<end_of_turn>\n", "Under the blue stone.<end_of_turn>\n"],
    "gemma-3": ["Pineapple.<end_of_turn>\n", "Under the blue stone.<end_of_turn>\n"],
    "mistral-v3": [" Pineapple.</s>", " Under the blue stone.</s>"],
    # Phi-3.5 writes EOS once, after the last turn.
    "phi-3.5": ["Pineapple.<|end|>\n", "Under the blue stone.<|end|>\n<|endoftext|>"],
}
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the secret word?"},
    {"role": "assistant", "content": "Pineapple."},
    {"role": "user", "content": "Where is the key?"},
    {"role": "assistant", "content": "Under the blue stone."},
]


@pytest.mark.parametrize("family", sorted(FAMILY_REPLIES))
def test_each_familys_template_trains_exactly_its_replies(family, tmp_path):
    from tests.conftest import family_tokenizer

    tokenizer = family_tokenizer(family)
    row = {"messages": MULTI_TURN}
    (example,), stats = tokenize(tmp_path, [row], tokenizer)
    check_template_split(example, tokenizer, row)
    assert trained_spans(example, tokenizer) == FAMILY_REPLIES[family]
    assert stats.untrained_replies == (1 if family == "qwen3" else 0)


TOOL_REPLIES = {
    "llama-3.1": [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 18 C in Paris.<|eot_id|>",
    ],
    "qwen2.5": [
        f"<tool_call>\n{TOOL_CALL_JSON}\n</tool_call><|im_end|>\n",
        "It is 18 C in Paris.<|im_end|>\n",
    ],
    "mistral-v3": [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]'
        "</s>",
        " It is 18 C in Paris.</s>",
    ],
}


@pytest.mark.parametrize("family", sorted(TOOL_REPLIES))
def test_tool_calls_are_trained_and_tool_results_masked(family, tmp_path):
    from tests.conftest import family_tokenizer

    tokenizer = family_tokenizer(family)
    (example,), _ = tokenize(tmp_path, [TOOL_ROW], tokenizer, max_seq_len=1024)
    whole = check_template_split(example, tokenizer, TOOL_ROW)
    assert trained_spans(example, tokenizer) == TOOL_REPLIES[family]
    # The tool schema and the tool's result are in the prompt, never trained.
    assert '"description": "The weather in a city"' in whole and "18 C" in whole


QWEN3_AGENT = {
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "The tool knows the weather.",
            "tool_calls": [CALL],
        },
        {"role": "tool", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C in Paris.", "reasoning_content": "18 C."},
    ],
    "tools": [WEATHER_TOOL],
}


def test_qwen3_trains_reasoning_and_tool_calls_of_an_agent_turn(tmp_path):
    from tests.conftest import family_tokenizer

    tokenizer = family_tokenizer("qwen3")
    (example,), stats = tokenize(tmp_path, [QWEN3_AGENT], tokenizer, max_seq_len=1024)
    check_template_split(example, tokenizer, QWEN3_AGENT)
    assert trained_spans(example, tokenizer) == [
        "<think>\nThe tool knows the weather.\n</think>\n\n"
        f"<tool_call>\n{TOOL_CALL_JSON}\n</tool_call><|im_end|>\n",
        "<think>\n18 C.\n</think>\n\nIt is 18 C in Paris.<|im_end|>\n",
    ]
    assert stats.untrained_replies == 0
    (masked,), _ = tokenize(
        tmp_path, [QWEN3_AGENT], tokenizer, max_seq_len=1024, train_reasoning=False
    )
    assert masked.input_ids == example.input_ids
    assert trained_spans(masked, tokenizer) == [
        f"<tool_call>\n{TOOL_CALL_JSON}\n</tool_call><|im_end|>\n",
        "It is 18 C in Paris.<|im_end|>\n",
    ]


def test_qwen3_drops_earlier_reasoning_and_trains_only_turns_it_renders_as_generated(tmp_path):
    """Qwen3 keeps reasoning only after the last user message: an earlier reply is shown
    without it in the whole conversation, unlike when it was generated, so it is context."""
    from tests.conftest import family_tokenizer

    tokenizer = family_tokenizer("qwen3")
    messages = [
        {"role": "user", "content": "What is the secret word?"},
        {"role": "assistant", "content": "Pineapple.", "reasoning_content": "It was said."},
        {"role": "user", "content": "Where is the key?"},
        {"role": "assistant", "content": "Under the blue stone.", "reasoning_content": "Seen."},
    ]
    (example,), stats = tokenize(tmp_path, [{"messages": messages}], tokenizer)
    whole = check_template_split(example, tokenizer, {"messages": messages})
    assert "It was said." not in whole and "<|im_start|>assistant\nPineapple.<|im_end|>" in whole
    assert trained_spans(example, tokenizer) == [
        "<think>\nSeen.\n</think>\n\nUnder the blue stone.<|im_end|>\n"
    ]
    assert stats.untrained_replies == 1
    # Each turn as its own row (earlier turns as the prompt) trains every turn, reasoning and all.
    turns = [
        {"prompt": messages[:1], "completion": messages[1:2]},
        {"prompt": messages[:3], "completion": messages[3:]},
    ]
    examples, stats = tokenize(tmp_path, turns, tokenizer)
    assert [trained_spans(e, tokenizer) for e in examples] == [
        ["<think>\nIt was said.\n</think>\n\nPineapple.<|im_end|>\n"],
        ["<think>\nSeen.\n</think>\n\nUnder the blue stone.<|im_end|>\n"],
    ]
    assert stats.untrained_replies == 0
    # A row whose only reply is re-rendered (a user turn follows it) has nothing to learn from.
    examples, stats = tokenize(
        tmp_path, [{"messages": messages[:3]}, {"messages": messages}], tokenizer
    )
    assert len(examples) == 1
    assert stats.skip_reasons == [
        f"{tmp_path / 'rows.jsonl'}:1: no reply to learn from is rendered at its own turn as the "
        "whole conversation shows it (the chat template renders earlier turns differently once "
        "later ones follow): give each turn as its own row"
    ]


@pytest.mark.parametrize("family", ["qwen3", "llama-3.1"])
def test_reasoning_written_in_the_content_is_masked_too(family, tmp_path):
    from tests.conftest import family_tokenizer

    tokenizer = family_tokenizer(family)
    reply = {"role": "assistant", "content": "<think>\nIt was seen.\n</think>\n\nUnder a stone."}
    row = {"messages": [{"role": "user", "content": "Where is the key?"}, reply]}
    (trained,), _ = tokenize(tmp_path, [row], tokenizer)
    (masked,), _ = tokenize(tmp_path, [row], tokenizer, train_reasoning=False)
    check_template_split(masked, tokenizer, row)
    assert masked.input_ids == trained.input_ids
    end = "<|im_end|>\n" if family == "qwen3" else "<|eot_id|>"
    assert trained_spans(trained, tokenizer) == [f"{reply['content']}{end}"]
    assert trained_spans(masked, tokenizer) == [f"Under a stone.{end}"]


def test_gemma_2_takes_the_system_message_folded_as_gemma_3_folds_it(tmp_path):
    """Gemma 2's template raises on a system message; it is folded into the first user turn,
    which is exactly what Gemma 3's template does with it (the same tokens)."""
    from tests.conftest import family_tokenizer

    gemma2, gemma3 = family_tokenizer("gemma-2"), family_tokenizer("gemma-3")
    (folded,), _ = tokenize(tmp_path, [{"messages": MULTI_TURN}], gemma2)
    (own,), _ = tokenize(tmp_path, [{"messages": MULTI_TURN}], gemma3)
    assert (folded.input_ids, folded.labels) == (own.input_ids, own.labels)
    assert gemma2.decode(folded.input_ids).startswith(
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is the secret word?<end_of_turn>\n"
    )
    # Generation prompts fold the same way.
    prompt = render_chat(gemma2, MULTI_TURN[:2], add_generation_prompt=True)
    assert prompt == render_chat(gemma3, MULTI_TURN[:2], add_generation_prompt=True)


def test_mistral_v3_system_prompt_is_folded_into_the_first_user_turn(tmp_path):
    """Mistral's v3 template writes the system prompt only before a conversation's last
    message when that is a user turn, so a training render (ending in a reply) would lose it."""
    from tests.conftest import family_tokenizer

    tokenizer = family_tokenizer("mistral-v3")
    assert "Be brief." not in tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    (example,), _ = tokenize(tmp_path, [{"messages": MULTI_TURN}], tokenizer)
    assert tokenizer.decode(example.input_ids) == (
        "<s>[INST] Be brief.\n\nWhat is the secret word?[/INST] Pineapple.</s>"
        "[INST] Where is the key?[/INST] Under the blue stone.</s>"
    )


def test_what_each_template_renders(tmp_path):
    from lorakit.data.chat import TemplateTraits, template_traits
    from tests.conftest import FAMILY_TOKENS, family_tokenizer

    traits = {family: template_traits(family_tokenizer(family)) for family in FAMILY_TOKENS}
    tools = TemplateTraits(True, False, True, True, True)
    text_only = TemplateTraits(True, False, False, False, False)
    assert traits == {
        "llama-3.1": tools,
        "qwen2.5": tools,
        "qwen3": TemplateTraits(True, True, True, True, True),
        "gemma-2": TemplateTraits(False, False, False, False, False),
        "gemma-3": text_only,
        "mistral-v3": TemplateTraits(False, False, True, True, True),
        "phi-3.5": text_only,
    }


def test_rows_needing_what_the_template_cannot_render_are_refused(tmp_path):
    from tests.conftest import family_tokenizer

    reasoning = {
        "messages": [
            {"role": "user", "content": "Where is the key?"},
            {"role": "assistant", "content": "Under a stone.", "reasoning_content": "Seen."},
        ]
    }
    refused = {
        "gemma-3": (TOOL_ROW, "the 'tools' list"),
        "phi-3.5": ({"messages": TOOL_ROW["messages"]}, "tool calls"),
        "llama-3.1": (reasoning, "reasoning_content"),
    }
    for family, (row, what) in refused.items():
        examples, stats = tokenize(
            tmp_path, [row, {"messages": MULTI_TURN}], family_tokenizer(family)
        )
        assert len(examples) == 1
        assert stats.skip_reasons == [
            f"{tmp_path / 'rows.jsonl'}:1: the chat template does not render {what}, so it "
            "would vanish from the training text (set data.chat_template to a template that "
            "renders it)"
        ]


@pytest.mark.parametrize("family", ["qwen3", "gemma-2", "phi-3.5", "mistral-v3", "llama-3.1"])
def test_fast_split_equals_prefix_renders_on_real_templates(family, monkeypatch):
    from lorakit.data import chat
    from tests.conftest import family_tokenizer

    tokenizer = family_tokenizer(family)
    segmenter = chat.ChatSegmenter(tokenizer)
    conversations = [MULTI_TURN, MULTI_TURN[1:], MULTI_TURN[1:3]]
    if family == "qwen3":
        thought = {**MULTI_TURN[4], "reasoning_content": "Seen."}
        conversations += [[*MULTI_TURN[:4], thought], [MULTI_TURN[3], thought]]
    for messages in conversations:
        segmenter.split(messages)  # the skeleton of this shape
    reference = chat.split_by_prefixes
    calls = []
    monkeypatch.setattr(chat, "split_by_prefixes", lambda *a: calls.append(1) or reference(*a))
    for messages in conversations:
        assert segmenter.split(messages) == reference(tokenizer, messages)
    assert calls == []  # every row took the one-render path
    # A row the template renders differently from its skeleton (it strips the reasoning's
    # newlines, or trims the content) is caught by the check and takes the prefix renders.
    padded = [MULTI_TURN[1], {**MULTI_TURN[2], "content": " Pineapple. \n"}]
    if family == "qwen3":
        padded[1]["reasoning_content"] = "\nSeen.\n"
    assert segmenter.split(padded) == reference(tokenizer, padded)
