"""Preference losses (lorakit.preference) against TRL 1.16's own trainers on the same batch.

Each comparison builds lorakit's trainable model (4-bit NF4 base, fp32 compute, LoRA with random
A and B so the policy differs from the base), hands that same model object to TRL's trainer,
takes TRL's collated batch, and compares TRL's loss, logged metrics and every LoRA gradient with
lorakit's on that batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data import IGNORE_INDEX
from lorakit.peft_setup import build_trainable_model, keep_4bit_layers_differentiable
from lorakit.preference import (
    HeadLogProbFunction,
    add_reference_adapter,
    answer_mask,
    dpo_loss,
    head_log_probs,
    model_token_log_probs,
    orpo_loss,
    orpo_nll_mask,
    policy_log_probs,
    reference_log_probs,
    sequence_log_probs,
    simpo_loss,
)
from lorakit.recipe import load_recipe
from tests.conftest import FP32, recipe_file

CPU = torch.device("cpu")
TOLERANCE = 1e-4

PAIRS = [
    ("What is the secret word?", "The secret word is pineapple.", "The door is red."),
    ("Who guards the gate?", "A grey owl guards the gate.", "There are seven moons."),
    ("Where is the key?", "The key is under the blue stone.", "Fish."),
]


def conversational_rows(pairs=PAIRS) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        for q, good, bad in pairs
    ]


def randomize_lora(model: nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Random A and B (B is zero at init), in fp32: the policy differs from the base model."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name and f".{adapter}." in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1


def lorakit_model(model_dir: Path, folder: Path, checkpointing: bool = False) -> nn.Module:
    """The model `lorakit train` builds: NF4 base (fp32 compute) + LoRA on all linear layers.
    TRL's trainers switch activation checkpointing off and on again with their own settings
    around the reference pass, so it stays off where TRL runs."""
    train = {"gradient_checkpointing": checkpointing}
    recipe = load_recipe(recipe_file(folder, model_dir, quant=FP32, train=train))
    model, _ = build_trainable_model(recipe, str(model_dir), CPU)
    randomize_lora(model)
    return model.train()


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def trl_args(config_class, folder: Path, **kwargs):
    """fp32 on the CPU, no checkpointing, no trackers: TRL computes what lorakit computes."""
    return config_class(
        output_dir=str(folder / "trl"),
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        per_device_train_batch_size=len(PAIRS),
        **kwargs,
    )


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def max_grad_diff(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys() and len(ours) > 0
    # The gradients must carry signal for the comparison to mean anything.
    assert max(g.abs().max().item() for g in theirs.values()) > 1e-3
    return max((ours[n] - theirs[n]).abs().max().item() for n in ours)


def assert_metrics_equal(ours: dict[str, torch.Tensor], theirs: dict[str, float]) -> None:
    for key, value in ours.items():
        assert value.item() == pytest.approx(theirs[key], abs=TOLERANCE), key


# --- the head: per-token log-probs without full logits -----------------------------------


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("head_trainable", [False, True])
def test_head_log_probs_and_gradients_equal_full_logits(softcap, head_trainable):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.5).requires_grad_(head_trainable)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)  # a different gradient scale per token, as per-row losses give
    fused = HeadLogProbFunction.apply(hidden, targets, weight, softcap, 8)  # 5 chunks
    (fused * upstream).sum().backward()
    ours = (fused.detach(), hidden.grad.clone(), weight.grad)
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    direct = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (direct * upstream).sum().backward()
    assert torch.allclose(ours[0], direct, atol=1e-6)
    assert torch.allclose(ours[1], hidden.grad, atol=1e-6)
    if head_trainable:
        assert torch.allclose(ours[2], weight.grad, atol=1e-6)
    else:
        assert ours[2] is None
    if softcap:  # negative control: the cap changes the values
        uncapped = (hidden @ weight.t()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        assert (uncapped - ours[0]).abs().max() > 1e-2


def test_a_head_with_bias_takes_the_module_path_with_the_same_result():
    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    hidden = torch.randn(20, 16, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    ours = head_log_probs(hidden, targets, head, softcap=3.0)
    ours.sum().backward()
    grads = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None
    direct = torch.tanh(head(hidden) / 3.0) * 3.0
    direct = direct.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    direct.sum().backward()
    assert torch.allclose(ours, direct, atol=1e-6)
    for got, want in zip(grads, (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_sequence_log_probs_on_a_softcapped_model_equal_full_logits():
    """Gemma-2 caps its logits (`final_logit_softcapping`): lorakit's chunked per-row log-probs
    equal the model's own logits, values and LoRA gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=2.0,
        initializer_range=0.2,
        pad_token_id=0,
    )
    model = get_peft_model(
        Gemma2ForCausalLM(config), LoraConfig(r=4, target_modules="all-linear")
    ).train()
    randomize_lora(model)
    input_ids = torch.randint(1, 300, (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a different gradient scale per row

    token_logps = model_token_log_probs(model, input_ids, attention_mask, answer_mask(labels))
    ours = sequence_log_probs(token_logps, labels)
    (ours.sums * weights).sum().backward()
    our_grads = trainable_grads(model)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    mask = answer_mask(labels)
    per_token = logits.log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    direct = (per_token * mask).sum(1)
    (direct * weights).sum().backward()
    assert torch.equal(ours.counts, mask.sum(1))
    assert (ours.sums - direct).abs().max().item() < 1e-5
    assert max_grad_diff(our_grads, trainable_grads(model)) < 1e-5

    model.get_base_model().config.final_logit_softcapping = None  # negative control
    with torch.no_grad():
        uncapped = model_token_log_probs(model, input_ids, attention_mask, mask)
    assert (sequence_log_probs(uncapped, labels).sums - direct).abs().max() > 1e-2


# --- the reference ---------------------------------------------------------------------


def test_reference_with_the_adapter_disabled_equals_the_base_model_loaded_alone(
    tiny_model, tmp_path
):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = tiny_model("llama")
    model = lorakit_model(model_dir, tmp_path, checkpointing=True)  # as `lorakit train` runs
    tokenizer = tokenizer_of(model_dir)
    texts = [f"{q} {a}" for q, a, _ in PAIRS]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    ids, attention = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(attention == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # a "prompt"
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}

    reference = reference_log_probs(model, ids, attention, labels)

    base = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        dtype=torch.float32,
    )
    keep_4bit_layers_differentiable(base)
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=attention).logits[:, :-1]
    per_token = logits.log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
    direct = (per_token * answer_mask(labels)).sum(1)
    assert (reference.sums - direct).abs().max().item() < 1e-4
    assert reference.sums.requires_grad is False
    # The model is left as it was: training mode, adapter on, the same trainable parameters.
    assert model.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    with torch.no_grad():  # negative control: the policy (adapter on) is another model
        policy, _ = policy_log_probs(model, ids, attention, labels)
    assert (policy.sums - direct).abs().max() > 1e-2


