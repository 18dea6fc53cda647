"""`lorakit quantize`: a 4-bit bitsandbytes model (NF4 or FP4, with or without double
quantization) with its cost measured, and GGUF export for llama.cpp and ollama.

4-bit: every linear layer except the output head is quantized by bitsandbytes exactly as
transformers does when it loads a model with a `BitsAndBytesConfig` (same layers, same packed
bytes: a test checks it), except that the block size is the user's choice. Sizes and bits per
parameter are measured from the tensors actually written, and the saved folder is the standard
bitsandbytes serialization that `AutoModelForCausalLM.from_pretrained` loads.

GGUF: tensors are renamed with gguf-py's tensor map and written with its `GGUFWriter`, one tensor
at a time (the file is never held in memory); the tokenizer (byte-level BPE), its special tokens
and the chat template go into the metadata. `verify_gguf` runs the file in llama.cpp
(llama-cpp-python) and compares its greedy tokens with transformers'.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lorakit.checkpoint import (
    ADAPTER_DIR,
    PROVENANCE_FILE,
    adapter_folder_in,
    atomic_dir,
    check_writable,
    write_json,
)
from lorakit.data import make_loader
from lorakit.data.formats import render_prompt
from lorakit.data.pipeline import Example, load_rows, tokenize_rows
from lorakit.errors import LorakitError
from lorakit.evaluate import evaluate_loss, perplexity
from lorakit.isolated import call_isolated
from lorakit.loss import TokenNLL
from lorakit.models import (
    ResolvedModel,
    load_config,
    load_tokenizer,
    provenance_header,
    resolve_model,
)
from lorakit.peft_setup import (
    build_4bit_config,
    choose_compute_dtype,
    keep_4bit_layers_differentiable,
    linear_modules,
)
from lorakit.recipe import DatasetSpec

METHODS = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def paper_bits_per_parameter(double_quant: bool, blocksize: int) -> float:
    """The QLoRA paper's storage cost of blockwise 4-bit quantization: 4 bits per weight plus a
    32-bit absmax per block, or with double quantization an 8-bit absmax per block plus a 32-bit
    constant per 256 blocks (4.5 and 4.127 bits at block size 64)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


# ---------------------------------------------------------------------------------------------
# What may be quantized or exported


def resolve_source(reference: str) -> ResolvedModel:
    """A full-precision model: refuse adapters, run folders and already-quantized models."""
    path = Path(reference).expanduser()
    if path.is_dir():
        _refuse_adapter(path, reference)
    resolved = resolve_model(reference)
    config = load_config(resolved.location)
    existing = getattr(config, "quantization_config", None)
    if existing:
        raise LorakitError(
            f"{reference} is already quantized ({_describe_quantization(existing)}): "
            "start from its full-precision or merged model"
        )
    return resolved


def _refuse_adapter(path: Path, reference: str) -> None:
    folder = adapter_folder_in(path)
    if folder == path:
        merged = path.parent / "merged" if path.name == ADAPTER_DIR else Path(f"{path}-merged")
        raise LorakitError(
            f"{reference} is a LoRA adapter, not a model: merge it into its base first with "
            f"`lorakit merge {reference} --out {merged}`, then quantize {merged}"
        )
    if folder is not None:
        merged = path / "merged"
        raise LorakitError(
            f"{reference} is a training run (its adapter is not a model): merge it into its base "
            f"first with `lorakit merge {reference} --out {merged}`, then quantize {merged}"
        )


def _describe_quantization(existing: Any) -> str:
    info = existing if isinstance(existing, dict) else existing.to_dict()
    method = info.get("quant_method", "quantized")
    detail = info.get("bnb_4bit_quant_type") if info.get("load_in_4bit") else None
    return f"{method} {detail}" if detail else str(method)


def check_output(out: Path, overwrite: bool, source: ResolvedModel, is_file: bool) -> None:
    """Refuse to replace existing output unless asked, and never the source itself."""
    if Path(source.location).resolve() == out.resolve():
        raise LorakitError(f"--out: {out} is the source model; choose another path")
    if out.exists() and out.is_dir() == is_file:
        kind = "a folder" if out.is_dir() else "a file"
        raise LorakitError(f"--out: {out} exists and is {kind}")
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not overwrite:
        raise LorakitError(f"--out: {out} already exists (pass --overwrite to replace it)")
    check_writable(out if not is_file else out.parent, "--out")


