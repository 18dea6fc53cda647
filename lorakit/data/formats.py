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

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (and a few common variants) for the three roles.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}

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
        if field in ("role", "content"):
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
    return {"messages": _messages(field.get("messages", list), "messages", field.columns)}


def _normalize_sharegpt(field: _Fields) -> dict[str, Any]:
    name = "conversations"
    return {"messages": _messages(field.get(name, list), name, field.columns)}


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
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = _messages(prompt + completion, "prompt+completion", field.columns)
        completion_roles = {m["role"] for m in messages[len(messages) - len(completion) :]}
        if "assistant" not in completion_roles:
            raise RowProblem("the completion has no assistant message to learn from")
        return {"messages": messages, "first_reply": len(messages) - len(completion)}
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


def _messages(messages: list[Any], name: str, columns: dict[str, str]) -> list[dict[str, str]]:
    if not messages:
        raise RowProblem(f"'{name}' is empty")
    role_key, content_key = columns.get("role"), columns.get("content")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowProblem(f"{name}[{i}] is not an object")
        speaker = _first_present(message, (role_key, "role", "from"))
        role = ROLE_ALIASES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise RowProblem(
                f"{name}[{i}] has role {speaker!r} (expected {', '.join(ROLES)}, "
                "or ShareGPT's human, gpt)"
            )
        content = _first_present(message, (content_key, "content", "value"))
        if not isinstance(content, str):
            raise RowProblem(f"{name}[{i}] needs a string 'content'")
        if not content.strip():
            if role == "system":
                continue  # an empty system prompt is the same as none
            raise RowProblem(f"{name}[{i}] ({role}) has empty content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowProblem("no assistant message to learn from")
    return out


def _first_present(message: dict[str, Any], keys: tuple[str | None, ...]) -> Any:
    for key in keys:
        if key is not None and key in message:
            return message[key]
    return None


def alpaca_user_text(instruction: str, input_text: str | None) -> str:
    return f"{instruction}\n\n{input_text}" if input_text else instruction


class Renderer:
    """Normalized rows → segments for one tokenizer and `train_on` (the chat skeletons and the
    BOS rule are worked out once, not per row)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, train_on: str) -> None:
        self.tokenizer, self.train_on = tokenizer, train_on
        self.bos = bos_text(tokenizer)
        self.segmenter = ChatSegmenter(tokenizer) if tokenizer.chat_template else None

    def segments(self, data: dict[str, Any], fmt: str) -> list[Segment] | Tokens | PairSegments:
        """A normalized row as text segments (or the row's own tokens, or a preference pair's
        two segment lists); raises RowProblem."""
        return FORMATS[fmt].render(self, data)

    def conversation(self, data: dict[str, Any]) -> list[Segment]:
        """Chat messages through the chat template, split at each reply."""
        return chat_segments(
            data["messages"],
            self.tokenizer,
            self.train_on,
            data.get("first_reply", 0),
            self.segmenter,
        )

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
                chat_segments(
                    data["prompt"] + data[side],
                    self.tokenizer,
                    "completions",
                    first,
                    self.segmenter,
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
    data: dict[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase, train_on: str
) -> list[Segment] | Tokens:
    return Renderer(tokenizer, train_on).segments(data, fmt)


def chat_segments(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    train_on: str,
    first_reply: int = 0,
    segmenter: ChatSegmenter | None = None,
) -> list[Segment]:
    """Split the rendered conversation at each reply; mark the replies `train_on` selects.

    `first_reply`: replies before this message index are context (a prompt/completion row whose
    prompt holds earlier turns), never trained unless `train_on: all`."""
    if tokenizer.chat_template is None:
        raise LorakitError(NO_CHAT_TEMPLATE)
    segmenter = segmenter or ChatSegmenter(tokenizer)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_reply]
    if train_on == "last_turn":
        replies = replies[-1:]
    trained = set(replies)
    return [
        (text, train_on == "all" or reply in trained) for text, reply in segmenter.split(messages)
    ]


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
            ("messages", "role", "content"),
            "`messages`: OpenAI-style role/content turns",
            _normalize_chat,
            Renderer.conversation,
        ),
        DataFormat(
            "sharegpt",
            ("conversations",),
            ("conversations", "role", "content"),
            "`conversations`: ShareGPT from/value turns",
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
            ("prompt", "completion", "role", "content"),
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
