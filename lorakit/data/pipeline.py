"""From the recipe's data section to tokenized examples: read → format → tokenize + mask."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from lorakit.data.formats import check_row, detect_format, render_segments
from lorakit.data.sources import Row, read_rows
from lorakit.errors import LorakitError
from lorakit.recipe import DatasetSpec, Recipe

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class SplitStats:
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    """Rows with no trained token left after truncation."""


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    stats: dict[str, SplitStats] = field(default_factory=dict)


def load_rows(specs: list[DatasetSpec]) -> list[tuple[Row, str]]:
    """Read every file and check every row against its format; return (row, format) pairs."""
    rows: list[tuple[Row, str]] = []
    for spec in specs:
        file_rows = read_rows(spec.path)
        fmt = spec.format if spec.format != "auto" else detect_format(file_rows[0])
        for row in file_rows:
            check_row(row, fmt)
            rows.append((row, fmt))
    return rows


def tokenize_rows(
    rows: list[tuple[Row, str]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    train_on: str,
) -> tuple[list[Example], SplitStats]:
    stats = SplitStats(rows=len(rows))
    rendered = [render_segments(row.data, fmt, tokenizer, train_on) for row, fmt in rows]
    texts = [text for segments in rendered for text, _ in segments]
    # One batched call: the fast tokenizer does the work in parallel in Rust.
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    examples: list[Example] = []
    cursor = 0
    for segments in rendered:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, trained in segments:
            piece = ids[cursor]
            cursor += 1
            input_ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
        if len(input_ids) > max_seq_len:
            stats.truncated += 1
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        example = Example(input_ids, labels)
        # The first label is never predicted (no token precedes it), so it does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.dropped += 1
            continue
        examples.append(example)
        stats.tokens += len(input_ids)
        stats.trained_tokens += example.trained_tokens
    stats.examples = len(examples)
    return examples, stats


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    data = recipe.data
    train_rows = load_rows(data.train)
    val_rows = load_rows(data.validation) if data.validation else []
    if data.val_split:
        order = list(range(len(train_rows)))
        random.Random(recipe.train.seed).shuffle(order)
        held_out = max(1, round(len(order) * data.val_split))
        if held_out >= len(order):
            raise LorakitError(f"data.val_split: {data.val_split} leaves no training rows")
        val_rows = [train_rows[i] for i in sorted(order[:held_out])]
        train_rows = [train_rows[i] for i in sorted(order[held_out:])]
    train, train_stats = tokenize_rows(train_rows, tokenizer, data.max_seq_len, data.train_on)
    if not train:
        raise LorakitError(
            f"data.train: no example has a trained token within max_seq_len={data.max_seq_len}"
        )
    validation, val_stats = tokenize_rows(val_rows, tokenizer, data.max_seq_len, data.train_on)
    return PreparedData(train, validation, {"train": train_stats, "validation": val_stats})
