"""Packing: best-fit decreasing rows, restarting positions, and no attention across examples:
a packed batch has the same loss and gradients as the same examples unpacked."""

import io
import math

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from lorakit.data import IGNORE_INDEX, Example, collate, prepare_data
from lorakit.data.packing import best_fit_decreasing, pack_examples, split_packed
from lorakit.loss import TokenNLL
from lorakit.models import load_tokenizer
from lorakit.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("private_cache")


def test_best_fit_decreasing_fills_the_fullest_row_that_fits():
    lengths = [5, 3, 7, 2, 4, 1, 6]
    bins = best_fit_decreasing(lengths, capacity=8)
    # 7 → new; 6 → new; 5 → new; 4 → new; 3 → row of 5 (room 3, the fullest that fits);
    # 2 → row of 6 (room 2); 1 → row of 7 (room 1).
    assert bins == [[2, 5], [6, 3], [0, 1], [4]]
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)


def test_packed_rows_restart_positions_and_mask_each_first_label():
    examples = [Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [-100, 5]), Example([6], [6])]
    rows = pack_examples(examples, capacity=4)
    assert rows == [
        ([1, 2, 3, 6], [IGNORE_INDEX, 2, 3, IGNORE_INDEX], [0, 1, 2, 0]),
        ([4, 5], [IGNORE_INDEX, 5], [0, 1]),
    ]
    assert split_packed([0, 1, 2, 0]) == [(0, 3), (3, 4)]


def test_packed_collate_has_no_padding_mask_and_positions_for_padding():
    rows = [Example(*row) for row in [([1, 2, 3], [-100, 2, 3], [0, 1, 0]), ([4], [-100], [0])]]
    batch = collate(rows, pad_token_id=0)
    assert batch["attention_mask"] is None
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    flat = collate(rows, pad_token_id=0, flatten=True)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 0]]


def _examples(vocab: int, count: int = 7) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for k in range(count):
        length = 3 + (5 * k) % 11
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        # A masked prompt then a trained reply, like chat data.
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        examples.append(Example(ids, labels))
    return examples


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("flatten", [False, True])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model, arch, flatten):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model(arch), dtype=torch.float32, attn_implementation="sdpa"
    )
    loss = TokenNLL(model)
    examples = _examples(model.config.vocab_size)
    packed = [Example(*row) for row in pack_examples(examples, capacity=16)]
    assert len(packed) < len(examples)

    def nll_and_grad(batch):
        model.zero_grad()
        nll, tokens = loss(**batch)
        nll.backward()
        grad = model.get_input_embeddings().weight.grad.clone()
        return nll.item(), int(tokens), grad

    unpacked_nll, unpacked_tokens, unpacked_grad = nll_and_grad(collate(examples, 0))
    packed_nll, packed_tokens, packed_grad = nll_and_grad(collate(packed, 0, flatten=flatten))
    assert packed_tokens == unpacked_tokens
    assert packed_nll / packed_tokens == pytest.approx(unpacked_nll / unpacked_tokens, abs=1e-4)
    # float32 sums in another order: ~2e-6 relative; cross-talk changes them at the 1e-1 level.
    assert torch.allclose(packed_grad, unpacked_grad, rtol=1e-4, atol=1e-4)


def test_cross_talk_would_change_the_loss(tiny_model):
    """The check above can fail: the same packed rows with one plain causal mask (positions
    counting straight through) give a different loss."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    loss = TokenNLL(model)
    examples = _examples(model.config.vocab_size)
    packed = [Example(*row) for row in pack_examples(examples, capacity=16)]
    batch = collate(packed, 0)
    separate, _ = loss(**batch)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    mixed, _ = loss(**batch)
    assert abs(separate.item() - mixed.item()) > 1e-2


def test_recipe_packing_reports_efficiency_and_trains(tmp_path, tiny_model, write_recipe):
    from lorakit.commands.train import train

    model = tiny_model("llama")
    path = write_recipe(model, data={"packing": True}, quant={"bnb_4bit_compute_dtype": "float32"})
    recipe = load_recipe(
        path, ["train.max_steps=2", "train.micro_batch_size=1", "data.max_seq_len=128"]
    )
    data = prepare_data(recipe, load_tokenizer(str(model)))
    stats = data.stats["train"]
    assert stats.examples == 8
    assert stats.packed_rows == len(data.train) < 8
    assert stats.packing_efficiency == pytest.approx(
        stats.tokens / (stats.packed_rows * recipe.data.max_seq_len)
    )
    assert sum(len(split_packed(row.position_ids)) for row in data.train) == 8
    log = io.StringIO()
    result = train(recipe, console=Console(file=log, width=200))
    assert result.steps == 2 and math.isfinite(result.train_loss)
    assert result.eval_after is not None
    efficiency = f"{stats.packing_efficiency:.1%}"
    assert f"packed into {stats.packed_rows} rows ({efficiency} full)" in log.getvalue()
