"""`lorakit merge`: fold one or more LoRA adapters into the base weights, check the result, and
write a model that loads with `AutoModelForCausalLM.from_pretrained`.

The base model and its quantization settings come from the recipe and provenance saved with the
adapter, so no training YAML is needed. Two merge bases:

- `original`: the base reloaded in full precision (what people usually serve). The adapter was
  trained against the NF4-rounded weights, so the merged model is close to, not equal to, the
  trained one.
- `dequantized`: the NF4 round trip of the weights the adapter saw in training (4-bit base built
  exactly as in training, then dequantized), so the merge reproduces the trained model.

Memory: the base is loaded once, adapters are attached to it, the verification runs the same
model before and after `merge_and_unload`, which adds each delta in place. At no point is there a
second full-precision copy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lorakit.data.formats import render_prompt
from lorakit.decoding import stop_token_ids
from lorakit.dtypes import COMPUTE_DTYPES, DTYPE_CHOICES, dtype_name, torch_dtype
from lorakit.errors import LorakitError
from lorakit.files import atomic_dir, check_writable, file_digest, safetensors_digests, write_json
from lorakit.merge_methods import DEFAULT_METHOD, MERGE_METHODS
from lorakit.models import ResolvedModel, load_config, load_tokenizer, resolve_model
from lorakit.peft_setup import load_base_as_trained
from lorakit.recipe import Recipe, load_recipe
from lorakit.run_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PROVENANCE_FILE,
    RECIPE_FILE,
    adapter_folder_in,
    adapter_provenance,
    base_reference_of,
    provenance,
    resolve_adapter_base,
    tokenizer_location,
)

BASES = ("original", "dequantized")
COMBINED = "combined"
VERIFY_NEW_TOKENS = 16
# Mean KL(unmerged || merged) per token, in nats. Measured on SmolLM2-135M with a quickstart
# adapter: fp32 ~3e-8, fp16 ~5e-5, bf16 3e-3 to 7e-3 (W + ΔW rounded to 8 mantissa bits).
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# The merge error may be at most this share of the adapter's own effect (both as mean KL).
MAX_SHARE_OF_EFFECT = 0.1
# Below this mean KL a difference is float rounding, whatever the adapter's size.
NOISE_FLOOR = 1e-6
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about the sea.",
    "Give me three tips for learning a new language.",
    "How do I boil an egg?",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet.",
    "Name three animals that live in the Arctic.",
)


@dataclass(frozen=True)
class MergeOptions:
    source: Path
    """A run folder (written by `lorakit train`) or an adapter folder."""
    out: Path | None
    adapters: tuple[Path, ...] = ()
    """More adapters (run or adapter folders) combined with the first."""
    weights: tuple[float, ...] | None = None
    method: str | None = None
    density: float | None = None
    base: str = "original"
    dtype: str = "auto"
    base_model: str | None = None
    """Load the base from here instead of the reference saved with the adapter."""
    verify: bool = True
    verify_prompts: int = 4
    tolerance: float | None = None
    max_shard_size: str = "5GB"
    overwrite: bool = False


@dataclass(frozen=True)
class Adapter:
    folder: Path
    config: dict[str, Any]
    recipe: Recipe | None
    provenance: dict[str, Any]

    @property
    def base_reference(self) -> str | None:
        return base_reference_of(self.provenance, self.config)

    @property
    def target_modules(self) -> list[str]:
        targets = self.config.get("target_modules") or []
        return sorted(targets) if isinstance(targets, list) else [targets]


@dataclass
class VerifyReport:
    prompts: int
    tokens: int
    max_abs_logit_diff: float
    mean_kl: float
    greedy_agreement: float
    """Share of generated positions where merged and unmerged pick the same greedy token."""
    adapter_effect: float
    """max |Δlogit| between the base and base + adapter: how much there was to merge."""
    adapter_kl: float
    """Mean KL(base + adapter || base): the adapter's whole effect on the same scale."""
    tolerance: float
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        # Absolute: the merged model predicts like base + adapter. Relative: the merge keeps
        # most of what the adapter does (a low-precision merge of a weak adapter can round it
        # away while staying close to the base in absolute terms).
        keeps_effect = self.mean_kl <= max(MAX_SHARE_OF_EFFECT * self.adapter_kl, NOISE_FLOOR)
        within = math.isfinite(self.mean_kl) and self.mean_kl <= self.tolerance
        self.passed = within and keeps_effect


