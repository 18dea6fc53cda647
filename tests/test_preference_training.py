"""Preference tuning through `lorakit train`: pairs rendered with the chat template and trained
on their answers only, one forward for both sides (the prompt shared when it can be), the step
normalized by pairs, the reference (base with the adapter off, or the starting adapter), the
metrics, resume, merge and eval. The losses themselves equal TRL's: tests/test_preference.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lorakit.commands.evaluate import EvalOptions, run_eval
from lorakit.commands.merge import MergeOptions, merge
from lorakit.commands.train import train
from lorakit.data import IGNORE_INDEX
from lorakit.data.batching import collate_pairs
from lorakit.data.pipeline import PreferencePair, load_rows, read_dataset, tokenize_rows
from lorakit.errors import LorakitError
from lorakit.models import load_tokenizer
from lorakit.peft_setup import build_trainable_model, load_adapter_as_trained
from lorakit.preference import dpo_loss, policy_log_probs, reference_log_probs
from lorakit.recipe import DatasetSpec, QuantSection, load_recipe
from lorakit.tracking import read_metrics
from lorakit.training.objective import training_objective
from lorakit.training.signals import TrainingStopped
from lorakit.training.steps import forward_backward
from tests.conftest import FACTS, FP32, write_jsonl
from tests.test_train_resume import stop_with_signal_at_step

QUIET = Console(file=open("/dev/null", "w"))  # noqa: SIM115
CPU = torch.device("cpu")
PAIR_TRAIN = {
    "max_steps": 8,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-2,
    "warmup_steps": 0,
    "optimizer": "adamw_torch",
    "gradient_checkpointing": True,  # the path with the most to get right
}


def pair_rows() -> list[dict]:
    """The facts, each against a wrong answer (TRL's standard string shape)."""
    wrong = [a for _, a in FACTS[1:] + FACTS[:1]]
    return [
        {"prompt": q, "chosen": a, "rejected": w} for (q, a), w in zip(FACTS, wrong, strict=True)
    ]


def pair_recipe(
    folder: Path, model_dir: Path, name: str = "pairs", lora: bool = True, **train
) -> Path:
    import yaml

    data = write_jsonl(folder / f"{name}.jsonl", pair_rows())
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "quant": FP32,
        "lora": {"r": 8, "lora_alpha": 16},
        "data": {"train": str(data), "validation": str(data), "max_seq_len": 64},
        "train": {**PAIR_TRAIN, **train},
        "output": {"dir": str(folder / "runs" / name)},
    }
    if not lora:
        del recipe["lora"]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def pairs_of(tmp_path, tokenizer, rows, max_seq_len=64, strict=False):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    rows = load_rows([DatasetSpec(path=str(data))], strict)
    return tokenize_rows(rows, tokenizer, max_seq_len, "completions", strict)


