"""What `lorakit quantize` may start from and where it may write: a full-precision model (adapters,
run folders and already-quantized models are refused with the command that fixes it), and an
output path that does not clobber the source or existing output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.files import check_writable
from lorakit.models import (
    ResolvedModel,
    load_config,
    resolve_model,
)
from lorakit.run_folder import ADAPTER_DIR, adapter_folder_in


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


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"
