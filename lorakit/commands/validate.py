"""`lorakit validate`: everything that can be checked without loading a model (the tokenizer is
read when chat data needs its template)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorakit.advice import recipe_advice
from lorakit.data.formats import NO_CHAT_TEMPLATE
from lorakit.data.pipeline import check_format_fits_method, needs_chat_template, read_dataset
from lorakit.errors import LorakitError
from lorakit.files import check_writable
from lorakit.models import load_tokenizer, resolve_model
from lorakit.recipe import load_recipe
from lorakit.run_folder import starting_adapter


def validate(path: Path, overrides: Sequence[str] = ()) -> list[str]:
    """Raise LorakitError on the first class of problem found; return a short report."""
    recipe = load_recipe(path, overrides)
    check_writable(Path(recipe.output.dir), "output.dir")
    model = resolve_model(recipe.model.name_or_path, convert=False)
    if recipe.model.adapter is not None:
        starting_adapter(recipe)
    warnings = [f"warning: {note}" for note in recipe_advice(recipe)]
    train = [read_dataset(spec, recipe.data.strict) for spec in recipe.data.train]
    val = [read_dataset(spec, recipe.data.strict) for spec in recipe.data.validation or []]
    for source in train + val:
        check_format_fits_method(source.format, recipe.train.method, source.stats.path)
    chats = [s.stats.path for s in train + val if needs_chat_template(s)]
    if chats and not recipe.data.chat_template and model.kind != "hub":
        tokenizer = load_tokenizer(model.location, recipe.model.trust_remote_code)
        if tokenizer.chat_template is None:
            raise LorakitError(f"{chats[0]}: {NO_CHAT_TEMPLATE}")
    formats = sorted({source.format for source in train})
    skipped = [source.stats for source in train + val if source.stats.skipped]
    return [
        *warnings,
        f"{path}: ok",
        f"model: {model.reference} ({model.kind})",
        f"data: {sum(len(s.rows) for s in train)} training rows ({', '.join(formats)}), "
        f"{sum(len(s.rows) for s in val)} validation rows",
        *(f"data: {s.path}: {s.skipped} rows skipped; first: {s.skip_reasons[0]}" for s in skipped),
        f"output: {recipe.output.dir}",
    ]
