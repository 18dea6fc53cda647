"""Packing: several examples per row of `max_seq_len`, with no attention across them.

Rows are filled best-fit decreasing: longest example first, each into the fullest row that
still has room for it. A packed row carries `position_ids` that restart at 0 for every example;
transformers reads the restarts as sequence boundaries (with `attention_mask=None`) and builds a
block-diagonal causal mask for SDPA/eager attention, or runs the varlen kernel for
flash-attention. The first label of every example is masked: in the row it would be predicted
from the previous example's last token, and unpacked it is never predicted at all, so packed and
unpacked batches have the same loss.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Protocol

from lorakit.data.formats import IGNORE_INDEX


class _Example(Protocol):
    input_ids: list[int]
    labels: list[int]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each bin; every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the first fit is the best fit
    for i in order:
        size = lengths[i]
        k = bisect.bisect_left(free, (size, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - size, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= size
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def pack_examples(examples: Sequence[_Example], capacity: int) -> list[tuple[list, list, list]]:
    """(input_ids, labels, position_ids) of each packed row."""
    rows = []
    for members in best_fit_decreasing([len(e.input_ids) for e in examples], capacity):
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            example = examples[i]
            input_ids += example.input_ids
            labels += [IGNORE_INDEX, *example.labels[1:]]
            positions += range(len(example.input_ids))
        rows.append((input_ids, labels, positions))
    return rows


def split_packed(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row."""
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    return list(zip(starts, starts[1:] + [len(position_ids)], strict=True))
