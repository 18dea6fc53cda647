"""The run folder and the adapter folder: what `train` writes and every other command reads.

```
runs/NAME/
  adapter/                 the final PEFT adapter (adapter_config.json, adapter_model.safetensors),
                           tokenizer + chat template, recipe.resolved.yaml, lorakit.json
  checkpoints/step-N/      an adapter folder plus what an exact resume needs (`lorakit.resume`)
  metrics.jsonl, loss.png, recipe.resolved.yaml, lorakit.json
```

`lorakit.json` is the provenance every lorakit output carries (adapter, merged model, 4-bit
model): built by `provenance` only, so `merge`, `eval` and `quantize` find an adapter's base
model without the training YAML (`resolve_adapter_base`).
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

import lorakit
from lorakit.errors import LorakitError
from lorakit.files import atomic_dir, read_json, write_json
from lorakit.models import ResolvedModel, resolve_model
from lorakit.recipe import Recipe

RECIPE_FILE = "recipe.resolved.yaml"
PROVENANCE_FILE = "lorakit.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"
"""Where a run folder keeps its final adapter."""


def check_run_dir(path: str, overwrite: bool) -> bool:
    """Refuse to mix a new run into an old one unless asked; True when an old run is there."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"output.dir: {path} exists and is not a folder")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not overwrite:
        raise LorakitError(
            f"output.dir: {path} already holds a run "
            "(pass --resume to continue it, or --overwrite to replace it)"
        )
    return occupied


def prepare_run_dir(path: str, overwrite: bool) -> Path:
    """Create the run folder, replacing an old run only when `overwrite`."""
    run_dir = Path(path)
    if check_run_dir(path, overwrite):
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LorakitError(f"output.dir: cannot create {path}: {exc.strerror}") from None
    return run_dir


def adapter_folder_in(path: Path) -> Path | None:
    """The adapter folder `path` names: itself (an adapter or checkpoint folder) or a run
    folder's `adapter/`; None when it is neither."""
    for folder in (path, path / ADAPTER_DIR):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    return None


def adapter_provenance(adapter_dir: Path) -> dict[str, Any]:
    """lorakit's provenance of an adapter: in its folder (older runs: at the run's root); {}
    for an adapter from elsewhere."""
    for folder in (adapter_dir, adapter_dir.parent):
        if (folder / PROVENANCE_FILE).is_file():
            return read_json(folder / PROVENANCE_FILE)
    return {}


def base_reference_of(provenance: dict[str, Any], peft_config: dict[str, Any]) -> str | None:
    """How an adapter's base model was named: in lorakit's provenance, else (an adapter from
    elsewhere) PEFT's base_model_name_or_path."""
    return provenance.get("base_model", {}).get("reference") or peft_config.get(
        "base_model_name_or_path"
    )


def resolve_adapter_base(adapter_dir: Path) -> ResolvedModel:
    """The base model every command loads an adapter on: the folder lorakit loaded it from in
    training while that folder still exists (so a relative path works from anywhere), else
    the name it was given, resolved again (an alias or a .gguf is converted again)."""
    provenance = adapter_provenance(adapter_dir)
    reference = base_reference_of(provenance, read_json(adapter_dir / ADAPTER_CONFIG))
    recorded = provenance.get("base_model", {})
    if not reference:
        raise LorakitError(f"{adapter_dir}: the adapter does not name its base model")
    location = recorded.get("location")
    if location and recorded.get("kind") != "hub" and Path(location, "config.json").is_file():
        return ResolvedModel(reference, location, recorded.get("kind", "folder"))
    try:
        return resolve_model(reference)
    except LorakitError as exc:
        raise LorakitError(
            f"{adapter_dir}: the adapter's base model {reference!r} cannot be found: "
            + str(exc).removeprefix("model.name_or_path: ")
        ) from None


def tokenizer_location(adapter_dir: Path | None, base_location: str) -> str:
    """Where an adapter's tokenizer is: the adapter folder holds the tokenizer and chat
    template it was trained with; an adapter saved without one uses its base's."""
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        return str(adapter_dir)
    return base_location


def write_adapter_files(
    folder: Path,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    provenance: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights, config, tokenizer + chat template, the resolved recipe and provenance: what
    later commands need and nothing else. `state_dict` is the gathered state under FSDP."""
    # Only the trained adapter: DPO on top of an adapter also holds a frozen reference copy.
    model.save_pretrained(
        folder, safe_serialization=True, state_dict=state_dict, selected_adapters=["default"]
    )
    tokenizer.save_pretrained(folder)
    (folder / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    write_json(folder / PROVENANCE_FILE, provenance)


def save_adapter(
    target: Path,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    provenance: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A self-contained PEFT adapter folder, written atomically."""
    with atomic_dir(target) as staging:
        write_adapter_files(staging, model, tokenizer, recipe, provenance, state_dict)
    return target


def provenance(model: ResolvedModel, **sections: Any) -> dict[str, Any]:
    """What every lorakit output records (adapter, checkpoint, merged or 4-bit model): which
    lorakit made it and when, from which base model, with which library versions; then the
    sections the command adds (the data an adapter was trained on, how a model was merged)."""
    return {
        "lorakit_version": lorakit.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": {
            "reference": model.reference,
            "kind": model.kind,
            "location": model.location,
        },
        "libraries": {
            name: version(name)
            for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
        },
        **sections,
    }


def starting_adapter(recipe: Recipe) -> Path:
    """The adapter folder `model.adapter` names, checked before anything loads: it exists, it
    was trained on this recipe's base, and the recipe does not also set LoRA settings."""
    from lorakit.files import read_json
    from lorakit.models import resolve_model
    from lorakit.run_folder import adapter_folder_in, adapter_provenance, base_reference_of

    given = Path(recipe.model.adapter or "")
    folder = adapter_folder_in(given)
    if folder is None:
        raise LorakitError(
            f"model.adapter: {given} is not a run, adapter or checkpoint folder "
            "(no adapter_config.json here or in adapter/)"
        )
    config = read_json(folder / ADAPTER_CONFIG)
    if recipe.lora.model_fields_set:
        raise LorakitError(
            f"lora: the starting adapter {given} brings its own LoRA settings (r="
            f"{config.get('r')}, lora_alpha={config.get('lora_alpha')}); remove the lora section"
        )
    trained_on = base_reference_of(adapter_provenance(folder), config)
    if trained_on:
        here = resolve_model(recipe.model.name_or_path, convert=False).location
        try:
            there = resolve_model(trained_on, convert=False).location
        except LorakitError:
            there = trained_on
        if here != there:
            raise LorakitError(
                f"model.adapter: {given} was trained on {trained_on!r}, not on "
                f"{recipe.model.name_or_path!r}"
            )
    return folder
