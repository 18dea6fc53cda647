"""The run folder and everything written into it atomically (temporary folder, then rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.recipe import Recipe

RECIPE_FILE = "recipe.resolved.yaml"
PROVENANCE_FILE = "lorakit.json"


def check_run_dir(path: str, overwrite: bool) -> bool:
    """Refuse to mix a new run into an old one unless asked; True when an old run is there."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"output.dir: {path} exists and is not a folder")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not overwrite:
        raise LorakitError(
            f"output.dir: {path} already holds a run (pass --overwrite to replace it)"
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


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a staging folder next to `target`; on success it replaces `target` in one rename,
    so a reader never sees a half-written folder and a failed save leaves the old one intact."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_adapter(
    target: Path,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    provenance: dict[str, Any],
) -> Path:
    """A self-contained PEFT adapter folder: weights, config, tokenizer + chat template, the
    resolved recipe and provenance, so later commands need nothing else."""
    with atomic_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
        write_json(staging / PROVENANCE_FILE, provenance)
    return target