# ---------------------------------------------------------------------------------------------
# 4-bit (bitsandbytes)


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
        write_json(staging / PROVENANCE_FILE, _provenance(resolved, report.to_dict()))
    return report


def _provenance(resolved: ResolvedModel, quantization: dict[str, Any]) -> dict[str, Any]:
    return {**provenance_header(resolved), "quantization": quantization}


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""Types the gguf package can write (it quantizes these in numpy, as llama.cpp does)."""

# HF model_type -> llama.cpp architecture name.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# llama.cpp's `llama` architecture rotates adjacent pairs of q/k dimensions; transformers'
# Llama rotates the two halves of each head. The rows of q_proj/k_proj are reordered to match.
_INTERLEAVE_ROPE = {"llama"}

# Pre-tokenizers lorakit recognizes, mapped to llama.cpp's names for them.
_GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Split", _GPT2_SPLIT), ("ByteLevel", False)): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


@dataclass
class GgufReport:
    source: str
    location: str
    """The model folder the file was written from."""
    out: str
    type: str
    architecture: str
    parameters: int
    file_bytes: int
    tensor_types: dict[str, int]
    """Tensor count per GGML type."""
    pre_tokenizer: str
    chat_template: bool

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.file_bytes / self.parameters


def gguf_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, read from its tokenizer.json."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LorakitError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2); "
            f"this tokenizer is {model.get('type')}"
            + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else "")
        )
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = tuple(_pre_tokenizer_step(step) for step in steps)
    name = _PRE_TOKENIZERS.get(shape)
    normalizer = (spec.get("normalizer") or {}).get("type")
    if name is None or (normalizer and not (name == "qwen2" and normalizer == "NFC")):
        raise LorakitError(
            f"GGUF export: the tokenizer's pre-tokenizer {[s[0] for s in shape]} "
            f"(normalizer {normalizer}) is not one lorakit maps to llama.cpp "
            "(GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE are)"
        )
    return name


def _pre_tokenizer_step(step: dict[str, Any]) -> tuple[str, Any]:
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return (kind, "add_prefix_space")
        return (kind, step.get("use_regex", True))
    if kind == "Digits":
        return (kind, step.get("individual_digits", False))
    if kind == "Split":
        return (kind, (step.get("pattern") or {}).get("Regex"))
    return (str(kind), None)


def gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, indexed by id (holes become unused pads)."""
    from gguf import TokenType

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise LorakitError(
            f"GGUF export: the tokenizer has token id {max(by_id)} but the model's vocab_size "
            f"is {vocab_size}"
        )
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _adds_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer puts BOS/EOS around plain text, as measured on a probe."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = full[:1] == [tokenizer.bos_token_id] and full[1 : 1 + len(bare)] == bare
    end = full[-1:] == [tokenizer.eos_token_id] and full[-1 - len(bare) : -1] == bare
    return {"bos": len(full) > len(bare) and start, "eos": len(full) > len(bare) and end}


def _rope_parameters(config) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None)
    if rope:
        return dict(rope)
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


def _write_hyperparameters(writer, config, head_dim: int) -> None:
    from gguf import RopeScalingType

    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", None, "llama3"):  # llama3: a rope_freqs tensor
        raise LorakitError(
            f"GGUF export: RoPE scaling {rope_type!r} is not supported by lorakit's GGUF writer "
            "(none, linear and llama3 are)"
        )


def _rope_frequency_factors(model: PreTrainedModel, config, head_dim: int) -> torch.Tensor | None:
    """Llama 3.x scales its rotary frequencies; llama.cpp divides each base frequency by a
    factor read from a `rope_freqs` tensor. The factors are taken from the frequencies
    transformers itself computed for this model, so both sides rotate identically."""
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    scaled = next(m.inv_freq for m in model.modules() if hasattr(m, "inv_freq")).float()
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    base = 1.0 / (float(rope["rope_theta"]) ** exponents)
    return base / scaled


