"""`lorakit prepare`: tokenize a recipe's data (filling the cache) and show what the model will
learn: statistics per dataset and split, a length histogram, and examples with the trained
tokens highlighted against the masked ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from lorakit.data.packing import split_packed
from lorakit.data.pipeline import (
    IGNORE_INDEX,
    Example,
    PreferencePair,
    PreparedData,
    SplitStats,
    pad_note,
    prepare_data,
)
from lorakit.models import load_tokenizer, resolve_model
from lorakit.recipe import Recipe, load_recipe

HISTOGRAM_BINS = 8
BAR_WIDTH = 40
# Shown around trained text when the output has no colors (a pipe, a file, NO_COLOR).
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def prepare(
    path: Path, overrides: Sequence[str] = (), preview: int = 0, console: Console | None = None
) -> PreparedData:
    console = console or Console()
    recipe = load_recipe(path, overrides)
    resolved = resolve_model(recipe.model.name_or_path, convert=False)  # the tokenizer only
    tokenizer = load_tokenizer(resolved.location, recipe.model.trust_remote_code)
    data = prepare_data(recipe, tokenizer)
    report(console, recipe, tokenizer, data, preview)
    return data


def report(
    console: Console,
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    preview: int = 0,
) -> None:
    console.print(dataset_table(data))
    console.print(split_table(data, recipe.data.max_seq_len))
    for name, stats in data.stats.items():
        if stats.dropped:
            console.print(
                f"{name}: dropped {stats.dropped} examples with no trained token within "
                f"max_seq_len={recipe.data.max_seq_len} (the prompt alone fills it)"
            )
    train = example_spans(data.train)
    console.print(histogram_text(train, recipe.data.max_seq_len))
    note = pad_note(tokenizer)
    for line in ([note] if note else []) + [f"warning: {w}" for w in data.warnings]:
        console.print(escape(line), highlight=False)
    colors = console.color_system is not None
    for number, example in enumerate(train[:preview], start=1):
        if isinstance(example, PreferencePair):
            show_pair(console, number, example, tokenizer, colors)
            continue
        console.print(
            f"\n[bold]example {number}[/bold]: {len(example.input_ids)} tokens, "
            f"{example.trained_tokens} trained"
        )
        console.print(highlight_example(example, tokenizer, colors=colors))
    if preview:
        legend = (
            "[bold green]trained[/bold green] / [dim]masked[/dim]"
            if console.color_system
            else f"{TRAINED_OPEN}trained{TRAINED_CLOSE} / masked"
        )
        console.print(f"\n{legend}")


def dataset_table(data: PreparedData) -> Table:
    table = Table(title="datasets", title_justify="left")
    for column in ("split", "dataset", "format", "rows", "skipped", "examples", "tokens"):
        table.add_column(
            column, justify="left" if column in ("split", "dataset", "format") else "right"
        )
    for column in ("trained", "truncated", "dropped", "weight", "cache"):
        table.add_column(column, justify="right")
    for name, stats in data.stats.items():
        for part in stats.datasets:
            table.add_row(
                name,
                escape(part.path),
                part.format,
                f"{part.rows:,}",
                f"{part.skipped:,}",
                f"{part.examples:,}",
                f"{part.tokens:,}",
                f"{part.trained_tokens:,}",
                f"{part.truncated:,}",
                f"{part.dropped:,}",
                f"{part.weight:g}" if name == "train" else "",
                "reused" if part.cached else "written",
            )
    return table


def split_table(data: PreparedData, max_seq_len: int) -> Table:
    table = Table(title="splits (one epoch)", title_justify="left")
    table.add_column("split")
    for column in ("examples", "tokens", "trained tokens", "trained %", "packed rows", "packing"):
        table.add_column(column, justify="right")
    for name, stats in data.stats.items():
        table.add_row(name, *_split_cells(stats, max_seq_len))
    return table


def _split_cells(stats: SplitStats, max_seq_len: int) -> list[str]:
    share = stats.trained_tokens / stats.tokens if stats.tokens else 0.0
    packing = f"{stats.packing_efficiency:.1%}" if stats.packing_efficiency is not None else "off"
    return [
        f"{stats.examples:,}",
        f"{stats.tokens:,}",
        f"{stats.trained_tokens:,}",
        f"{share:.1%}",
        f"{stats.packed_rows:,}" if stats.packed_rows else "-",
        packing,
    ]


def show_pair(
    console: Console,
    number: int,
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    colors: bool,
) -> None:
    """The prompt once, then each answer with its trained tokens highlighted."""
    prompt = pair.prompt_length
    console.print(f"\n[bold]pair {number}[/bold]: prompt of {prompt} tokens")
    console.print(tokenizer.decode(pair.chosen.input_ids[:prompt]), style="dim", highlight=False)
    for side, example in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        own = Example(example.input_ids[prompt:], example.labels[prompt:])
        console.print(f"[bold]{side}[/bold]: {example.trained_tokens} trained tokens")
        console.print(highlight_example(own, tokenizer, colors=colors, first_trained=True))


def example_spans(rows: list[Example | PreferencePair]) -> list[Example | PreferencePair]:
    """The examples inside (possibly packed) rows, in order."""
    out = []
    for row in rows:
        if isinstance(row, PreferencePair) or row.position_ids is None:
            out.append(row)
            continue
        for start, end in split_packed(row.position_ids):
            out.append(Example(row.input_ids[start:end], row.labels[start:end]))
    return out


def length_histogram(lengths: list[int], max_seq_len: int) -> list[tuple[int, int, int]]:
    """(low, high, count) for HISTOGRAM_BINS equal bins of token lengths up to max_seq_len."""
    width = max(1, math.ceil(max_seq_len / HISTOGRAM_BINS))
    counts = [0] * math.ceil(max_seq_len / width)
    for length in lengths:
        counts[min(len(counts) - 1, (length - 1) // width)] += 1
    return [(k * width + 1, min((k + 1) * width, max_seq_len), c) for k, c in enumerate(counts)]


def histogram_text(examples: list[Example], max_seq_len: int) -> str:
    lengths = [e.length for e in examples]
    if not lengths:
        return ""
    bins = length_histogram(lengths, max_seq_len)
    top = max(count for _, _, count in bins) or 1
    lines = [
        f"train example lengths (tokens): min {min(lengths)}, "
        f"median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}"
    ]
    for low, high, count in bins:
        bar = "█" * math.ceil(BAR_WIDTH * count / top) if count else ""
        lines.append(f"  {low:>6}-{high:<6} {bar} {count:,}")
    return "\n".join(lines)


def highlight_example(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    colors: bool = True,
    first_trained: bool = False,
) -> Text:
    """The example's text, trained tokens in green (or between ⟦ ⟧), masked ones dimmed.

    The first token counts as masked (no token precedes it, so it is never predicted), unless
    `first_trained`: a part cut out after a prompt, whose first token the prompt predicts."""
    text = Text()
    first = first_trained and bool(example.labels) and example.labels[0] != IGNORE_INDEX
    trained_flags = [first] + [label != IGNORE_INDEX for label in example.labels[1:]]
    start = 0
    for end in range(1, len(trained_flags) + 1):
        if end < len(trained_flags) and trained_flags[end] == trained_flags[start]:
            continue
        piece = tokenizer.decode(example.input_ids[start:end])
        if trained_flags[start]:
            if colors:
                text.append(piece, style="bold green")
            else:
                text.append(f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}")
        else:
            text.append(piece, style="dim" if colors else "")
        start = end
    return text