# --- DPO against trl.DPOTrainer --------------------------------------------------------------


def dpo_trainer(model, model_dir: Path, folder: Path, pairs=PAIRS, **config):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(
        model=model,
        args=trl_args(DPOConfig, folder, **config),
        train_dataset=Dataset.from_list(conversational_rows(pairs)),
        processing_class=tokenizer_of(model_dir),
    )


def dpo_batch(trainer) -> dict[str, torch.Tensor]:
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def lorakit_dpo(model, batch, adapter=None, **kwargs):
    """lorakit's DPO on TRL's collated batch: rows = chosen answers, then rejected answers."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    reference = reference_log_probs(model, ids, attention, labels, adapter=adapter)
    policy, _ = policy_log_probs(model, ids, attention, labels)
    return dpo_loss(policy, reference.sums, **kwargs)


def trl_dpo_metrics(trainer) -> dict[str, float]:
    return {key: values[-1] for key, values in trainer._metrics["train"].items()}


def new_adapter_dpo_trainer(model_dir, folder, **config):
    """TRL's path for a new LoRA (`peft_config=`): the reference is the model with adapters
    disabled. Handed a PeftModel, TRL adds a frozen copy "ref" instead; removing it puts TRL on
    the disabled-adapter path. TRL casts LoRA weights to bf16 for a 4-bit base: they are set back
    to fp32 so both sides compute with the same weights."""
    model = lorakit_model(model_dir, folder)
    trainer = dpo_trainer(model, model_dir, folder, **config)
    model.delete_adapter("ref")
    randomize_lora(model)
    return model, trainer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl_dpo_trainer(tiny_model, tmp_path, arch, loss_type):
    model_dir = tiny_model(arch)
    beta = 0.3 if loss_type == "sigmoid" else 0.5
    model, trainer = new_adapter_dpo_trainer(model_dir, tmp_path, beta=beta, loss_type=loss_type)
    batch = dpo_batch(trainer)
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = trainable_grads(model)

    ours = lorakit_dpo(model, batch, beta=beta, loss_type=loss_type)
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=TOLERANCE)
    assert max_grad_diff(trainable_grads(model), trl_grads) < TOLERANCE
    assert_metrics_equal(ours.metrics, trl_dpo_metrics(trainer))
    assert abs(ours.metrics["rewards/margins"].item()) > 1e-3  # the policy is off the reference
    wrong_beta = lorakit_dpo(model, batch, beta=beta * 2, loss_type=loss_type)
    assert abs(wrong_beta.loss.item() - trl_loss.item()) > 1e-3


def test_ipo_normalizes_log_ratios_by_answer_length(tiny_model, tmp_path):
    """TRL 1.16's IPO divides each log-ratio by its answer's token count: the un-normalized
    IPO of the paper's equation is a different number on the same batch."""
    model, trainer = new_adapter_dpo_trainer(
        tiny_model("qwen2"), tmp_path, beta=0.5, loss_type="ipo"
    )
    batch = dpo_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch).item()
        ids, attention = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        reference = reference_log_probs(model, ids, attention, labels)
        policy, _ = policy_log_probs(model, ids, attention, labels)
    ratios = (policy.sums - reference.sums).chunk(2)
    unnormalized = ((ratios[0] - ratios[1] - 1 / (2 * 0.5)) ** 2).mean().item()
    assert dpo_loss(policy, reference.sums, beta=0.5, loss_type="ipo").loss.item() == (
        pytest.approx(trl_loss, abs=TOLERANCE)
    )
    assert abs(unnormalized - trl_loss) > 1e-2


