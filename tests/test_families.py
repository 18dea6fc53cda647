"""The family matrix: for each model family people bring (tiny random models built from the
family's own transformers classes, configs shaped like the real ones: `conftest.build_config`),
each with its own special tokens and real chat template (`conftest.family_model`), the whole
QLoRA path holds.

Per family: 4-bit training memorizes a batch; the fused LoRA path equals PEFT's; packing equals
unpacked; the shared prompt prefix is on (and exact) or off with the reason; merge verify
passes in fp32; eval and generate run on the adapter; resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit.artifacts import load_target, resolve_target
from lorakit.commands.evaluate import EvalOptions, run_eval
from lorakit.commands.generate import answer_prompts
from lorakit.commands.merge import MergeOptions, merge
from lorakit.commands.train import train
from lorakit.data import collate
from lorakit.data.packing import pack_examples
from lorakit.data.pipeline import Example
from lorakit.loss import TokenNLL
from lorakit.peft_setup import build_trainable_model
from lorakit.recipe import load_recipe
from lorakit.training.signals import TrainingStopped
from tests.conftest import CHAT_TEMPLATES, FAMILIES, FAMILY_TEMPLATES, FP32
from tests.test_fast_lora import plain_peft
from tests.test_packing import _examples as packable_examples
from tests.test_shared_prefix import chat_examples
from tests.test_shared_prefix import loss_and_gradients as lora_loss_and_gradients
from tests.test_train_resume import stop_with_signal_at_step

QUIET = Console(file=open("/dev/null", "w"))  # noqa: SIM115 (one sink for the whole module)
MEMORIZE = {
    "max_steps": 24,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 2e-2,
    "warmup_steps": 0,
    "optimizer": "adamw_torch",
}
LONG = {"max_seq_len": 256}
"""Room for the real templates' default system prompts (Llama 3.1's dates, Qwen2.5's "You are
Qwen…"), which a tiny 400-token vocabulary spells in many tokens."""
SHARED_PREFIX = {
    "llama3": "on",
    "mistral": "on",  # its sliding window (4096) is longer than max_seq_len
    "qwen2.5": "on",
    "qwen3": "on",
    "gemma2": "off (attention is eager, not sdpa)",  # transformers has no SDPA for Gemma 2
    "gemma3": "off (sliding-window attention (16 < max_seq_len))",
    "phi3": "on",
    "gpt2": "off (the model applies dropout (attn_pdrop 0.1, embd_pdrop 0.1, resid_pdrop 0.1))",
}
"""What the start-up check decides for each family (max_seq_len 64 in these recipes)."""

pytestmark = pytest.mark.parametrize("family", FAMILIES)


def tokenizer_template(family: str) -> str:
    return (CHAT_TEMPLATES / f"{FAMILY_TEMPLATES[family]}.jinja").read_text(encoding="utf-8")


def data_kind(family: str) -> str:
    """GPT-2 has no chat template: it learns alpaca rows through the plain prompt."""
    return "alpaca" if family == "gpt2" else "chat"


@pytest.fixture(scope="module")
def trained_runs(family_model, tmp_path_factory):
    """One 4-bit (fp32 compute) run per family, trained once for the module."""
    from tests.conftest import recipe_file

    runs = {}

    def run(family: str):
        if family not in runs:
            folder = tmp_path_factory.mktemp(f"run-{family}")
            path = recipe_file(
                folder,
                family_model(family),
                "memorize",
                data_kind(family),
                quant=FP32,
                data=LONG,
                train=MEMORIZE,
            )
            runs[family] = train(load_recipe(path), console=QUIET)
        return runs[family]

    return run


def test_4bit_training_memorizes_a_batch(family, trained_runs):
    result = trained_runs(family)
    assert result.summary.quantization == "4-bit nf4 + double quant"
    assert result.eval_after < 0.5 * result.eval_before, (result.eval_before, result.eval_after)


def test_the_fused_lora_path_equals_peft(family, family_model, write_recipe):
    """Every LoRA weight gets PEFT's gradient through lorakit's fused dropout-free path."""
    recipe = load_recipe(
        write_recipe(family_model(family), data_kind=data_kind(family), quant=FP32)
    )
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        model, _ = build_trainable_model(recipe, recipe.model.name_or_path, torch.device("cpu"))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give A a gradient too
                torch.nn.init.normal_(param, std=0.05)
        routed = sum(hasattr(m, "_lorakit_plain_forward") for m in model.modules())
        if not fast:
            plain_peft(model)
        model.train()
        results.append((routed, *lora_loss_and_gradients(model, collate(chat_examples(), 0))))
    (routed, fast_nll, tokens, fast_grads), (_, peft_nll, _, peft_grads) = results
    lora_layers = len([n for n in fast_grads if "lora_A" in n])
    # 4-bit loading turns GPT-2's Conv1D layers into Linear4bit: every layer takes the path.
    assert routed == lora_layers > 0
    assert fast_nll == pytest.approx(peft_nll, rel=1e-5)
    for name, grad in fast_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, peft_grads[name], atol=1e-6, rtol=1e-4), name