def _write_tokenizer(writer, tokenizer, location: str, vocab_size: int) -> tuple[str, bool]:
    import gguf

    pre = gguf_pre_tokenizer(tokenizer)
    tokens, types = gguf_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf-py reads merges and special token ids from the folder's tokenizer files; whether BOS
    # and EOS are added, and the chat template, come from the tokenizer transformers loaded.
    special = gguf.SpecialVocab(location, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise LorakitError(f"GGUF export: no BPE merges found in {location}/tokenizer.json")
    special.add_special_token = _adds_special_tokens(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    special.chat_template = template
    special.add_to_gguf(writer, quiet=True)
    return pre, template is not None


@dataclass(frozen=True)
class _PlannedTensor:
    name: str
    """GGUF name."""
    source: str
    """Key in the transformers state dict."""
    ggml_type: Any
    shape: tuple[int, ...]


def _tensor_type(shape: tuple[int, ...], wanted):
    """llama.cpp's rules: 1-D tensors (norms, biases) stay F32; a row that does not split into
    whole quantization blocks falls back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block, _ = GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else GGMLQuantizationType.F16


def _plan_tensors(
    state: dict[str, torch.Tensor], arch: str, blocks: int, wanted
) -> list[_PlannedTensor]:
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, blocks)
    seen: set[int] = set()
    plan: list[_PlannedTensor] = []
    for key, tensor in state.items():
        # Tied output head: llama.cpp reuses token_embd when output.weight is absent.
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorakitError(f"GGUF export: no llama.cpp {arch} tensor corresponds to {key}")
        shape = tuple(tensor.shape)
        plan.append(_PlannedTensor(name, key, _tensor_type(shape, wanted), shape))
    return plan


def _interleave_rope_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from [first half | second half] to alternating pairs."""
    rows = tensor.shape[0]
    return (
        tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:])
        .swapaxes(1, 2)
        .reshape(tensor.shape)
    )


def _gguf_data(tensor: torch.Tensor, ggml_type):
    import gguf

    return gguf.quants.quantize(tensor.detach().float().contiguous().numpy(), ggml_type)


def export_gguf(
    source: str, out: Path, *, gguf_type: str = "f16", overwrite: bool = False
) -> GgufReport:
    """Write a full (or merged) model as one GGUF file with tokenizer and chat template."""
    import gguf
    import numpy as np

    if gguf_type not in GGUF_TYPES:
        raise LorakitError(f"--type: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if out.suffix != ".gguf":
        raise LorakitError(f"--out: a GGUF export is one file; give a path ending in .gguf: {out}")
    resolved = resolve_source(source)
    if resolved.kind == "hub":
        raise LorakitError(
            f"{source}: GGUF export reads a local model folder; download the model first "
            "(huggingface-cli download ID --local-dir DIR) and pass DIR"
        )
    check_output(out, overwrite, resolved, is_file=True)
    config = load_config(resolved.location)
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise LorakitError(
            f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))} models; "
            f"{source} is {config.model_type!r}"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type("model")
    writer.add_name(Path(source.rstrip("/")).name)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hyperparameters(writer, config, head_dim)
    pre, has_template = _write_tokenizer(writer, tokenizer, resolved.location, config.vocab_size)

    model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype="auto")
    state = model.state_dict()
    plan = _plan_tensors(state, arch, config.num_hidden_layers, wanted)
    factors = _rope_frequency_factors(model, config, head_dim)
    if factors is not None:
        state = {**state, "rope_freqs": factors}
        f32 = gguf.GGMLQuantizationType.F32
        plan.append(_PlannedTensor("rope_freqs.weight", "rope_freqs", f32, (len(factors),)))
    for item in plan:
        block, size = gguf.GGML_QUANT_SIZES[item.ggml_type]
        nbytes = math.prod(item.shape) // block * size
        if item.ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if item.ggml_type == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(item.shape, item.ggml_type)
            writer.add_tensor_info(
                item.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=item.ggml_type
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(staging)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:
            tensor = state[item.source]
            if arch in _INTERLEAVE_ROPE and item.source.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _interleave_rope_rows(tensor, heads)
            elif arch in _INTERLEAVE_ROPE and item.source.endswith(
                ("k_proj.weight", "k_proj.bias")
            ):
                tensor = _interleave_rope_rows(tensor, kv_heads)
            writer.write_tensor_data(_gguf_data(tensor, item.ggml_type))
        writer.close()
        os.replace(staging, out)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)

    counts: dict[str, int] = {}
    for item in plan:
        counts[item.ggml_type.name] = counts.get(item.ggml_type.name, 0) + 1
    return GgufReport(
        source=source,
        location=resolved.location,
        out=str(out),
        type=gguf_type,
        architecture=arch,
        parameters=sum(math.prod(item.shape) for item in plan),
        file_bytes=out.stat().st_size,
        tensor_types=counts,
        pre_tokenizer=pre,
        chat_template=has_template,
    )


