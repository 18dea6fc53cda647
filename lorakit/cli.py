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


def user_errors(command: F) -> F:
    """Turn LorakitError into `error: …` lines on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        quiet_libraries()
        try:
            return command(*args, **kwargs)
        except LorakitError as exc:
            for line in str(exc).splitlines():
                print(f"error: {line}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.command("train")
@user_errors
def train_command(
    recipe: RecipeArg,
    set_: SetOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run folder.")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="auto|PATH",
            help="Continue exactly from a checkpoint: `auto` (the run folder's latest, or a new "
            "run when there is none yet) or a checkpoint / run folder.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Resume even if the recipe, data or tokenizer changed since then."
        ),
    ] = False,
) -> None:
    """Fine-tune a model with (Q)LoRA as the recipe says; writes a run folder with the adapter.

    Ctrl-C (or SIGTERM) finishes the current optimizer step, writes a checkpoint and exits
    (130 / 143); a second Ctrl-C aborts at once."""
    from lorakit.recipe import load_recipe
    from lorakit.train import TrainingStopped, train

    if resume is not None and resume.startswith("-"):
        raise LorakitError(
            f"--resume: expected auto or a checkpoint path, got {resume!r} (e.g. --resume auto)"
        )
    try:
        train(
            load_recipe(recipe, set_ or ()),
            overwrite=overwrite,
            resume=resume,
            force=force,
            console=console,
        )
    except TrainingStopped as stopped:
        print(f"{stopped}; checkpoint: {stopped.checkpoint}", file=sys.stderr)
        again = "".join(f" --set {item}" for item in set_ or ())
        print(f"resume with: lorakit train {recipe}{again} --resume auto", file=sys.stderr)
        raise typer.Exit(stopped.exit_code) from None
    except KeyboardInterrupt:
        print("aborted; the checkpoints written so far are intact", file=sys.stderr)
        raise typer.Exit(130) from None


@app.command("validate")
@user_errors
def validate_command(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Check a recipe, its model reference and its data files without loading a model."""
    from lorakit.validate import validate

    for line in validate(recipe, set_ or ()):
        console.print(line)


@app.command("recipes")
@user_errors
def recipes_command() -> None:
    """List the shipped recipes (use one with `lorakit init --template NAME`)."""
    from rich.table import Table

    from lorakit.catalog import shipped_recipes

    table = Table("name", "what it does", "file", title="shipped recipes", title_justify="left")
    for recipe in shipped_recipes():
        table.add_row(recipe.name, recipe.summary, str(recipe.path))
    Console().print(table)


@app.command("init")
@user_errors
def init_command(
    path: Annotated[Path, typer.Argument(help="Where to write the recipe.")] = Path("recipe.yaml"),
    template: Annotated[
        str, typer.Option("--template", "-t", help="A shipped recipe (see `lorakit recipes`).")
    ] = "starter",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented starter recipe."""
    from lorakit.catalog import write_starter

    written = write_starter(path, template, force)
    console.print(f"wrote {written}; check it with: lorakit validate {written}")


@app.command("reference")
def reference_command() -> None:
    """Print the recipe reference (Markdown), generated from the schema."""
    from lorakit.recipe import recipe_reference

    sys.stdout.write(recipe_reference())


@app.command("prepare")
@user_errors
def prepare_command(
    recipe: RecipeArg,
    set_: SetOption = None,
    preview: Annotated[
        int, typer.Option("--preview", min=0, help="Show N examples, trained tokens highlighted.")
    ] = 0,
) -> None:
    """Tokenize the recipe's data (filling the cache) and show statistics and examples."""
    from lorakit.prepare import prepare

    # A pipe or a file gets the whole report: wide tables, and example text never re-wrapped.
    wide = None if sys.stdout.isatty() else 160
    prepare(recipe, set_ or (), preview, Console(width=wide, soft_wrap=True))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