@dataclass
class MergeResult:
    out: Path
    base: ResolvedModel
    dtype: torch.dtype
    method: str | None
    weights: list[float]
    verify: VerifyReport | None
    files: list[str]


# --- reading and checking the inputs -------------------------------------------------------


def find_adapter_folder(path: Path) -> Path:
    """A run folder holds its adapter in `adapter/`; an adapter folder is used as it is."""
    folder = adapter_folder_in(path)
    if folder is not None:
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise LorakitError(f"{folder}: {ADAPTER_WEIGHTS} is missing")
        return folder
    if not path.exists():
        raise LorakitError(f"{path}: no such run or adapter folder")
    raise LorakitError(
        f"{path}: not a run folder or adapter folder (no {ADAPTER_CONFIG} here or in adapter/)"
    )


def read_adapter(path: Path) -> Adapter:
    folder = find_adapter_folder(path)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{folder / ADAPTER_CONFIG}: malformed JSON: {exc.msg}") from None
    if config.get("peft_type") != "LORA":
        raise LorakitError(f"{folder}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    # The adapter folder carries the recipe and provenance; older runs only have them at the root.
    recipe_file = next(
        (d / RECIPE_FILE for d in (folder, folder.parent) if (d / RECIPE_FILE).is_file()), None
    )
    recipe = load_recipe(recipe_file) if recipe_file else None
    return Adapter(folder, config, recipe, adapter_provenance(folder))


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise LorakitError(
            f"--weights: expected numbers separated by commas, e.g. 0.7,0.3 (got {text!r})"
        ) from None
    if not all(math.isfinite(w) for w in weights):
        raise LorakitError(f"--weights: weights must be finite numbers (got {text!r})")
    return weights


def check_options(options: MergeOptions, count: int) -> None:
    """Everything about the command line that can be wrong, before any model is read."""
    if options.out is None:
        raise LorakitError("--out: say where to write the merged model, e.g. --out merged/")
    if options.base not in BASES:
        raise LorakitError(f"--base: unknown base {options.base!r} (choose {', '.join(BASES)})")
    if options.dtype not in DTYPE_CHOICES:
        raise LorakitError(
            f"--dtype: unknown dtype {options.dtype!r} (choose {', '.join(DTYPE_CHOICES)})"
        )
    method = options.method
    if method is not None and method not in MERGE_METHODS:
        raise LorakitError(
            f"--method: unknown method {method!r} (choose {', '.join(MERGE_METHODS)})"
        )
    if method is not None and count == 1:
        raise LorakitError(
            f"--method {method}: a method combines several adapters; add them with --adapter"
        )
    if options.weights is not None and len(options.weights) != count:
        raise LorakitError(
            f"--weights: {len(options.weights)} weight(s) for {count} adapter(s); "
            "give one weight per adapter, in order"
        )
    chosen = MERGE_METHODS[method or DEFAULT_METHOD]
    pruning = [m.name for m in MERGE_METHODS.values() if m.density]
    if options.density is not None:
        if count == 1 or not chosen.density:
            raise LorakitError(f"--density: only the methods {', '.join(pruning)} prune by density")
        if not 0 < options.density <= 1:
            raise LorakitError(f"--density: must be in (0, 1] (got {options.density})")
    elif count > 1 and chosen.density:
        raise LorakitError(
            f"--density: method {chosen.name} needs the fraction of weights it keeps, "
            "e.g. --density 0.5"
        )
    if options.verify_prompts < 1:
        raise LorakitError("--verify-prompts: must be at least 1")
    if options.tolerance is not None and not options.tolerance > 0:
        raise LorakitError(f"--tolerance: must be positive (got {options.tolerance})")
    check_out_dir(options.out, options.overwrite)


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LorakitError(f"--out: {out} is not empty (pass --overwrite to replace it)")
    check_writable(out, "--out")


def base_identity(reference: str) -> str:
    """Where a reference points (an alias and the same .gguf file are one base)."""
    try:
        return resolve_model(reference, convert=False).location
    except LorakitError:
        return reference


def check_same_base(adapters: list[Adapter]) -> None:
    first = adapters[0]
    for other in adapters[1:]:
        if base_identity(other.base_reference or "") != base_identity(first.base_reference or ""):
            raise LorakitError(
                f"{other.folder}: trained on base model {other.base_reference!r}, but "
                f"{first.folder} on {first.base_reference!r}; adapters of different bases "
                "cannot be combined"
            )


def check_combinable(adapters: list[Adapter], method: str) -> None:
    """What add_weighted_adapter would get wrong silently, as a clear error instead."""
    for adapter in adapters:
        if adapter.config.get("use_dora"):
            raise LorakitError(
                f"{adapter.folder}: a DoRA adapter cannot be combined or reweighted "
                "(its magnitude vectors do not add up); merge it alone with weight 1"
            )
        saved = adapter.config.get("modules_to_save")
        if saved:
            raise LorakitError(
                f"{adapter.folder}: modules_to_save ({', '.join(saved)}) "
                "are whole trained copies and cannot be combined or reweighted; merge it alone"
            )
    if not MERGE_METHODS[method].factorwise:
        return
    first = adapters[0]
    for other in adapters[1:]:
        for key in ("r", "target_modules", "layers_to_transform"):
            mine, theirs = _setting(first, key), _setting(other, key)
            if mine != theirs:
                raise LorakitError(
                    f"--method {method} combines the A and B factors entry by entry and needs "
                    f"equal {key}: {first.folder} has {mine}, {other.folder} has {theirs} "
                    "(use --method cat or svd)"
                )


def _setting(adapter: Adapter, key: str) -> Any:
    return adapter.target_modules if key == "target_modules" else adapter.config.get(key)


def resolve_base(adapter: Adapter, override: str | None) -> ResolvedModel:
    if override:
        try:
            return resolve_model(override)
        except LorakitError as exc:
            raise LorakitError(f"--base-model: {str(exc).split(': ', 1)[-1]}") from None
    try:
        return resolve_adapter_base(adapter.folder)
    except LorakitError as exc:
        raise LorakitError(f"{exc} (pass --base-model to load it from elsewhere)") from None


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module LoRA can wrap, in the order LoRA's A and B see them."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D":  # GPT-2 stores its weight as (in, out)
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<factor>[AB])(?:\.weight)?$")