_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
}


# ---------------------------------------------------------------------------------------------
# Checking a GGUF file in llama.cpp

DEFAULT_CHECK_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
)


@dataclass
class PromptCheck:
    prompt: str
    same_prompt_tokens: bool
    """llama.cpp tokenized the rendered prompt into the same ids as transformers."""
    new_tokens: int
    identical_prefix: int
    """How many of transformers' greedy tokens llama.cpp reproduces before the first difference."""
    agreement: float
    """Fraction of positions where llama.cpp's next-token choice (given transformers' greedy
    prefix) equals transformers' greedy token."""
    max_logit_diff: float


LLAMA_CPP_SCORER = "lorakit.quantize:llama_cpp_scores"
"""The function the verify child runs (a name, so a test can point it at a crashing one)."""
LLAMA_CPP_HINT = (
    "llama-cpp-python may be compiled for another CPU, or use instructions this machine does "
    'not allow (AMX, AVX-512); reinstall it portably: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip '
    "install --no-cache-dir --force-reinstall llama-cpp-python (`make install` does), or "
    "verify the file on another machine"
)


def verify_gguf(
    gguf_file: Path,
    model_location: str,
    prompts: tuple[str, ...] | list[str] = DEFAULT_CHECK_PROMPTS,
    new_tokens: int = 16,
) -> list[PromptCheck]:
    """Run the GGUF file in llama.cpp and compare it with transformers on the source model:
    greedy tokens (teacher-forced on transformers' greedy continuation) and logits.

    llama.cpp runs in a child process (`lorakit.isolated`): a crash in its native code is an
    error that names the file, which stays written."""
    import numpy as np

    if importlib.util.find_spec("llama_cpp") is None:
        raise LorakitError(
            "checking a GGUF file needs llama-cpp-python: pip install 'lorakit[gguf]'"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_location)
    model = AutoModelForCausalLM.from_pretrained(model_location, dtype=torch.float32).eval()
    cases = []
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        greedy = _greedy_tokens(model, ids, new_tokens)
        with torch.no_grad():
            reference = model(torch.tensor([ids + greedy])).logits[0, len(ids) - 1 : -1].numpy()
        cases.append((prompt, text, ids, greedy, reference))
    with tempfile.TemporaryDirectory(prefix="lorakit-verify-") as folder:
        scores = call_isolated(
            LLAMA_CPP_SCORER,
            {
                "gguf_file": str(gguf_file),
                "texts": [text for _, text, _, _, _ in cases],
                "sequences": [ids + greedy for _, _, ids, greedy, _ in cases],
                "starts": [len(ids) for _, _, ids, _, _ in cases],
            },
            what="llama.cpp",
            doing=f"verifying {gguf_file}",
            hint=f"{gguf_file} is written and complete; {LLAMA_CPP_HINT}",
            workdir=Path(folder),
        )
        logits_of = [np.load(Path(folder) / s["logits"], allow_pickle=False) for s in scores]
    checks: list[PromptCheck] = []
    for case, score, logits in zip(cases, scores, logits_of, strict=True):
        prompt, _, ids, greedy, reference = case
        matches = logits.argmax(-1) == np.asarray(greedy)
        checks.append(
            PromptCheck(
                prompt=prompt,
                same_prompt_tokens=score["prompt_ids"] == ids,
                new_tokens=len(greedy),
                identical_prefix=int(matches.argmin()) if not matches.all() else len(greedy),
                agreement=float(matches.mean()),
                max_logit_diff=float(np.abs(logits - reference).max()),
            )
        )
    return checks


