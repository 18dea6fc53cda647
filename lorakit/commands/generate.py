"""`lorakit generate`: try a model or adapter by hand, one-shot prompts or an interactive chat
that streams tokens, with the chat template the adapter was trained with."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase, TextStreamer

from lorakit.artifacts import LoadedTarget, load_target, resolve_target
from lorakit.data.formats import render_chat, render_prompt
from lorakit.decoding import greedy_continuations, stop_token_ids
from lorakit.errors import LorakitError

Message = dict[str, str]
COMMANDS = "/reset starts a new conversation, /exit (or end of input) quits"


def generate(
    target: str,
    prompts: list[str],
    *,
    chat_mode: bool = False,
    system: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    load_in_4bit: bool | None = None,
    dtype: str | None = None,
    console: Console,
) -> None:
    """Answers to `prompts` on stdout (batched), then an interactive chat when asked."""
    from accelerate import Accelerator

    if not prompts and not chat_mode:
        raise LorakitError("generate: give --prompt TEXT or --chat")
    for number, text in enumerate(prompts, start=1):
        if not text.strip():
            which = f" #{number}" if len(prompts) > 1 else ""
            raise LorakitError(f"--prompt{which} is empty: give the text to answer")
    resolved = resolve_target(target)
    loaded = load_target(resolved, Accelerator().device, load_in_4bit, dtype)
    console.print(f"{resolved.label()} ({resolved.kind}, {loaded.precision})")
    if prompts:
        answers = answer_prompts(loaded, prompts, max_new_tokens, system, batch_size)
        for question, answer in zip(prompts, answers, strict=True):
            if len(prompts) > 1:
                print(f"> {question}")
            print(answer)
    if chat_mode:
        interactive = sys.stdin.isatty()
        if interactive:
            console.print(COMMANDS)
        chat(loaded, sys.stdin, max_new_tokens, system, show_prompt=interactive)


def conversation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The text that asks the model for the next assistant turn."""
    if tokenizer.chat_template is not None:
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    # Without a chat template the model only knows the plain instruction format of one turn.
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    user = [m["content"] for m in messages if m["role"] == "user"][-1]
    return render_prompt(tokenizer, f"{system}\n\n{user}" if system else user)


def _starting_messages(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system else []


def answer_prompts(
    loaded: LoadedTarget,
    prompts: list[str],
    max_new_tokens: int,
    system: str | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to independent prompts, generated in batches."""
    tokenizer = loaded.tokenizer
    texts = [
        conversation_prompt(
            tokenizer, [*_starting_messages(system), {"role": "user", "content": p}]
        )
        for p in prompts
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    new = greedy_continuations(loaded.model, tokenizer, ids, max_new_tokens, batch_size)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


class _StreamTo(TextStreamer):
    """transformers' TextStreamer, writing to a chosen stream instead of print()."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stream: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


@torch.no_grad()
def reply(
    loaded: LoadedTarget, messages: list[Message], max_new_tokens: int, stream: TextIO
) -> str:
    """Generate the next assistant turn greedily, streaming its tokens as they come."""
    model, tokenizer = loaded.model, loaded.tokenizer
    text = conversation_prompt(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    output = model.generate(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        streamer=_StreamTo(tokenizer, stream),
    )
    new = output[0, ids.shape[1] :].tolist()
    for position, token in enumerate(new):
        if token in stops:
            new = new[:position]
            break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def chat(
    loaded: LoadedTarget,
    lines: Iterable[str],
    max_new_tokens: int,
    system: str | None = None,
    stream: TextIO | None = None,
    show_prompt: bool = False,
) -> list[Message]:
    """Read user turns from `lines` (stdin), stream each reply; return the conversation."""
    stream = stream or sys.stdout
    if loaded.tokenizer.chat_template is None:
        print(
            "note: this model has no chat template; each message is answered on its own",
            file=sys.stderr,
        )
    messages = _starting_messages(system)
    for line in _prompted(lines, show_prompt):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = _starting_messages(system)
            continue
        messages.append({"role": "user", "content": text})
        messages.append(
            {"role": "assistant", "content": reply(loaded, messages, max_new_tokens, stream)}
        )
    return messages


def _prompted(lines: Iterable[str], show_prompt: bool) -> Iterable[str]:
    """The lines, each preceded by a `you> ` prompt on stderr when a person is typing."""
    iterator = iter(lines)
    while True:
        if show_prompt:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = next(iterator, None)
        if line is None:
            return
        yield line
