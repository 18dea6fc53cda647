"""Dataset formats: turn one row into text segments, each marked trained or masked.

Segments are split exactly where the chat template switches between prompt and response, so
tokenizing them one by one gives the same tokens as the rendered conversation, and the label
mask follows the template token by token. The end-of-turn / EOS token that closes a response
belongs to the response, so the model learns to stop.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lorakit.data.sources import Row
from lorakit.errors import LorakitError

Segment = tuple[str, bool]
"""(text, trained)"""

ROLES = ("system", "user", "assistant")

# Used when the tokenizer has no chat template (base models such as GPT-2).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def detect_format(row: Row) -> str:
    keys = row.data.keys()
    if "messages" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise LorakitError(
        f"{row.where}: cannot tell the dataset format from keys {sorted(keys)} "
        "(expected 'messages', 'instruction'+'output', or 'text'; or set format:)"
    )


def check_row(row: Row, fmt: str) -> None:
    """Raise a one-line error naming the file and row when a row lacks what its format needs."""
    data = row.data
    if fmt == "chat":
        messages = _field(row, "messages", list)
        if not messages:
            raise LorakitError(f"{row.where}: 'messages' is empty")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise LorakitError(f"{row.where}: messages[{i}] is not an object")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise LorakitError(
                    f"{row.where}: messages[{i}] has role {role!r} (expected {', '.join(ROLES)})"
                )
            if not isinstance(content, str):
                raise LorakitError(f"{row.where}: messages[{i}] needs a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise LorakitError(f"{row.where}: no assistant message to learn from")
    elif fmt == "alpaca":
        _field(row, "instruction", str)
        _field(row, "output", str)
        if data.get("input") is not None and not isinstance(data["input"], str):
            raise LorakitError(f"{row.where}: field 'input' must be a string")
    elif fmt == "text":
        _field(row, "text", str)


def _field(row: Row, name: str, kind: type) -> Any:
    if name not in row.data or row.data[name] is None:
        raise LorakitError(f"{row.where}: missing required field '{name}'")
    value = row.data[name]
    if not isinstance(value, kind):
        raise LorakitError(f"{row.where}: field '{name}' must be a {kind.__name__}")
    if kind is str and not value.strip():
        raise LorakitError(f"{row.where}: field '{name}' is empty")
    return value


def alpaca_user_text(instruction: str, input_text: str | None) -> str:
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def render_segments(
    data: dict[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase, train_on: str
) -> list[Segment]:
    if fmt == "text":
        return _with_special_ends(tokenizer, [(data["text"], True)], close_with_eos=True)
    if fmt == "alpaca":
        if tokenizer.chat_template is None:
            template = PLAIN_PROMPT_WITH_INPUT if data.get("input") else PLAIN_PROMPT
            prompt = template.format(instruction=data["instruction"], input=data.get("input"))
            segments = [(prompt, train_on == "all"), (data["output"], True)]
            return _with_special_ends(tokenizer, segments, close_with_eos=True)
        messages = [
            {"role": "user", "content": alpaca_user_text(data["instruction"], data.get("input"))},
            {"role": "assistant", "content": data["output"]},
        ]
        if data.get("system"):
            messages.insert(0, {"role": "system", "content": data["system"]})
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
    return chat_segments(messages, tokenizer, train_on)


def chat_segments(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, train_on: str
) -> list[Segment]:
    """Split the rendered conversation at each assistant turn's start and end."""
    if tokenizer.chat_template is None:
        raise LorakitError(
            "chat data needs a tokenizer with a chat template; this model has none "
            "(use alpaca or text data)"
        )
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[: i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LorakitError(
                "the chat template does not render conversations turn by turn as prefixes, "
                "so prompt and response tokens cannot be separated"
            )
        segments.append((prompt[len(done) :], train_on == "all"))
        segments.append((full[len(prompt) :], True))
        done = full
    rest = render_chat(tokenizer, messages)[len(done) :]
    if rest:
        segments.append((rest, train_on == "all"))
    return _with_special_ends(tokenizer, segments, close_with_eos=False)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str) -> str:
    """The text a model is given to answer `user_text`, in the format it was trained on."""
    if tokenizer.chat_template is None:
        return _bos_text(tokenizer) + PLAIN_PROMPT.format(instruction=user_text)
    messages = [{"role": "user", "content": user_text}]
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def _bos_text(tokenizer: PreTrainedTokenizerBase) -> str:
    # Templates carry their own BOS; plain text gets one only if the tokenizer defines it
    # and it differs from EOS (GPT-2 uses one token for both).
    bos = tokenizer.bos_token
    if bos is None or bos == tokenizer.eos_token:
        return ""
    return bos


def _with_special_ends(
    tokenizer: PreTrainedTokenizerBase, segments: list[Segment], close_with_eos: bool
) -> list[Segment]:
    if close_with_eos:
        segments = [*segments, (tokenizer.eos_token, True)]
        bos = _bos_text(tokenizer)
        if bos:
            segments = [(bos, False), *segments]
    return [s for s in segments if s[0]]
