"""Dataset formats: read one row into its format's fields, then into text segments marked
trained or masked.

Each format is one `DataFormat` entry in `FORMATS` (at the end of this file): the fields that
identify it for `format: auto`, the fields it reads (which a recipe's `columns:` may map onto a
file's own column names), a one-line summary (help texts, the recipe reference), and its two
steps: normalize a row into its fields (checked), and render those into segments. The recipe
schema, auto-detection, its error message and the command-line help are all built from it.

Segments are split exactly where the chat template switches between prompt and reply (see
`chat.py`), so the label mask follows the template token by token. The end-of-turn / EOS token
that closes a reply belongs to the reply, so the model learns to stop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorakit.data.chat import ChatSegmenter, RowProblem, render_chat
from lorakit.data.sources import Row
from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["FORMATS", "IGNORE_INDEX", "RowProblem", "render_chat", "render_prompt"]

Segment = tuple[str, bool]
"""(text, trained)"""

IGNORE_INDEX = -100
"""The label of a token the loss skips (PyTorch's cross-entropy default)."""

ROLES = ("system", "user", "assistant", "tool")
# Speaker names of ShareGPT and its variants for the four roles. LLaMA-Factory's ShareGPT
# writes a tool call as its own turn (`function_call`, the call as JSON) and a tool's result as
# `observation`; Llama 3.1 calls the tool role `ipython`, OpenAI's older API `function`.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "ipython": "tool",
    "observation": "tool",
    "function": "tool",
}
MESSAGE_FIELDS = ("role", "content", "reasoning_content")
"""Keys inside each message that `columns:` may rename."""
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
"""The names datasets give an assistant message's reasoning (transformers reads all three)."""

NO_CHAT_TEMPLATE = (
    "chat data needs a tokenizer with a chat template; this model has none "
    "(set data.chat_template, or use alpaca, prompt_completion or text data)"
)

# Used when the tokenizer has no chat template (base models such as GPT-2).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class PairSegments:
    """A preference row: the segments of prompt + chosen answer and of prompt + rejected."""

    chosen: list[Segment]
    rejected: list[Segment]


@dataclass(frozen=True)
class Tokens:
    """A pre-tokenized row: used as is, no template, no EOS added."""

    input_ids: list[int]
    labels: list[int] | None


