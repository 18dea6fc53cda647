"""Chat templates: named overrides, what a template can render, and splitting a rendered
conversation at reply boundaries.

A conversation is split where the template switches between prompt and assistant reply: the
prompt of turn i is the conversation up to it rendered with the generation prompt, and the
reply is what rendering the turn itself adds (its text, tool calls and reasoning as the
template writes them, and the end-of-turn token closing it). Each segment is tokenized on its
own, exactly as at inference, where the prompt is tokenized alone and the reply is generated
after it. The text of every segment is cut from the template's render of the whole
conversation, so the segments join to exactly that render.

Some templates render a turn differently once later turns follow it: Qwen3 drops the reasoning
of replies before the last user message, Mistral's v3 template moves the system prompt and the
tool list to the last user message. Such a reply was generated in a context the whole render
no longer shows, so it is kept as context (untrained, as the whole render shows it) and
counted; the other replies of the row are trained as usual.

Rendering every prefix of every conversation costs 2k+2 renders for k replies. The template's
structure rarely depends on the words, so it is worked out once per sequence of roles with
placeholder contents (a skeleton); a row then costs one render, which checks that the skeleton
filled with the row's contents is exactly the template's own output. A row that renders
differently (a template that trims or inspects its content), and rows with tools or tool calls
(whose JSON no placeholder stands for), take the prefix renders.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]
ChatSegment = tuple[str, int | None, bool]
"""(text, index of the assistant message this text is the reply of or None for prompt text,
whether the text is that reply's reasoning)"""

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
"""How reasoning is written inside `content` by the templates that parse it (Qwen3, QwQ,
DeepSeek-R1)."""
SYSTEM_FOLD = "{system}\n\n{user}"
"""A system message folded into the first user turn, as Gemma 3's template folds it."""

NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    # The plain prompt lorakit uses for models without a template, as a chat template.
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


class RowProblem(Exception):
    """Something wrong with one row; the pipeline skips the row or, with `strict`, stops."""


def load_chat_template(value: str) -> str:
    """The text of a named template or of a .jinja file."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    file = Path(value).expanduser()
    if not file.is_file():
        raise LorakitError(
            f"data.chat_template: {value!r} is neither a named template "
            f"({', '.join(NAMED_TEMPLATES)}) nor an existing .jinja file"
        )
    text = file.read_text(encoding="utf-8")
    try:
        _compile(text)
    except Exception as exc:  # jinja2.TemplateSyntaxError carries the line
        line = getattr(exc, "lineno", None)
        where = f"{value}:{line}" if line else value
        raise LorakitError(f"data.chat_template: {where}: {exc}") from None
    return text


# --- what a template renders ------------------------------------------------------------------

_PROBE = "lorakitprobe"
_PROBE_CALL = {
    "id": "probe0001",  # Mistral's templates insist on 9 alphanumeric characters
    "type": "function",
    "function": {"name": _PROBE, "arguments": {}},
}


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template renders: found once per template by rendering a probe conversation
    for each feature and looking for the probe's text in the output."""

    system_role: bool
    """A system message is rendered (Gemma 2's template raises; some drop it silently)."""
    reasoning: bool
    """An assistant message's `reasoning_content` is rendered (Qwen3)."""
    tools: bool
    """The `tools` list is rendered (the schemas the model may call)."""
    tool_calls: bool
    """An assistant message's `tool_calls` are rendered."""
    tool_results: bool
    """A `tool` message (a tool's result) is rendered."""


_TRAITS: dict[tuple[str, str], TemplateTraits] = {}


def template_traits(tokenizer: PreTrainedTokenizerBase) -> TemplateTraits:
    key = (str(tokenizer.chat_template), json.dumps(tokenizer.special_tokens_map, sort_keys=True))
    if key not in _TRAITS:
        _TRAITS[key] = _probe_traits(tokenizer)
    return _TRAITS[key]


def _probe_traits(tokenizer: PreTrainedTokenizerBase) -> TemplateTraits:
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "ok"}
    call = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    named = {**_PROBE_CALL, "function": {"name": "f", "arguments": {}}}
    named_call = {**call, "tool_calls": [named]}
    result = {"role": "tool", "content": _PROBE, "tool_call_id": _PROBE_CALL["id"], "name": "f"}
    schema = {
        "type": "function",
        "function": {
            "name": _PROBE,
            "description": "probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }

    def shows(messages: list[Message], tools: list[Message] | None = None) -> bool:
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # a template that refuses the feature raises
            return False
        return _PROBE in text

    return TemplateTraits(
        system_role=shows([{"role": "system", "content": _PROBE}, user, answer]),
        reasoning=shows([user, {**answer, "reasoning_content": _PROBE}]),
        tools=shows([user, answer], tools=[schema]),
        tool_calls=shows([user, call]),
        tool_results=shows([user, named_call, result, answer]),
    )


def fold_system_message(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message]
) -> list[Message]:
    """The messages as a template without a system role takes them: a leading system message
    folded into the first user turn, as Gemma 3's template and Google's Gemma docs do it (Gemma
    2's template raises on a system message). Unchanged for templates with a system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    return _fold_system(messages, template_traits(tokenizer).system_role)


def _fold_system(messages: list[Message], system_role: bool) -> list[Message]:
    if system_role or not messages or messages[0]["role"] != "system":
        return messages
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise RowProblem(
            "the chat template has no system role and no user turn follows the system message "
            "to fold it into"
        )
    system, user = messages[0]["content"], messages[1]["content"]
    return [{**messages[1], "content": SYSTEM_FOLD.format(system=system, user=user)}, *messages[2:]]


def unsupported_feature(
    traits: TemplateTraits, messages: list[Message], tools: list[Message] | None
) -> str | None:
    """What this conversation needs that the template cannot render (its text would vanish
    from the training data), or None."""
    needs = (
        (traits.tools, "the 'tools' list", lambda: bool(tools)),
        (traits.tool_calls, "tool calls", lambda: any("tool_calls" in m for m in messages)),
        (traits.tool_results, "tool results", lambda: any(m["role"] == "tool" for m in messages)),
        (
            traits.reasoning,
            "reasoning_content",
            lambda: any("reasoning_content" in m for m in messages),
        ),
    )
    return next((name for rendered, name, needed in needs if not rendered and needed()), None)


# --- rendering and splitting ------------------------------------------------------------------


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    add_generation_prompt: bool = False,
    tools: list[Message] | None = None,
) -> str:
    """The template's text of a conversation (a leading system message folded into the first
    user turn where the template has no system role)."""
    return tokenizer.apply_chat_template(
        fold_system_message(tokenizer, messages),
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


_ANSWER = "\ue002"  # stands for a reply's answer text to find where its reasoning ends


def split_by_prefixes(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    tools: list[Message] | None = None,
) -> list[ChatSegment]:
    """The reference split: render the whole conversation and every prefix. A reply is
    trained where both its prompt and the reply itself, as rendered at its own turn, are what
    the whole render shows; other replies stay in the prompt text (see the module docstring).
    Raises RowProblem for a template error."""
    try:
        whole = render_chat(tokenizer, messages, tools=tools)
        specials = _special_texts(tokenizer)
        segments: list[ChatSegment] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise RowProblem("the conversation starts with an assistant message")
            prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
            if len(prompt) < done or not whole.startswith(prompt):
                continue  # the context of this turn is rendered differently later on
            full = render_chat(tokenizer, messages[: i + 1], tools=tools)
            reply = _reply_as_rendered(whole, prompt, full, specials)
            if reply is None:
                continue
            segments.append((whole[done : len(prompt)], None, False))
            segments += _split_reasoning(tokenizer, messages, i, prompt, reply, tools)
            done = len(prompt) + len(reply)
    except RowProblem:
        raise
    except Exception as exc:  # templates raise their own errors (e.g. "roles must alternate")
        raise RowProblem(f"chat template error: {str(exc).splitlines()[0]}") from None
    segments.append((whole[done:], None, False))
    return [s for s in segments if s[0]]


def _reply_as_rendered(whole: str, prompt: str, full: str, specials: tuple[str, ...]) -> str | None:
    """The reply of the turn rendered alone (`full` after `prompt`), if the whole render shows
    it the same. Special tokens a template writes only at the end of a conversation (Phi-3's EOS
    after the last `<|end|>`) are left off the replies that other turns follow."""
    reply, rest = full[len(prompt) :], whole[len(prompt) :]
    while reply and not rest.startswith(reply):
        closing = next((s for s in specials if reply.endswith(s)), None)
        if closing is None:
            return None
        reply = reply[: -len(closing)]
    return reply or None


def _split_reasoning(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    i: int,
    prompt: str,
    reply: str,
    tools: list[Message] | None,
) -> list[ChatSegment]:
    """The reply as [reasoning, answer]: the reasoning part is all the template writes before
    the answer text (the reasoning and its tags), found by rendering the turn again with a
    marker for the answer."""
    message = messages[i]
    content = message["content"]
    if "reasoning_content" in message:
        lead, thought = "", message["reasoning_content"].strip()
    elif THINK_CLOSE in content:
        close = content.rindex(THINK_CLOSE)
        after = content[close + len(THINK_CLOSE) :]
        lead = content[: len(content) - len(after.lstrip())]  # the block and the space after it
        thought = content[:close].split(THINK_OPEN)[-1].strip()
    else:
        return [(reply, i, False)]
    marked = {**message, "content": lead + _ANSWER}
    rendered = render_chat(tokenizer, [*messages[:i], marked], tools=tools)
    before = rendered[len(prompt) :].split(_ANSWER)[0]
    found = rendered.startswith(prompt) and _ANSWER in rendered and reply.startswith(before)
    if found and thought in before:
        return [s for s in ((before, i, True), (reply[len(before) :], i, False)) if s[0]]
    if thought and thought in reply:
        raise RowProblem(
            "the chat template writes this reply's reasoning where it cannot be told apart "
            "from the answer"
        )
    return [(reply, i, False)]  # the template does not show the reasoning in this turn


def _special_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}
    return tuple(sorted(texts, key=len, reverse=True))


_SENTINEL = "\ue000{}\ue001"  # private-use characters: no template or text produces them
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
_PLAIN_KEYS = frozenset({"role", "content", "reasoning_content"})

Skeleton = list[tuple[list[Any], int | None, bool]]
"""Segments as literal text and indices into a row's field values."""


