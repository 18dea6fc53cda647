"""Chat templates: named overrides, and splitting a rendered conversation at reply boundaries.

A conversation is split where the template switches between prompt and assistant reply: the
prompt of turn i is the conversation up to it rendered with the generation prompt, and the
reply is what rendering the turn itself adds (its text and the end-of-turn token closing it).
Each segment is tokenized on its own, exactly as at inference, where the prompt is tokenized
alone and the reply is generated after it.

Rendering every prefix of every conversation costs 2k+1 renders for k replies. The template's
structure rarely depends on the words, so it is worked out once per sequence of roles with
placeholder contents (a skeleton); a row then costs one render, which checks that the skeleton
filled with the row's contents is exactly the template's own output. A row that renders
differently (a template that trims or inspects its content) falls back to the prefix renders.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ChatSegment = tuple[str, int | None]
"""(text, index of the assistant message this text is the reply of, or None for prompt text)"""

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


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def split_by_prefixes(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> list[ChatSegment]:
    """The reference split: render every prefix; exact for any template that renders a
    conversation turn by turn."""
    segments: list[ChatSegment] = []
    done = ""
    try:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise RowProblem("the conversation starts with an assistant message")
            prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            full = render_chat(tokenizer, messages[: i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise RowProblem(
                    "the chat template does not render this conversation turn by turn as "
                    "prefixes, so prompt and reply tokens cannot be separated"
                )
            segments += [(prompt[len(done) :], None), (full[len(prompt) :], i)]
            done = full
        whole = render_chat(tokenizer, messages)
    except RowProblem:
        raise
    except Exception as exc:  # templates raise their own errors (e.g. "roles must alternate")
        raise RowProblem(f"chat template error: {str(exc).splitlines()[0]}") from None
    if not whole.startswith(done):
        raise RowProblem("the chat template renders this conversation differently as a whole")
    segments.append((whole[len(done) :], None))
    return [s for s in segments if s[0]]


_SENTINEL = "\ue000{}\ue001"  # private-use characters: no template or text produces them
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class ChatSegmenter:
    """`split(messages)` == `split_by_prefixes(tokenizer, messages)`, with one render per row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._render = _direct_renderer(tokenizer)
        self._skeletons: dict[tuple[str, ...], list[tuple[list[Any], int | None]] | None] = {}
        self.reply_endings: set[str] = set()
        """The template text that closes a reply, e.g. `<|im_end|>\\n`."""

    def split(self, messages: list[dict[str, str]]) -> list[ChatSegment]:
        shape = tuple(m["role"] for m in messages)
        if shape not in self._skeletons:
            self._skeletons[shape] = self._skeleton(shape)
        skeleton = self._skeletons[shape]
        if skeleton is not None:
            contents = [m["content"] for m in messages]
            segments = [
                ("".join(p if isinstance(p, str) else contents[p] for p in parts), reply)
                for parts, reply in skeleton
            ]
            if "".join(text for text, _ in segments) == self._render(messages):
                return [s for s in segments if s[0]]
        return split_by_prefixes(self.tokenizer, messages)

    def _skeleton(self, shape: tuple[str, ...]) -> list[tuple[list[Any], int | None]] | None:
        """Segments of a conversation of this shape, as literal text and content indices."""
        if self._render is None:
            return None
        placeholders = [
            {"role": role, "content": _SENTINEL.format(i)} for i, role in enumerate(shape)
        ]
        try:
            segments = split_by_prefixes(self.tokenizer, placeholders)
            # The direct render must be what apply_chat_template produces, or it cannot check.
            if self._render(placeholders) != render_chat(self.tokenizer, placeholders):
                return None
        except RowProblem:
            return None
        skeleton = []
        for text, reply in segments:
            pieces = _SENTINEL_RE.split(text)
            parts = [p if k % 2 == 0 else int(p) for k, p in enumerate(pieces)]
            skeleton.append(([p for p in parts if p != ""], reply))
            if reply is not None and isinstance(parts[-1], str):
                self.reply_endings.add(parts[-1])
        return skeleton


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

    def render(messages: list[dict[str, str]]) -> str | None:
        try:
            return compiled.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=False,
                **variables,
            )
        except Exception:  # the reference path reports the template's error for the row
            return None

    return render
