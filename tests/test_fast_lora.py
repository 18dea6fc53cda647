"""The dropout-free LoRA fast path: same numbers as PEFT's forward, used only where it applies."""

import weakref

import pytest
import torch

import lorakit.fast_lora as fast_lora
from lorakit.data import collate, prepare_data
from lorakit.loss import TokenNLL
from lorakit.models import load_tokenizer
from lorakit.peft_setup import build_trainable_model
from lorakit.recipe import load_recipe
from tests.conftest import FP32


def plain_peft(model: torch.nn.Module) -> None:
    """Put PEFT's own forward back on every routed layer (the reference)."""
    for module in model.modules():
        if hasattr(module, fast_lora._PLAIN_FORWARD):
            module.forward = getattr(module, fast_lora._PLAIN_FORWARD)


def loss_and_gradients(recipe, fast: bool):
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    data = prepare_data(recipe, tokenizer)
    torch.manual_seed(0)
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, torch.device("cpu"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give A a gradient too
            torch.nn.init.normal_(param, std=0.05)
    if not fast:
        plain_peft(model)
    batch = collate(data.train[:4], tokenizer.pad_token_id)
    nll, tokens = TokenNLL(model)(**batch)
    (nll / tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return (nll / tokens).item(), grads


def assert_same_loss_and_gradients(got, want, loss_abs, atol, rtol):
    """Both (loss, grads) from `loss_and_gradients`: equal losses, and every LoRA weight of the
    tiny model (2 layers x 7 modules x A, B) gets a non-zero gradient equal to the other's."""
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert got_loss == pytest.approx(want_loss, abs=loss_abs)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 2 * 2 * 7
    for name, grad in got_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, want_grads[name], atol=atol, rtol=rtol), name


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_fused_layers_match_peft_loss_and_gradients(tiny_model, write_recipe, load_in_4bit):
    quant = {**FP32, "load_in_4bit": load_in_4bit}
    recipe = load_recipe(write_recipe(tiny_model("llama"), quant=quant))
    fast_loss, fast_grads = loss_and_gradients(recipe, fast=True)
    peft_loss, peft_grads = loss_and_gradients(recipe, fast=False)
    assert fast_loss == pytest.approx(peft_loss, abs=1e-6)
    assert fast_grads.keys() == peft_grads.keys() and len(fast_grads) == 2 * 2 * 7
    for name, grad in fast_grads.items():
        assert torch.allclose(grad, peft_grads[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize(("load_in_4bit", "every_n"), [(True, 1), (False, 1), (True, 2)])
def test_gradient_checkpointing_keeps_loss_and_gradients(
    tiny_model, write_recipe, load_in_4bit, every_n
):
    """Re-entrant checkpointing drops autograd from the first forward: every LoRA weight must
    still get the gradient it gets without checkpointing (none may silently stay None), also
    when only every n-th layer is checkpointed."""
    quant = {**FP32, "load_in_4bit": load_in_4bit}
    model_dir = tiny_model("llama")
    checkpointed = {"gradient_checkpointing": True, "checkpoint_every_n_layers": every_n}
    on = load_recipe(write_recipe(model_dir, quant=quant, train=checkpointed))
    off = load_recipe(write_recipe(model_dir, quant=quant, train={"gradient_checkpointing": False}))
    model, _ = build_trainable_model(on, on.model.name_or_path, torch.device("cpu"))
    flags = [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]
    assert flags == [True, every_n == 1]  # the tiny model's two layers
    assert_same_loss_and_gradients(
        loss_and_gradients(on, fast=True),
        loss_and_gradients(off, fast=True),
        loss_abs=1e-6,
        atol=1e-6,
        rtol=1e-4,
    )


def count_fused_calls(monkeypatch) -> list[int]:
    calls = [0]
    apply = fast_lora.LoraLinearFunction.apply

    def counting(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(fast_lora.LoraLinearFunction, "apply", counting)
    return calls


@pytest.mark.parametrize(("dropout", "expected_calls"), [(0.0, 14), (0.1, 0)])
def test_only_dropout_free_layers_take_the_fast_path(
    tiny_model, write_recipe, monkeypatch, dropout, expected_calls
):
    recipe = load_recipe(
        write_recipe(tiny_model("llama"), quant=FP32, lora={"lora_dropout": dropout})
    )
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, torch.device("cpu"))
    calls = count_fused_calls(monkeypatch)
    model(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls[0] == expected_calls  # 2 layers x 7 linear modules
    with model.disable_adapter():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls[0] == expected_calls  # a disabled adapter runs PEFT's path


def test_gpt2_conv1d_layers_keep_peft_forward(tiny_model, write_recipe):
    recipe = load_recipe(
        write_recipe(tiny_model("gpt2"), data_kind="alpaca", quant={"load_in_4bit": False})
    )
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, torch.device("cpu"))
    routed = [m for m in model.modules() if hasattr(m, fast_lora._PLAIN_FORWARD)]
    assert routed == []  # Conv1D stores its weight transposed (fan_in_fan_out)


def test_small_bf16_update_is_not_rounded_away():
    # Early in training s·B·A·x is ~1e-4 of the base output: far below bf16's resolution.
    # The fused layer sums it in the input's dtype, so it survives.
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(8, 64)
    a = torch.randn(4, 64) * 0.1
    b = torch.randn(32, 4) * 1e-4
    y = fast_lora.LoraLinearFunction.apply(x, a, b, base, 2.0, torch.bfloat16)
    base_out = x.to(torch.bfloat16) @ base.weight.t()
    update = (x.to(torch.bfloat16) @ a.to(torch.bfloat16).t()) @ b.to(torch.bfloat16).t() * 2
    assert y.dtype == torch.float32
    got = y - base_out.float()
    assert torch.allclose(got, update.float(), rtol=2e-2, atol=1e-7)
    assert got.abs().max() > 0


def test_shared_input_cast_is_reused_and_never_kept_alive():
    x = torch.randn(4, 8)
    first = fast_lora._LastCast.of(x, torch.bfloat16)
    assert fast_lora._LastCast.of(x, torch.bfloat16) is first  # q, k, v share one cast
    x.add_(1)  # an in-place change invalidates it
    second = fast_lora._LastCast.of(x, torch.bfloat16)
    assert second is not first and torch.equal(second, x.to(torch.bfloat16))
    kept = weakref.ref(x), weakref.ref(second)
    del x, first, second
    assert kept[0]() is None and kept[1]() is None  # the cache holds neither input nor cast


def test_fused_layer_compiles_to_the_same_output_and_gradients():
    """Under `torch.compile` the fused function must still scale the update: an `add_` with
    `alpha=` lost its scaling in the compiled graph (torch 2.13)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False)
    x0, a0, b0 = torch.randn(2, 5, 64), torch.randn(8, 64), torch.randn(48, 8)

    def fused(x, a, b):
        return fast_lora.LoraLinearFunction.apply(x, a, b, base, 2.0, torch.float32)

    results = []
    for fn in (fused, torch.compile(fused, dynamic=True)):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        y = fn(x, a, b)
        y.pow(2).sum().backward()
        results.append((y.detach(), x.grad, a.grad, b.grad))
    x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
    reference = base(x) + 2.0 * (x @ a.t()) @ b.t()
    reference.pow(2).sum().backward()
    for got in results:
        for value, want in zip(got, (reference.detach(), x.grad, a.grad, b.grad), strict=True):
            assert torch.allclose(value, want, rtol=1e-5, atol=1e-4)


def test_compiled_layers_keep_loss_and_gradients(tiny_model, write_recipe):
    """`train.torch_compile`: the compiled decoder layers (non-re-entrant checkpointing) give
    the loss and every LoRA gradient of the eager model."""
    model_dir = tiny_model("llama")
    compiled = load_recipe(write_recipe(model_dir, quant=FP32, train={"torch_compile": True}))
    eager = load_recipe(write_recipe(model_dir, quant=FP32))
    _, summary = build_trainable_model(compiled, compiled.model.name_or_path, torch.device("cpu"))
    assert summary.compiled == "2 decoder layers"
    assert_same_loss_and_gradients(
        loss_and_gradients(compiled, fast=True),
        loss_and_gradients(eager, fast=True),
        loss_abs=1e-5,
        atol=1e-5,
        rtol=1e-3,
    )