class ChatSegmenter:
    """`split(messages, tools)` == `split_by_prefixes(tokenizer, messages, tools)`, with one
    render per row for rows of plain text messages."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.traits = template_traits(tokenizer)
        self._render = _direct_renderer(tokenizer)
        self._skeletons: dict[tuple[tuple[str, bool], ...], Skeleton | None] = {}

    def split(
        self, messages: list[Message], tools: list[Message] | None = None
    ) -> list[ChatSegment]:
        missing = unsupported_feature(self.traits, messages, tools)
        if missing is not None:
            raise RowProblem(
                f"the chat template does not render {missing}, so it would vanish from the "
                "training text (set data.chat_template to a template that renders it)"
            )
        if tools or not all(m.keys() <= _PLAIN_KEYS for m in messages):
            return split_by_prefixes(self.tokenizer, messages, tools)
        if any(THINK_CLOSE in m["content"] for m in messages if m["role"] == "assistant"):
            return split_by_prefixes(self.tokenizer, messages)  # no placeholder parses tags
        shape = tuple((m["role"], "reasoning_content" in m) for m in messages)
        if shape not in self._skeletons:
            self._skeletons[shape] = self._skeleton(shape)
        skeleton = self._skeletons[shape]
        if skeleton is not None:
            values = [v for m in messages for v in _field_values(m)]
            segments = [
                ("".join(p if isinstance(p, str) else values[p] for p in parts), reply, thought)
                for parts, reply, thought in skeleton
            ]
            if "".join(text for text, _, _ in segments) == self._render(messages):
                return [s for s in segments if s[0]]
        return split_by_prefixes(self.tokenizer, messages)

    def _skeleton(self, shape: tuple[tuple[str, bool], ...]) -> Skeleton | None:
        """Segments of a conversation of this shape, as literal text and value indices."""
        if self._render is None:
            return None
        placeholders, count = [], 0
        for role, reasoning in shape:
            message = {"role": role, "content": _SENTINEL.format(count)}
            if reasoning:
                message["reasoning_content"] = _SENTINEL.format(count + 1)
            placeholders.append(message)
            count += 1 + reasoning
        try:
            segments = split_by_prefixes(self.tokenizer, placeholders)
            # The direct render must be what apply_chat_template produces, or it cannot check.
            if self._render(placeholders) != render_chat(self.tokenizer, placeholders):
                return None
        except RowProblem:
            return None
        skeleton: Skeleton = []
        for text, reply, thought in segments:
            pieces = _SENTINEL_RE.split(text)
            parts = [p if k % 2 == 0 else int(p) for k, p in enumerate(pieces)]
            skeleton.append(([p for p in parts if p != ""], reply, thought))
        return skeleton


def _field_values(message: Message) -> list[str]:
    """A message's text fields in skeleton order."""
    if "reasoning_content" in message:
        return [message["content"], message["reasoning_content"]]
    return [message["content"]]


def _compile(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def _direct_renderer(tokenizer: PreTrainedTokenizerBase):
    """Render with the compiled template directly, as apply_chat_template does inside, without
    its per-call conversions (twice as fast). None when transformers' internals have moved."""
    try:
        compiled = _compile(tokenizer.chat_template)
    except Exception:
        return None
    variables = dict(tokenizer.special_tokens_map)
    system_role = template_traits(tokenizer).system_role

    def render(messages: list[Message]) -> str | None:
        try:
            folded = _fold_system(messages, system_role)
            return compiled.render(
                messages=[_with_reasoning_aliases(m) for m in folded],
                tools=None,
                documents=None,
                add_generation_prompt=False,
                **variables,
            )
        except Exception:  # the reference path reports the template's error for the row
            return None

    return render


def _with_reasoning_aliases(message: Message) -> Message:
    """apply_chat_template also passes reasoning as `thinking` (the name gpt-oss reads)."""
    if "reasoning_content" not in message:
        return message
    return {"thinking": message["reasoning_content"], **message}
