"""What `lorakit eval` and `lorakit generate` run: a TARGET, resolved and loaded.

A TARGET is one of
- a base model reference (built-in alias, `.gguf` file, model folder, hub id), as in a recipe;
- a run folder written by `lorakit train` (its `adapter/` is used) or an adapter folder
  (PEFT files; lorakit's also hold `recipe.resolved.yaml` and `lorakit.json`, which name the
  base model and the data settings the adapter was trained with);
- a merged model folder (a plain Hugging Face model folder).

An adapter is run on its base loaded exactly as in training (`peft_setup.load_adapter_as_trained`:
4-bit when the recipe quantized it, the same compute dtype, 4-bit layout, k-bit preparation,
embeddings and fused LoRA path), with the tokenizer and chat template saved next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lorakit.dtypes import dtype_name
from lorakit.errors import LorakitError
from lorakit.models import load_tokenizer, resolve_model
from lorakit.peft_setup import (
    choose_compute_dtype,
    describe_quantization,
    load_adapter_as_trained,
    load_base_as_trained,
)
from lorakit.recipe import DataSection, ModelSection, QuantSection, Recipe, load_recipe
from lorakit.run_folder import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    PROVENANCE_FILE,
    RECIPE_FILE,
    adapter_folder_in,
    resolve_adapter_base,
    tokenizer_location,
)


@dataclass(frozen=True)
class Target:
    reference: str
    """What the user typed."""
    kind: str
    """`model` (a base model), `merged` (a model folder lorakit wrote) or `adapter`."""
    model_location: str
    """What from_pretrained loads: the model itself, or the adapter's base."""
    adapter_dir: Path | None = None
    recipe: Recipe | None = None
    """The recipe an adapter was trained with (None for models and foreign adapters)."""
    base_reference: str | None = None

    @property
    def tokenizer_location(self) -> str:
        return tokenizer_location(self.adapter_dir, self.model_location)

    @property
    def trust_remote_code(self) -> bool:
        return self.recipe.model.trust_remote_code if self.recipe else False

    @property
    def data_settings(self) -> DataSection | None:
        return self.recipe.data if self.recipe else None

    def label(self) -> str:
        path = Path(self.reference)
        if self.kind == "adapter" and path.name == ADAPTER_DIR:
            path = path.parent
        return path.name or self.reference


def resolve_target(reference: str) -> Target:
    """Tell what `reference` is without loading weights; a one-line error when it is neither a
    model nor an adapter."""
    path = Path(reference).expanduser()
    if path.is_dir():
        adapter_dir = adapter_folder_in(path)
        if adapter_dir is not None:
            return _adapter_target(reference, adapter_dir)
        if (path / "config.json").is_file():
            kind = "merged" if (path / PROVENANCE_FILE).is_file() else "model"
            return Target(reference, kind, str(path.resolve()))
        raise LorakitError(
            f"{reference}: neither a model folder (config.json), an adapter folder "
            f"({ADAPTER_CONFIG}) nor a run folder (adapter/)"
        )
    if path.exists() and path.suffix != ".gguf":
        raise LorakitError(
            f"{reference}: not a model or adapter (expected a folder, a .gguf file, "
            "a built-in alias or a hub id)"
        )
    try:
        resolved = resolve_model(reference)
    except LorakitError as exc:
        raise LorakitError(str(exc).removeprefix("model.name_or_path: ")) from None
    return Target(reference, "model", resolved.location)


def _adapter_target(reference: str, adapter_dir: Path) -> Target:
    recipe = None
    if (adapter_dir / RECIPE_FILE).is_file():
        recipe = load_recipe(adapter_dir / RECIPE_FILE)
    base = resolve_adapter_base(adapter_dir)
    return Target(reference, "adapter", base.location, adapter_dir, recipe, base.reference)


@dataclass
class LoadedTarget:
    target: Target
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    precision: str
    """How the weights were loaded, for the comparison table, e.g. `4-bit nf4, bfloat16`."""


def load_target(
    target: Target,
    device: torch.device,
    load_in_4bit: bool | None = None,
    dtype: str | None = None,
) -> LoadedTarget:
    """Load the model (with its adapter) in eval mode.

    `load_in_4bit` / `dtype` left as None mean: as the adapter was trained (its recipe's quant
    section), and for a plain model the full-precision weights in the `auto` dtype."""
    quant = target.recipe.quant if target.recipe else QuantSection(load_in_4bit=False)
    if load_in_4bit is not None:
        quant = quant.model_copy(update={"load_in_4bit": load_in_4bit})
    quant = quant.model_copy(
        update={"bnb_4bit_compute_dtype": dtype or quant.bnb_4bit_compute_dtype}
    )
    tokenizer = _load_tokenizer(target)
    model_section = target.recipe.model if target.recipe else ModelSection()
    try:
        if target.adapter_dir is not None:
            model = load_adapter_as_trained(
                target.model_location, target.adapter_dir, quant, model_section, device
            )
        else:
            model, _ = load_base_as_trained(model_section, quant, target.model_location, device)
            model.eval()
    except LorakitError as exc:
        raise LorakitError(f"{target.reference}: {exc}") from None
    compute_dtype = choose_compute_dtype(quant.bnb_4bit_compute_dtype, device)
    name = dtype_name(compute_dtype)
    precision = f"{describe_quantization(quant)}, {name}" if quant.load_in_4bit else name
    return LoadedTarget(target, model, tokenizer, precision)


def _load_tokenizer(target: Target) -> PreTrainedTokenizerBase:
    try:
        return load_tokenizer(target.tokenizer_location, target.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LorakitError(
            f"{target.reference}: cannot load the tokenizer from {target.tokenizer_location}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