def rename_columns(data: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The row with the recipe's `columns` applied: field name ← the file's column name."""
    renamed = dict(data)
    for field, column in columns.items():
        if field in MESSAGE_FIELDS:
            continue  # keys inside messages, applied by normalize()
        if column in data:
            renamed[field] = data[column]
    return renamed


def detect_format(rows: list[Row], columns: dict[str, str] | None = None) -> str:
    """The format the first rows' fields point to; the first row names the error."""
    for row in rows[:10]:
        keys = rename_columns(row.data, columns or {}).keys()
        for fmt in FORMATS.values():
            if all(f in keys for f in fmt.signature):
                return fmt.name
    keys = sorted(rows[0].data.keys())
    present = set(rename_columns(rows[0].data, columns or {}))
    partial = [
        (fmt, [f for f in fmt.signature if f not in present])
        for fmt in FORMATS.values()
        if len(fmt.signature) > 1 and any(f in present for f in fmt.signature)
    ]
    if partial:
        fmt, missing = partial[0]
        raise LorakitError(
            f"{rows[0].where}: missing field {missing[0]!r}: the keys {keys} look like "
            f"{fmt.name} data, which needs {' and '.join(repr(f) for f in fmt.signature)} "
            "(or set format: and columns:)"
        )
    expected = ", ".join("+".join(repr(f) for f in fmt.signature) for fmt in FORMATS.values())
    raise LorakitError(
        f"{rows[0].where}: cannot tell the dataset format from keys {keys} "
        f"(expected {expected}; or set format: and columns:)"
    )


def normalize(data: dict[str, Any], fmt: str, columns: dict[str, str]) -> dict[str, Any]:
    """The row reduced to its format's fields, checked; raises RowProblem."""
    data = rename_columns(data, columns) if columns else data
    return FORMATS[fmt].normalize(_Fields(data, columns))


def _normalize_chat(field: _Fields) -> dict[str, Any]:
    messages = _messages(field.get("messages", list), "messages", field.columns)
    return _with_tools({"messages": messages}, field)


def _normalize_sharegpt(field: _Fields) -> dict[str, Any]:
    name = "conversations"
    messages = _messages(field.get(name, list), name, field.columns)
    system = field.optional_text("system")  # LLaMA-Factory's ShareGPT keeps it beside the turns
    if system and messages[0]["role"] == "system":
        raise RowProblem(f"both {field.label('system')} and a system turn in '{name}'")
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return _with_tools({"messages": messages}, field)


def _with_tools(row: dict[str, Any], field: _Fields) -> dict[str, Any]:
    """The row with its `tools` (the JSON schemas of the functions it may call), if any."""
    tools = _tools(field.data.get("tools"), field.label("tools"))
    return {**row, "tools": tools} if tools else row


def _normalize_alpaca(field: _Fields) -> dict[str, Any]:
    return {
        "instruction": field.text("instruction"),
        "input": field.optional_text("input"),
        "output": field.text("output"),
        "system": field.optional_text("system"),
    }


def _normalize_prompt_completion(field: _Fields) -> dict[str, Any]:
    prompt, completion = field.get("prompt", (str, list)), field.get("completion", (str, list))
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise RowProblem(f"field {field.label('completion')} is empty")
        if field.data.get("tools"):
            raise RowProblem(f"field {field.label('tools')} needs message lists, not strings")
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = _messages(prompt + completion, "prompt+completion", field.columns)
        completion_roles = {m["role"] for m in messages[len(messages) - len(completion) :]}
        if "assistant" not in completion_roles:
            raise RowProblem("the completion has no assistant message to learn from")
        row = {"messages": messages, "first_reply": len(messages) - len(completion)}
        return _with_tools(row, field)
    raise RowProblem("'prompt' and 'completion' must both be strings or both message lists")


def _normalize_preference(field: _Fields) -> dict[str, Any]:
    """A prompt and two answers to it, the chosen and the rejected, in TRL's shapes: strings
    (`prompt`, `chosen`, `rejected`), or message lists with an explicit `prompt` list or with
    the prompt implicit as the messages both conversations start with."""
    chosen, rejected = field.get("chosen", (str, list)), field.get("rejected", (str, list))
    prompt = field.data.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise RowProblem("'prompt' must be a string when 'chosen' and 'rejected' are strings")
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer.strip():
                raise RowProblem(f"field {field.label(name)} is empty")
        pair = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "plain_prompt": prompt,
        }
    elif isinstance(chosen, list) and isinstance(rejected, list):
        pair = _conversational_pair(chosen, rejected, prompt, field.columns)
    else:
        raise RowProblem("'chosen' and 'rejected' must both be strings or both message lists")
    if pair["chosen"] == pair["rejected"]:
        raise RowProblem("'chosen' and 'rejected' are the same answer: nothing to prefer")
    return pair


def _conversational_pair(
    chosen: list[Any], rejected: list[Any], prompt: Any, columns: dict[str, str]
) -> dict[str, Any]:
    chosen_messages = _messages(chosen, "chosen", columns)
    rejected_messages = _messages(rejected, "rejected", columns)
    if prompt is not None:
        if not isinstance(prompt, list):
            raise RowProblem("'prompt' must be a message list when the answers are")
        # Normalized with an answer after it, as the whole conversation is validated.
        prompt_messages = _messages(prompt + chosen, "prompt", columns)[: -len(chosen_messages)]
        return {"prompt": prompt_messages, "chosen": chosen_messages, "rejected": rejected_messages}
    shared = 0
    for left, right in zip(chosen_messages, rejected_messages, strict=False):
        if left != right:
            break
        shared += 1
    if shared == 0:
        raise RowProblem("'chosen' and 'rejected' share no prompt (give 'prompt' explicitly)")
    return {
        "prompt": chosen_messages[:shared],
        "chosen": chosen_messages[shared:],
        "rejected": rejected_messages[shared:],
    }


