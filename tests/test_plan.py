"""`lorakit plan` and the memory check of `lorakit train`, on a tiny model and on the shipped GPU
recipes (offline: their configs ship with lorakit)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lorakit.commands.train as train_command
from lorakit.tracking import read_metrics
from tests.conftest import one_error_line, run_cli

GPU_RECIPES = sorted(Path("configs/gpu").glob("*.yaml"))


def planned_total(stdout: str) -> float:
    return float(re.search(r"│ total\s+│\s+([0-9.]+) │", stdout).group(1))


@pytest.fixture
def refuse_loading(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_plan_breaks_the_peak_down_without_loading_the_model(
    tiny_model, write_recipe, refuse_loading
):
    recipe = write_recipe(tiny_model("llama"))
    code, out, err = run_cli("plan", recipe, "--memory", "8GiB")
    assert code == 0, err
    for part in (
        "frozen 4-bit weights",
        "LoRA weights",
        "optimizer state",
        "activations",
        "runtime",
    ):
        assert part in out
    assert "fits in 8.00 GiB (cpu" in out
    assert "8 rows tokenized, the longest" in out
    assert "largest that fit" in out and "4 optimizer steps" in out


def test_plan_refuses_a_recipe_that_does_not_fit_and_lists_the_levers(tiny_model, write_recipe):
    # Packed rows of 4096 tokens: the micro-batch is what takes the memory.
    packed = {"packing": True, "max_seq_len": 4096}
    recipe = write_recipe(tiny_model("llama"), data=packed, train={"micro_batch_size": 8})
    _, out, _ = run_cli("plan", recipe, "--memory", "8GiB")
    needed = planned_total(out)
    _, out, _ = run_cli("plan", recipe, "--memory", "8GiB", "--set", "train.micro_batch_size=1")
    budget = f"{(needed + planned_total(out)) / 2:.3f}GiB"
    code, out, err = run_cli("plan", recipe, "--memory", budget)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: the recipe needs about {needed:.2f} GiB at its peak")
    assert "set train.micro_batch_size=" in line or "set data.max_seq_len=" in line
    assert "levers (each alone)" in out and "does not fit" in out


def test_plan_probe_times_real_steps(tiny_model, write_recipe):
    recipe = write_recipe(tiny_model("llama"))
    code, out, err = run_cli("plan", recipe, "--memory", "8GiB", "--probe")
    assert code == 0, err
    seconds = float(re.search(r"\(([0-9.]+) s per micro-batch", out).group(1))
    assert seconds > 0


@pytest.mark.parametrize("path", GPU_RECIPES, ids=[p.stem for p in GPU_RECIPES])
def test_the_gpu_recipes_plan_offline(path, refuse_loading):
    code, out, err = run_cli("plan", path, "--device", "cuda", "--memory", "24GiB")
    assert code == 0, err
    assert "published hyperparameters shipped with" in out
    # checkpointing `auto`: 24 GiB holds the recipe only with every layer checkpointed
    assert re.search(r"auto train\.gradient_checkpointing\s*│\s*on \(", out)
    assert "(cuda, bfloat16)" in out
    assert 8 < planned_total(out) < 24  # a 7-8B QLoRA at 2048 tokens on a 24 GB card


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_planning_for_a_gpu_that_is_not_here_needs_its_size(tiny_model, write_recipe):
    code, _, err = run_cli("plan", write_recipe(tiny_model("llama")), "--device", "cuda")
    assert code == 2
    assert one_error_line(err) == "error: --device cuda: no GPU here; give its size with --memory"


def test_train_refuses_before_loading_when_memory_is_short(
    tiny_model, write_recipe, refuse_loading, monkeypatch, tmp_path
):
    monkeypatch.setattr(train_command, "available_memory", lambda device: 64 * 2**20)
    recipe = write_recipe(tiny_model("llama"))
    code, _, err = run_cli("train", recipe)
    assert code == 2
    assert one_error_line(err).startswith("error: the recipe needs about ")
    assert "0.06 GiB is available" in err
    assert not (tmp_path / "runs").exists()


def test_train_records_the_plan_beside_the_measured_peak(tiny_model, write_recipe, monkeypatch):
    """With --skip-memory-check a refused recipe trains anyway, and the run records both."""
    monkeypatch.setattr(train_command, "available_memory", lambda device: 64 * 2**20)
    recipe = write_recipe(tiny_model("llama"), train={"max_steps": 1})
    code, _, err = run_cli("train", recipe, "--skip-memory-check")
    assert code == 0, err
    record = [
        r for r in read_metrics(recipe.parent / "runs" / "recipe") if "memory_peak_bytes" in r
    ]
    (memory,) = record
    assert memory["memory_peak_scope"] == "loop"
    assert memory["memory_planned_bytes"] > 0 and memory["memory_peak_bytes"] > 0
    assert "peak memory" in err and "planned" in err


def test_auto_values_are_said_with_their_reasons(tiny_model, write_recipe):
    recipe = write_recipe(
        tiny_model("llama"),
        train={"max_steps": 1, "gradient_checkpointing": "auto", "micro_batch_size": "auto"},
    )
    code, _, err = run_cli("train", recipe)
    assert code == 0, err
    said = " ".join(err.split())
    assert "auto: train.micro_batch_size = 4 (the largest of the effective batch 4" in said
    assert "auto: train.gradient_checkpointing = off" in said
