"""4-bit bitsandbytes quantization (NF4 or FP4, with or without double quantization) with its
cost measured.

Every linear layer except the output head is quantized by bitsandbytes exactly as transformers
does when it loads a model with a `BitsAndBytesConfig` (same layers, same packed bytes: a test
checks it), except that the block size is the user's choice. Sizes and bits per parameter are
measured from the tensors actually written, and the saved folder is the standard bitsandbytes
serialization that `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.table import Table
from transformers import AutoModelForCausalLM, PreTrainedModel

from lorakit.data import make_loader
from lorakit.data.pipeline import Example, load_rows, tokenize_rows
from lorakit.errors import LorakitError
from lorakit.files import atomic_dir, write_json
from lorakit.loss import TokenNLL, evaluate_loss, perplexity
from lorakit.models import (
    load_tokenizer,
)
from lorakit.peft_setup import (
    build_4bit_config,
    choose_compute_dtype,
    keep_4bit_layers_differentiable,
    linear_modules,
)
from lorakit.quantization.source import check_output, mib, resolve_source
from lorakit.recipe import DatasetSpec
from lorakit.run_folder import PROVENANCE_FILE, provenance

METHODS = ("nf4", "fp4")


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def paper_bits_per_parameter(double_quant: bool, blocksize: int) -> float:
    """The QLoRA paper's storage cost of blockwise 4-bit quantization: 4 bits per weight plus a
    32-bit absmax per block, or with double quantization an 8-bit absmax per block plus a 32-bit
    constant per 256 blocks (4.5 and 4.127 bits at block size 64)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


@dataclass
class LayerStats:
    name: str
    parameters: int
    relative_error: float
    """||W - dequant(quant(W))|| / ||W|| (Frobenius)."""
    block_bytes: int = 0
    """Stored packed 4-bit data + per-block scales (absmax, and nested absmax with DQ)."""
    stored_bytes: int = 0
    """Everything stored for the layer's weight, per-tensor constants (code maps, state) too."""

    @property
    def block_bits(self) -> float:
        return 8 * self.block_bytes / self.parameters

    @property
    def stored_bits(self) -> float:
        return 8 * self.stored_bytes / self.parameters


def weighted_error(layers: list[LayerStats]) -> float:
    """Parameter-weighted mean of the layers' relative errors."""
    return sum(x.relative_error * x.parameters for x in layers) / sum(x.parameters for x in layers)


def layers_by_kind(layers: list[LayerStats]) -> dict[str, list[LayerStats]]:
    """Layers grouped by their last name part (q_proj, down_proj, ...), in first-seen order."""
    groups: dict[str, list[LayerStats]] = {}
    for layer in layers:
        groups.setdefault(layer.name.rsplit(".", 1)[-1], []).append(layer)
    return groups


@dataclass
class QuantizeReport:
    source: str
    out: str
    method: str
    double_quant: bool
    blocksize: int
    dtype: str
    """Dtype of the tensors left unquantized, and the 4-bit compute dtype."""
    parameters: int
    quantized_parameters: int
    fp16_bytes: int
    """2 bytes per parameter: what the same model takes in fp16."""
    disk_bytes: int
    memory_bytes: int
    layers: list[LayerStats] = field(default_factory=list)
    loss_before: float | None = None
    loss_after: float | None = None
    eval_tokens: int | None = None

    @property
    def block_bits(self) -> float:
        return 8 * sum(x.block_bytes for x in self.layers) / self.quantized_parameters

    @property
    def stored_bits(self) -> float:
        return 8 * sum(x.stored_bytes for x in self.layers) / self.quantized_parameters

    @property
    def paper_bits(self) -> float:
        return paper_bits_per_parameter(self.double_quant, self.blocksize)

    @property
    def mean_error(self) -> float:
        return weighted_error(self.layers)

    @property
    def worst_layer(self) -> LayerStats:
        return max(self.layers, key=lambda x: x.relative_error)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [
            {**asdict(x), "block_bits": x.block_bits, "stored_bits": x.stored_bits}
            for x in self.layers
        ]
        data.update(
            block_bits_per_parameter=self.block_bits,
            stored_bits_per_parameter=self.stored_bits,
            paper_bits_per_parameter=self.paper_bits,
            mean_relative_error=self.mean_error,
            perplexity_before=None if self.loss_before is None else perplexity(self.loss_before),
            perplexity_after=None if self.loss_after is None else perplexity(self.loss_after),
        )
        return data