def _normalize_text(field: _Fields) -> dict[str, Any]:
    return {"text": field.text("text")}


def _normalize_tokenized(field: _Fields) -> dict[str, Any]:
    input_ids = field.get("input_ids", list)
    labels = field.data.get("labels")
    if not input_ids or not all(type(t) is int for t in input_ids):
        raise RowProblem("'input_ids' must be a non-empty list of integers")
    if labels is not None and (
        not isinstance(labels, list)
        or len(labels) != len(input_ids)
        or not all(type(t) is int for t in labels)
    ):
        raise RowProblem("'labels' must be a list of integers as long as 'input_ids'")
    return {"input_ids": input_ids, "labels": labels}


class _Fields:
    """Typed access to a row's fields, with messages that name the file's column."""

    def __init__(self, data: dict[str, Any], columns: dict[str, str]) -> None:
        self.data, self.columns = data, columns

    def label(self, name: str) -> str:
        column = self.columns.get(name)
        return f"'{name}' (column '{column}')" if column and column != name else f"'{name}'"

    def get(self, name: str, kind: type | tuple[type, ...]) -> Any:
        value = self.data.get(name)
        if value is None:
            raise RowProblem(f"missing required field {self.label(name)}")
        if not isinstance(value, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            names = " or ".join("a string" if k is str else f"a {k.__name__}" for k in kinds)
            raise RowProblem(f"field {self.label(name)} must be {names}")
        return value

    def text(self, name: str) -> str:
        value = self.get(name, str)
        if not value.strip():
            raise RowProblem(f"field {self.label(name)} is empty")
        return value

    def optional_text(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise RowProblem(f"field {self.label(name)} must be a string")
        return value or None


def _messages(messages: list[Any], name: str, columns: dict[str, str]) -> list[dict[str, Any]]:
    """Checked messages: `role` and `content` always; an assistant's `tool_calls` and
    `reasoning_content`, a tool result's `tool_call_id` and `name` when given. Templates test
    for these keys (`'tool_calls' in message`), so a key is present only with a value."""
    if not messages:
        raise RowProblem(f"'{name}' is empty")
    keys = {field: (columns.get(field), field) for field in MESSAGE_FIELDS}
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RowProblem(f"{where} is not an object")
        speaker = _first_present(message, (*keys["role"], "from"))
        role = ROLE_ALIASES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise RowProblem(
                f"{where} has role {speaker!r} (expected {', '.join(ROLES)}, "
                "or ShareGPT's human, gpt, function_call, observation)"
            )
        content = _first_present(message, (*keys["content"], "value"))
        if speaker == "function_call":
            calls = _calls(content, f"{where} (function_call)")
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == "tool":
            out.append(_tool_result(message, content, where, out))
        elif role == "assistant":
            reasoning = _first_present(message, (keys["reasoning_content"][0], *REASONING_KEYS))
            out.append(_assistant(message, content, reasoning, where))
        else:
            if message.get("tool_calls"):
                raise RowProblem(f"{where} ({role}) has tool_calls: only replies call tools")
            if not isinstance(content, str):
                raise RowProblem(f"{where} needs a string 'content'")
            if not content.strip():
                if role == "system":
                    continue  # an empty system prompt is the same as none
                raise RowProblem(f"{where} ({role}) has empty content")
            out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowProblem("no assistant message to learn from")
    return out


def _assistant(message: dict[str, Any], content: Any, reasoning: Any, where: str) -> dict[str, Any]:
    """A reply: text, tool calls or both (the text may be empty or missing with tool calls)."""
    calls = message.get("tool_calls")
    calls = _calls(calls, f"{where}.tool_calls") if calls else []
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise RowProblem(f"{where} needs a string 'content'")
    if not content.strip() and not calls:
        raise RowProblem(f"{where} (assistant) has empty content")
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None and not isinstance(reasoning, str):
        raise RowProblem(f"{where}: 'reasoning_content' must be a string")
    if reasoning and reasoning.strip():
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_result(
    message: dict[str, Any], content: Any, where: str, before: list[dict[str, Any]]
) -> dict[str, Any]:
    """A tool's result: prompt text for the next reply (a JSON value is written as JSON)."""
    if not before or not (before[-1].get("tool_calls") or before[-1]["role"] == "tool"):
        raise RowProblem(f"{where} (tool) does not follow an assistant turn with tool calls")
    if isinstance(content, dict | list):
        content = json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise RowProblem(f"{where} (tool) needs a string 'content'")
    out = {"role": "tool", "content": content}
    for key in ("tool_call_id", "name"):
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            raise RowProblem(f"{where} (tool): '{key}' must be a string")
        if value is not None:
            out[key] = value
    return out


def _calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls in OpenAI's shape, `{"type": "function", "function": {"name", "arguments"}}`
    (+ `id`). Also taken: a bare `{"name", "arguments"}`, and a JSON string of either or of a
    list (LLaMA-Factory's `function_call` turn)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if isinstance(value, dict):
        return [_call(value, where)]
    if not isinstance(value, list) or not value:
        raise RowProblem(f"{where} must be a tool call or a list of them (or JSON of either)")
    return [_call(call, f"{where}[{k}]") for k, call in enumerate(value)]


def _call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise RowProblem(
            f'{where} must be a function call: {{"type": "function", "function": '
            '{"name": ..., "arguments": {...}}}'
        )
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RowProblem(f"{where}: the tool call needs a function 'name'")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": _arguments(function.get("arguments"), where)},
    }
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise RowProblem(f"{where}: the tool call's 'id' must be a string")
        out["id"] = call["id"]
    return out


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """A call's arguments as an object: templates write them with `tojson`, so a JSON string
    (OpenAI's spelling) is parsed, or it would be written as one quoted string. None: `{}`."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowProblem(f"{where}: 'arguments' is not valid JSON") from None
    if not isinstance(value, dict):
        raise RowProblem(f"{where}: 'arguments' must be a JSON object")
    return value


def _tools(value: Any, label: str) -> list[dict[str, Any]] | None:
    """A row's tool schemas in OpenAI's shape (`{"type": "function", "function": {...}}`, the
    shape transformers' `get_json_schema` writes); a bare function schema is wrapped into it,
    a JSON string (LLaMA-Factory's ShareGPT) parsed. None or empty: no tools."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError:
            raise RowProblem(f"field {label} is not valid JSON") from None
    if not value:
        return None
    if not isinstance(value, list):
        raise RowProblem(f"field {label} must be a list of function schemas")
    tools = []
    for k, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowProblem(f"field {label} item {k} must be a function schema with a 'name'")
        tools.append(tool if "function" in tool else {"type": "function", "function": tool})
    return tools


def _first_present(message: dict[str, Any], keys: tuple[str | None, ...]) -> Any:
    for key in keys:
        if key is not None and key in message:
            return message[key]
    return None


def alpaca_user_text(instruction: str, input_text: str | None) -> str:
    return f"{instruction}\n\n{input_text}" if input_text else instruction


class Renderer:
    """Normalized rows → segments for one tokenizer, `train_on` and `train_reasoning` (the chat
    skeletons and the BOS rule are worked out once, not per row)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, train_on: str, train_reasoning: bool = True
    ) -> None:
        self.tokenizer, self.train_on, self.train_reasoning = tokenizer, train_on, train_reasoning
        self.bos = bos_text(tokenizer)
        self.segmenter = ChatSegmenter(tokenizer) if tokenizer.chat_template else None
        self.untrained_replies = 0
        """Replies `train_on` asks for that the template renders differently once later turns
        follow, so they stay context (see `lorakit.data.chat`)."""

    def segments(self, data: dict[str, Any], fmt: str) -> list[Segment] | Tokens | PairSegments:
        """A normalized row as text segments (or the row's own tokens, or a preference pair's
        two segment lists); raises RowProblem."""
        return FORMATS[fmt].render(self, data)

    def conversation(self, data: dict[str, Any], train_on: str | None = None) -> list[Segment]:
        """Chat messages (and tools) through the chat template, split at each reply; the
        replies `train_on` (default: the recipe's) selects are trained, their reasoning only
        with `train_reasoning`."""
        if self.segmenter is None:
            raise LorakitError(NO_CHAT_TEMPLATE)
        train_on = train_on or self.train_on
        messages = data["messages"]
        pieces = self.segmenter.split(messages, data.get("tools"))
        wanted = wanted_replies(messages, train_on, data.get("first_reply", 0))
        kept = {reply for _, reply, _ in pieces if reply is not None}
        if train_on != "all":
            if not wanted & kept:
                raise RowProblem(
                    "no reply to learn from is rendered at its own turn as the whole "
                    "conversation shows it (the chat template renders earlier turns differently "
                    "once later ones follow): give each turn as its own row"
                )
            self.untrained_replies += len(wanted - kept)
        return [
            (text, train_on == "all" or self._trained(reply, thought, wanted))
            for text, reply, thought in pieces
        ]

    def _trained(self, reply: int | None, thought: bool, wanted: set[int]) -> bool:
        return reply in wanted and (self.train_reasoning or not thought)

    def alpaca(self, data: dict[str, Any]) -> list[Segment]:
        """The chat template when the tokenizer has one, else lorakit's plain prompt."""
        if self.segmenter is None:
            template = PLAIN_PROMPT_WITH_INPUT if data["input"] else PLAIN_PROMPT
            prompt = template.format(instruction=data["instruction"], input=data["input"])
            return self.document([(prompt, self.train_on == "all"), (data["output"], True)])
        user = alpaca_user_text(data["instruction"], data["input"])
        messages = [{"role": "user", "content": user}]
        messages.append({"role": "assistant", "content": data["output"]})
        if data["system"]:
            messages.insert(0, {"role": "system", "content": data["system"]})
        return self.conversation({"messages": messages})

    def preference(self, data: dict[str, Any]) -> PairSegments:
        """Both answers after the same prompt, through the chat template (a string row on a
        model without one: prompt text, then the answer and EOS); only the answers are
        trained, whatever `train_on` says."""
        if self.segmenter is None and "plain_prompt" in data:
            prompt = (data["plain_prompt"], False)
            return PairSegments(
                *(self.document([prompt, (data[side][0]["content"], True)]) for side in SIDES)
            )
        first = len(data["prompt"])
        return PairSegments(
            *(
                self.conversation(
                    {"messages": data["prompt"] + data[side], "first_reply": first},
                    train_on="completions",
                )
                for side in SIDES
            )
        )

    def prompt_completion(self, data: dict[str, Any]) -> list[Segment]:
        if "prompt" not in data:
            return self.conversation(data)
        train_all = self.train_on == "all"
        return self.document([(data["prompt"], train_all), (data["completion"], True)])

    def document(self, segments: list[Segment]) -> list[Segment]:
        """Raw text: BOS (as the tokenizer adds it), the segments, and a trained EOS."""
        segments = [(self.bos, False), *segments, (self.tokenizer.eos_token, True)]
        return [s for s in segments if s[0]]


def render_segments(
    data: dict[str, Any],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    train_on: str,
    train_reasoning: bool = True,
) -> list[Segment] | Tokens:
    return Renderer(tokenizer, train_on, train_reasoning).segments(data, fmt)


def wanted_replies(messages: list[dict[str, Any]], train_on: str, first_reply: int = 0) -> set[int]:
    """The assistant messages `train_on` trains. `first_reply`: replies before this message
    index are context (a prompt/completion row whose prompt holds earlier turns)."""
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_reply]
    return set(replies[-1:] if train_on == "last_turn" else replies)


def render_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str) -> str:
    """The text a model is given to answer `user_text`, in the format it was trained on."""
    if tokenizer.chat_template is None:
        return bos_text(tokenizer) + PLAIN_PROMPT.format(instruction=user_text)
    messages = [{"role": "user", "content": user_text}]
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def bos_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The BOS a document starts with: only if the tokenizer defines one distinct from EOS
    (GPT-2 uses one token for both) and adds it itself when encoding (Llama does; SmolLM2 and
    Qwen, whose BOS is a chat marker, do not)."""
    bos = tokenizer.bos_token
    if bos is None or bos == tokenizer.eos_token:
        return ""
    added = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if added and added[0] == tokenizer.bos_token_id else ""


@dataclass(frozen=True)
class DataFormat:
    """One dataset format, everything about it in one place."""

    name: str
    signature: tuple[str, ...]
    """The fields that identify it for `format: auto` (tried in the order of FORMATS)."""
    fields: tuple[str, ...]
    """Every field it reads: what a recipe's `columns:` may map."""
    summary: str
    normalize: Callable[[_Fields], dict[str, Any]]
    render: Callable[[Renderer, dict[str, Any]], list[Segment] | Tokens]


FORMATS: dict[str, DataFormat] = {
    f.name: f
    for f in (
        DataFormat(
            "preference",
            ("chosen", "rejected"),
            ("prompt", "chosen", "rejected", "role", "content"),
            "`prompt`, `chosen`, `rejected`: strings, or message lists (the prompt may be the "
            "messages both start with)",
            _normalize_preference,
            Renderer.preference,
        ),
        DataFormat(
            "chat",
            ("messages",),
            ("messages", "tools", *MESSAGE_FIELDS),
            "`messages`: OpenAI-style turns (+ `tools`, tool calls and results, reasoning)",
            _normalize_chat,
            Renderer.conversation,
        ),
        DataFormat(
            "sharegpt",
            ("conversations",),
            ("conversations", "system", "tools", *MESSAGE_FIELDS),
            "`conversations`: ShareGPT from/value turns (+ `system`, `tools`, tool turns)",
            _normalize_sharegpt,
            Renderer.conversation,
        ),
        DataFormat(
            "alpaca",
            ("instruction", "output"),
            ("instruction", "input", "output", "system"),
            "`instruction` (+ `input`) and `output`",
            _normalize_alpaca,
            Renderer.alpaca,
        ),
        DataFormat(
            "prompt_completion",
            ("prompt", "completion"),
            ("prompt", "completion", "tools", *MESSAGE_FIELDS),
            "`prompt` and `completion`: strings, or message lists",
            _normalize_prompt_completion,
            Renderer.prompt_completion,
        ),
        DataFormat(
            "tokenized",
            ("input_ids",),
            ("input_ids", "labels"),
            "`input_ids` (+ `labels`): used as they are",
            _normalize_tokenized,
            lambda renderer, data: Tokens(data["input_ids"], data["labels"]),
        ),
        DataFormat(
            "text",
            ("text",),
            ("text",),
            "`text`: documents, joined and cut into max_seq_len chunks",
            _normalize_text,
            lambda renderer, data: renderer.document([(data["text"], True)]),
        ),
    )
}
"""Every format, in the order `format: auto` tries them."""
FORMAT_FIELDS = tuple(dict.fromkeys(f for fmt in FORMATS.values() for f in fmt.fields))
"""Every field some format reads: the names `columns:` may map."""
