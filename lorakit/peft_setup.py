"""The trainable model: 4-bit base (bitsandbytes) + LoRA (peft) + gradient checkpointing.

The only module that builds `BitsAndBytesConfig` and `LoraConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

from lorakit.dtypes import AUTO, torch_dtype
from lorakit.errors import LorakitError
from lorakit.fast_lora import enable_fast_lora
from lorakit.recipe import LoraSection, ModelSection, QuantSection, Recipe
from lorakit.run_folder import starting_adapter
from lorakit.shared_prefix import enable_shared_prefix

REENTRANT_CHECKPOINTING = True
"""Re-entrant checkpointing runs the first forward of each layer without autograd (no graph is
built for activations that are thrown away) and rebuilds it once, in backward. Measured on the
benchmark recipe: 5-20% less time per micro-batch in one process (four alternating pairs), but
inside the noise in a whole `make bench --levers` pair (0.97x). FSDP keeps the non-re-entrant
variant, which it documents as its supported mode."""

_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")


@cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX-512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def choose_compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the hardware runs it fast, fp32 otherwise (bf16 is ~13x slower on
    CPUs without AVX-512-BF16/AMX)."""
    if setting != AUTO:
        return torch_dtype(setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def build_bnb_config(quant: QuantSection, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if not quant.load_in_4bit:
        return None
    return build_4bit_config(
        quant.bnb_4bit_quant_type,
        quant.bnb_4bit_use_double_quant,
        compute_dtype,
        torch_dtype(quant.bnb_4bit_quant_storage),
    )


def build_4bit_config(
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype = torch.uint8,
) -> BitsAndBytesConfig:
    """The 4-bit config shared by training (from the recipe) and `lorakit quantize`."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def load_base_model(
    model_section: ModelSection,
    quant: QuantSection,
    location: str,
    device: torch.device,
    sharded: bool = False,
) -> tuple[PreTrainedModel, torch.dtype]:
    """Load the frozen base: 4-bit when `quant` asks for it, else in the compute dtype.

    `sharded` (FSDP): the weights stay on the CPU for FSDP to shard onto the GPUs, and every
    tensor takes the 4-bit storage dtype, because FSDP flattens tensors of one dtype."""
    dtype = choose_compute_dtype(quant.bnb_4bit_compute_dtype, device)
    kwargs = {}
    if device.type == "cuda" and not sharded:
        kwargs["device_map"] = {"": device}
    storage = torch_dtype(quant.bnb_4bit_quant_storage)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            quantization_config=build_bnb_config(quant, dtype),
            dtype=storage if sharded and quant.load_in_4bit else dtype,
            attn_implementation=attention_for(model_section.attn_implementation),
            trust_remote_code=model_section.trust_remote_code,
            revision=model_section.revision,
            **kwargs,
        )
    except OSError as exc:
        raise LorakitError(
            f"cannot load the model from {location}: {str(exc).splitlines()[0]}"
        ) from None
    return model, dtype


def attention_for(setting: str) -> str | None:
    """transformers' `attn_implementation` for a recipe's setting (None: its own choice)."""
    return None if setting == "auto" else setting


def check_attention(setting: str, config: PretrainedConfig) -> None:
    """An attention kernel the architecture does not implement, refused before loading."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    supports = {
        "sdpa": getattr(model_class, "_supports_sdpa", True),
        "flash_attention_2": getattr(model_class, "_supports_flash_attn", True),
    }
    if model_class is not None and not supports.get(setting, True):
        raise LorakitError(
            f"model.attn_implementation: {setting} is not implemented for "
            f"{model_class.__name__}; use auto (or eager)"
        )


def load_base_as_trained(
    model_section: ModelSection,
    quant: QuantSection,
    location: str,
    device: torch.device,
    sharded: bool = False,
) -> tuple[PreTrainedModel, torch.dtype]:
    """The frozen base exactly as training prepares it, for training and for every command
    that runs an adapter afterwards: loaded as `quant` says, the 4-bit layers kept in the
    layout training used, and PEFT's k-bit preparation (norms in fp32) on a 4-bit base."""
    model, dtype = load_base_model(model_section, quant, location, device, sharded)
    keep_4bit_layers_differentiable(model)
    if quant.load_in_4bit and not sharded:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, dtype


def finish_as_trained(peft_model: PeftModel, quant: QuantSection, dtype: torch.dtype) -> None:
    """What training does once LoRA is attached: frozen embeddings back in bf16 (4-bit base,
    bf16 compute) and the fused dropout-free LoRA path."""
    if quant.load_in_4bit:
        keep_frozen_embeddings_in(peft_model.get_base_model(), dtype)
    enable_fast_lora(peft_model, dtype)


def load_adapter_as_trained(
    location: str,
    adapter_dir: Path,
    quant: QuantSection,
    model_section: ModelSection | None = None,
    device: torch.device | None = None,
) -> PeftModel:
    """A saved adapter on its base, loaded as it was trained (the same base preparation,
    embeddings and LoRA path as `build_trainable_model`), in eval mode."""
    device = device or torch.device("cpu")
    model, dtype = load_base_as_trained(model_section or ModelSection(), quant, location, device)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LorakitError(
            f"{adapter_dir}: the adapter does not fit its base model {location}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    finish_as_trained(peft_model, quant, dtype)
    return peft_model.eval()


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """On CPUs with AVX-512-BF16, bitsandbytes repacks 4-bit weights in place the first time a
    layer runs in eval mode without grad (e.g. a generation before training), and the repacked
    path has no backward: training after it would silently stop gradients at every frozen
    layer. A model that will be trained keeps the differentiable layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def keep_frozen_embeddings_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo `prepare_model_for_kbit_training`'s fp32 upcast for the frozen embedding matrices.

    The upcast guards fp16 training; with bf16 compute it only doubles the largest non-4-bit
    weights (the embedding, tied to the output head in small models: a fifth of SmolLM2) and
    makes the head's matmul run in fp32 (~4x slower than bf16 on a CPU with AVX-512-BF16).
    They were loaded in bf16, so keeping them there loses nothing. The head then casts its
    input to its own dtype, so every forward (generation included) still works."""
    if dtype != torch.bfloat16:
        return
    embeddings = model.get_input_embeddings()
    stream_dtype = embeddings.weight.dtype
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)()
        if module is None or module.weight.requires_grad or module.weight.dtype == dtype:
            continue
        module.weight.data = module.weight.data.to(dtype)
    if stream_dtype != embeddings.weight.dtype:
        # The hidden states enter the first layer in the dtype every later layer gets (bf16 ->
        # fp32 is exact), so a compiled layer has one input dtype, and the first layer's norm
        # keeps fp32 precision as every later one does (it rounded its output to bf16).
        embeddings.register_forward_hook(_cast_output_to(stream_dtype))
    head = model.get_output_embeddings()
    if head is not None and not head.weight.requires_grad:
        head.register_forward_pre_hook(_cast_input_to_weight_dtype)


def _cast_input_to_weight_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def _cast_output_to(dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    def cast(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)

    return cast


def linear_modules(model: PreTrainedModel) -> dict[str, str]:
    """Every linear-like leaf module (Linear, Linear4bit, GPT-2's Conv1D) except the output
    head, mapped to its group: `attention`, `mlp` or `other`."""
    head = model.get_output_embeddings()
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if module is head or list(module.children()):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            parents = name.split(".")[:-1]
            if any(w in p for p in parents for w in _ATTENTION_WORDS):
                found[name] = "attention"
            elif any(w in p for p in parents for w in _MLP_WORDS):
                found[name] = "mlp"
            else:
                found[name] = "other"
    return found


def resolve_target_modules(model: PreTrainedModel, target: list[str] | str) -> list[str]:
    """Turn a preset (`all-linear`, `attention`, `mlp`) into module names for this
    architecture, or check that every listed name matches a module."""
    modules = linear_modules(model)
    leaf_groups: dict[str, set[str]] = {}
    for name, group in modules.items():
        leaf_groups.setdefault(name.rsplit(".", 1)[-1], set()).add(group)
    if isinstance(target, list):
        for wanted in target:
            if not any(n == wanted or n.endswith("." + wanted) for n in modules):
                raise LorakitError(
                    f"lora.target_modules: {wanted!r} matches no linear module of this model "
                    f"(it has: {', '.join(sorted(leaf_groups))})"
                )
        return list(target)
    names: set[str] = set()
    for name, group in modules.items():
        if target != "all-linear" and group != target:
            continue
        leaf = name.rsplit(".", 1)[-1]
        # A leaf name shared across groups (GPT-2's c_proj) needs its parent to be unambiguous.
        names.add(leaf if len(leaf_groups[leaf]) == 1 else ".".join(name.split(".")[-2:]))
    if not names:
        raise LorakitError(f"lora.target_modules: preset {target!r} matches no module here")
    return sorted(names)


def build_lora_config(lora: LoraSection, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=target_modules,
        bias=lora.bias,
        layers_to_transform=lora.layers_to_transform,
        modules_to_save=lora.modules_to_save,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


@dataclass(frozen=True)
class ModelSummary:
    lora: str
    """The adapter's settings (the recipe's, or the starting adapter's)."""
    base_parameters: int
    trainable_parameters: int
    quantization: str
    compute_dtype: str
    target_modules: list[str]
    layers: str
    shared_prefix: str = "off"
    """`on`, or `off` with the reason (`lorakit.shared_prefix`)."""
    compiled: str = "off"
    """What `train.torch_compile` compiled."""

    @property
    def trainable_percent(self) -> float:
        return (
            100.0 * self.trainable_parameters / (self.base_parameters + self.trainable_parameters)
        )

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("base parameters", f"{self.base_parameters:,}"),
            (
                "trainable parameters",
                f"{self.trainable_parameters:,} ({self.trainable_percent:.3f}%)",
            ),
            ("quantization", self.quantization),
            ("compute dtype", self.compute_dtype),
            ("target modules", ", ".join(self.target_modules)),
            ("layers", self.layers),
            ("shared prompt prefix", self.shared_prefix),
            ("torch.compile", self.compiled),
        ]


def describe_quantization(quant: QuantSection) -> str:
    if not quant.load_in_4bit:
        return "none (plain LoRA)"
    double = " + double quant" if quant.bnb_4bit_use_double_quant else ""
    return f"4-bit {quant.bnb_4bit_quant_type}{double}"


def enable_checkpointing(model: PreTrainedModel, every_n_layers: int, reentrant: bool) -> None:
    """transformers' activation checkpointing of every (or every n-th) decoder layer; it also
    makes the embeddings' output require grad, which re-entrant checkpointing needs."""
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant},
        every_n_layers=every_n_layers,
    )