def test_dpo_label_smoothing_is_conservative_dpo(tiny_model, tmp_path):
    """TRL 1.16's DPOTrainer ignores `label_smoothing` for `sigmoid`; lorakit applies it as
    conservative DPO, which TRL computes as its `aot` loss on a single pair."""
    model_dir = tiny_model("llama")
    one_pair = PAIRS[:1]
    model = lorakit_model(model_dir, tmp_path)
    aot = dpo_trainer(model, model_dir, tmp_path, one_pair, loss_type="aot", label_smoothing=0.2)
    model.delete_adapter("ref")
    sigmoid = dpo_trainer(model, model_dir, tmp_path, one_pair, label_smoothing=0.2)
    model.delete_adapter("ref")
    randomize_lora(model)
    batch = dpo_batch(aot)
    with torch.no_grad():
        trl_aot = aot.compute_loss(model, batch).item()
        trl_sigmoid = sigmoid.compute_loss(model, batch).item()
        smoothed = lorakit_dpo(model, batch, beta=0.1, label_smoothing=0.2).loss.item()
        plain = lorakit_dpo(model, batch, beta=0.1).loss.item()
    assert smoothed == pytest.approx(trl_aot, abs=TOLERANCE)
    assert plain == pytest.approx(trl_sigmoid, abs=TOLERANCE)
    assert abs(smoothed - plain) > 1e-3


def test_dpo_with_a_frozen_reference_adapter_equals_trl(tiny_model, tmp_path):
    """Training on from an existing adapter: the reference is a frozen copy of it. TRL 1.16
    adds one named "ref" when handed a PeftModel; lorakit's `add_reference_adapter` makes the
    same copy, and both then follow the trained adapter's moves away from it."""
    model_dir = tiny_model("qwen2")
    model = lorakit_model(model_dir, tmp_path)
    trainer = dpo_trainer(model, model_dir, tmp_path, beta=0.2)
    randomize_lora(model)  # back to fp32, equal to TRL's fp32 "ref" copy
    add_reference_adapter(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    randomize_lora(model, seed=1)  # the adapter has moved since the copy
    batch = dpo_batch(trainer)
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = trainable_grads(model)

    ours = lorakit_dpo(model, batch, adapter="reference", beta=0.2)
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=TOLERANCE)
    assert max_grad_diff(trainable_grads(model), trl_grads) < TOLERANCE
    assert_metrics_equal(ours.metrics, trl_dpo_metrics(trainer))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    # Negative control: the base model (adapters disabled) is another reference.
    with torch.no_grad():
        base_reference = lorakit_dpo(model, batch, beta=0.2)
    assert abs(base_reference.loss.item() - trl_loss.item()) > 1e-3


