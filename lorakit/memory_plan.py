"""Will a recipe fit: the peak memory of lorakit's training loop, estimated without loading weights.

The model is built on the meta device from its config (no weights, no time), which tells exactly
which linear layers bitsandbytes turns into 4-bit, which modules LoRA targets and how many
parameters everything else has. Every part of the estimate is then a formula over those shapes
that mirrors what lorakit's training path really allocates (`lorakit.peft_setup`,
`lorakit.fast_lora`, `lorakit.loss`), not a generic rule of thumb:

- frozen weights: 4-bit packed data plus the block constants exactly as bitsandbytes stores them,
  and the tensors left unquantized in the dtype they end up in after PEFT's k-bit preparation and
  `keep_frozen_embeddings_in`;
- LoRA weights (fp32 masters), their gradients, and the optimizer state of the recipe's optimizer;
- activations: what autograd keeps for backward per token and per decoder layer (counted by
  hand from the ops, checked against `saved_tensors_hooks` in the tests), under gradient
  checkpointing on / every n layers / off, plus the step's working memory at its peak (the
  output head's two live logit chunks at the end of the forward, or one recomputed layer and its
  gradients in backward);
- the runtime: on the CPU the Python process with torch/transformers imported and the tokenizer
  (measured), on the GPU the CUDA context and the caching allocator's slack (documented
  assumptions).

`estimate` answers for one recipe; `largest_micro_batch`, `largest_seq_len` and `levers` answer
"what fits" and "what to change". `PUBLISHED_CONFIGS` holds the published hyperparameters of the
models the GPU recipes name, so big models are planned offline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lorakit.dtypes import COMPUTE_DTYPES, torch_dtype
from lorakit.loss import chunk_positions
from lorakit.peft_setup import choose_compute_dtype, linear_modules, resolve_target_modules
from lorakit.recipe import Recipe

GiB = 2**30
MiB = 2**20

# --- Constants and where they come from -------------------------------------------------------

QUANT_BLOCKSIZE = 64
"""Values per 4-bit block: transformers' `BitsAndBytesConfig` default (`bnb_4bit_blocksize` is not
a recipe key), the block size of the QLoRA paper."""
NESTED_BLOCKSIZE = 256
"""Double quantization: the 8-bit absmax values are themselves quantized in blocks of 256, one
fp32 constant per block (bitsandbytes `quantize_4bit(compress_statistics=True)`)."""
QUANT_CODE_BYTES = 16 * 4
"""The NF4/FP4 code book (16 fp32 values), one per quantized weight."""
NESTED_EXTRA_BYTES = 256 * 4 + 4
"""Double quantization adds, per weight, the 8-bit dynamic code book (256 fp32) and the absmax
offset (one fp32)."""
ADAM8BIT_MIN_SIZE = 4096
"""bitsandbytes' `min_8bit_size`: tensors with fewer elements keep 32-bit optimizer state."""
ADAM8BIT_BLOCKSIZE = 256
"""bitsandbytes' blockwise 8-bit optimizer state: one fp32 absmax per 256 values and state."""
ADAM8BIT_QMAP_BYTES = 2 * 256 * 4
"""The two 8-bit code books (signed and unsigned dynamic maps), shared by all parameters."""

CPU_RUNTIME_BYTES = 445 * MiB
"""Resident memory of a Python process after `import lorakit.commands.train` (torch 2.13 CPU,
transformers 5.24, peft, bitsandbytes, accelerate): 443-447 MiB measured on the 2-core Xeon
these numbers were calibrated on (`benchmarks/plan_accuracy.py` prints it again)."""
CPU_RUN_STATE_BYTES = 15 * MiB
"""What a run holds besides the libraries, the tokenizer and the model's tensors by its first
step (Accelerate, the data loader, the tokenized data): the resident memory at the loop's start
in `benchmarks/plan_accuracy.py`'s runs minus those, -2 to 25 MiB over ten settings, median
15."""
TOKENIZER_BYTES_PER_TOKEN = 880
"""Resident memory of a loaded fast tokenizer per vocabulary entry: SmolLM2's (49,152 entries)
added 42 MiB. One measured point, scaled linearly for other vocabularies."""
CUDA_CONTEXT_BYTES = 512 * MiB
"""The CUDA context, which `torch.cuda.max_memory_allocated` does not see. PyTorch measured
287 MB with lazy module loading (its default since 1.13; 667 MB eager, pytorch/pytorch#86509);
the kernels loaded on first use (cuBLAS, SDPA, bitsandbytes) come on top, hence 0.5 GiB. An
assumption, not measured here (no GPU where this was written)."""
CUDA_ALLOCATOR_SLACK = 0.10
"""Reserved minus allocated memory of PyTorch's caching allocator (block rounding and
fragmentation of the memory that changes size every step: activations, gradients and working
memory), as a fraction of it. An assumption, not measured here."""
FSDP_PREFETCHED_UNITS = 2
"""FSDP gathers one decoder layer's full weights for its forward/backward, and with
`BACKWARD_PRE` prefetch (configs/accelerate/fsdp-qlora.yaml) the next one at the same time."""

_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
"""How PEFT finds a module's layer index for `layers_to_transform` (no `layers_pattern`)."""


# --- Published model configs --------------------------------------------------------------------

PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/config.json
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ),
    # https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ),
    # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/config.json
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ),
    # https://huggingface.co/meta-llama/Meta-Llama-3-70B-Instruct/blob/main/config.json
    "meta-llama/Meta-Llama-3-70B-Instruct": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ),
    # LLaMA-65B, the model of the QLoRA paper's one-GPU claim (Dettmers et al. 2023, arXiv
    # 2305.14314); https://huggingface.co/huggyllama/llama-65b/blob/main/config.json
    "huggyllama/llama-65b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=64,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        dtype="float16",
    ),
}


def published_config(name: str) -> PretrainedConfig:
    """The config of a model in `PUBLISHED_CONFIGS`, built offline."""
    values = dict(PUBLISHED_CONFIGS[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


# --- What the model is made of -----------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool
    layer: int | None
    """Decoder layer index (PEFT's rule), None outside the layers."""

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelLayout:
    """The shapes the estimate needs, read from a model built on the meta device."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]
    """Every linear layer but the output head: the layers bitsandbytes quantizes."""
    embedding_params: int
    head_params: int
    """0 when tied to the embeddings."""
    other_params: int
    """Norm scales and every parameter that is neither a linear weight nor embeddings/head."""
    buffer_bytes: int
    """Buffers (RoPE's inverse frequencies), in the dtype the config builds them."""
    biases: tuple[int, ...]
    """Sizes of every bias parameter (linear layers', and norms' where they have one)."""
    lora_targets: tuple[Linear, ...]
    modules_to_save_params: int
    """Parameters of `lora.modules_to_save` (trained in full, as a copy)."""
    parameters: int

    def targets_in_layer(self, layer: int) -> tuple[Linear, ...]:
        return tuple(t for t in self.lora_targets if t.layer == layer)


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model with every tensor on the meta device: shapes only, no memory, no time."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def model_layout(config: PretrainedConfig, recipe: Recipe) -> ModelLayout:
    model = meta_model(config, recipe.model.trust_remote_code)
    modules = dict(model.named_modules())
    linears = tuple(_linear(name, modules[name]) for name in linear_modules(model))
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embeddings
    params = dict(model.named_parameters())  # tied weights are listed once
    linear_weight_names = {f"{lin.name}.weight" for lin in linears}
    bias_names = {n for n in params if n.endswith(".bias")}
    head_params = 0 if tied else head.weight.numel()
    ends = {id(embeddings), id(head.weight) if head is not None else None}
    other = sum(
        p.numel()
        for n, p in params.items()
        if n not in linear_weight_names and n not in bias_names and id(p) not in ends
    )
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelLayout(
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        vocab=embeddings.shape[0],
        tied=tied,
        linears=linears,
        embedding_params=embeddings.numel(),
        head_params=head_params,
        other_params=other,
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        biases=tuple(params[n].numel() for n in sorted(bias_names)),
        lora_targets=_lora_targets(model, linears, recipe),
        modules_to_save_params=_modules_to_save_params(model, recipe.lora.modules_to_save),
        parameters=sum(p.numel() for p in params.values()),
    )


def _linear(name: str, module: torch.nn.Module) -> Linear:
    weight = module.weight
    # GPT-2's Conv1D stores [in, out]; nn.Linear [out, in].
    out_f, in_f = weight.shape if isinstance(module, torch.nn.Linear) else weight.shape[::-1]
    match = _LAYER_INDEX.match(name)
    layer = int(match["idx"]) if match else None
    return Linear(name, in_f, out_f, getattr(module, "bias", None) is not None, layer)


def _lora_targets(model: PreTrainedModel, linears: tuple[Linear, ...], recipe: Recipe) -> tuple:
    """The linear layers PEFT puts an adapter on: a name equal to a target or ending in
    `.target` (PEFT's matching), within `layers_to_transform`, not in `modules_to_save`."""
    wanted = resolve_target_modules(model, recipe.lora.target_modules)
    layers = recipe.lora.layers_to_transform
    saved = recipe.lora.modules_to_save or []
    found = []
    for lin in linears:
        if not any(lin.name == t or lin.name.endswith("." + t) for t in wanted):
            continue
        if layers is not None and lin.layer not in layers:
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", lin.name) for m in saved):
            continue
        found.append(lin)
    return tuple(found)


def _modules_to_save_params(model: PreTrainedModel, names: list[str] | None) -> int:
    if not names:
        return 0
    total = 0
    for name, module in model.named_modules():
        if any(name == m or name.endswith("." + m) for m in names):
            total += sum(p.numel() for p in module.parameters())
    return total


# --- Dtypes as lorakit's training path sets them -----------------------------------------------


@dataclass(frozen=True)
class Dtypes:
    compute: torch.dtype
    """The matmuls (`quant.bnb_4bit_compute_dtype`, `auto` resolved)."""
    stream: torch.dtype
    """The hidden states between layers: fp32 on the 4-bit path (PEFT's k-bit preparation
    upcasts the norms, and lorakit feeds the first layer fp32), else the compute dtype."""
    embeddings: torch.dtype
    """Frozen embeddings and untied head."""
    others: torch.dtype
    """Norm scales, biases and other unquantized parameters."""
    lora: torch.dtype
    """LoRA weights: fp32 masters (PEFT's `autocast_adapter_dtype`), except under FSDP."""
    dropout_mask: torch.dtype = torch.float32
    """What LoRA dropout keeps: on the CPU torch's dropout keeps its scaled noise in the input's
    dtype (LoRA's), on CUDA the fused kernel keeps a bool mask."""

    @property
    def c(self) -> int:
        return _size(self.compute)

    @property
    def s(self) -> int:
        return _size(self.stream)

    @property
    def lora_bytes(self) -> int:
        return _size(self.lora)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def resolve_compute_dtype(recipe: Recipe, device: str) -> torch.dtype:
    """`auto` as training would choose it: on the CPU from this machine's flags; on a GPU bf16
    (every GPU since Ampere runs it)."""
    setting = recipe.quant.bnb_4bit_compute_dtype
    if setting == "auto" and device == "cuda":
        return torch.bfloat16
    return choose_compute_dtype(setting, torch.device(device))


def training_dtypes(
    recipe: Recipe, compute: torch.dtype, fsdp: bool = False, device: str = "cpu"
) -> Dtypes:
    """Mirrors `build_trainable_model`: `load_base_model` loads in the compute dtype (the 4-bit
    storage dtype under FSDP); `prepare_model_for_kbit_training` (4-bit, not FSDP) upcasts every
    bf16/fp16 parameter to fp32; `keep_frozen_embeddings_in` puts the frozen embeddings and
    head back in bf16 when computing in bf16."""
    storage = _named_dtype(recipe.quant.bnb_4bit_quant_storage) or torch.float32
    if not recipe.quant.load_in_4bit:
        dtypes = Dtypes(compute, compute, compute, compute, compute if fsdp else torch.float32)
    elif fsdp:
        loaded = storage if storage.is_floating_point else compute
        dtypes = Dtypes(compute, loaded, loaded, loaded, loaded)
    else:
        embeddings = torch.bfloat16 if compute == torch.bfloat16 else torch.float32
        dtypes = Dtypes(compute, torch.float32, embeddings, torch.float32, torch.float32)
    mask = torch.bool if device == "cuda" else dtypes.lora
    return replace(dtypes, dropout_mask=mask)


# --- The parts -------------------------------------------------------------------------------


def quantized_weight_bytes(weights: int, double_quant: bool) -> int:
    """What bitsandbytes keeps for one 4-bit weight of `weights` values: packed data (two values
    per byte), one absmax per block of 64 (fp32; with double quantization 8-bit plus one fp32
    per 256 blocks, a 256-entry code book and an offset), and the 16-entry code book."""
    blocks = math.ceil(weights / QUANT_BLOCKSIZE)
    packed = math.ceil(weights / 2)
    if double_quant:
        absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NESTED_EXTRA_BYTES
    else:
        absmax = 4 * blocks
    return packed + absmax + QUANT_CODE_BYTES


def frozen_bytes(layout: ModelLayout, recipe: Recipe, dt: Dtypes) -> tuple[int, int]:
    """(4-bit weights, everything else frozen). Without 4-bit, every weight is in the compute
    dtype and the first number is 0."""
    embeddings = (layout.embedding_params + layout.head_params) * _size(dt.embeddings)
    others = (layout.other_params + sum(layout.biases)) * _size(dt.others) + layout.buffer_bytes
    linear = sum(lin.weights for lin in layout.linears)
    if not recipe.quant.load_in_4bit:
        return 0, embeddings + others + linear * dt.c
    double = recipe.quant.bnb_4bit_use_double_quant
    quantized = sum(quantized_weight_bytes(lin.weights, double) for lin in layout.linears)
    return quantized, embeddings + others


def trainable_sizes(layout: ModelLayout, recipe: Recipe) -> list[int]:
    """Elements of every trainable tensor (the optimizer keeps state per tensor): LoRA A
    [r, in] and B [out, r] per target, DoRA's magnitude [out], trained biases, and
    `modules_to_save` copies (one entry for all of them: approximate for the optimizer)."""
    r = recipe.lora.r
    sizes: list[int] = []
    for lin in layout.lora_targets:
        sizes += [r * lin.in_features, lin.out_features * r]
        if recipe.lora.use_dora:
            sizes.append(lin.out_features)
    if recipe.lora.bias == "all":  # PEFT trains every bias of the model
        sizes += list(layout.biases)
    elif recipe.lora.bias == "lora_only":
        sizes += [lin.out_features for lin in layout.lora_targets if lin.bias]
    if layout.modules_to_save_params:
        sizes.append(layout.modules_to_save_params)
    return sizes


OPTIMIZER_STATES = {
    "paged_adamw_8bit": "8-bit AdamW moments, paged",
    "adamw_8bit": "8-bit AdamW moments",
    "paged_adamw_32bit": "32-bit AdamW moments, paged",
    "adamw_torch": "AdamW moments (torch)",
}


def optimizer_state_bytes(sizes: list[int], optimizer: str) -> int:
    """AdamW's two moments. bitsandbytes' 8-bit variants keep them in 8 bits with one fp32
    absmax per 256 values each, but in 32 bits for tensors under 4096 elements; the 32-bit ones
    and torch's AdamW keep 8 bytes per parameter (torch adds a 4-byte step per tensor)."""
    total = 0
    eight_bit = optimizer in ("paged_adamw_8bit", "adamw_8bit")
    for n in sizes:
        if eight_bit and n >= ADAM8BIT_MIN_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / ADAM8BIT_BLOCKSIZE)
        else:
            total += 8 * n
    if eight_bit and any(n >= ADAM8BIT_MIN_SIZE for n in sizes):
        total += ADAM8BIT_QMAP_BYTES
    if optimizer == "adamw_torch":
        total += 4 * len(sizes)
    return total


def mapped_checkpoint_bytes(
    layout: ModelLayout, recipe: Recipe, config: PretrainedConfig, dt: Dtypes, device: str
) -> int:
    """Checkpoint pages that stay resident on the CPU. transformers loads a tensor whose dtype
    matches the checkpoint's as a view of the memory-mapped safetensors file; PEFT's k-bit
    preparation replaces bf16/fp16 ones by fp32 copies, but fp32 ones stay views. So with an
    fp32 checkpoint and fp32 compute the file stays mapped, and the pages read to quantize the
    linear weights stay resident (measured: 423 MiB of SmolLM2's 540 MiB file; clean file
    pages, which the kernel may reclaim under pressure, but resident until then)."""
    if device != "cpu" or not recipe.quant.load_in_4bit or dt.compute != torch.float32:
        return 0
    if stored_dtype(config) != torch.float32:
        return 0
    return sum(lin.weights for lin in layout.linears) * 4


def stored_dtype(config: PretrainedConfig) -> torch.dtype | None:
    """The dtype the checkpoint's weights are stored in, as its config says."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        return _named_dtype(dtype)
    return dtype


def _named_dtype(name: str) -> torch.dtype | None:
    """A floating-point dtype lorakit computes in, by name (None for uint8 and others)."""
    return torch_dtype(name) if name in COMPUTE_DTYPES else None


# --- Activations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One micro-batch at its largest: `rows` x `width` positions."""

    rows: int
    width: int
    masked: bool
    """An attention mask is built (padding or packing): SDPA then repeats K/V over the query
    heads and keeps a float copy of the mask per layer."""
    packed: bool = False
    """Rows carry their own position ids, so RoPE's cos/sin are per row, not shared."""

    @property
    def tokens(self) -> int:
        return self.rows * self.width

    @property
    def predicted(self) -> int:
        """Positions with a label: all but the first of each row, at most."""
        return self.rows * (self.width - 1)


def uses_fast_lora(recipe: Recipe) -> bool:
    """`lorakit.fast_lora` takes over plain LoRA without dropout (nn.Linear or 4-bit bases)."""
    return recipe.lora.lora_dropout == 0 and not recipe.lora.use_dora


def layer_saved_bytes(
    layout: ModelLayout,
    layer: int,
    recipe: Recipe,
    dt: Dtypes,
    batch: Batch,
    input_grad: bool = True,
) -> tuple[int, bool]:
    """Bytes autograd keeps for backward for one decoder layer (a Llama-style layer: two
    RMSNorms, attention with RoPE, gated MLP), counted op by op in the order they run, and
    whether the layer's output needs a gradient. An op keeps its inputs only when something
    before it needs a gradient: `input_grad` (the layer's input does) or a LoRA layer.

    - each RMSNorm keeps its input in fp32 and the inverse RMS (its scale is frozen, so the
      normalized value is not kept);
    - SDPA keeps q, k, v, its output and the log-sum-exp; with a mask, k and v repeated to the
      query heads and the mask as a float in the query dtype;
    - the gated MLP keeps gate and up outputs and SiLU's output;
    - LoRA layers keep what `_lora_kept_per_token` says. Frozen 4-bit or full-precision layers
      keep nothing (bitsandbytes 0.50 saves no input; a frozen weight needs none).
    """
    d, inter, s = layout.hidden, layout.intermediate, dt.s
    q, kv = layout.heads * layout.head_dim, layout.kv_heads * layout.head_dim
    targets = layout.targets_in_layer(layer)
    by_kind = {k: [t for t in targets if _input_kind(t) == k] for k in _KINDS}
    grad = input_grad
    per_token = fixed = 0
    norm = d * 4 + 4

    def lora(kind: str, shared: bool) -> None:
        nonlocal per_token, grad
        if by_kind[kind]:
            per_token += _lora_kept_per_token(by_kind[kind], recipe, dt, layout, grad, shared)
            grad = True

    per_token += norm if grad else 0
    lora("attention_in", shared=False)
    attention_kept = grad
    if grad:
        kv_kept = q if batch.masked else kv
        per_token += (q + 2 * kv_kept + q) * s + layout.heads * 4
        if recipe.model.attn_implementation == "eager":
            # Softmax output in fp32 and its cast, per head and key position.
            per_token += layout.heads * batch.width * (4 + (s if s != 4 else 0))
        if batch.masked:
            fixed += batch.rows * batch.width * batch.width * s
    lora("attention_out", shared=attention_kept)
    per_token += norm if grad else 0
    lora("mlp_in", shared=False)
    per_token += 3 * inter * s if grad else 0
    lora("mlp_out", shared=False)
    if uses_fast_lora(recipe) and dt.lora != dt.compute:
        # A and B cast to the compute dtype, kept per call.
        fixed += sum(recipe.lora.r * (t.in_features + t.out_features) * dt.c for t in targets)
    return per_token * batch.tokens + fixed, grad


_KINDS = ("attention_in", "attention_out", "mlp_in", "mlp_out")


def _lora_kept_per_token(
    targets: list[Linear],
    recipe: Recipe,
    dt: Dtypes,
    layout: ModelLayout,
    input_grad: bool = True,
    input_kept: bool = False,
) -> int:
    """Bytes per token that adapted layers reading one input keep. On the fast path
    (`LoraLinearFunction`): that input cast to the compute dtype, once for siblings (q/k/v,
    gate/up), unless no cast is needed and the input is kept already (`input_kept`: o_proj's
    input is SDPA's output); and the rank-r projection per layer. On PEFT's path (dropout):
    per adapted layer, the dropout's output and, when its input needs a gradient, its scaled
    noise (the input's dtype on the CPU, a bool mask on CUDA), and the rank-r projection."""
    r, c = recipe.lora.r, dt.c
    width = targets[0].in_features
    if uses_fast_lora(recipe):
        cast = 0 if (input_kept and c == dt.s) else width * c
        return cast + len(targets) * r * c
    noise = _size(dt.dropout_mask) if recipe.lora.lora_dropout > 0 and input_grad else 0
    return sum(t.in_features * (dt.lora_bytes + noise) + r * dt.lora_bytes for t in targets)


def _input_kind(target: Linear) -> str:
    """Which input a layer reads: q/k/v share one, gate/up another (GPT-2's c_attn and c_fc
    alike)."""
    leaf = target.name.rsplit(".", 1)[-1]
    if leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv"):
        return "attention_in"
    if leaf in ("o_proj", "dense", "out_proj") or target.name.endswith("attn.c_proj"):
        return "attention_out"
    if leaf in ("gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3"):
        return "mlp_in"
    return "mlp_out"


def checkpointed_layers(recipe: Recipe, layers: int) -> set[int]:
    """transformers checkpoints the layers whose index is a multiple of every_n_layers."""
    if not recipe.train.gradient_checkpointing:
        return set()
    n = recipe.train.checkpoint_every_n_layers
    return {i for i in range(layers) if i % n == 0}


def head_working_bytes(layout: ModelLayout, dt: Dtypes, batch: Batch) -> int:
    """The output head at the end of the forward (`lorakit.loss.HeadNLLFunction`): the
    predicted positions' hidden states gathered into one tensor, their labels, a chunk of them
    cast to the head's dtype, plus the logit chunks alive at the worst moment of its loop,
    replayed allocation by allocation (see `_head_chunk_peak`)."""
    chunk = chunk_positions(layout.vocab)
    sizes = []
    left = batch.predicted
    while left > 0 and len(sizes) < 3:  # from the third chunk on, the pattern repeats
        sizes.append(min(left, chunk))
        left -= sizes[-1]
    w = _size(dt.embeddings)
    peak = _head_chunk_peak(sizes, layout.vocab, w)
    gathered = batch.predicted * layout.hidden * dt.s
    cast = sizes[0] * layout.hidden * w if sizes and w != dt.s else 0  # a chunk's hidden states
    targets = batch.predicted * 2 * 8  # the labels picked out, and an arange over them (int64)
    return peak + gathered + cast + targets


def _head_chunk_peak(sizes: list[int], vocab: int, head_bytes: int) -> int:
    """Peak bytes of the logits in `HeadNLLFunction.forward`'s loop. Per chunk of n positions:
    `(h @ W.T)` in the head dtype (n·V·w), `.float()` (n·V·4), then the previous chunk's fp32
    logits are released; `logsumexp` makes an fp32 temporary of the chunk; `grad = logits...`
    releases the previous gradient; `.to(head dtype)` makes the new one. In fp32 the casts are
    no-ops and the gradient is the logits tensor itself, which keeps the previous chunk alive
    until `grad` is rebound."""
    peak = 0
    previous_logits = previous_grad = 0
    for n in sizes:
        f = n * vocab * 4
        if head_bytes == 4:
            peak = max(peak, previous_logits + 2 * f)  # old logits held by grad, new, temporary
            previous_logits = f
            continue
        w = n * vocab * head_bytes
        peak = max(peak, previous_logits + previous_grad + w + f)
        peak = max(peak, previous_grad + 2 * f)
        previous_logits, previous_grad = f, w
    return peak


def layer_backward_working_bytes(
    layout: ModelLayout, layer: int, recipe: Recipe, dt: Dtypes, batch: Batch, recomputed: bool
) -> int:
    """The most a layer's backward needs on top of what the layer keeps (traced allocation by
    allocation with torch's profiler on SmolLM2), whichever moment is larger:

    - the gated MLP's multiply in backward: the gradients of the product, of SiLU's output and
      of up exist together, once the down projection's backward has released what it kept;
    - for a recomputed (checkpointed) layer, the end of its recomputation: the MLP's product
      (the down projection's input, not kept), the down projection's output in the compute
      dtype and in the stream dtype, its LoRA update, and the cast `add_` makes of it.

    Both with the gradient arriving from the layer above."""
    t, d, s, c = batch.tokens, layout.hidden, dt.s, dt.c
    inter = layout.intermediate
    incoming = t * d * s
    down = [x for x in layout.targets_in_layer(layer) if _input_kind(x) == "mlp_out"]
    released = _lora_kept_per_token(down, recipe, dt, layout) * t if down else 0
    mlp_backward = 3 * t * inter * s - released
    if not recomputed:
        return mlp_backward + incoming
    output = t * d * (2 * c + (2 * s if s != c else 0))
    recompute_end = t * inter * s + output
    return max(mlp_backward, recompute_end) + incoming


@dataclass(frozen=True)
class Activations:
    saved: int
    """Everything autograd keeps once the forward is done (all layers, the model's ends)."""
    working: int
    """The most the step needs on top of what is still kept, at its peak moment."""
    peak_in: str
    """`head` (end of forward) or `backward` (a layer's recomputation and gradients)."""


def activation_bytes(layout: ModelLayout, recipe: Recipe, dt: Dtypes, batch: Batch) -> Activations:
    """The step's activation memory at its peak.

    Checkpointed layers keep only their input; the others keep everything (`layer_saved_bytes`).
    The model's ends keep the final norm's fp32 input, RoPE's cos/sin, the boolean mask, and the
    head's gradient for the hidden states (computed in the forward). The peak is the larger of
    the end of the forward (all of that plus the head's chunks) and the backward, walked layer
    by layer from the top: what is still kept up to that layer, plus its recomputation when
    checkpointed (sharing the kept input when that is already fp32), plus its gradients."""
    ckpt = checkpointed_layers(recipe, layout.layers)
    t, d, s = batch.tokens, layout.hidden, dt.s
    # Frozen embeddings give the first layer an input that needs no gradient, until a LoRA
    # layer makes the stream need one; checkpointing makes it require grad from the start (the
    # re-entrant variant needs it).
    full, grad = [], bool(ckpt)
    for i in range(layout.layers):
        saved_i, grad = layer_saved_bytes(layout, i, recipe, dt, batch, grad or i in ckpt)
        full.append(saved_i)
    kept = [t * d * s if i in ckpt else full[i] for i in range(layout.layers)]
    rope_rows = batch.rows if batch.packed else 1
    ends = t * d * 4 + t * 4 + 2 * rope_rows * batch.width * layout.head_dim * s
    ends += batch.predicted  # the boolean selection of labelled positions
    if ckpt:
        # Checkpointing makes the frozen embeddings' output a leaf that requires grad, which
        # the graph holds until backward (next to its fp32 copy, the first layer's input).
        ends += t * d * _size(dt.embeddings) if dt.embeddings != dt.stream else 0
    if batch.masked and ckpt:
        # The boolean mask (and cos/sin) reach each layer as keyword arguments, which the
        # checkpoint's closure holds until backward; without checkpointing only its float
        # copies are kept.
        ends += batch.rows * batch.width * batch.width
    saved = sum(kept) + ends + batch.predicted * d * s
    head = head_working_bytes(layout, dt, batch)
    shared_input = t * d * s if s == 4 else 0
    backward = 0
    below = saved - batch.predicted * d * s  # the head's backward released its gradient
    for i in reversed(range(layout.layers)):
        recompute = full[i] - shared_input if i in ckpt else 0
        working = layer_backward_working_bytes(layout, i, recipe, dt, batch, i in ckpt)
        backward = max(backward, below - saved + recompute + working)
        below -= kept[i]
    if head >= backward:
        return Activations(saved, head, "head")
    return Activations(saved, backward, "backward")


# --- The plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Peak memory of the training loop on one device (one process), by part, in bytes."""

    frozen_4bit: int
    frozen_other: int
    lora_weights: int
    lora_gradients: int
    optimizer_state: int
    activations: int
    working: int
    runtime: int
    parallel: int
    """DDP's gradient buckets, or FSDP's gathered layers."""
    mapped_checkpoint: int
    """CPU only: checkpoint pages that stay mapped (`mapped_checkpoint_bytes`)."""
    allocator_slack: int
    device: str
    processes: int
    fsdp: bool
    tokens: int
    """Positions in the largest micro-batch."""
    trainable_parameters: int
    compute_dtype: str
    peak_in: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    optimizer: str = "adamw_torch"

    @property
    def allocated(self) -> int:
        """What a GPU's allocator reports (`torch.cuda.max_memory_allocated`): the total less
        the CUDA context and the cached-but-free slack. On the CPU: the total (the resident
        set holds the process too)."""
        if self.device == "cpu":
            return self.total
        return self.total - self.runtime - self.allocator_slack

    @property
    def total(self) -> int:
        return sum(bytes_ for _, bytes_, _ in self.parts())

    def fits(self, budget: int) -> bool:
        return self.total <= budget

    def parts(self) -> list[tuple[str, int, str]]:
        """(part, bytes, how it is counted)."""
        rows = [
            ("frozen 4-bit weights", self.frozen_4bit, "packed + absmax + constants"),
            ("frozen weights, not 4-bit", self.frozen_other, "embeddings, head, norms"),
            ("LoRA weights", self.lora_weights, f"{self.trainable_parameters:,} parameters"),
            ("LoRA gradients", self.lora_gradients, "same dtype as the weights"),
            ("optimizer state", self.optimizer_state, OPTIMIZER_STATES.get(self.optimizer, "")),
            ("activations kept for backward", self.activations, f"{self.tokens:,} positions"),
            ("step working memory", self.working, f"peak in the {self.peak_in}"),
            ("runtime", self.runtime, "process" if self.device == "cpu" else "CUDA context"),
        ]
        if self.mapped_checkpoint:
            rows.append(
                ("checkpoint file still mapped", self.mapped_checkpoint, "fp32 views keep it")
            )
        if self.parallel:
            what = "FSDP gathered layers" if self.fsdp else "DDP gradient buckets"
            rows.append((what, self.parallel, f"{self.processes} processes"))
        if self.allocator_slack:
            rows.append(("allocator slack", self.allocator_slack, "caching allocator"))
        return rows


def estimate(
    recipe: Recipe,
    config: PretrainedConfig,
    *,
    device: str = "cpu",
    processes: int = 1,
    fsdp: bool = False,
    compute_dtype: torch.dtype | None = None,
    full_rows: bool = False,
    runtime_bytes: int | None = None,
    layout: ModelLayout | None = None,
) -> MemoryPlan:
    """Peak memory per device of `recipe` training the model of `config`.

    `device`: `cpu` or `cuda`. `processes`: data-parallel processes (DDP: each holds
    everything; `fsdp`: weights, gradients and optimizer state are sharded over them,
    activations are not). `full_rows`: every micro-batch is `micro_batch_size` full rows of
    `max_seq_len` with no padding and no packing (text chunks), so attention needs no mask;
    the default assumes a mask (padding or packing), the costlier case. `runtime_bytes`
    replaces the runtime constant (e.g. a measurement on this machine). `layout`: reuse a
    `model_layout` already built for this config and LoRA targets."""
    layout = layout or model_layout(config, recipe)
    compute = compute_dtype or resolve_compute_dtype(recipe, device)
    dt = training_dtypes(recipe, compute, fsdp, device)
    flash = recipe.model.attn_implementation == "flash_attention_2"
    pairs = recipe.train.method != "sft"  # a preference micro-batch of P pairs runs 2P rows
    batch = Batch(
        recipe.train.micro_batch_size * (2 if pairs else 1),
        recipe.data.max_seq_len,
        masked=not (full_rows or flash),
        packed=recipe.data.packing and not full_rows,
    )
    frozen_4bit, frozen_other = frozen_bytes(layout, recipe, dt)
    sizes = trainable_sizes(layout, recipe)
    trainable = sum(sizes)
    lora = trainable * dt.lora_bytes
    optimizer = optimizer_state_bytes(sizes, recipe.train.optimizer)
    acts = activation_bytes(layout, recipe, dt, batch)
    share = processes if fsdp else 1
    parallel = 0
    if processes > 1 and not fsdp:
        parallel = lora  # DDP's buckets hold a copy of every gradient
    if fsdp:
        per_layer = (frozen_4bit + frozen_other + lora) / max(layout.layers, 1)
        parallel = int(FSDP_PREFETCHED_UNITS * per_layer)
    if runtime_bytes is None:
        runtime_bytes = CUDA_CONTEXT_BYTES
        if device == "cpu":
            tokenizer = TOKENIZER_BYTES_PER_TOKEN * layout.vocab
            runtime_bytes = CPU_RUNTIME_BYTES + tokenizer + CPU_RUN_STATE_BYTES
    slack = 0
    if device == "cuda":
        slack = int(CUDA_ALLOCATOR_SLACK * (acts.saved + acts.working + lora))
    notes = _notes(recipe, layout)
    return MemoryPlan(
        frozen_4bit=math.ceil(frozen_4bit / share),
        frozen_other=math.ceil(frozen_other / share),
        lora_weights=math.ceil(lora / share),
        lora_gradients=math.ceil(lora / share),
        optimizer_state=math.ceil(optimizer / share),
        activations=acts.saved,
        working=acts.working,
        runtime=runtime_bytes,
        parallel=parallel,
        mapped_checkpoint=0
        if fsdp
        else mapped_checkpoint_bytes(layout, recipe, config, dt, device),
        allocator_slack=slack,
        device=device,
        processes=processes,
        fsdp=fsdp,
        tokens=batch.tokens,
        trainable_parameters=trainable,
        compute_dtype=str(compute).removeprefix("torch."),
        peak_in=acts.peak_in,
        notes=notes,
        optimizer=recipe.train.optimizer,
    )


def _notes(recipe: Recipe, layout: ModelLayout) -> tuple[str, ...]:
    """What the estimate only approximates (the rest is checked against runs)."""
    notes = []
    if recipe.lora.use_dora:
        notes.append("DoRA's activations are counted as plain LoRA's with dropout (approximate)")
    if recipe.train.torch_compile:
        notes.append("torch.compile may fuse and drop some kept activations (not modeled)")
    if recipe.model.attn_implementation != "sdpa":
        notes.append(
            f"{recipe.model.attn_implementation} attention is approximated (SDPA is measured)"
        )
    leaves = {lin.name.rsplit(".", 1)[-1] for lin in layout.linears}
    if not leaves & {"gate_proj", "gate_up_proj", "w1"}:
        notes.append("activations assume a Llama-style layer with a gated MLP (approximate here)")
    return tuple(notes)


# --- Answers ---------------------------------------------------------------------------------


def with_values(recipe: Recipe, **dotted: Any) -> Recipe:
    """A copy of the recipe with `section__key=value` changes (validated again). Which keys the
    recipe itself set is kept (plus the changed ones): checks such as "a starting adapter
    brings its own LoRA settings" go by it."""
    raw = recipe.to_dict()
    changed: dict[str, set[str]] = {}
    for key, value in dotted.items():
        section, name = key.split("__")
        raw[section][name] = value
        changed.setdefault(section, set()).add(name)
    copy = Recipe.model_validate(raw)
    for section in type(recipe).model_fields:
        before, after = getattr(recipe, section), getattr(copy, section)
        if hasattr(before, "model_fields_set") and hasattr(after, "model_fields_set"):
            after.__pydantic_fields_set__ = before.model_fields_set | changed.get(section, set())
    return copy


def largest_micro_batch(
    recipe: Recipe, config: PretrainedConfig, budget: int, limit: int = 4096, **kwargs: Any
) -> int:
    """The largest `train.micro_batch_size` whose plan fits `budget` (0: not even 1)."""
    layout = kwargs.pop("layout", None) or model_layout(config, recipe)

    def fits(n: int) -> bool:
        candidate = with_values(recipe, train__micro_batch_size=n)
        return estimate(candidate, config, layout=layout, **kwargs).fits(budget)

    return _largest(fits, limit)


def largest_seq_len(
    recipe: Recipe, config: PretrainedConfig, budget: int, limit: int | None = None, **kwargs: Any
) -> int:
    """The largest `data.max_seq_len` whose plan fits `budget` (0: not even 1 token); at most
    the model's `max_position_embeddings`."""
    layout = kwargs.pop("layout", None) or model_layout(config, recipe)
    limit = limit or getattr(config.get_text_config(), "max_position_embeddings", None) or 2**17

    def fits(n: int) -> bool:
        candidate = with_values(recipe, data__max_seq_len=n)
        return estimate(candidate, config, layout=layout, **kwargs).fits(budget)

    return _largest(fits, limit)


def _largest(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] with fits(n), for a fits that only turns false as n grows."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


@dataclass(frozen=True)
class Lever:
    change: str
    """What to set, in recipe keys."""
    why: str
    total: int
    """The plan's total with the change."""
    fits: bool


def levers(recipe: Recipe, config: PretrainedConfig, budget: int, **kwargs: Any) -> list[Lever]:
    """What to change when the recipe does not fit, most harmless first: each lever alone,
    with the plan it gives. Checkpointing and the 8-bit optimizer change speed only; a smaller
    micro-batch with more accumulation keeps the effective batch; the 4-bit base, a shorter
    max_seq_len and a smaller r change what is trained."""
    layout = kwargs.pop("layout", None) or model_layout(config, recipe)

    def plan(candidate: Recipe) -> MemoryPlan:  # the levers change no shape or target
        return estimate(candidate, config, layout=layout, **kwargs)

    found: list[Lever] = []

    def add(change: str, why: str, candidate: Recipe) -> None:
        result = plan(candidate)
        found.append(Lever(change, why, result.total, result.fits(budget)))

    tcfg = recipe.train
    if not tcfg.gradient_checkpointing or tcfg.checkpoint_every_n_layers > 1:
        add(
            "train.gradient_checkpointing=true train.checkpoint_every_n_layers=1",
            "keep one input per layer, recompute the rest in backward (slower steps)",
            with_values(
                recipe, train__gradient_checkpointing=True, train__checkpoint_every_n_layers=1
            ),
        )
    if tcfg.optimizer not in ("paged_adamw_8bit", "adamw_8bit"):
        add(
            "train.optimizer=paged_adamw_8bit",
            "8-bit AdamW moments (2 bytes per parameter instead of 8)",
            with_values(recipe, train__optimizer="paged_adamw_8bit"),
        )
    micro = largest_micro_batch(
        recipe, config, budget, limit=tcfg.micro_batch_size, layout=layout, **kwargs
    )
    if 0 < micro < tcfg.micro_batch_size:
        steps = math.ceil(tcfg.micro_batch_size * tcfg.gradient_accumulation_steps / micro)
        add(
            f"train.micro_batch_size={micro} train.gradient_accumulation_steps={steps}",
            "same effective batch in more, smaller micro-batches (slower)",
            with_values(
                recipe, train__micro_batch_size=micro, train__gradient_accumulation_steps=steps
            ),
        )
    if not recipe.quant.load_in_4bit:
        add(
            "quant.load_in_4bit=true",
            "QLoRA: the frozen base in 4-bit NF4",
            with_values(recipe, quant__load_in_4bit=True),
        )
    seq = largest_seq_len(
        recipe, config, budget, limit=recipe.data.max_seq_len, layout=layout, **kwargs
    )
    if 0 < seq < recipe.data.max_seq_len:
        add(
            f"data.max_seq_len={seq}",
            "shorter rows: longer examples are truncated",
            with_values(recipe, data__max_seq_len=seq),
        )
    r = recipe.lora.r
    while r > 1:
        r //= 2
        candidate = with_values(
            recipe, lora__r=r, lora__lora_alpha=recipe.lora.lora_alpha * r / recipe.lora.r
        )
        if plan(candidate).fits(budget) or r == 1:
            add(f"lora.r={r}", "a smaller adapter (alpha scaled with it)", candidate)
            break
    return found


def describe(plan: MemoryPlan) -> list[str]:
    lines = [f"{name:32s} {size / GiB:8.2f} GiB  {how}" for name, size, how in plan.parts()]
    lines.append(f"{'total':32s} {plan.total / GiB:8.2f} GiB")
    return lines + list(plan.notes)