def compile_decoder_layers(model: PreTrainedModel) -> int:
    """`torch.compile` each decoder layer (the classes the model names unsplittable): one
    graph serves every layer of a class. Returns the number of layers compiled. A layer the
    compiler fails on runs eager (with dynamo's warning) instead of ending the run."""
    torch._dynamo.config.suppress_errors = True
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


ADAPTER = "default"
"""The name of the adapter lorakit trains (PEFT's default)."""
REFERENCE_ADAPTER = "reference"
"""DPO's reference when training goes on from `model.adapter`: a frozen copy of it."""


def continue_adapter(model: PreTrainedModel, recipe: Recipe, sharded: bool) -> PeftModel:
    """The base with `model.adapter` loaded trainable; for DPO also a frozen copy of it, the
    reference (the policy starts equal to it)."""
    from lorakit.preference import add_reference_adapter

    peft_model = PeftModel.from_pretrained(
        model,
        str(starting_adapter(recipe)),
        adapter_name=ADAPTER,
        is_trainable=True,
        autocast_adapter_dtype=not sharded,
    )
    if recipe.train.method == "dpo":
        add_reference_adapter(peft_model, REFERENCE_ADAPTER)
    return peft_model


def describe_lora(config: LoraConfig) -> str:
    scale = " rslora" if config.use_rslora else ""
    return f"r={config.r} alpha={config.lora_alpha:g} dropout={config.lora_dropout:g}{scale}" + (
        " dora" if config.use_dora else ""
    )