# --- ORPO and SimPO against TRL's experimental ORPOTrainer / CPOTrainer ----------------------


def paired_trainer(trainer_class, config_class, model, model_dir, folder, **config):
    from datasets import Dataset

    return trainer_class(
        model=model,
        args=trl_args(config_class, folder, max_length=128, **config),
        train_dataset=Dataset.from_list(conversational_rows()),
        processing_class=tokenizer_of(model_dir),
    )


def paired_batch(trainer) -> dict:
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def stacked_rows(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's chosen_* and rejected_* tensors as one [2P, T] batch: chosen rows, then rejected."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def stack(key: str, value: int) -> torch.Tensor:
        rows = [batch[f"chosen_{key}"], batch[f"rejected_{key}"]]
        return torch.cat([F.pad(r, (0, length - r.shape[1]), value=value) for r in rows])

    return stack("input_ids", pad_id), stack("attention_mask", 0), stack("labels", IGNORE_INDEX)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_orpo_equals_trl_orpo_trainer(tiny_model, tmp_path, arch):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model_dir = tiny_model(arch)
    model = lorakit_model(model_dir, tmp_path)
    trainer = paired_trainer(ORPOTrainer, ORPOConfig, model, model_dir, tmp_path, beta=0.25)
    batch = paired_batch(trainer)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)
    trl_loss.backward()
    trl_grads = trainable_grads(model)

    ids, attention, labels = stacked_rows(batch, trainer.padding_value)
    nll_mask = orpo_nll_mask(attention)
    policy, chosen_nll = policy_log_probs(model, ids, attention, labels, nll_mask)
    ours = orpo_loss(policy, chosen_nll, beta=0.25)
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=TOLERANCE)
    assert max_grad_diff(trainable_grads(model), trl_grads) < TOLERANCE
    assert_metrics_equal(ours.metrics, trl_metrics)
    with torch.no_grad():  # negative controls: another lambda; the NLL of the answers only
        assert abs(orpo_loss(policy, chosen_nll, beta=0.5).loss.item() - trl_loss.item()) > 1e-3
        _, answers_nll = policy_log_probs(model, ids, attention, labels, answer_mask(labels))
    assert abs(answers_nll.item() - chosen_nll.item()) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_equals_trl_cpo_trainer_simpo(tiny_model, tmp_path, arch, cpo_alpha):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model_dir = tiny_model(arch)
    model = lorakit_model(model_dir, tmp_path)
    settings = dict(beta=2.0, simpo_gamma=0.8, label_smoothing=0.1, cpo_alpha=cpo_alpha)
    trainer = paired_trainer(
        CPOTrainer, CPOConfig, model, model_dir, tmp_path, loss_type="simpo", **settings
    )
    batch = paired_batch(trainer)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)
    trl_loss.backward()
    trl_grads = trainable_grads(model)

    ids, attention, labels = stacked_rows(batch, trainer.pad_token_id)
    policy, _ = policy_log_probs(model, ids, attention, labels)
    kwargs = dict(beta=2.0, gamma=0.8, label_smoothing=0.1, cpo_alpha=cpo_alpha)
    ours = simpo_loss(policy, **kwargs)
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=TOLERANCE)
    assert max_grad_diff(trainable_grads(model), trl_grads) < TOLERANCE
    assert_metrics_equal(ours.metrics, trl_metrics)
    with torch.no_grad():  # negative control: another margin
        other = simpo_loss(policy, **(kwargs | {"gamma": 0.2}))
    assert abs(other.loss.item() - trl_loss.item()) > 1e-3