def llama_cpp_scores(
    gguf_file: str,
    texts: list[str],
    sequences: list[list[int]],
    starts: list[int],
    workdir: str,
) -> list[dict[str, Any]]:
    """In the child process: llama.cpp's tokens for each text, and its logits at positions
    `start - 1 …` of each token sequence (those that predict the continuation), saved as
    .npy files in `workdir`."""
    import numpy as np
    from llama_cpp import Llama

    # One thread: ggml's worker threads spin while they wait, which on a busy 2-core machine
    # made a 60-token pass take seconds instead of milliseconds.
    llm = Llama(
        model_path=gguf_file,
        n_ctx=max(len(sequence) for sequence in sequences) + 8,
        logits_all=True,
        verbose=False,
        n_threads=1,
        n_threads_batch=1,
    )
    results = []
    for number, (text, sequence, start) in enumerate(zip(texts, sequences, starts, strict=True)):
        prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(sequence)
        logits = np.asarray(llm.scores[start - 1 : len(sequence) - 1], dtype=np.float32)
        name = f"logits-{number}.npy"
        np.save(Path(workdir) / name, logits)
        results.append({"prompt_ids": list(prompt_ids), "logits": name})
    llm.close()
    return results


def llama_cpp_tokenize(gguf_file: str, text: str, workdir: str) -> list[int]:
    """In the child process: the ids llama.cpp's tokenizer gives `text` (BOS as it adds it)."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_file, vocab_only=True, verbose=False)
    return list(llm.tokenize(text.encode("utf-8")))


@torch.no_grad()
def _greedy_tokens(model: PreTrainedModel, ids: list[int], count: int) -> list[int]:
    """Greedy continuation of exactly `count` tokens (no stop at EOS: every position compares),
    one token per step on the KV cache."""
    # transformers 5.24 renamed `past_key_values` to `cache`; older 5.x releases take the former.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens: list[int] = []
    inputs, cache = torch.tensor([ids]), None
    for _ in range(count):
        result = model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{name: cache})
        cache = result.cache if name == "cache" else result.past_key_values
        tokens.append(int(result.logits[0, -1].argmax()))
        inputs = torch.tensor([[tokens[-1]]])
    return tokens


# ---------------------------------------------------------------------------------------------
# Tables


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


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
        f"{_mib(report.disk_bytes)} vs {_mib(report.fp16_bytes)} in fp16 "
        f"({report.fp16_bytes / report.disk_bytes:.2f}x smaller; "
        f"{8 * report.disk_bytes / report.parameters:.2f} bits/param overall)",
    )
    summary.add_row(
        "size in memory",
        f"{_mib(report.memory_bytes)} vs {_mib(report.fp16_bytes)} in fp16 "
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


def gguf_table(report: GgufReport, checks: list[PromptCheck]) -> Table:
    table = Table(title="lorakit quantize --format gguf", show_header=False, title_justify="left")
    table.add_row("model", f"{report.source} ({report.architecture}) → {report.out}")
    types = ", ".join(f"{n} {t}" for t, n in sorted(report.tensor_types.items()))
    table.add_row("tensors", f"{sum(report.tensor_types.values())} ({types})")
    table.add_row(
        "size",
        f"{_mib(report.file_bytes)} for {report.parameters:,} parameters "
        f"({report.bits_per_parameter:.2f} bits/param)",
    )
    table.add_row(
        "tokenizer",
        f"byte-level BPE, pre-tokenizer {report.pre_tokenizer}, chat template "
        + ("included" if report.chat_template else "none"),
    )
    for check in checks:
        table.add_row(
            f"llama.cpp: {check.prompt[:30]}",
            f"prompt tokens {'identical' if check.same_prompt_tokens else 'DIFFER'}; "
            f"greedy: first {check.identical_prefix}/{check.new_tokens} identical, "
            f"{100 * check.agreement:.0f}% agree; max |Δlogit| {check.max_logit_diff:.3g}",
        )
    table.add_row("use", f"llama-cli -m {report.out}   |   ollama: FROM ./{Path(report.out).name}")
    return table