def build_trainable_model(
    recipe: Recipe, location: str, device: torch.device, sharded: bool = False
) -> tuple[PeftModel, ModelSummary]:
    """Base model (4-bit or not) with LoRA adapters attached and checkpointing set up. The
    recipe's `auto` values must be resolved (`lorakit.planning.resolve_auto`).

    `sharded` (FSDP QLoRA): no fp32 up-casting of norms and adapters, which would mix dtypes
    inside the tensors FSDP flattens."""
    unresolved = [k for k, v in recipe.train.model_dump().items() if v == "auto"]
    if unresolved:
        raise ValueError(f"resolve train.{unresolved[0]}: auto before building the model")
    model, dtype = load_base_as_trained(recipe.model, recipe.quant, location, device, sharded)
    if recipe.model.adapter is None:
        targets = resolve_target_modules(model, recipe.lora.target_modules)
    if recipe.train.gradient_checkpointing:
        # A re-entrant checkpoint hides the layer from the compiler (it would run eager).
        reentrant = REENTRANT_CHECKPOINTING and not sharded and not recipe.train.torch_compile
        enable_checkpointing(model, recipe.train.checkpoint_every_n_layers, reentrant)
    model.config.use_cache = False
    if recipe.model.adapter is not None:
        peft_model = continue_adapter(model, recipe, sharded)
        targets = sorted(peft_model.peft_config[ADAPTER].target_modules)
    else:
        try:
            peft_model = get_peft_model(
                model, build_lora_config(recipe.lora, targets), autocast_adapter_dtype=not sharded
            )
        except ValueError as exc:
            raise LorakitError(f"lora: {str(exc).splitlines()[0]}") from None
    finish_as_trained(peft_model, recipe.quant, dtype)
    trainable, total = peft_model.get_nb_trainable_parameters()
    shared_prefix = enable_shared_prefix(peft_model.get_base_model(), recipe.data, sharded)
    compiled = "off"
    if recipe.train.torch_compile:  # after the shared-prefix check, which runs eager
        compiled = f"{compile_decoder_layers(peft_model.get_base_model())} decoder layers"
    layers = recipe.lora.layers_to_transform
    config = peft_model.peft_config[ADAPTER]
    summary = ModelSummary(
        lora=describe_lora(config)
        + (f", continuing {recipe.model.adapter}" if recipe.model.adapter else ""),
        base_parameters=total - trainable,
        trainable_parameters=trainable,
        quantization=describe_quantization(recipe.quant),
        compute_dtype=str(dtype).removeprefix("torch."),
        target_modules=targets,
        layers="all" if layers is None else ", ".join(map(str, layers)),
        shared_prefix=shared_prefix,
        compiled=compiled,
    )
    return peft_model, summary