def reconstruction_error(
    weight: torch.Tensor, method: str, double_quant: bool, blocksize: int = 64
) -> float:
    """Relative error of one 4-bit round trip of `weight` through bitsandbytes."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=method
    )
    return _relative_error(weight, dequantize_4bit(packed, state))


def _relative_error(original: torch.Tensor, restored: torch.Tensor) -> float:
    original = original.float()
    return ((original - restored.float()).norm() / original.norm()).item()


def quantize_linear_layers(
    model: PreTrainedModel, method: str, double_quant: bool, blocksize: int
) -> list[LayerStats]:
    """Replace every linear layer but the output head with a bitsandbytes `Linear4bit`, in
    place, measuring each layer's reconstruction error on the way."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    modules = dict(model.named_modules())
    weights = {name: _weight_out_in(modules[name]) for name in linear_modules(model)}
    check_blocksize(weights, blocksize)
    stats: list[LayerStats] = []
    for name, weight in weights.items():
        module = modules[name]
        layer = bnb.nn.Linear4bit(
            weight.shape[1],
            weight.shape[0],
            bias=module.bias is not None,
            compute_dtype=weight.dtype,
            compress_statistics=double_quant,
            quant_type=method,
            quant_storage=torch.uint8,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=method,
            quant_storage=torch.uint8,
            module=layer,
        ).to(weight.device)  # quantizes here
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        restored = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        stats.append(LayerStats(name, weight.numel(), _relative_error(weight, restored)))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer)
    return stats


def _weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight.data
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]; Linear4bit wants [out, in]
        weight = weight.t()
    return weight.contiguous()


def check_blocksize(weights: dict[str, torch.Tensor], blocksize: int) -> None:
    """Refuse blocks that would span two rows of a weight: bitsandbytes (0.50) quantizes them
    correctly but its CPU kernels dequantize them wrongly (measured: relative error 0.2-0.3
    instead of 0.09), so the model would compute garbage on the CPU."""
    for name, weight in weights.items():
        row = weight.shape[-1]
        if row % blocksize:
            fitting = [b for b in BLOCKSIZES if all(w.shape[-1] % b == 0 for w in weights.values())]
            raise LorakitError(
                f"--blocksize: {blocksize} does not divide the rows of {name} ({row} values), "
                "and bitsandbytes' CPU kernels dequantize blocks spanning two rows wrongly; "
                f"block sizes that fit this model: {', '.join(map(str, fitting)) or 'none'}"
            )


def memory_bytes(model: torch.nn.Module) -> int:
    """Bytes the model holds: parameters, buffers and the 4-bit quantization state, each
    storage counted once (tied embeddings share one)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def stored_tensor_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in the folder's safetensors files, read from their headers."""
    sizes: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                sizes[key] = end - start
    return sizes


def _measure_stored(layers: list[LayerStats], sizes: dict[str, int]) -> None:
    for layer in layers:
        weight = f"{layer.name}.weight"
        keys = [k for k in sizes if k == weight or k.startswith(weight + ".")]
        if weight not in sizes or len(keys) < 2:
            raise RuntimeError(f"{layer.name}: no 4-bit weight in the saved files")
        block = (weight, f"{weight}.absmax", f"{weight}.nested_absmax")
        layer.block_bytes = sum(sizes[k] for k in keys if k in block)
        layer.stored_bytes = sum(sizes[k] for k in keys)


def load_eval_examples(
    data: Path, tokenizer, max_seq_len: int, train_on: str = "completions"
) -> list[Example]:
    """The --data file through the training pipeline (same formats, template and masking)."""
    rows = load_rows([DatasetSpec(path=str(data))])
    examples, _ = tokenize_rows(rows, tokenizer, max_seq_len, train_on)
    if not examples:
        raise LorakitError(f"--data: {data}: no example has a trained token within {max_seq_len}")
    return examples


def mean_token_nll(
    model: torch.nn.Module, examples: list[Example], batch_size: int, pad_id: int
) -> float:
    loader = make_loader(examples, batch_size, pad_id, seed=0, shuffle=False)
    return evaluate_loss(TokenNLL(model), loader, Accelerator(cpu=True))


