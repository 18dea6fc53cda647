"""The command line. Thin: parse arguments, call one function per command, map errors to exit
codes (2 for bad input, with one line per problem and no traceback)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from lorakit.errors import LorakitError

app = typer.Typer(
    name="lorakit",
    help="Fine-tune large language models with LoRA and QLoRA from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable)

RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set train.learning_rate=1e-4"),
]


def quiet_libraries() -> None:
    """lorakit prints its own progress; the libraries' bars and advice would bury it."""
    import logging
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Paged optimizer state is a CUDA feature; on the CPU bitsandbytes runs the same
    # optimizer unpaged, and says so once per tensor.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # peft probes a deprecated transformers property when it wraps a model.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def user_errors(command: F) -> F:
    """Turn LorakitError into `error: …` lines on stderr and its exit code (2: bad input)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        quiet_libraries()
        try:
            return command(*args, **kwargs)
        except LorakitError as exc:
            for line in str(exc).splitlines():
                print(f"error: {line}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


@app.command("train")
@user_errors
def train_command(
    recipe: RecipeArg,
    set_: SetOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run folder.")
    ] = False,
) -> None:
    """Fine-tune a model with (Q)LoRA as the recipe says; writes a run folder with the adapter."""
    from lorakit.recipe import load_recipe
    from lorakit.train import train

    train(load_recipe(recipe, set_ or ()), overwrite=overwrite, console=console)


@app.command("validate")
@user_errors
def validate_command(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Check a recipe, its model reference and its data files without loading a model."""
    from lorakit.validate import validate

    for line in validate(recipe, set_ or ()):
        console.print(line)


@app.command("merge")
@user_errors
def merge_command(
    source: Annotated[Path, typer.Argument(help="A run folder (lorakit train) or adapter folder.")],
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the merged model.")] = None,
    adapter: Annotated[
        list[Path] | None,
        typer.Option("--adapter", help="Another adapter (run or adapter folder) to combine."),
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="One weight per adapter, e.g. 0.7,0.3.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="How several adapters combine: linear|cat|svd|ties|dare_ties|dare_linear|"
            "magnitude_prune (default cat: the exact weighted sum).",
        ),
    ] = None,
    density: Annotated[
        float | None, typer.Option("--density", help="Fraction kept by ties/dare/magnitude_prune.")
    ] = None,
    base: Annotated[
        str,
        typer.Option(
            "--base", help="original: full-precision base; dequantized: its NF4 round trip."
        ),
    ] = "original",
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="auto (as the base is stored)|float32|bfloat16|float16."),
    ] = "auto",
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="Load the base from here, not the saved reference."),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare merged vs unmerged logits.")
    ] = True,
    verify_prompts: Annotated[
        int, typer.Option("--verify-prompts", help="Sample prompts the check runs.")
    ] = 4,
    tolerance: Annotated[
        float | None,
        typer.Option("--tolerance", help="Largest mean KL (nats/token) verify accepts."),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Split safetensors above this size.")
    ] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Merge adapters into the base model and write a model that loads anywhere."""
    from lorakit.merge import MergeOptions, merge, parse_weights

    options = MergeOptions(
        source=source,
        out=out,
        adapters=tuple(adapter or ()),
        weights=parse_weights(weights),
        method=method,
        density=density,
        base=base,
        dtype=dtype,
        base_model=base_model,
        verify=verify,
        verify_prompts=verify_prompts,
        tolerance=tolerance,
        max_shard_size=max_shard_size,
        force=force,
    )
    merge(options, console=console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
