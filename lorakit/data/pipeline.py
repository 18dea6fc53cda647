"""From the recipe's data section to tokenized examples.

read → check (bad rows skipped and counted, or an error with `strict`) → format → tokenize +
mask → fit to `max_seq_len` (truncate; `text` documents are joined with EOS and chunked) →
cache → validation split → weights → packing.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from lorakit.data import cache
from lorakit.data.chat import RowProblem, load_chat_template, split_by_prefixes
from lorakit.data.formats import (
    IGNORE_INDEX,
    PairSegments,
    Renderer,
    Tokens,
    detect_format,
    normalize,
)
from lorakit.data.packing import pack_examples
from lorakit.data.sources import Row, read_rows, source_fingerprint
from lorakit.errors import LorakitError
from lorakit.recipe import DataSection, DatasetSpec, Recipe

__all__ = ["IGNORE_INDEX", "Example", "PreparedData", "SplitStats", "prepare_data"]

REASONS_KEPT = 5
"""How many skip reasons the statistics list (all are counted)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Packed rows only: positions restarting at 0 for each example in the row."""

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss covers: the first label is never predicted (no token precedes it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])

    @property
    def token_count(self) -> int:
        return len(self.input_ids)

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferencePair:
    """A prompt with a chosen and a rejected answer: two examples whose tokens agree up to the
    end of the prompt, each labelled on its own answer only."""

    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None
    """The reference model's summed log-probs of (chosen, rejected), when precomputed."""

    @property
    def prompt_length(self) -> int:
        """Tokens before the first answer token (shared by both sides)."""
        first = [
            next((i for i, t in enumerate(side.labels) if t != IGNORE_INDEX), len(side.labels))
            for side in (self.chosen, self.rejected)
        ]
        return min(first)

    @property
    def token_count(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)

    @property
    def trained_tokens(self) -> int:
        return self.chosen.trained_tokens + self.rejected.trained_tokens

    @property
    def length(self) -> int:
        """The longer side, for grouping batches by length."""
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


