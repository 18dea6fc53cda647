"""`lorakit validate`: everything that can be checked without loading a model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorakit.advice import recipe_advice
from lorakit.data.pipeline import load_rows
from lorakit.models import resolve_model
from lorakit.recipe import load_recipe


def validate(path: Path, overrides: Sequence[str] = ()) -> list[str]:
    """Raise LorakitError on the first class of problem found; return a short report."""
    recipe = load_recipe(path, overrides)
    model = resolve_model(recipe.model.name_or_path, convert=False)
    train_rows = load_rows(recipe.data.train)
    val_rows = load_rows(recipe.data.validation) if recipe.data.validation else []
    formats = sorted({fmt for _, fmt in train_rows})
    warnings = [f"warning: {note}" for note in recipe_advice(recipe)]
    return [
        *warnings,
        f"{path}: ok",
        f"model: {model.reference} ({model.kind})",
        f"data: {len(train_rows)} training rows ({', '.join(formats)}), "
        f"{len(val_rows)} validation rows",
        f"output: {recipe.output.dir}",
    ]