def quantize_model(
    source: str,
    out: Path,
    *,
    method: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: str = "auto",
    data: Path | None = None,
    max_seq_len: int = 512,
    batch_size: int = 4,
    overwrite: bool = False,
) -> QuantizeReport:
    """Quantize `source` to 4 bits and save it (bitsandbytes serialization) in `out`."""
    if method not in METHODS:
        raise LorakitError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    if blocksize not in BLOCKSIZES:
        raise LorakitError(f"--blocksize: {blocksize} is not one of {BLOCKSIZES}")
    resolved = resolve_source(source)
    check_output(out, overwrite, resolved, is_file=False)
    compute_dtype = choose_compute_dtype(dtype, torch.device("cpu"))
    tokenizer = load_tokenizer(resolved.location)
    examples = load_eval_examples(data, tokenizer, max_seq_len) if data else None

    model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=compute_dtype)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    pad_id = tokenizer.pad_token_id
    loss_before = mean_token_nll(model, examples, batch_size, pad_id) if examples else None

    layers = quantize_linear_layers(model, method, double_quant, blocksize)
    model.config.quantization_config = build_4bit_config(method, double_quant, compute_dtype)
    # Without this, bitsandbytes repacks the weights on this CPU at the first no-grad forward
    # (lossily: absmax goes to bf16), and save_pretrained would write the repacked values.
    keep_4bit_layers_differentiable(model)
    loss_after = mean_token_nll(model, examples, batch_size, pad_id) if examples else None

    report = QuantizeReport(
        source=source,
        out=str(out),
        method=method,
        double_quant=double_quant,
        blocksize=blocksize,
        dtype=str(compute_dtype).removeprefix("torch."),
        parameters=parameters,
        quantized_parameters=sum(x.parameters for x in layers),
        fp16_bytes=2 * parameters,
        disk_bytes=0,
        memory_bytes=memory_bytes(model),
        layers=layers,
        loss_before=loss_before,
        loss_after=loss_after,
        eval_tokens=sum(e.trained_tokens for e in examples) if examples else None,
    )
    with atomic_dir(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        sizes = stored_tensor_bytes(staging)
        _measure_stored(layers, sizes)
        report.disk_bytes = sum(f.stat().st_size for f in staging.glob("*.safetensors"))
        write_json(staging / PROVENANCE_FILE, provenance(resolved, quantization=report.to_dict()))
    return report


def report_tables(report: QuantizeReport) -> list[Table]:
    """The summary, and the reconstruction error per kind of layer (every layer is in the
    lorakit.json written with the model)."""
    summary = Table(title="lorakit quantize", show_header=False, title_justify="left")
    double = " + double quant" if report.double_quant else ""
    summary.add_row("model", f"{report.source} → {report.out}")
    summary.add_row(
        "method", f"{report.method}{double}, block size {report.blocksize}, {report.dtype}"
    )
    summary.add_row(
        "parameters quantized",
        f"{report.quantized_parameters:,} of {report.parameters:,} "
        f"({100 * report.quantized_parameters / report.parameters:.1f}%, "
        f"{len(report.layers)} linear layers; embeddings, norms and head stay {report.dtype})",
    )
    summary.add_row(
        "size on disk",
        f"{mib(report.disk_bytes)} vs {mib(report.fp16_bytes)} in fp16 "
        f"({report.fp16_bytes / report.disk_bytes:.2f}x smaller; "
        f"{8 * report.disk_bytes / report.parameters:.2f} bits/param overall)",
    )
    summary.add_row(
        "size in memory",
        f"{mib(report.memory_bytes)} vs {mib(report.fp16_bytes)} in fp16 "
        f"({report.fp16_bytes / report.memory_bytes:.2f}x smaller)",
    )
    summary.add_row(
        "bits per quantized parameter",
        f"{report.block_bits:.3f} measured (4-bit data + block scales; QLoRA formula "
        f"{report.paper_bits:.3f}); {report.stored_bits:.3f} with per-tensor constants",
    )
    worst = report.worst_layer
    summary.add_row(
        "reconstruction error",
        f"{report.mean_error:.4f} mean relative (||W-Ŵ||/||W||), "
        f"worst {worst.relative_error:.4f} ({worst.name})",
    )
    if report.loss_before is not None and report.loss_after is not None:
        before, after = perplexity(report.loss_before), perplexity(report.loss_after)
        summary.add_row(
            "perplexity",
            f"{before:.3f} → {after:.3f} ({100 * (after / before - 1):+.2f}%) "
            f"on {report.eval_tokens:,} tokens",
        )
    layers = Table(title="reconstruction error by layer kind", title_justify="left")
    for column in ("layer", "layers", "parameters", "mean error", "max error", "bits/param"):
        layers.add_column(column, justify="left" if column == "layer" else "right")
    for kind, members in layers_by_kind(report.layers).items():
        params = sum(x.parameters for x in members)
        layers.add_row(
            kind,
            str(len(members)),
            f"{params:,}",
            f"{weighted_error(members):.4f}",
            f"{max(x.relative_error for x in members):.4f}",
            f"{8 * sum(x.block_bytes for x in members) / params:.3f}",
        )
    return [summary, layers]