@dataclass
class DatasetStats:
    """One dataset entry of the recipe, before weighting (what the cache stores)."""

    path: str = ""
    format: str = ""
    rows: int = 0
    skipped: int = 0
    """Rows with a problem; the first few are in `skip_reasons`."""
    skip_reasons: list[str] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    """Examples with no trained token left after truncation."""
    masked_eos_rows: int = 0
    """Pre-tokenized rows whose labels mask the EOS that ends a trained span."""
    untrained_replies: int = 0
    """Chat replies left as context: the template renders them differently once later turns
    follow (Qwen3 drops earlier turns' reasoning), see `lorakit.data.chat`."""
    weight: float = 1.0
    cached: bool = False

    def add(self, other: DatasetStats) -> None:
        for name in (
            "rows",
            "skipped",
            "truncated",
            "dropped",
            "masked_eos_rows",
            "untrained_replies",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skip_reasons = (self.skip_reasons + other.skip_reasons)[:REASONS_KEPT]


@dataclass
class SplitStats(DatasetStats):
    """A whole split: the datasets added up, then weighted, then packed."""

    packed_rows: int = 0
    """Rows after packing; 0 when not packed."""
    packing_efficiency: float | None = None
    """Real tokens / (packed rows x max_seq_len)."""
    datasets: list[DatasetStats] = field(default_factory=list)


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    stats: dict[str, SplitStats] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """Things about the data a user should know before training on it."""
    source_fingerprints: dict[str, str] = field(default_factory=dict)
    """Content digest of each dataset file the recipe names (by path)."""
    tokenizer_fingerprint: str = ""
    """Digest of what decides the token ids (vocabulary, special tokens, chat template)."""


@dataclass
class DatasetRows:
    """One dataset's usable rows, normalized to its format's fields."""

    format: str
    rows: list[Row]
    stats: DatasetStats


def read_dataset(spec: DatasetSpec, strict: bool = False) -> DatasetRows:
    """Read and check every row; bad rows are skipped and counted (an error with `strict`)."""
    raw = read_rows(spec.path, spec.split, spec.name)
    fmt = spec.format if spec.format != "auto" else detect_format(raw, spec.columns)
    stats = DatasetStats(path=spec.path, format=fmt, rows=len(raw))
    rows = []
    for row in raw:
        try:
            rows.append(Row(normalize(row.data, fmt, spec.columns), row.where))
        except RowProblem as problem:
            _skip(stats, f"{row.where}: {problem}", strict)
    if not rows:
        _nothing_left(stats)
    return DatasetRows(fmt, rows, stats)


def check_format_fits_method(fmt: str, method: str, path: str) -> None:
    """Preference data trains with a preference method, everything else with SFT."""
    if method == "sft" and fmt == "preference":
        raise LorakitError(
            f"{path}: preference data (chosen and rejected answers) trains with train.method "
            "dpo, orpo or simpo; this recipe's method is sft"
        )
    if method != "sft" and fmt != "preference":
        raise LorakitError(
            f"{path}: train.method {method} needs preference data (rows with a prompt, a "
            f"chosen and a rejected answer); this file is {fmt} data"
        )


def needs_chat_template(source: DatasetRows) -> bool:
    """Rows that are conversations render through a chat template (alpaca rows and preference
    rows of strings fall back to plain text without one)."""
    return any(_conversation(row.data) for row in source.rows)


def _conversation(data: dict[str, Any]) -> bool:
    return "messages" in data or ("chosen" in data and "plain_prompt" not in data)


def load_rows(specs: list[DatasetSpec], strict: bool = False) -> list[tuple[Row, str]]:
    """The usable rows of every dataset, as (normalized row, format) pairs."""
    pairs = []
    for spec in specs:
        source = read_dataset(spec, strict)
        pairs += [(row, source.format) for row in source.rows]
    return pairs


def _skip(stats: DatasetStats, reason: str, strict: bool) -> None:
    if strict:
        raise LorakitError(reason)
    stats.skipped += 1
    if len(stats.skip_reasons) < REASONS_KEPT:
        stats.skip_reasons.append(reason)


def _nothing_left(stats: DatasetStats) -> None:
    of = f" of {stats.path}" if stats.path else ""
    raise LorakitError(
        f"{stats.skip_reasons[0]} ({stats.skipped} of {stats.rows} rows{of} have a problem, "
        "none is left to train on)"
    )


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added; the same ids as `tokenizer(texts)`.

    Rendered chat data repeats itself between its special tokens (a default system prompt,
    `assistant\\n`, newlines). Fast tokenizers split the input at special tokens before
    anything else, so each stretch between two of them is tokenized on its own; those stretches
    are tokenized once each and reused (a third fewer tokens to encode for SmolLM2 chat data).
    """
    split = _special_token_splitter(tokenizer)
    if split is None:
        return _encode(tokenizer, texts)
    pieces = [split(text) for text in texts]
    unique = list(dict.fromkeys(p for row in pieces for p in row))
    table = dict(zip(unique, _encode(tokenizer, unique), strict=True))
    return [[t for p in row for t in table[p]] for row in pieces]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # Same ids as tokenizer(texts), without building offsets.
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _special_token_splitter(tokenizer: PreTrainedTokenizerBase):
    """Split text at special tokens (kept as pieces), where that leaves the ids unchanged: not
    when a token strips the whitespace around it, added tokens are matched after normalization,
    or the pre-tokenizer treats the first piece of a text differently (Metaspace's
    `prepend_scheme: first`, Llama-2 style)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(backend, "encode_special_tokens", True):
        return None  # (special tokens encoded as plain text are not split out)
    added = list((getattr(tokenizer, "added_tokens_decoder", None) or {}).values())
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    if backend.normalizer is not None and any(t.normalized for t in added):
        return None
    if '"prepend_scheme":"first"' in backend.to_str().replace(" ", ""):
        return None
    specials = sorted({t.content for t in added if t.special}, key=len, reverse=True)
    if not specials:
        return None
    pattern = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
    return lambda text: [p for p in pattern.split(text) if p]


def tokenize_rows(
    rows: list[tuple[Row, str]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    train_on: str,
    strict: bool = False,
    train_reasoning: bool = True,
) -> tuple[list[Example], DatasetStats]:
    """Tokenize and mask normalized rows, then fit them to `max_seq_len`: longer examples are
    truncated, `text` documents are joined (each closed by EOS) and cut into chunks."""
    stats = DatasetStats(rows=len(rows))
    renderer = Renderer(tokenizer, train_on, train_reasoning)
    rendered: list[tuple[Any, str, str]] = []
    for row, fmt in rows:
        try:
            rendered.append((renderer.segments(row.data, fmt), fmt, row.where))
        except RowProblem as problem:
            _skip(stats, f"{row.where}: {problem}", strict)
    texts = [t for s, _, _ in rendered for t, _ in _text_segments(s)]
    ids = iter(encode_texts(tokenizer, texts))
    vocab = len(tokenizer)
    examples: list[Example] = []
    stream: list[int] = []  # text documents, joined
    for segments, fmt, where in rendered:
        if isinstance(segments, Tokens):
            example = _pretokenized(segments, vocab, train_on, tokenizer.eos_token_id, stats)
            if example is None:
                _skip(
                    stats,
                    f"{where}: 'input_ids' holds ids outside the vocabulary ({vocab})",
                    strict,
                )
                continue
        elif isinstance(segments, PairSegments):
            pair = PreferencePair(_masked(segments.chosen, ids), _masked(segments.rejected, ids))
            _fit_pair(pair, max_seq_len, examples, stats)
            continue
        else:
            example = _masked(segments, ids)
        if fmt == "text":
            stream += example.input_ids
        else:
            _fit(example, max_seq_len, examples, stats)
    examples += _chunks(stream, max_seq_len)
    stats.untrained_replies = renderer.untrained_replies
    if rows and not rendered:
        _nothing_left(stats)
    stats.examples = len(examples)
    stats.tokens = sum(e.token_count for e in examples)
    stats.trained_tokens = sum(e.trained_tokens for e in examples)
    return examples, stats


def _text_segments(segments: Any) -> list[tuple[str, bool]]:
    """The text segments of a rendered row, in the order they are tokenized."""
    if isinstance(segments, PairSegments):
        return segments.chosen + segments.rejected
    return segments if isinstance(segments, list) else []


def _masked(segments: list[tuple[str, bool]], ids: Any) -> Example:
    input_ids: list[int] = []
    labels: list[int] = []
    for _, trained in segments:
        piece = next(ids)
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return Example(input_ids, labels)


def _pretokenized(
    tokens: Tokens, vocab: int, train_on: str, eos_id: int | None, stats: DatasetStats
) -> Example | None:
    if not all(0 <= t < vocab for t in tokens.input_ids):
        return None
    if tokens.labels is None:
        # Without labels nothing tells prompt from reply: every token is trained.
        return Example(list(tokens.input_ids), list(tokens.input_ids))
    labels = tokens.labels if train_on != "all" else list(tokens.input_ids)
    if eos_id is not None and any(
        token == eos_id and label == IGNORE_INDEX and before != IGNORE_INDEX
        for token, label, before in zip(tokens.input_ids[1:], labels[1:], labels[:-1], strict=True)
    ):
        stats.masked_eos_rows += 1
    return Example(list(tokens.input_ids), list(labels))


def _fit(example: Example, max_seq_len: int, out: list[Example], stats: DatasetStats) -> None:
    if len(example.input_ids) > max_seq_len:
        stats.truncated += 1
        example = Example(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
    # The first label is never predicted (no token precedes it), so it does not count.
    if all(label == IGNORE_INDEX for label in example.labels[1:]):
        stats.dropped += 1
        return
    out.append(example)


def _fit_pair(pair: PreferencePair, max_seq_len: int, out: list[Any], stats: DatasetStats) -> None:
    """Truncation keeps the prompt and cuts the answers (counted); a prompt that leaves no room
    for an answer token drops the pair (counted)."""
    prompt = pair.prompt_length
    if prompt >= max_seq_len:
        stats.dropped += 1
        return
    if max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) > max_seq_len:
        stats.truncated += 1
        pair = PreferencePair(
            *(
                Example(side.input_ids[:max_seq_len], side.labels[:max_seq_len])
                for side in (pair.chosen, pair.rejected)
            )
        )
    out.append(pair)


def _chunks(stream: list[int], max_seq_len: int) -> list[Example]:
    """Consecutive `max_seq_len` windows of the joined documents; a last window of one token
    has nothing to predict and is left out."""
    pieces = [stream[i : i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
    return [Example(p, list(p)) for p in pieces if len(p) > 1]


def dataset_examples(
    spec: DatasetSpec,
    data: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_fingerprint: str,
    source_digest: str,
) -> tuple[list[Example], DatasetStats]:
    """One dataset entry, tokenized: from the cache when nothing it depends on has changed.
    `source_digest`: the entry's `source_fingerprint`."""
    key = cache.entry_key(
        source=source_digest,
        spec=spec.model_dump(mode="json", exclude={"weight"}),
        max_seq_len=data.max_seq_len,
        train_on=data.train_on,
        train_reasoning=data.train_reasoning,
        strict=data.strict,
        tokenizer=tokenizer_fingerprint,
    )
    hit = cache.load(key)
    if hit is not None:
        input_ids, labels, record = hit
        known = {f.name for f in fields(DatasetStats)}
        stats = DatasetStats(**{k: v for k, v in record.items() if k in known})
        stats.cached = True
        examples = [Example(i, lab) for i, lab in zip(input_ids, labels, strict=True)]
        if stats.format == "preference":  # stored as chosen, rejected, chosen, …
            examples = [PreferencePair(*examples[i : i + 2]) for i in range(0, len(examples), 2)]
        return examples, stats
    source = read_dataset(spec, data.strict)
    pairs = [(row, source.format) for row in source.rows]
    examples, tokenized = tokenize_rows(
        pairs, tokenizer, data.max_seq_len, data.train_on, data.strict, data.train_reasoning
    )
    stats = source.stats
    stats.add(replace(tokenized, rows=0))
    stats.examples, stats.tokens = tokenized.examples, tokenized.tokens
    stats.trained_tokens = tokenized.trained_tokens
    flat = [s for e in examples for s in _sides(e)]
    cache.store(key, [e.input_ids for e in flat], [e.labels for e in flat], stats)
    return examples, stats


def _sides(example: Example | PreferencePair) -> tuple[Example, ...]:
    if isinstance(example, PreferencePair):
        return (example.chosen, example.rejected)
    return (example,)


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Every dataset of the recipe, tokenized, split, weighted and (optionally) packed.

    A `data.chat_template` override is set on `tokenizer`, so generation and the saved adapter
    use the template the data was rendered with."""
    data = recipe.data
    if data.chat_template:
        tokenizer.chat_template = load_chat_template(data.chat_template)
    fingerprint = cache.tokenizer_fingerprint(tokenizer)
    specs = data.train + (data.validation or [])
    # Each source is hashed once: for its cache key here and for the run's resume check.
    digests = {
        (s.path, s.split, s.name): source_fingerprint(s.path, s.split, s.name) for s in specs
    }

    def tokenized(spec: DatasetSpec) -> tuple[list[Example], DatasetStats]:
        digest = digests[(spec.path, spec.split, spec.name)]
        return dataset_examples(spec, data, tokenizer, fingerprint, digest)

    train_sets = [tokenized(s) for s in data.train]
    for (_, stats), spec in zip(train_sets, data.train, strict=True):
        stats.weight = spec.weight
    val_sets = [tokenized(s) for s in data.validation or []]
    for _, stats in train_sets + val_sets:
        check_format_fits_method(stats.format, recipe.train.method, stats.path)
    rng = random.Random(recipe.train.seed)
    if data.val_split:
        train_sets, held_out = _hold_out(train_sets, data.val_split, rng)
        val_sets = [(held_out, DatasetStats())]
    train = []
    for (examples, _), spec in zip(train_sets, data.train, strict=True):
        train += apply_weight(examples, spec.weight, rng)
    if not train:
        raise LorakitError(
            f"data.train: no example has a trained token within max_seq_len={data.max_seq_len}"
        )
    validation = [e for examples, _ in val_sets for e in examples]
    train_stats = _split_stats(train, [s for _, s in train_sets])
    val_stats = _split_stats(validation, [s for _, s in val_sets if s.path])
    if data.packing:
        train = _pack(train, data.max_seq_len, train_stats)
        validation = _pack(validation, data.max_seq_len, val_stats)
    warnings = data_warnings(tokenizer, train_stats, val_stats)
    return PreparedData(
        train,
        validation,
        {"train": train_stats, "validation": val_stats},
        warnings,
        source_fingerprints={s.path: digests[(s.path, s.split, s.name)] for s in specs},
        tokenizer_fingerprint=fingerprint,
    )


def _hold_out(
    sets: list[tuple[list[Example], DatasetStats]], fraction: float, rng: random.Random
) -> tuple[list[tuple[list[Example], DatasetStats]], list[Example]]:
    """Hold out a seeded random fraction of all training examples for validation."""
    pool = [(d, example) for d, (examples, _) in enumerate(sets) for example in examples]
    order = list(range(len(pool)))
    rng.shuffle(order)
    held = max(1, round(len(order) * fraction))
    if held >= len(order):
        raise LorakitError(f"data.val_split: {fraction} leaves no training examples")
    kept: list[list[Example]] = [[] for _ in sets]
    for i in sorted(order[held:]):
        kept[pool[i][0]].append(pool[i][1])
    held_out = [pool[i][1] for i in sorted(order[:held])]
    return [(k, stats) for k, (_, stats) in zip(kept, sets, strict=True)], held_out


def apply_weight(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    """`weight` x the examples: whole copies, plus a seeded random sample for the fraction
    (at least one example, so a listed dataset never vanishes)."""
    whole, fraction = int(weight), weight - int(weight)
    out = examples * whole
    if fraction and examples:
        count = math.floor(fraction * len(examples) + 0.5)
        if whole == 0:
            count = max(1, count)
        out += [examples[i] for i in sorted(rng.sample(range(len(examples)), count))]
    return out


def _split_stats(examples: list[Example], parts: list[DatasetStats]) -> SplitStats:
    stats = SplitStats(datasets=parts)
    for part in parts:
        stats.add(part)
    formats = {part.format for part in parts if part.format}
    stats.format = formats.pop() if len(formats) == 1 else ""
    stats.examples = len(examples)
    stats.tokens = sum(e.token_count for e in examples)
    stats.trained_tokens = sum(e.trained_tokens for e in examples)
    return stats


def _pack(examples: list[Example], max_seq_len: int, stats: SplitStats) -> list[Example]:
    rows = [Example(*row) for row in pack_examples(examples, max_seq_len)]
    stats.packed_rows = len(rows)
    if rows:
        stats.packing_efficiency = stats.tokens / (len(rows) * max_seq_len)
    return rows


def data_warnings(tokenizer: PreTrainedTokenizerBase, *splits: SplitStats) -> list[str]:
    notes = []
    for split in splits:
        for part in split.datasets:
            if part.skipped:
                more = part.skipped - len(part.skip_reasons)
                notes.append(
                    "\n  ".join(
                        [
                            f"{part.path}: skipped {part.skipped} of {part.rows} rows with "
                            "problems (data.strict: true makes them errors):",
                            *part.skip_reasons,
                            *([f"… and {more} more"] if more else []),
                        ]
                    )
                )
            if part.untrained_replies:
                notes.append(
                    f"{part.path}: {part.untrained_replies} assistant replies are context, not "
                    "trained: the chat template renders them differently once later turns follow "
                    "(e.g. Qwen3 drops the reasoning of turns before the last user message), so "
                    "the whole conversation no longer shows them as they were generated; to train "
                    "every turn, give each as its own row (prompt: the turns before it, "
                    "completion: the reply)"
                )
            if part.masked_eos_rows:
                same = tokenizer.pad_token_id == tokenizer.eos_token_id
                notes.append(
                    f"{part.path}: the labels of {part.masked_eos_rows} rows mask the EOS that "
                    "ends a trained span, so the model does not learn to stop there"
                    + (" (pad token == EOS: they were likely masked as padding)" if same else "")
                )
    closing = reply_closing(tokenizer)
    if closing is not None and not any(t in closing for t in _special_tokens(tokenizer)):
        notes.append(
            f"the chat template closes a reply with {closing!r}, which holds no special token: "
            "the model will not learn a token to stop on (set data.chat_template)"
        )
    return notes


def reply_closing(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """What the chat template renders after a reply's text (e.g. `<|im_end|>\\n`)."""
    if tokenizer.chat_template is None:
        return None
    reply = "\ue000"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    try:
        segments = split_by_prefixes(tokenizer, messages)
    except RowProblem:
        return None
    text = "".join(text for text, index, _ in segments if index == 1)
    return text.split(reply, 1)[-1]


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}


def pad_note(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why a pad token equal to EOS does not mask EOS here (and where it would)."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    return (
        f"the pad token is the EOS token ({tokenizer.eos_token!r}); lorakit masks padding by "
        "position (attention mask and labels), never by token id, so the EOS closing each reply "
        "stays trained. Collators that set labels[input_ids == pad_id] = -100 would mask it."
    )
