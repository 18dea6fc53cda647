"""The command line. Thin: parse arguments, call one function per command, map errors to exit
codes (2 for bad input, with one line per problem and no traceback)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar, get_args

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


DTYPES = ("auto", "float32", "bfloat16", "float16")
TargetsArg = Annotated[
    list[str],
    typer.Argument(
        help="Models to evaluate: a base model (alias, folder, .gguf, hub id), a run or "
        "adapter folder written by `lorakit train`, or a merged model folder.",
        show_default=False,
    ),
]
LoadIn4bitOption = Annotated[
    bool | None,
    typer.Option(
        "--load-in-4bit/--no-load-in-4bit",
        help="Load the (base) weights in 4-bit. Default: as the adapter was trained; plain "
        "models unquantized.",
        show_default=False,
    ),
]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        help="Compute dtype: auto, float32, bfloat16 or float16. Default: the adapter's "
        "training setting; auto for plain models.",
        show_default=False,
    ),
]
MaxNewTokensOption = Annotated[
    int, typer.Option(min=1, help="Generate at most this many tokens per answer.")
]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Rows per forward / generate batch.")]


@app.command("eval")
@user_errors
def eval_command(
    targets: TargetsArg,
    data: Annotated[
        list[str] | None,
        typer.Option(help="Evaluation data file (.jsonl/.json/.csv/.parquet); repeatable."),
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="Data format: auto, alpaca, chat or text.")
    ] = "auto",
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: loss, perplexity, exact_match, contains, regex, chrf. "
            "Default: loss,perplexity (+ exact_match,contains,chrf for prompt/answer rows).",
            show_default=False,
        ),
    ] = None,
    normalize: Annotated[
        str,
        typer.Option(
            help="Before comparing answers: strip, lowercase, whitespace, punctuation, or none."
        ),
    ] = "strip",
    regex: Annotated[
        str | None,
        typer.Option(
            help="Adds the regex metric: the pattern extracts the answer from a generation "
            "(group 1 if any), which must equal the reference."
        ),
    ] = None,
    max_new_tokens: MaxNewTokensOption = 128,
    batch_size: BatchSizeOption = 16,
    max_seq_len: Annotated[
        int | None,
        typer.Option(min=1, help="Default: the adapter's training value.", show_default=False),
    ] = None,
    train_on: Annotated[
        str | None,
        typer.Option(
            help="Which tokens the loss covers: completions or all. Default: as trained.",
            show_default=False,
        ),
    ] = None,
    load_in_4bit: LoadIn4bitOption = None,
    dtype: DtypeOption = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Use the first N rows.", show_default=False)
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for report.json and generations.jsonl.")] = Path(
        "runs/eval"
    ),
    harness: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated lm-evaluation-harness tasks (needs the harness extra).",
            show_default=False,
        ),
    ] = None,
    harness_include: Annotated[
        Path | None,
        typer.Option(help="A folder of harness task YAML files.", show_default=False),
    ] = None,
) -> None:
    """Loss, perplexity and task metrics of one or more targets on the same data, side by side."""
    from lorakit.evaluate import EvalOptions, run_eval
    from lorakit.metrics import compile_regex, parse_metrics, parse_normalizers
    from lorakit.recipe import DataSection

    train_on_type = DataSection.model_fields["train_on"].annotation
    if not data and not harness:
        raise LorakitError("eval: give --data FILE (or --harness TASKS)")
    chosen = parse_metrics(metrics) if metrics is not None else []
    options = EvalOptions(
        metrics=chosen,
        normalizers=parse_normalizers(normalize),
        pattern=compile_regex(regex) if regex is not None or "regex" in chosen else None,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        train_on=_choice("--train-on", train_on, get_args(train_on_type)),
        load_in_4bit=load_in_4bit,
        dtype=_choice("--dtype", dtype, DTYPES),
        limit=limit,
    )
    tasks = [t.strip() for t in harness.split(",") if t.strip()] if harness else None
    run_eval(
        targets,
        data or [],
        options,
        fmt=format_,
        out_dir=out,
        harness_tasks=tasks,
        harness_include=str(harness_include) if harness_include else None,
        console=console,
    )


@app.command("generate")
@user_errors
def generate_command(
    target: Annotated[
        str, typer.Argument(help="A model, or a run / adapter folder written by lorakit train.")
    ],
    prompt: Annotated[
        list[str] | None, typer.Option(help="A user message to answer; repeatable.")
    ] = None,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Interactive chat on stdin, streaming tokens as they come."),
    ] = False,
    system: Annotated[
        str | None, typer.Option(help="A system message.", show_default=False)
    ] = None,
    max_new_tokens: MaxNewTokensOption = 256,
    batch_size: BatchSizeOption = 16,
    load_in_4bit: LoadIn4bitOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Greedy answers from a model or adapter, with the chat template it was trained with."""
    from accelerate import Accelerator

    from lorakit.chat import COMMANDS, answer_prompts
    from lorakit.chat import chat as chat_loop
    from lorakit.targets import load_target, resolve_target

    if not prompt and not chat:
        raise LorakitError("generate: give --prompt TEXT or --chat")
    for number, text in enumerate(prompt or [], start=1):
        if not text.strip():
            which = f" #{number}" if len(prompt or []) > 1 else ""
            raise LorakitError(f"--prompt{which} is empty: give the text to answer")
    dtype = _choice("--dtype", dtype, DTYPES)
    resolved = resolve_target(target)
    loaded = load_target(resolved, Accelerator().device, load_in_4bit, dtype)
    console.print(f"{resolved.label()} ({resolved.kind}, {loaded.precision})")
    if prompt:
        answers = answer_prompts(loaded, prompt, max_new_tokens, system, batch_size)
        for question, answer in zip(prompt, answers, strict=True):
            if len(prompt) > 1:
                print(f"> {question}")
            print(answer)
    if chat:
        interactive = sys.stdin.isatty()
        if interactive:
            console.print(COMMANDS)
        chat_loop(loaded, sys.stdin, max_new_tokens, system, show_prompt=interactive)


def _ordinal(number: int) -> str:
    suffix = (
        "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    )
    return f"{number}{suffix}"


def _choice(option: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise LorakitError(f"{option}: {value!r} is not one of {', '.join(allowed)}")
    return value


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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", "--force", help="Replace --out.")
    ] = False,
) -> None:
    """Quantize a model to 4 bits (NF4/FP4, measured) or export it to GGUF for llama.cpp."""
    from lorakit import quantize

    if format_ == "bnb":
        if type_ is not None or verify:
            raise LorakitError("--type and --verify apply to --format gguf")
        dtype = _choice("--dtype", dtype, DTYPES)
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
        try:
            checks = quantize.verify_gguf(out, report.location) if verify else []
        except LorakitError:
            console.print(quantize.gguf_table(report, []))  # the file is written: say what it is
            raise
        console.print(quantize.gguf_table(report, checks))
    else:
        raise LorakitError(f"--format: {format_!r} is not bnb or gguf")


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
    force: Annotated[
        bool, typer.Option("--force", "--overwrite", help="Replace a non-empty --out.")
    ] = False,
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
