"""Length-grouped batches: a random epoch order with less padding."""

import pytest
import torch

from lorakit.data import IGNORE_INDEX, collate, make_loader
from lorakit.data.batching import EpochShuffle, LengthGroupedShuffle
from lorakit.data.pipeline import Example
from lorakit.models import load_tokenizer
from lorakit.recipe import load_recipe
from tests.conftest import tokenize

pytestmark = pytest.mark.usefixtures("private_cache")


LENGTHS = [3, 40, 7, 25, 12, 33, 5, 18, 29, 9, 36, 14, 21, 2, 38, 11, 27, 6, 31, 16, 23, 8]


def examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths]


def padded_tokens(loader) -> int:
    return sum(batch["input_ids"].numel() for batch in loader)


def test_each_epoch_is_a_reproducible_permutation():
    sampler = LengthGroupedShuffle(LENGTHS, batch_size=4, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(len(LENGTHS)))
    assert list(LengthGroupedShuffle(LENGTHS, batch_size=4, seed=7)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(len(LENGTHS))) and second != first


def test_batches_group_similar_lengths_and_only_the_last_is_short():
    sampler = LengthGroupedShuffle(LENGTHS, batch_size=4, seed=0)
    order = list(sampler)
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 2]
    # One window holds all 22 examples: consecutive slices of the sorted lengths.
    ranked = sorted(range(len(LENGTHS)), key=LENGTHS.__getitem__)
    expected = [ranked[i : i + 4] for i in range(0, 22, 4)]
    assert sorted(map(sorted, batches)) == sorted(map(sorted, expected))
    assert sorted(batches[-1]) == sorted(expected[-1])


def test_windows_bound_how_far_the_order_is_sorted():
    sampler = LengthGroupedShuffle(LENGTHS, batch_size=2, seed=0, window=2)  # 4 examples
    order = list(sampler)
    permutation = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0))
    windows = [set(permutation[i : i + 4].tolist()) for i in range(0, len(LENGTHS), 4)]
    batches = [set(order[i : i + 2]) for i in range(0, len(order), 2)]
    assert all(any(b <= w for w in windows) for b in batches)


def test_grouping_cuts_padding():
    data = examples(LENGTHS)
    plain = make_loader(data, 4, 0, seed=0, shuffle=True)
    grouped = make_loader(data, 4, 0, seed=0, shuffle=True, group_by_length=True)
    real = sum(LENGTHS)
    assert isinstance(plain.sampler, EpochShuffle)
    assert isinstance(grouped.sampler, LengthGroupedShuffle)
    # Sorted batches of 4 pad each batch to its longest member only.
    ranked = sorted(LENGTHS)
    best = sum(max(ranked[i : i + 4]) * len(ranked[i : i + 4]) for i in range(0, 22, 4))
    assert padded_tokens(grouped) == best == 472
    assert padded_tokens(plain) > best > real == 414


def test_validation_loader_keeps_file_order():
    loader = make_loader(examples(LENGTHS), 4, 0, seed=0, shuffle=False, group_by_length=True)
    assert list(loader.sampler) == list(range(len(LENGTHS)))


def test_recipe_key_defaults_on_and_turns_off(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {train: x.jsonl}\n")
    assert load_recipe(path).data.group_by_length is True
    assert load_recipe(path, ["data.group_by_length=false"]).data.group_by_length is False


def test_collate_pads_right_and_masks_padding(tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "The sea", "completion": " be wide and deep."},
    ]
    examples, _ = tokenize(tmp_path, rows, tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert short < batch["input_ids"].shape[1]
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (
        batch["input_ids"].shape[1] - short
    )
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