def test_packed_loss_and_gradients_equal_unpacked(family, family_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(family_model(family), dtype=torch.float32)
    examples = packable_examples(model.config.vocab_size)
    packed = [Example(*row) for row in pack_examples(examples, capacity=16)]
    assert len(packed) < len(examples)

    def nll_and_grad(batch):
        model.zero_grad()
        nll, tokens = TokenNLL(model)(**batch)
        nll.backward()
        return nll.item() / int(tokens), model.get_input_embeddings().weight.grad.clone()

    unpacked_loss, unpacked_grad = nll_and_grad(collate(examples, 0))
    packed_loss, packed_grad = nll_and_grad(collate(packed, 0))
    assert packed_loss == pytest.approx(unpacked_loss, abs=1e-4)
    assert torch.allclose(packed_grad, unpacked_grad, rtol=1e-4, atol=1e-4)


def test_shared_prefix_is_on_and_exact_or_off_with_the_reason(family, family_model, write_recipe):
    recipe = load_recipe(
        write_recipe(family_model(family), data_kind=data_kind(family), quant=FP32)
    )
    torch.manual_seed(0)
    model, summary = build_trainable_model(recipe, recipe.model.name_or_path, torch.device("cpu"))
    assert summary.shared_prefix == SHARED_PREFIX[family]
    if summary.shared_prefix != "on":
        return
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.train()
    shared = collate(chat_examples(), pad_token_id=0, share_prefix=True)
    assert "segments" in shared
    shared_nll, _, shared_grads = lora_loss_and_gradients(model, shared)
    padded_nll, _, padded_grads = lora_loss_and_gradients(model, collate(chat_examples(), 0))
    assert shared_nll == pytest.approx(padded_nll, rel=1e-5)
    for name, grad in shared_grads.items():
        assert torch.allclose(grad, padded_grads[name], atol=1e-6, rtol=1e-4), name


def test_merge_verify_passes_in_fp32(family, trained_runs, tmp_path):
    result = trained_runs(family)
    merged = merge(
        MergeOptions(source=result.run_dir, out=tmp_path / "merged", dtype="float32"),
        console=QUIET,
    )
    assert merged.verify.passed and merged.verify.max_abs_logit_diff < 1e-4, merged.verify
    assert merged.verify.adapter_effect > 1  # there was something to merge


def test_eval_and_generate_run_on_the_adapter(family, trained_runs, tmp_path):
    """eval's loss of the adapter is training's final eval loss; generate answers with the
    adapter's chat template (what it saved with the adapter)."""
    result = trained_runs(family)
    data = load_recipe(result.run_dir / "recipe.resolved.yaml").data.validation[0].path
    options = EvalOptions(metrics=["loss", "exact_match"], batch_size=4, max_new_tokens=16)
    report = run_eval([str(result.run_dir)], [data], options, out_dir=tmp_path, console=QUIET)
    scores = report.results[0].scores
    assert scores["loss"] == pytest.approx(result.eval_after, abs=1e-4)
    loaded = load_target(resolve_target(str(result.run_dir)), torch.device("cpu"))
    template = loaded.tokenizer.chat_template
    assert template == (None if family == "gpt2" else tokenizer_template(family))
    (answer,) = answer_prompts(loaded, ["What is the secret word?"], max_new_tokens=12)
    assert answer.strip()


def test_resume_is_exact(family, family_model, write_recipe, monkeypatch):
    sections = dict(
        quant=FP32,
        data=LONG,
        train={**MEMORIZE, "max_steps": 4, "save_steps": 2, "gradient_accumulation_steps": 1},
    )
    kind = data_kind(family)
    whole = train(
        load_recipe(write_recipe(family_model(family), "whole", kind, **sections)), console=QUIET
    )
    pieces = load_recipe(write_recipe(family_model(family), "pieces", kind, **sections))
    stop_with_signal_at_step(monkeypatch, 2)
    with pytest.raises(TrainingStopped):
        train(pieces, console=QUIET)
    monkeypatch.undo()
    resumed = train(pieces, resume="auto", console=QUIET)
    assert resumed.resumed_from == [str(Path(pieces.output.dir) / "checkpoints" / "step-2")]
    want = load_file(whole.adapter_dir / "adapter_model.safetensors")
    got = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_merged_model_exports_to_gguf_and_runs_in_llama_cpp(family, trained_runs, tmp_path):
    """train → merge → GGUF (f16 and q8_0) → llama.cpp, the path a user takes to serve the
    adapter (GPT-2 has no GGUF export: refused in one line)."""
    from lorakit.errors import LorakitError
    from lorakit.quantization.gguf import export_gguf, verify_gguf

    result = trained_runs(family)
    merged = merge(
        MergeOptions(source=result.run_dir, out=tmp_path / "merged", dtype="float32"),
        console=QUIET,
    )
    if family == "gpt2":
        with pytest.raises(LorakitError, match="GGUF export supports"):
            export_gguf(str(merged.out), tmp_path / "m.gguf")
        return
    for gguf_type, agreement in (("f16", 0.9), ("q8_0", 0.75)):
        out = tmp_path / f"m.{gguf_type}.gguf"
        export_gguf(str(merged.out), out, gguf_type=gguf_type)
        checks = verify_gguf(out, str(merged.out), new_tokens=12)
        assert all(check.same_prompt_tokens for check in checks), checks
        assert sum(c.agreement for c in checks) / len(checks) >= agreement, (gguf_type, checks)
