"""Batches: a deterministic per-epoch shuffle (optionally grouped by length) and right-padded
tensors."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from lorakit.data.pipeline import IGNORE_INDEX, Example


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


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
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


def make_loader(
    examples: list[Example],
    batch_size: int,
    pad_token_id: int,
    seed: int,
    shuffle: bool,
    group_by_length: bool = False,
) -> DataLoader:
    if shuffle and group_by_length and examples:
        lengths = [len(e.input_ids) for e in examples]
        sampler: EpochShuffle = LengthGroupedShuffle(lengths, batch_size, seed)
    else:
        sampler = EpochShuffle(len(examples), seed, shuffle)
    return DataLoader(
        examples,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=lambda batch: collate(batch, pad_token_id),
    )
