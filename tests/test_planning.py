"""What the memory plan decides on a machine: the `auto` values, the refusal of a recipe that
cannot fit (before anything loads), and the measurement the plan is compared with."""

from __future__ import annotations

import mmap

import pytest
import torch

from lorakit import planning
from lorakit.errors import LorakitError
from lorakit.memory_plan import GiB, with_values
from lorakit.models import load_config
from lorakit.planning import HEADROOM, check_fits, parse_size, plan_of, resolve_auto, sized
from lorakit.recipe import Recipe

SHAPE = {"device": "cpu", "processes": 1, "fsdp": False}


def make_recipe(model_dir, **sections) -> Recipe:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "quant": {"bnb_4bit_compute_dtype": "float32"},
        "data": {"train": "unused.jsonl", "max_seq_len": 512},
        "train": {"gradient_accumulation_steps": 4},
        "output": {"dir": "unused"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Recipe.model_validate(raw)


@pytest.fixture(scope="module")
def llama(tiny_model):
    folder = tiny_model("llama")
    return folder, load_config(str(folder))


@pytest.mark.parametrize(
    "text, size",
    [
        ("24GiB", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("512 MiB", 512 * 2**20),
        ("1.5TiB", 1.5 * 2**40),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


def test_a_size_that_is_not_one():
    with pytest.raises(LorakitError, match=r"--memory: 'lots' is not a size"):
        parse_size("lots")


def test_with_memory_to_spare_auto_spends_it_on_speed(llama):
    folder, config = llama
    recipe = make_recipe(folder, train={"micro_batch_size": "auto", "torch_compile": "auto"})
    resolved, decisions = resolve_auto(recipe, config, budget=100 * GiB, train_examples=16, **SHAPE)
    tcfg = resolved.train
    assert tcfg.gradient_checkpointing is False
    # The effective batch (4 x 4) is one micro-batch; the loss is token-normalized either way.
    assert (tcfg.micro_batch_size, tcfg.gradient_accumulation_steps) == (16, 1)
    assert tcfg.torch_compile is False  # one optimizer step does not pay the compilation back
    said = {d.key: d.value for d in decisions}
    assert said == {
        "train.micro_batch_size": 16,
        "train.gradient_checkpointing": "off",
        "train.torch_compile": "off",
    }


def test_checkpointing_auto_checkpoints_the_fewest_layers_that_fit(llama):
    """With a budget between the plans of 'every layer' and 'none', auto picks a choice that fits
    with the headroom, and the next faster choice would not have."""
    folder, config = llama
    recipe = make_recipe(folder, train={"micro_batch_size": 16})

    def total(every: int) -> int:
        values = {"train__gradient_checkpointing": every > 0}
        if every:
            values["train__checkpoint_every_n_layers"] = every
        return plan_of(with_values(recipe, **values), config, **SHAPE).total

    on, off = total(1), total(0)
    assert on < off
    budget = int((on + off) / 2 / HEADROOM)
    resolved, (decision,) = resolve_auto(recipe, config, budget=budget, train_examples=8, **SHAPE)
    tcfg = resolved.train
    assert tcfg.gradient_checkpointing is True
    chosen = tcfg.checkpoint_every_n_layers
    assert total(chosen) <= HEADROOM * budget
    faster = planning.CHECKPOINTING_CHOICES[planning.CHECKPOINTING_CHOICES.index(chosen) - 1]
    assert total(faster) > HEADROOM * budget
    assert decision.value == ("on" if chosen == 1 else f"1 layer in {chosen}")


def test_micro_batch_auto_keeps_the_effective_batch_when_memory_is_short(llama):
    folder, config = llama
    recipe = make_recipe(folder, train={"micro_batch_size": "auto", "gradient_checkpointing": True})

    def total(micro: int) -> int:
        return plan_of(with_values(recipe, train__micro_batch_size=micro), config, **SHAPE).total

    budget = int((total(4) + total(8)) / 2 / HEADROOM)
    resolved, _ = resolve_auto(recipe, config, budget=budget, train_examples=64, **SHAPE)
    assert (resolved.train.micro_batch_size, resolved.train.gradient_accumulation_steps) == (4, 4)


def test_compile_auto_is_on_for_long_runs_and_never_under_fsdp(llama):
    folder, config = llama
    recipe = make_recipe(folder, train={"torch_compile": "auto", "gradient_checkpointing": True})
    long_run = {"budget": 100 * GiB, "train_examples": 4 * 600}  # 600 micro-batches
    resolved, _ = resolve_auto(recipe, config, **long_run, **SHAPE)
    assert resolved.train.torch_compile is True
    fsdp = {**SHAPE, "processes": 2, "fsdp": True}
    resolved, (decision,) = resolve_auto(recipe, config, **long_run, **fsdp)
    assert resolved.train.torch_compile is False and decision.why == "FSDP"


def test_rows_are_planned_as_long_as_the_data_has_them(llama):
    folder, config = llama
    recipe = make_recipe(folder, train={"gradient_checkpointing": True})
    assert sized(recipe, 100).data.max_seq_len == 100
    assert sized(recipe, 4096) is recipe  # truncated to max_seq_len anyway
    packed = make_recipe(folder, data={"packing": True})
    assert sized(packed, 100) is packed  # packed rows fill max_seq_len
    short = plan_of(recipe, config, longest=100, **SHAPE)
    assert short.total < plan_of(recipe, config, **SHAPE).total


def test_a_preference_micro_batch_is_planned_as_twice_the_rows(llama):
    folder, config = llama
    sft = make_recipe(folder, train={"micro_batch_size": 4, "gradient_checkpointing": True})
    dpo = make_recipe(
        folder, train={"method": "dpo", "micro_batch_size": 2, "gradient_checkpointing": True}
    )
    assert plan_of(dpo, config, **SHAPE).activations == plan_of(sft, config, **SHAPE).activations


def test_a_recipe_that_cannot_fit_is_refused_with_its_numbers_and_a_lever(llama):
    folder, config = llama
    recipe = make_recipe(folder, train={"micro_batch_size": 16, "gradient_checkpointing": True})
    plan = plan_of(recipe, config, **SHAPE)
    check_fits(recipe, config, plan, plan.total, **SHAPE)  # exactly enough: accepted
    smaller = plan_of(with_values(recipe, train__micro_batch_size=1), config, **SHAPE)
    budget = (plan.total + smaller.total) // 2
    with pytest.raises(LorakitError) as refused:
        check_fits(recipe, config, plan, budget, **SHAPE)
    message = str(refused.value)
    assert message.startswith(
        f"the recipe needs about {plan.total / GiB:.2f} GiB at its peak (memory plan) and "
        f"{budget / GiB:.2f} GiB is available: set "
    )
    assert "train.micro_batch_size=" in message or "data.max_seq_len=" in message


def test_the_peak_meter_sees_what_the_loop_allocates():
    meter = planning.PeakMeter(torch.device("cpu"))
    meter.start()
    before = meter.peak()
    # 64 MiB of fresh pages, touched (a tensor could reuse heap memory already resident)
    size = 64 * 2**20
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    after = meter.peak()
    block.close()
    assert before is not None and after is not None
    assert after - before >= 60 * 2**20


def test_without_a_cxx_compiler_auto_leaves_compile_off_and_true_is_refused(llama, monkeypatch):
    folder, config = llama
    monkeypatch.setattr(planning, "compiler_found", lambda: False)
    recipe = make_recipe(folder, train={"torch_compile": "auto", "gradient_checkpointing": True})
    resolved, (decision,) = resolve_auto(
        recipe, config, budget=100 * GiB, train_examples=4 * 600, **SHAPE
    )
    assert resolved.train.torch_compile is False
    assert decision.why.startswith("no C++ compiler for inductor here")
    wanted = make_recipe(folder, train={"torch_compile": True})
    with pytest.raises(
        LorakitError, match="train.torch_compile: inductor needs a C\\+\\+ compiler"
    ):
        planning.check_compiler(wanted, "cpu")
    planning.check_compiler(wanted, "cuda")  # Triton builds the GPU kernels
