"""The dropout-free LoRA fast path: base matmul and LoRA update in one autograd function.

PEFT computes `base(x) + B(A(dropout(x))) * scaling` as separate modules: with a 4-bit base it
casts the input twice, clones the base output, runs the small LoRA matmuls in the adapter's fp32
and builds a dozen autograd nodes per layer. With `lora_dropout: 0` the same function is
`y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, and one autograd function computes it with every matmul in the compute
dtype (bf16 is ~4x fp32 on CPUs with AVX-512-BF16), the fp32 adapter weights kept as masters.
The dequantized base weight is not saved for backward (it is dequantized again there, as
bitsandbytes does), so memory stays that of QLoRA; under gradient checkpointing the saved input
and rank-r projection are dropped and recomputed with the layer.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn

_PLAIN_FORWARD = "_lorakit_plain_forward"


def _frozen_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's [out, in] weight in `dtype` (dequantized when it is 4-bit)."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, quant_state)
    return weight.to(dtype)


class _LastCast:
    """q/k/v (and gate/up) read the same input: cast it to the compute dtype once, not 3x.

    Only weak references are kept: the cache never holds a tensor alive (between steps it
    would otherwise pin the last layer's input and its cast). While autograd saves the cast
    for backward, the siblings find it; in a no-grad pass each casts for itself."""

    source: weakref.ref | None = None
    version: int = -1
    result: weakref.ref | None = None

    @classmethod
    def of(cls, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        if torch.compiler.is_compiling():  # a compiled graph merges the casts itself
            return x.to(dtype)
        result = cls.result() if cls.result is not None else None
        same = cls.source is not None and cls.source() is x and cls.version == x._version
        if result is None or not same or result.dtype != dtype:
            result = x.to(dtype)
            cls.source, cls.version, cls.result = weakref.ref(x), x._version, weakref.ref(result)
        return result


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ with W frozen; gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling, compute_dtype):
        xc = _LastCast.of(x, compute_dtype).reshape(-1, x.shape[-1])
        a, b = lora_a.to(compute_dtype), lora_b.to(compute_dtype)
        bias = None if base.bias is None else base.bias.to(compute_dtype)
        y = torch.nn.functional.linear(xc, _frozen_weight(base, compute_dtype), bias)
        u = xc @ a.t()
        # The update is summed in the input's dtype: early in training it is far below bf16's
        # resolution of the base output and would round away.
        # Scaled with mul_, not add_(alpha=): a compiled graph drops that alpha (torch 2.13).
        y = y.to(x.dtype).add_((u @ b.t()).mul_(scaling))
        ctx.save_for_backward(xc, u, a, b)
        ctx.base, ctx.scaling, ctx.compute_dtype = base, scaling, compute_dtype
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        xc, u, a, b = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(ctx.compute_dtype)
        gu = (g @ b).mul_(ctx.scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _frozen_weight(ctx.base, ctx.compute_dtype)).addmm_(gu, a)
            grad_x = grad_x.view(*grad_y.shape[:-1], -1).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (gu.t() @ xc).to(a_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ u).mul_(ctx.scaling).to(b_dtype)
        return grad_x, grad_a, grad_b, None, None, None


def _single_plain_adapter(layer: nn.Module) -> str | None:
    """The active adapter when the layer is plain LoRA without dropout, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    bias = layer.get_base_layer().bias
    if (
        (bias is not None and bias.requires_grad)
        or name not in layer.lora_A
        or layer.lora_B[name].bias is not None
        or name in getattr(layer, "lora_variant", {})
        or not isinstance(layer.lora_dropout[name], nn.Identity)
        or torch.is_autocast_enabled()
    ):
        return None
    return name


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if (args or kwargs) else _single_plain_adapter(self)
    if name is None:
        return getattr(self, _PLAIN_FORWARD)(x, *args, **kwargs)
    return LoraLinearFunction.apply(
        x,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        self.base_layer,
        self.scaling[name],
        self.lorakit_compute_dtype,
    )


def enable_fast_lora(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Route every plain LoRA linear (nn.Linear or 4-bit base) through `LoraLinearFunction`.

    Layers keep PEFT's forward whenever the fast path does not apply (dropout, DoRA, several
    or disabled adapters, merged weights, autocast). Returns the number of layers routed."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    routed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or hasattr(module, _PLAIN_FORWARD):
            continue
        base = module.get_base_layer()
        if type(base) not in (nn.Linear, bnb.nn.Linear4bit) or module.fan_in_fan_out:
            continue
        setattr(module, _PLAIN_FORWARD, module.forward)
        module.lorakit_compute_dtype = compute_dtype
        module.forward = types.MethodType(_fused_forward, module)
        routed += 1
    return routed