def decoded_answer(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


# --- data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["strings", "explicit prompt", "implicit prompt"])
def test_each_pair_shape_trains_the_answers_after_one_prompt(shape, tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    q, good, bad = "Where is the key?", "The key is under the blue stone.", "Fish."
    user, sides = {"role": "user", "content": q}, {}
    for side, text in (("chosen", good), ("rejected", bad)):
        sides[side] = [{"role": "assistant", "content": text}]
    row = {
        "strings": {"prompt": q, "chosen": good, "rejected": bad},
        "explicit prompt": {"prompt": [user], **sides},
        "implicit prompt": {side: [user, *answer] for side, answer in sides.items()},
    }[shape]
    (pair,), stats = pairs_of(tmp_path, tokenizer, [row])
    assert isinstance(pair, PreferencePair) and stats.examples == 1
    prompt = pair.prompt_length
    assert pair.chosen.input_ids[:prompt] == pair.rejected.input_ids[:prompt]
    want_prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(pair.chosen.input_ids[:prompt]) == want_prompt
    assert decoded_answer(pair.chosen, tokenizer) == good + "<|im_end|>\n"
    assert decoded_answer(pair.rejected, tokenizer) == bad + "<|im_end|>\n"


def test_string_pairs_on_a_model_without_template_are_plain_text(tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model("gpt2")))
    (pair,), _ = pairs_of(tmp_path, tokenizer, pair_rows()[:1])
    q, good = FACTS[0]
    assert tokenizer.decode(pair.chosen.input_ids) == q + good + tokenizer.eos_token
    assert decoded_answer(pair.chosen, tokenizer) == good + tokenizer.eos_token


def test_bad_pairs_are_skipped_and_counted_or_stop_with_strict(tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    good = pair_rows()[0]
    rows = [
        good,
        {**good, "rejected": good["chosen"]},  # nothing to prefer
        {**good, "chosen": "  "},
        {"prompt": good["prompt"], "chosen": good["chosen"]},  # no rejected answer
        {**good, "rejected": 7},
    ]
    pairs, _ = pairs_of(tmp_path, tokenizer, rows)
    stats = read_dataset(DatasetSpec(path=str(tmp_path / "rows.jsonl"))).stats
    assert len(pairs) == 1 and stats.skipped == 4
    reasons = " | ".join(stats.skip_reasons)
    assert "'chosen' and 'rejected' are the same answer" in reasons
    assert "field 'chosen' is empty" in reasons
    assert "missing required field 'rejected'" in reasons
    assert "field 'rejected' must be a string or a list" in reasons
    with pytest.raises(LorakitError, match=r"rows.jsonl:2: 'chosen' and 'rejected' are the same"):
        pairs_of(tmp_path, tokenizer, rows, strict=True)


def test_truncation_keeps_the_prompt_and_cuts_the_answers(tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    long = {"prompt": "Where is the key?", "chosen": "The key " * 40, "rejected": "No."}
    (pair,), stats = pairs_of(tmp_path, tokenizer, [long], max_seq_len=30)
    assert stats.truncated == 1 and len(pair.chosen.input_ids) == 30
    assert pair.rejected.input_ids == pairs_of(tmp_path, tokenizer, [long])[0][0].rejected.input_ids
    too_long_prompt = {**long, "prompt": "Where is the key? " * 30}
    pairs, stats = pairs_of(tmp_path, tokenizer, [too_long_prompt], max_seq_len=30)
    assert pairs == [] and stats.dropped == 1


# --- the objective ---------------------------------------------------------------------------


def model_and_pairs(tiny_model, tmp_path, **train):
    recipe = load_recipe(pair_recipe(tmp_path, tiny_model("llama"), method="dpo", **train))
    torch.manual_seed(0)
    model, summary = build_trainable_model(recipe, recipe.model.name_or_path, CPU)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # the policy differs from the reference
            torch.nn.init.normal_(param, std=0.05)
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    pairs, _ = pairs_of(tmp_path, tokenizer, pair_rows())
    return recipe, model.train(), summary, pairs


def loss_and_gradients(objective, batch):
    objective.model.zero_grad(set_to_none=True)
    total, count = objective(**batch)
    (total / count).backward()
    grads = {n: p.grad.clone() for n, p in objective.model.named_parameters() if p.requires_grad}
    return total.item() / int(count), grads


def test_one_forward_of_both_sides_is_trls_math_in_either_layout(tiny_model, tmp_path):
    """The objective on a collated batch equals `dpo_loss` of the per-row log-probs that
    tests/test_preference.py proves equal to TRL's DPOTrainer; with one pair per batch the
    prompt runs once (shared-prefix row) and nothing changes."""
    recipe, model, summary, pairs = model_and_pairs(tiny_model, tmp_path)
    assert summary.shared_prefix == "on"
    objective = training_objective(recipe, model)
    padded = collate_pairs(pairs[:1], pad_token_id=0)
    shared = collate_pairs(pairs[:1], pad_token_id=0, share_prefix=True)
    assert "segments" in shared and shared["input_ids"].shape[0] == 1
    padded_loss, padded_grads = loss_and_gradients(objective, padded)
    shared_loss, shared_grads = loss_and_gradients(objective, shared)
    assert shared_loss == pytest.approx(padded_loss, rel=1e-5)
    for name, grad in padded_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(shared_grads[name], grad, atol=1e-6, rtol=1e-4), name

    inputs = {k: padded[k] for k in ("input_ids", "attention_mask", "labels")}
    policy, _ = policy_log_probs(model, **inputs)
    reference = reference_log_probs(model, **inputs)
    expected = dpo_loss(policy, reference.sums, beta=recipe.train.beta)
    assert padded_loss == pytest.approx(expected.loss.item(), rel=1e-5)


def test_the_step_loss_is_normalized_by_pairs(tiny_model, tmp_path):
    """One micro-batch of 4 pairs and 2 micro-batches of 2 give the same loss and gradients."""
    from accelerate import Accelerator

    recipe, model, _, pairs = model_and_pairs(tiny_model, tmp_path)
    objective = training_objective(recipe, model)
    accelerator = Accelerator(cpu=True)
    results = []
    for sizes in ((4,), (2, 2)):
        model.zero_grad(set_to_none=True)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        batches = [collate_pairs(pairs[s : s + n], 0) for s, n in zip(starts, sizes, strict=True)]
        loss, count = forward_backward(accelerator, objective, batches)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, count, grads))
    (whole, whole_count, whole_grads), (split, split_count, split_grads) = results
    assert whole_count == split_count == 4
    assert split == pytest.approx(whole, rel=1e-6)
    for name, grad in whole_grads.items():
        assert torch.allclose(split_grads[name], grad, atol=1e-7, rtol=1e-5), name


# --- whole runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo"])
def test_each_method_trains_and_its_rewards_rise(method, tiny_model, tmp_path):
    result = train(
        load_recipe(pair_recipe(tmp_path, tiny_model("llama"), method=method, eval_steps=4)),
        console=QUIET,
    )
    records = read_metrics(result.run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(
        steps[-1]
    )
    assert steps[-1]["pairs"] == 4 and result.trained_pairs == 8 * 4
    assert evals[-1]["eval_rewards/accuracies"] == 1.0
    # ORPO and SimPO reward β·mean log-prob, DPO β·summed log-ratio: different scales.
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] + 0.1
    assert result.eval_after < result.eval_before
    assert result.eval_accuracy == (evals[0]["eval_rewards/accuracies"], 1.0)


def test_precomputed_reference_log_probs_give_the_same_run(tiny_model, tmp_path):
    on_the_fly = train(load_recipe(pair_recipe(tmp_path, tiny_model("llama"), "a", method="dpo")))
    precomputed = train(
        load_recipe(
            pair_recipe(
                tmp_path, tiny_model("llama"), "b", method="dpo", precompute_ref_log_probs=True
            )
        )
    )
    losses = [
        [r["loss"] for r in read_metrics(x.run_dir) if "loss" in r]
        for x in (on_the_fly, precomputed)
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_dpo_after_sft_starts_from_the_adapter_and_uses_it_as_reference(
    tiny_model, tmp_path, write_recipe
):
    """SFT first, then DPO on top (`model.adapter`): the policy starts as the adapter, so the
    first loss is exactly ln 2; the reference is that adapter, not the base; the saved adapter
    is the trained one alone (no reference copy)."""
    sft = train(load_recipe(write_recipe(tiny_model("llama"), quant=FP32)), console=QUIET)
    path = pair_recipe(tmp_path, tiny_model("llama"), "dpo", lora=False, method="dpo")
    recipe = load_recipe(path, [f"model.adapter={sft.run_dir}"])
    assert recipe.model.adapter == str(sft.run_dir)
    dpo = train(recipe, console=QUIET)
    first = next(r for r in read_metrics(dpo.run_dir) if "loss" in r)
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)

    tokenizer = load_tokenizer(str(tiny_model("llama")))
    batch = collate_pairs(pairs_of(tmp_path, tokenizer, pair_rows())[0][:2], 0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    start = load_adapter_as_trained(str(tiny_model("llama")), sft.adapter_dir, QuantSection(**FP32))
    objective = training_objective(recipe, dpo.model)
    assert objective.reference == "reference"
    ours = objective.reference_log_probs(**inputs)
    theirs = policy_log_probs(start, **inputs)[0].sums.detach()
    assert torch.allclose(ours, theirs, atol=1e-4)
    with start.disable_adapter():
        base = policy_log_probs(start, **inputs)[0].sums.detach()
    assert (base - ours).abs().max() > 1e-2  # the base would be another reference

    saved = load_file(dpo.adapter_dir / "adapter_model.safetensors")
    assert not any("reference" in name for name in saved)
    before = load_file(sft.adapter_dir / "adapter_model.safetensors")
    assert saved.keys() == before.keys()
    assert any(not torch.equal(saved[k], before[k]) for k in saved)


def test_a_starting_adapter_brings_its_own_lora_settings(tiny_model, tmp_path, write_recipe):
    sft = train(load_recipe(write_recipe(tiny_model("llama"), quant=FP32)), console=QUIET)
    path = pair_recipe(tmp_path, tiny_model("llama"), "dpo", method="dpo")
    recipe = load_recipe(path, [f"model.adapter={sft.run_dir}"])  # the recipe sets lora too
    with pytest.raises(LorakitError, match="^lora: the starting adapter .* brings its own LoRA"):
        train(recipe, console=QUIET)


def test_a_dpo_run_resumes_exactly(tiny_model, tmp_path, monkeypatch):
    sections = {"method": "dpo", "save_steps": 4}
    whole = train(load_recipe(pair_recipe(tmp_path, tiny_model("llama"), "whole", **sections)))
    pieces = load_recipe(pair_recipe(tmp_path, tiny_model("llama"), "pieces", **sections))
    stop_with_signal_at_step(monkeypatch, 4)
    with pytest.raises(TrainingStopped):
        train(pieces, console=QUIET)
    monkeypatch.undo()
    resumed = train(pieces, resume="auto", console=QUIET)
    want = load_file(whole.adapter_dir / "adapter_model.safetensors")
    got = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_preference_adapter_merges_and_evals_by_preference_accuracy(tiny_model, tmp_path):
    result = train(load_recipe(pair_recipe(tmp_path, tiny_model("llama"), method="dpo")))
    merged = merge(
        MergeOptions(source=result.run_dir, out=tmp_path / "merged", dtype="float32"),
        console=QUIET,
    )
    assert merged.verify.passed and merged.verify.max_abs_logit_diff < 1e-4
    data = str(tmp_path / "pairs.jsonl")
    targets = [str(tiny_model("llama")), str(result.run_dir), str(merged.out)]
    report = run_eval(targets, [data], EvalOptions(), out_dir=tmp_path / "eval", console=QUIET)
    scores = [r.scores["preference_accuracy"] for r in report.results]
    assert scores[1] == scores[2] == 1.0 and scores[0] < 1.0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"] == [
        "preference_accuracy"
    ]