def check_fits_base(
    adapters: list[Adapter], base: ResolvedModel, config: Any, trust_remote_code: bool
) -> None:
    """Compare each adapter's tensor shapes with the base's modules on the meta device (no
    weights loaded), so a wrong base fails in a second with a message that names it."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules = dict(skeleton.named_modules())
    params = dict(skeleton.named_parameters())
    arch = (config.architectures or [type(skeleton).__name__])[0]
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    vocab = getattr(config, "vocab_size", None)
    described = f"{base.reference} ({arch}, hidden size {hidden}, vocabulary {vocab})"
    for adapter in adapters:
        _check_shapes(adapter, modules, params, described)


def _check_shapes(
    adapter: Adapter,
    modules: dict[str, nn.Module],
    params: dict[str, nn.Parameter],
    described: str,
) -> None:
    prefix = "base_model.model."
    with safe_open(adapter.folder / ADAPTER_WEIGHTS, "pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = tuple(tensors.get_slice(key).get_shape())
            name = key.removeprefix(prefix)
            match = _LORA_KEY.match(name)
            if match:
                module_name = match["module"]
                module = modules.get(module_name)
                dims = _dims(module) if module is not None else None
                if dims is None:
                    raise LorakitError(
                        f"{adapter.folder}: does not fit the base model {described}: it has no "
                        f"layer {module_name} (the adapter was trained on another architecture)"
                    )
                got = shape[1] if match["factor"] == "A" else shape[0]
                want = dims[0] if match["factor"] == "A" else dims[1]
                if got != want:
                    side = "input" if match["factor"] == "A" else "output"
                    raise LorakitError(
                        f"{adapter.folder}: does not fit the base model {described}: "
                        f"{module_name} has {side} size {want} there but {got} in the adapter"
                    )
            elif ".lora_" not in name:
                # A whole trained copy (modules_to_save), e.g. a resized lm_head.
                param = params.get(name)
                if param is not None and tuple(param.shape) != shape:
                    raise LorakitError(
                        f"{adapter.folder}: does not fit the base model {described}: {name} "
                        f"is {list(param.shape)} there but {list(shape)} in the adapter"
                    )


def check_vocabulary(
    adapter: Adapter, tokenizer: PreTrainedTokenizerBase, base: ResolvedModel, config: Any
) -> None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise LorakitError(
            f"{adapter.folder}: its tokenizer has {len(tokenizer)} tokens but the base model "
            f"{base.reference} has a vocabulary of {vocab}: it was trained on another base"
        )


def merge_dtype(setting: str, config: Any) -> torch.dtype:
    """`auto`: the dtype the base checkpoint (`config`) is stored in (float32 when it does not
    say)."""
    if setting != "auto":
        return torch_dtype(setting)
    stored = getattr(config, "dtype", None)
    name = stored if isinstance(stored, str) else dtype_name(stored) if stored else None
    return torch_dtype(name) if name in COMPUTE_DTYPES else torch.float32


# --- loading the full-precision base -------------------------------------------------------


def load_original_base(
    recipe: Recipe | None, base: ResolvedModel, dtype: torch.dtype
) -> PreTrainedModel:
    model_section = recipe.model if recipe else None
    return AutoModelForCausalLM.from_pretrained(
        base.location,
        dtype=dtype,
        trust_remote_code=bool(model_section and model_section.trust_remote_code),
        revision=model_section.revision if model_section else None,
    )


def load_dequantized_base(
    recipe: Recipe | None, adapter: Adapter, base: ResolvedModel, dtype: torch.dtype
) -> PreTrainedModel:
    """The 4-bit base built exactly as in training, each 4-bit layer replaced by a plain Linear
    holding its dequantized weight: the NF4 round trip the adapter was trained against."""
    import bitsandbytes as bnb

    if recipe is None:
        raise LorakitError(
            f"{adapter.folder}: --base dequantized needs the recipe saved with the adapter "
            f"({RECIPE_FILE}) to rebuild the 4-bit base"
        )
    if not recipe.quant.load_in_4bit:
        raise LorakitError(
            f"{adapter.folder}: trained on an unquantized base (quant.load_in_4bit: false), "
            "so there is no 4-bit round trip to reproduce; use --base original"
        )
    model, _ = load_base_as_trained(recipe.model, recipe.quant, base.location, torch.device("cpu"))
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        has_bias = module.bias is not None
        with torch.device("meta"):
            linear = nn.Linear(module.in_features, module.out_features, bias=has_bias)
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if has_bias:
            linear.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    # Nothing is quantized any more: casting and save_pretrained must treat it as a plain model.
    model.hf_quantizer.remove_quantization_config(model)
    model.is_loaded_in_4bit = False
    model.to(dtype)
    model.config.dtype = dtype
    return model


# --- attaching and combining adapters ------------------------------------------------------


def attach_adapters(
    model: PreTrainedModel,
    adapters: list[Adapter],
    weights: list[float],
    combination: str | None,
    density: float | None,
) -> PeftModel:
    """Base + adapters with one active adapter: the single adapter as trained (`combination`
    None), or their weighted combination (peft's add_weighted_adapter)."""
    peft_model = PeftModel.from_pretrained(model, adapters[0].folder, adapter_name="adapter0")
    names = ["adapter0"]
    for i, adapter in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(adapter.folder, adapter_name=f"adapter{i}")
        names.append(f"adapter{i}")
    if combination is None:
        return peft_model
    try:
        peft_model.add_weighted_adapter(
            names, weights, COMBINED, combination_type=combination, density=density
        )
    except (ValueError, TypeError) as exc:
        raise LorakitError(f"--method {combination}: {str(exc).splitlines()[0]}") from None
    _fix_rslora_scaling(peft_model)
    peft_model.set_adapter(COMBINED)
    for name in names:
        peft_model.delete_adapter(name)
    return peft_model


def _fix_rslora_scaling(peft_model: PeftModel) -> None:
    """add_weighted_adapter folds every scale into the new factors and sets lora_alpha = r so
    the new scale is 1, but it copies use_rslora from the first adapter, which turns that scale
    into sqrt(r). Put it back to 1."""
    config = peft_model.peft_config[COMBINED]
    if not config.use_rslora:
        return
    config.use_rslora = False
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and COMBINED in scaling:
            scaling[COMBINED] = 1.0


# --- verification --------------------------------------------------------------------------


@dataclass
class Sample:
    input_ids: torch.Tensor
    """Prompt + the unmerged model's greedy continuation, shape [1, T]."""
    prompt_tokens: int
    logits: torch.Tensor
    """The unmerged model's logits over input_ids, fp32, [T, vocab]."""


@dataclass(frozen=True)
class Effect:
    """How far the adapter moves base logits, measured before the merge."""

    max_abs_logit_diff: float
    mean_kl: float


def sample_prompts(recipe: Recipe | None, count: int) -> list[str]:
    """The recipe's sample prompts first (they exercise what the adapter learned), then
    generic ones."""
    own = list(recipe.eval.sample_prompts) if recipe else []
    return list(dict.fromkeys(own + list(DEFAULT_PROMPTS)))[:count]


@torch.no_grad()
def unmerged_samples(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> tuple[list[Sample], Effect]:
    """Greedy continuations and logits of base + adapter (unmerged), and how far the adapter
    moves the logits away from the base."""
    model.eval()
    samples: list[Sample] = []
    effect = 0.0
    kl_sum = 0.0
    positions = 0
    stops = stop_token_ids(model, tokenizer)
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        sequence = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=VERIFY_NEW_TOKENS,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        logits = model(input_ids=sequence).logits[0].float()
        with model.disable_adapter():
            base_logits = model(input_ids=sequence).logits[0].float()
        effect = max(effect, (logits - base_logits).abs().max().item())
        kl = mean_kl(logits, base_logits)
        kl_sum += kl.sum().item()
        positions += kl.numel()
        samples.append(Sample(sequence, ids.shape[1], logits))
    return samples, Effect(effect, kl_sum / max(positions, 1))


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per position, from logits [T, vocab]."""
    kl = F.kl_div(
        F.log_softmax(other, dim=-1),
        F.log_softmax(reference, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    return kl.clamp_min(0)  # rounding can make a near-zero KL slightly negative


@torch.no_grad()
def compare_merged(
    model: PreTrainedModel, samples: list[Sample], effect: Effect, tolerance: float
) -> VerifyReport:
    model.eval()
    max_diff = 0.0
    kl_sum = 0.0
    positions = 0
    agree = 0
    generated = 0
    for sample in samples:
        logits = model(input_ids=sample.input_ids).logits[0].float()
        max_diff = max(max_diff, (logits - sample.logits).abs().max().item())
        kl = mean_kl(sample.logits, logits)
        kl_sum += kl.sum().item()
        positions += kl.numel()
        # Positions prompt_tokens-1 … T-2 predict the generated tokens. Agreeing on all of them
        # means the merged model generates the same greedy text.
        start = sample.prompt_tokens - 1
        want = sample.logits[start:-1].argmax(-1)
        got = logits[start:-1].argmax(-1)
        agree += int((want == got).sum())
        generated += want.numel()
    return VerifyReport(
        prompts=len(samples),
        tokens=positions,
        max_abs_logit_diff=max_diff,
        mean_kl=kl_sum / max(positions, 1),
        greedy_agreement=agree / max(generated, 1),
        adapter_effect=effect.max_abs_logit_diff,
        adapter_kl=effect.mean_kl,
        tolerance=tolerance,
    )


class VerificationFailed(LorakitError):
    """The merged model does not reproduce base + adapter within tolerance."""

    exit_code = 1


# --- the command ---------------------------------------------------------------------------


def merge(options: MergeOptions, console: Console | None = None) -> MergeResult:
    console = console or Console(stderr=True)
    say = console.print
    # Everything that can fail on user input happens before a model is loaded or a file written.
    adapters = [read_adapter(path) for path in (options.source, *options.adapters)]
    check_options(options, len(adapters))
    weights = list(options.weights) if options.weights else [1.0] * len(adapters)
    method = (options.method or DEFAULT_METHOD) if len(adapters) > 1 else None
    # How peft combines the adapters; None: one adapter at weight 1, used as trained.
    combination = (method or "linear") if len(adapters) > 1 or weights != [1.0] else None
    check_same_base(adapters)
    if combination:
        check_combinable(adapters, combination)
    primary = adapters[0]
    recipe = primary.recipe
    trust_remote_code = bool(recipe and recipe.model.trust_remote_code)
    base = resolve_base(primary, options.base_model)
    config = load_config(base.location, trust_remote_code)
    check_fits_base(adapters, base, config, trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_location(primary.folder, base.location))
    check_vocabulary(primary, tokenizer, base, config)
    dtype = merge_dtype(options.dtype, config)
    tolerance = options.tolerance or DEFAULT_TOLERANCE[dtype]
    assert options.out is not None  # checked above

    with torch.no_grad():
        if options.base == "original":
            model = load_original_base(recipe, base, dtype)
        else:
            model = load_dequantized_base(recipe, primary, base, dtype)
        peft_model = attach_adapters(model, adapters, weights, combination, options.density)
        samples, effect = [], Effect(0.0, 0.0)
        if options.verify:
            prompts = sample_prompts(recipe, options.verify_prompts)
            samples, effect = unmerged_samples(peft_model, tokenizer, prompts)
        # In place: each LoRA delta is added to its base weight, then the wrappers are removed.
        merged = peft_model.merge_and_unload()
        report = compare_merged(merged, samples, effect, tolerance) if options.verify else None

    say(_summary_table(options, base, adapters, weights, method, dtype))
    if report is not None:
        say(_verify_table(report))
        if not report.passed:
            raise VerificationFailed(
                f"verify: the merged model differs from base + adapter (mean KL "
                f"{report.mean_kl:.3g}; tolerance {report.tolerance:.3g} and at most "
                f"{MAX_SHARE_OF_EFFECT:g} x the adapter's own effect {report.adapter_kl:.3g}); "
                "nothing written (merge in float32, raise --tolerance, or pass --no-verify)"
            )

    with atomic_dir(options.out) as staging:
        merged.save_pretrained(staging, max_shard_size=options.max_shard_size)
        tokenizer.save_pretrained(staging)
        info = merge_provenance(options, base, adapters, weights, method, dtype, report, staging)
        write_json(staging / PROVENANCE_FILE, info)
    files = list(info["files"])
    say(f"merged model written to {options.out} ({len(files)} safetensors file(s))")
    return MergeResult(options.out, base, dtype, method, weights, report, files)


def merge_provenance(
    options: MergeOptions,
    base: ResolvedModel,
    adapters: list[Adapter],
    weights: list[float],
    method: str | None,
    dtype: torch.dtype,
    report: VerifyReport | None,
    folder: Path,
) -> dict[str, Any]:
    """What went into the merged model, with hashes, so it can be traced and reproduced."""
    location = Path(base.location)
    info = provenance(
        base,
        merge={
            "base": options.base,
            "dtype": dtype_name(dtype),
            "method": method,
            "density": options.density,
            "weights": weights,
        },
        adapters=[
            {
                "path": str(adapter.folder.resolve()),
                "weight": weight,
                "sha256": file_digest(adapter.folder / ADAPTER_WEIGHTS),
                "r": adapter.config.get("r"),
                "lora_alpha": adapter.config.get("lora_alpha"),
                "target_modules": adapter.target_modules,
                "training": {
                    k: adapter.provenance[k]
                    for k in ("created", "steps", "data", "final_loss")
                    if k in adapter.provenance
                },
            }
            for adapter, weight in zip(adapters, weights, strict=True)
        ],
        verify=asdict(report) if report else None,
        files=safetensors_digests(folder),
    )
    info["base_model"]["files"] = safetensors_digests(location) if location.is_dir() else {}
    return info


def _summary_table(
    options: MergeOptions,
    base: ResolvedModel,
    adapters: list[Adapter],
    weights: list[float],
    method: str | None,
    dtype: torch.dtype,
) -> Table:
    table = Table(title="lorakit merge", show_header=False, title_justify="left")
    table.add_row("base model", f"{base.reference} ({base.kind})")
    base_kind = {
        "original": "original (full precision)",
        "dequantized": "dequantized (NF4 round trip, as in training)",
    }
    table.add_row("merge into", base_kind[options.base])
    table.add_row("dtype", str(dtype).removeprefix("torch."))
    for adapter, weight in zip(adapters, weights, strict=True):
        table.add_row("adapter", f"{adapter.folder} (weight {weight:g}, r={adapter.config['r']})")
    if method:
        density = f", density {options.density:g}" if options.density is not None else ""
        table.add_row("method", f"{method}{density}")
    return table


def _verify_table(report: VerifyReport) -> Table:
    verdict = "[green]passed[/green]" if report.passed else "[red]FAILED[/red]"
    table = Table(title=f"verify: {verdict}", show_header=False, title_justify="left")
    table.add_row("prompts / positions", f"{report.prompts} / {report.tokens}")
    table.add_row("max |Δlogit| merged vs unmerged", f"{report.max_abs_logit_diff:.3g}")
    table.add_row("mean KL merged vs unmerged", f"{report.mean_kl:.3g}")
    table.add_row(
        "adapter effect (vs base)",
        f"max |Δlogit| {report.adapter_effect:.3g}, mean KL {report.adapter_kl:.3g}",
    )
    table.add_row(
        "tolerance",
        f"{report.tolerance:.3g} and ≤ {MAX_SHARE_OF_EFFECT:g} x adapter KL",
    )
    table.add_row("greedy-token agreement", f"{100 * report.greedy_agreement:.1f}%")
    return table
