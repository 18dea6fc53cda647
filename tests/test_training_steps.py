"""Numerics and stopping rules: NaN / inf steps are skipped, counted and logged, a run that
keeps producing them aborts with a diagnosis, and early stopping ends a run whose eval loss
stops improving."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit.commands.train as train_module
from lorakit.commands.train import train
from lorakit.errors import LorakitError
from lorakit.recipe import EarlyStopping, load_recipe
from lorakit.resume import TrainingState, read_checkpoint
from lorakit.tracking import read_metrics
from lorakit.training.steps import record_evaluation
from tests.conftest import FP32


def poison_steps(monkeypatch, steps: set[int], what: str) -> None:
    """Make the given optimizer steps non-finite: the loss (and so every gradient) NaN, or
    one LoRA gradient inf while the loss stays finite."""
    original = train_module.forward_backward
    calls = {"n": 0}

    def forward_backward(accelerator, loss_module, batches):
        calls["n"] += 1
        loss, tokens = original(accelerator, loss_module, batches)
        if calls["n"] in steps:
            lora = [p for n, p in loss_module.named_parameters() if "lora_A" in n]
            if what == "nan":
                for p in loss_module.parameters():
                    if p.grad is not None:
                        p.grad.fill_(math.nan)
                return math.nan, tokens
            lora[1].grad[0, 0] = math.inf
        return loss, tokens

    monkeypatch.setattr(train_module, "forward_backward", forward_backward)


def lora_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step}" / "adapter_model.safetensors")


def test_a_nan_step_is_skipped_counted_and_logged(tiny_model, write_recipe, monkeypatch):
    recipe = load_recipe(
        write_recipe(
            tiny_model("llama"),
            quant=FP32,
            train={"max_steps": 5, "save_steps": 1, "save_total_limit": None},
        )
    )
    poison_steps(monkeypatch, {3}, "nan")
    result = train(recipe)
    run = result.run_dir
    assert result.steps == 5 and result.skipped_steps == 1
    records = read_metrics(run)
    lr_at_step_3 = 1e-2 * 0.5 * (1 + math.cos(math.pi * 2 / 5))  # cosine, no warmup
    assert [r for r in records if "skipped" in r] == [
        {
            "step": 3,
            "skipped": "loss is nan",
            "lr": pytest.approx(lr_at_step_3),
            "bad_steps_in_a_row": 1,
        }
    ]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 5]
    # The skipped step changed nothing: weights and optimizer state are those of step 2.
    before, skipped, after = lora_weights(run, 2), lora_weights(run, 3), lora_weights(run, 4)
    assert all(torch.equal(before[k], skipped[k]) for k in before)
    assert any(not torch.equal(skipped[k], after[k]) for k in before)
    a = read_checkpoint(run / "checkpoints" / "step-2").optimizer_state()
    b = read_checkpoint(run / "checkpoints" / "step-3").optimizer_state()
    assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])
    assert read_checkpoint(run / "checkpoints" / "step-5").state.skipped_steps == 1
    provenance = json.loads((run / "lorakit.json").read_text())
    assert provenance["skipped_steps"] == 1


def test_an_inf_gradient_with_a_finite_loss_is_skipped(tiny_model, write_recipe, monkeypatch):
    recipe = load_recipe(write_recipe(tiny_model("llama"), quant=FP32, train={"max_steps": 3}))
    poison_steps(monkeypatch, {2}, "inf")
    result = train(recipe)
    skipped = [r for r in read_metrics(result.run_dir) if "skipped" in r]
    assert [(r["step"], r["skipped"]) for r in skipped] == [(2, "gradient norm is inf")]
    assert result.skipped_steps == 1 and math.isfinite(result.train_loss)


def test_k_bad_steps_in_a_row_abort_with_a_diagnosis(tiny_model, write_recipe, monkeypatch):
    recipe = load_recipe(
        write_recipe(
            tiny_model("llama"),
            quant=FP32,
            train={"max_steps": 20, "max_bad_steps": 3, "max_grad_norm": None},
        )
    )
    poison_steps(monkeypatch, set(range(2, 21)), "inf")
    with pytest.raises(LorakitError) as failed:
        train(recipe)
    lines = str(failed.value).splitlines()
    assert lines[0].startswith("training diverged: steps 2–4 (3 in a row, train.max_bad_steps)")
    assert "gradient norm is inf at step 4" in lines[0]
    assert "the weights are those after step 1" in lines[0]
    assert lines[2] == (
        "first non-finite gradient: "
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight"
    )
    assert "lower train.learning_rate (now 0.01)" in lines[3]
    assert "set train.max_grad_norm" in lines[3]
    skipped = [r["step"] for r in read_metrics(Path(recipe.output.dir)) if "skipped" in r]
    assert skipped == [2, 3, 4]


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(tiny_model, write_recipe):
    # No evaluation can beat the best by 100 nats: the run stops after `patience` of them.
    recipe = load_recipe(
        write_recipe(
            tiny_model("llama"),
            quant=FP32,
            train={
                "max_steps": 20,
                "eval_steps": 2,
                "early_stopping": {"patience": 2, "min_delta": 100},
            },
        )
    )
    result = train(recipe)
    assert result.steps == 4
    assert result.stop_reason.startswith("early stopping: no eval loss improvement over 100 in 2")
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    state = read_checkpoint(result.run_dir / "checkpoints" / "step-4").state
    assert state.evals_without_improvement == 2 and state.best_eval_step == 0
    provenance = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert provenance["stop_reason"] == result.stop_reason and provenance["steps"] == 4
    # Resuming an early-stopped run does not train on.
    assert train(recipe, resume="auto").steps == 4


def test_early_stopping_counts_evaluations_without_real_improvement():
    state = TrainingState()
    rule = EarlyStopping(patience=2, min_delta=0.1)
    stops = [record_evaluation(state, loss, rule) for loss in [3.0, 2.5, 2.45, 2.3, 2.35]]
    # 2.45 is not 0.1 better than 2.5 (one miss); 2.3 is (the count restarts); 2.35 misses.
    assert stops == [False, False, False, False, False]
    assert (state.best_eval_loss, state.evals_without_improvement) == (2.3, 1)
    assert record_evaluation(state, 2.25, rule) is True
    assert state.last_eval_loss == 2.25


def test_early_stopping_needs_evaluations(tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"), train={"early_stopping": {"patience": 2}})
    with pytest.raises(LorakitError, match="train: early_stopping needs eval_steps"):
        load_recipe(path)


def test_checkpointing_every_n_layers_needs_checkpointing(tiny_model, write_recipe):
    train = {"gradient_checkpointing": False, "checkpoint_every_n_layers": 2}
    path = write_recipe(tiny_model("llama"), train=train)
    with pytest.raises(
        LorakitError, match="checkpoint_every_n_layers needs gradient_checkpointing"
    ):
        load_recipe(path)
