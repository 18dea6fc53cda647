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
