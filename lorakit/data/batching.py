"""Batches: a deterministic per-epoch shuffle (optionally grouped by length) and right-padded
(or packed) tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from lorakit.data.pipeline import IGNORE_INDEX, Example, PreferencePair


class EpochShuffle(Sampler[int]):
    """A fresh permutation per epoch, reproducible from (seed, epoch) alone."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class LengthGroupedShuffle(EpochShuffle):
    """A seeded shuffle whose micro-batches hold examples of similar length: less padding.

    Each epoch: shuffle, sort every window of `window` micro-batches by length, cut it into
    micro-batches and shuffle those. The epoch order stays random, a batch just stops mixing a
    20-token example with a 200-token one. Only the last batch may be short; it stays last so
    the DataLoader's consecutive grouping keeps every batch as built."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 64) -> None:
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size, self.span = lengths, batch_size, batch_size * window

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, self.size, self.span):
            window = sorted(order[start : start + self.span], key=self.lengths.__getitem__)
            batches += [
                window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)
            ]
        short = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        return iter([index for batch in shuffled + short for index in batch])


def collate(
    examples: list[Example], pad_token_id: int, flatten: bool = False, share_prefix: bool = False
) -> dict[str, torch.Tensor | None]:
    """Right-padded tensors. Packed rows (with `position_ids`) get `attention_mask=None`: the
    restarting positions tell transformers where each example begins (a padding mask would
    hide them). `flatten` joins the rows into one, the layout flash-attention's varlen path
    reads. `share_prefix`: examples that start with the same untrained tokens become one row
    holding those tokens once (`lorakit.shared_prefix`)."""
    if isinstance(examples[0], PreferencePair):
        return collate_pairs(examples, pad_token_id, share_prefix)
    if examples[0].position_ids is not None:
        return _collate_packed(examples, pad_token_id, flatten)
    prefix = trainable_shared_prefix(examples) if share_prefix else 0
    if prefix:
        return collate_shared(examples, prefix)
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(
    pairs: Sequence[PreferencePair], pad_token_id: int, share_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """2P rows: the P chosen answers, then the P rejected ones in the same pair order (TRL's
    layout), so one forward runs both sides. With `share_prefix` the prompt tokens every row
    starts with run once (one pair per micro-batch: its whole prompt). `pairs` counts the pairs
    (the step's loss is normalized by them); `reference` holds precomputed reference log-probs
    in row order when every pair has them."""
    rows = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    batch = collate(rows, pad_token_id, share_prefix=share_prefix)
    batch["pairs"] = torch.tensor(len(pairs))
    if all(pair.reference is not None for pair in pairs):
        sides = [[pair.reference[side] for pair in pairs] for side in (0, 1)]
        batch["reference"] = torch.tensor(sides[0] + sides[1], dtype=torch.float64)
    return batch


MIN_SHARED_PREFIX = 4
"""Shorter common prefixes are not worth a separate prefix pass (generation) or a second
attention call per layer (training)."""


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def trainable_shared_prefix(examples: Sequence[Example]) -> int:
    """The prefix a batch can share in training: common tokens whose labels, and the label of
    the first token after them, are all masked (that token is predicted from the prefix in
    every example, so it may be counted in none); 0 when not worth sharing."""
    if len(examples) < 2:
        return 0
    length = shared_prefix_length([e.input_ids for e in examples])
    for example in examples:
        trained = next((i for i, t in enumerate(example.labels) if t != IGNORE_INDEX), None)
        if trained is not None:
            length = min(length, trained - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


def collate_shared(examples: Sequence[Example], prefix: int) -> dict[str, torch.Tensor]:
    """One row: the `prefix` tokens once, then each example's remaining tokens (longest first:
    a compiled attention then sees the same size order in every batch), with positions
    continuing the prefix's; `segments` holds [prefix, own length of each example] and `order`
    which example each own part is."""
    input_ids, labels = list(examples[0].input_ids[:prefix]), list(examples[0].labels[:prefix])
    positions = list(range(prefix))
    segments = [prefix]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    for example in (examples[i] for i in order):
        own = len(example.input_ids) - prefix
        input_ids += example.input_ids[prefix:]
        labels += example.labels[prefix:]
        positions += range(prefix, prefix + own)
        segments.append(own)
    return {
        "input_ids": torch.tensor([input_ids]),
        "attention_mask": torch.ones((1, len(input_ids)), dtype=torch.long),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "segments": torch.tensor(segments),
        "order": torch.tensor(order),
    }


def _collate_packed(
    examples: list[Example], pad_token_id: int, flatten: bool
) -> dict[str, torch.Tensor | None]:
    if flatten:
        examples = [
            Example(
                [t for e in examples for t in e.input_ids],
                [t for e in examples for t in e.labels],
                [t for e in examples for t in e.position_ids],
            )
        ]
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    # Padding gets positions of its own (0, 1, …): a separate sequence no example attends to.
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        position_ids[row, :n] = torch.tensor(example.position_ids)
        position_ids[row, n:] = torch.arange(width - n)
    return {
        "input_ids": input_ids,
        "attention_mask": None,
        "labels": labels,
        "position_ids": position_ids,
    }


def make_loader(
    examples: list[Example],
    batch_size: int,
    pad_token_id: int,
    seed: int,
    shuffle: bool,
    flatten: bool = False,
    group_by_length: bool = False,
    processes: int = 1,
    share_prefix: bool = False,
) -> DataLoader:
    """`processes`: how many processes split each step's batches between them. Length groups
    are then built for the global batch, so N processes see the examples one process with
    N times the micro-batch would."""
    if shuffle and group_by_length and examples:
        lengths = [e.length for e in examples]
        sampler: EpochShuffle = LengthGroupedShuffle(lengths, batch_size * processes, seed)
    else:
        sampler = EpochShuffle(len(examples), seed, shuffle)
    return DataLoader(
        examples,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=lambda batch: collate(batch, pad_token_id, flatten, share_prefix),
        # Each new iterator draws a seed; from its own generator it leaves the global torch RNG
        # (dropout) alone, so a run resumed mid-epoch draws the same masks as an unbroken one.
        generator=torch.Generator().manual_seed(seed),
    )
