"""Batches: a deterministic per-epoch shuffle and right-padded (or packed) tensors."""

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


def collate(
    examples: list[Example], pad_token_id: int, flatten: bool = False
) -> dict[str, torch.Tensor | None]:
    """Right-padded tensors. Packed rows (with `position_ids`) get `attention_mask=None`: the
    restarting positions tell transformers where each example begins (a padding mask would
    hide them). `flatten` joins the rows into one, the layout flash-attention's varlen path
    reads."""
    if examples[0].position_ids is not None:
        return _collate_packed(examples, pad_token_id, flatten)
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
) -> DataLoader:
    return DataLoader(
        examples,
        batch_size=batch_size,
        sampler=EpochShuffle(len(examples), seed, shuffle),
        collate_fn=lambda batch: collate(batch, pad_token_id, flatten),
        # Each new iterator draws a seed; from its own generator it leaves the global torch RNG
        # (dropout) alone, so a run resumed mid-epoch draws the same masks as an unbroken one.
        generator=torch.Generator().manual_seed(seed),
    )
