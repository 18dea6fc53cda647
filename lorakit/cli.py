"""The command line. Thin: parse arguments, call one function per command (`lorakit.commands.*`),
map errors to exit codes (2 for bad input, with one line per problem and no traceback).

One word per meaning across commands: `--overwrite` replaces existing output (train, merge,
quantize, init); `--ignore-changes` resumes a run whose recipe, data or tokenizer changed.
`--force`, which meant either, still works where it did, with a deprecation note."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar, get_args

import typer
from rich.console import Console

from lorakit.data.formats import FORMATS
from lorakit.dtypes import DTYPE_CHOICES
from lorakit.errors import LorakitError
from lorakit.merge_methods import DEFAULT_METHOD, MERGE_METHODS

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
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing output.", show_default=False)
]
DeprecatedForce = Annotated[bool, typer.Option("--force", hidden=True)]
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


def deprecated_flag(old: str, new: str) -> None:
    print(f"note: {old} is deprecated here; it means {new}", file=sys.stderr)


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
            help="Continue exactly from a checkpoint: `auto` (the run folder's newest intact "
            "one, or a new run when there is none yet) or a checkpoint / run folder.",
        ),
    ] = None,
    ignore_changes: Annotated[
        bool,
        typer.Option(
            "--ignore-changes",
            help="Resume even if the recipe, data or tokenizer changed since the checkpoint.",
        ),
    ] = False,
    skip_memory_check: Annotated[
        bool,
        typer.Option(
            "--skip-memory-check",
            help="Train even when the memory plan says the recipe does not fit.",
        ),
    ] = False,
    force: DeprecatedForce = False,
) -> None:
    """Fine-tune a model with (Q)LoRA as the recipe says; writes a run folder with the adapter.

    Ctrl-C (or SIGTERM) finishes the current optimizer step, writes a checkpoint and exits
    (130 / 143); a second Ctrl-C aborts at once."""
    from lorakit.commands.train import train
    from lorakit.recipe import load_recipe
    from lorakit.training.signals import TrainingStopped

    if resume is not None and resume.startswith("-"):
        raise LorakitError(
            f"--resume: expected auto or a checkpoint path, got {resume!r} (e.g. --resume auto)"
        )
    if force:
        deprecated_flag("--force", "--ignore-changes")
    try:
        train(
            load_recipe(recipe, set_ or ()),
            overwrite=overwrite,
            resume=resume,
            force=ignore_changes or force,
            console=console,
            check_memory=not skip_memory_check,
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
    from lorakit.commands.validate import validate

    for line in validate(recipe, set_ or ()):
        console.print(line)


@app.command("plan")
@user_errors
def plan_command(
    recipe: RecipeArg,
    set_: SetOption = None,
    memory: Annotated[
        str | None,
        typer.Option(
            help="The memory to plan for, e.g. 24GiB (default: what is free).", show_default=False
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="cpu or cuda[:N] (default: cuda when there is one).", show_default=False),
    ] = None,
    gpus: Annotated[int, typer.Option(min=1, help="Data-parallel processes (one per GPU).")] = 1,
    fsdp: Annotated[
        bool, typer.Option("--fsdp", help="Shard weights and optimizer state over the GPUs.")
    ] = False,
    probe: Annotated[
        bool,
        typer.Option("--probe", help="Load the model and time a few steps for a time estimate."),
    ] = False,
) -> None:
    """Will the recipe fit, and how long will it run: the peak memory by part, without loading
    weights; the largest batch that fits; the levers when it does not."""
    from lorakit.commands.plan import PlanOptions, plan

    options = PlanOptions(memory=memory, device=device, gpus=gpus, fsdp=fsdp, probe=probe)
    plan(recipe, set_ or (), options, Console())


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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing file.")
    ] = False,
    force: DeprecatedForce = False,
) -> None:
    """Write a commented starter recipe."""
    from lorakit.catalog import write_starter

    if force:
        deprecated_flag("--force", "--overwrite")
    written = write_starter(path, template, overwrite or force)
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
    from lorakit.commands.prepare import prepare

    # A pipe or a file gets the whole report: wide tables, and example text never re-wrapped.
    wide = None if sys.stdout.isatty() else 160
    prepare(recipe, set_ or (), preview, Console(width=wide, soft_wrap=True))


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
        help=f"Compute dtype: {', '.join(DTYPE_CHOICES)}. Default: the adapter's training "
        "setting; auto for plain models.",
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
        str,
        typer.Option("--format", help=f"Data format: auto, {', '.join(FORMATS)}."),
    ] = "auto",
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: loss, perplexity, exact_match, contains, regex, chrf, "
            "preference_accuracy (preference pairs). "
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
    from lorakit.commands.evaluate import EvalOptions, run_eval
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
        dtype=_choice("--dtype", dtype, DTYPE_CHOICES),
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
    from lorakit.commands.generate import generate

    generate(
        target,
        list(prompt or []),
        chat_mode=chat,
        system=system,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        load_in_4bit=load_in_4bit,
        dtype=_choice("--dtype", dtype, DTYPE_CHOICES),
        console=console,
    )


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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
    force: DeprecatedForce = False,
) -> None:
    """Quantize a model to 4 bits (NF4/FP4, measured) or export it to GGUF for llama.cpp."""
    from lorakit.commands.quantize import QuantizeOptions, quantize

    if force:
        deprecated_flag("--force", "--overwrite")
    options = QuantizeOptions(
        model=model,
        out=out,
        format=format_,
        method=method,
        double_quant=double_quant,
        blocksize=blocksize,
        type=type_,
        data=data,
        max_seq_len=max_seq_len,
        dtype=_choice("--dtype", dtype, DTYPE_CHOICES) or "auto",
        verify=verify,
        overwrite=overwrite or force,
    )
    quantize(options, console)


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
            help="How several adapters combine: "
            + "; ".join(f"{m.name}: {m.summary}" for m in MERGE_METHODS.values())
            + f" (default {DEFAULT_METHOD}).",
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density",
            help="Fraction kept by "
            + "/".join(m.name for m in MERGE_METHODS.values() if m.density)
            + ".",
        ),
    ] = None,
    base: Annotated[
        str,
        typer.Option(
            "--base", help="original: full-precision base; dequantized: its NF4 round trip."
        ),
    ] = "original",
    dtype: Annotated[
        str,
        typer.Option("--dtype", help=f"{'|'.join(DTYPE_CHOICES)} (auto: as the base is stored)."),
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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --out.")
    ] = False,
    force: DeprecatedForce = False,
) -> None:
    """Merge adapters into the base model and write a model that loads anywhere."""
    from lorakit.commands.merge import MergeOptions, merge, parse_weights

    if force:
        deprecated_flag("--force", "--overwrite")
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
        overwrite=overwrite or force,
    )
    merge(options, console=console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
