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


@app.command("quantize")
@user_errors
def quantize_command(
    model: Annotated[
        str, typer.Argument(help="A full or merged model: folder, .gguf file, alias or hub id.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (bnb) or .gguf file (gguf).")],
    format_: Annotated[
        str, typer.Option("--format", help="bnb: 4-bit bitsandbytes folder; gguf: llama.cpp file.")
    ] = "bnb",
    method: Annotated[str | None, typer.Option(help="bnb: nf4 (default) or fp4.")] = None,
    double_quant: Annotated[
        bool | None,
        typer.Option(
            "--double-quant/--no-double-quant",
            help="bnb: also quantize the per-block scales (default on).",
        ),
    ] = None,
    blocksize: Annotated[
        int | None, typer.Option(help="bnb: weights per quantization block (default 64).")
    ] = None,
    type_: Annotated[
        str | None,
        typer.Option(
            "--type", help="gguf: f16 (default), f32, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="bnb: measure perplexity before and after on this dataset file."),
    ] = None,
    max_seq_len: Annotated[int, typer.Option(help="bnb: truncate --data examples.")] = 512,
    dtype: Annotated[
        str,
        typer.Option(help="bnb: dtype of unquantized tensors and 4-bit compute (auto = as train)."),
    ] = "auto",
    verify: Annotated[
        bool,
        typer.Option(help="gguf: run the file in llama.cpp and compare greedy tokens."),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
) -> None:
    """Quantize a model to 4 bits (NF4/FP4, measured) or export it to GGUF for llama.cpp."""
    from lorakit import quantize

    if format_ == "bnb":
        if type_ is not None or verify:
            raise LorakitError("--type and --verify apply to --format gguf")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise LorakitError(f"--dtype: {dtype!r} is not auto, float32, bfloat16 or float16")
        report = quantize.quantize_model(
            model,
            out,
            method=method or "nf4",
            double_quant=True if double_quant is None else double_quant,
            blocksize=blocksize or 64,
            dtype=dtype,
            data=data,
            max_seq_len=max_seq_len,
            overwrite=overwrite,
        )
        for table in quantize.report_tables(report):
            console.print(table)
    elif format_ == "gguf":
        given = [
            flag
            for flag, value in (
                ("--method", method),
                ("--double-quant", double_quant),
                ("--blocksize", blocksize),
                ("--data", data),
            )
            if value is not None
        ]
        if given:
            raise LorakitError(f"{', '.join(given)} apply to --format bnb; GGUF takes --type")
        report = quantize.export_gguf(model, out, gguf_type=type_ or "f16", overwrite=overwrite)
        checks = quantize.verify_gguf(out, report.location) if verify else []
        console.print(quantize.gguf_table(report, checks))
    else:
        raise LorakitError(f"--format: {format_!r} is not bnb or gguf")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
