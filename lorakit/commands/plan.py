"""`lorakit plan`: will this recipe fit, and how long will it run, before anything loads.

The model is built on the meta device from its config (a local folder's, a GGUF header's, the
published hyperparameters shipped for the GPU recipes' hub ids, or a hub config in the local
cache), so no weights are read. The plan's parts, the answer on the budget (this machine's free
memory, or `--memory`), the largest micro-batch and sequence length that fit, the levers when it
does not fit, the `auto` values, and with `--probe` a time estimate from a few real steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, PretrainedConfig

from lorakit.data import prepare_data
from lorakit.data.pipeline import read_dataset
from lorakit.errors import LorakitError
from lorakit.memory_plan import (
    PUBLISHED_CONFIGS,
    GiB,
    MemoryPlan,
    largest_micro_batch,
    largest_seq_len,
    levers,
    published_config,
    with_values,
)
from lorakit.models import converted_folder, load_config, load_tokenizer, resolve_model
from lorakit.planning import (
    available_memory,
    check_fits,
    device_kind,
    parse_size,
    plan_of,
    resolve_auto,
    run_length,
    sized,
)
from lorakit.recipe import Recipe, load_recipe


@dataclass(frozen=True)
class PlanOptions:
    memory: str | None = None
    """A budget such as `24GiB`; default: what the device has free."""
    device: str | None = None
    """`cpu` or `cuda[:N]`; default: cuda when there is one."""
    gpus: int = 1
    fsdp: bool = False
    probe: bool = False


@dataclass
class PlanReport:
    recipe: Recipe
    plan: MemoryPlan
    budget: int
    config_source: str
    data: PlanData
    decisions: list
    largest_micro_batch: int
    largest_seq_len: int
    steps: int
    micro_batches: int
    seconds_per_micro_batch: float | None = None

    @property
    def fits(self) -> bool:
        return self.plan.total <= self.budget


def plan(
    path: Path, overrides: Sequence[str], options: PlanOptions, console: Console
) -> PlanReport:
    recipe = load_recipe(path, overrides)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available() and options.memory is None:
        raise LorakitError(f"--device {device}: no GPU here; give its size with --memory")
    budget = parse_size(options.memory) if options.memory else available_memory(device)
    config, source = planning_config(recipe)
    data = planning_data(recipe)
    shape = {
        "device": device_kind(device),
        "processes": options.gpus,
        "fsdp": options.fsdp,
        "longest": data.longest,
    }
    resolved, decisions = resolve_auto(
        recipe, config, budget=budget, train_examples=data.examples, **shape
    )
    memory = plan_of(resolved, config, **shape)
    layout = {key: shape[key] for key in ("device", "processes", "fsdp")}
    steps, micro_batches = run_length(resolved, data.examples, options.gpus)
    report = PlanReport(
        recipe=resolved,
        plan=memory,
        budget=budget,
        config_source=source,
        data=data,
        decisions=decisions,
        largest_micro_batch=largest_micro_batch(
            sized(resolved, data.longest), config, budget, **layout
        ),
        largest_seq_len=largest_seq_len(resolved, config, budget, **layout),
        steps=steps,
        micro_batches=micro_batches,
    )
    if options.probe and report.fits:
        report.seconds_per_micro_batch = probe(resolved, device)
    for table in plan_tables(report, config, layout):
        console.print(table)
    check_fits(resolved, config, memory, budget, **shape)
    return report


@dataclass(frozen=True)
class PlanData:
    examples: int
    """Rows (or pairs) of one epoch."""
    longest: int | None
    """The longest tokenized row; None when there is no tokenizer here to tell."""
    how: str


def planning_data(recipe: Recipe) -> PlanData:
    """The training data as the run will see it, tokenized (cached as `train` caches it) when
    the model's tokenizer is here; else its rows, planned at `max_seq_len`."""
    resolved = resolve_model(recipe.model.name_or_path, convert=False)
    try:
        if resolved.kind == "hub" and not _in_hub_cache(resolved.location, "tokenizer_config.json"):
            raise LorakitError("not in the local hub cache")
        tokenizer = load_tokenizer(resolved.location, recipe.model.trust_remote_code)
    except LorakitError:
        rows = sum(len(read_dataset(spec, recipe.data.strict).rows) for spec in recipe.data.train)
        how = f"{rows:,} rows read; no tokenizer here, so every row planned at max_seq_len"
        return PlanData(rows, None, how)
    train = prepare_data(recipe, tokenizer).train
    longest = max((example.length for example in train), default=1)
    unit = "pairs" if recipe.train.method != "sft" else "rows"
    how = f"{len(train):,} {unit} tokenized, the longest {longest:,} tokens"
    if recipe.data.packing:
        how += f"; packed rows of {recipe.data.max_seq_len:,}"
    return PlanData(len(train), longest, how)


def planning_config(recipe: Recipe) -> tuple[PretrainedConfig, str]:
    """The model's config without its weights, and where it came from."""
    name = recipe.model.name_or_path
    if name in PUBLISHED_CONFIGS:
        return published_config(name), "published hyperparameters shipped with lorakit"
    resolved = resolve_model(name, convert=False)
    remote = recipe.model.trust_remote_code
    if resolved.kind == "hub":
        try:
            if not _in_hub_cache(name, "config.json"):
                raise LorakitError("not in the local hub cache")
            return load_config(name, remote), "hub config (local cache)"
        except LorakitError:
            known = ", ".join(sorted(PUBLISHED_CONFIGS))
            raise LorakitError(
                f"model.name_or_path: no config for {name!r} here (offline); download the "
                f"model's config.json into a folder and name the folder, or plan one of {known}"
            ) from None
    location = Path(resolved.location)
    if location.suffix == ".gguf":
        folder = converted_folder(location)
        if (folder / "config.json").is_file():
            return load_config(str(folder)), f"{folder}"
        config = AutoConfig.from_pretrained(location.parent, gguf_file=location.name)
        return config, f"the GGUF header of {location.name}"
    return load_config(str(location), remote), str(location)


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    """Whether the hub's local cache holds the file (planning never goes online)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def plan_tables(report: PlanReport, config: PretrainedConfig, shape: dict) -> list[Table]:
    memory = report.plan
    parts = Table(title="lorakit plan: peak memory per device", title_justify="left")
    for column in ("part", "GiB", "counted"):
        parts.add_column(column, justify="right" if column == "GiB" else "left")
    for name, size, how in memory.parts():
        parts.add_row(name, f"{size / GiB:.2f}", how)
    verdict = "fits" if report.fits else "[red]does not fit[/red]"
    where = f"{memory.device}, {memory.compute_dtype}"
    if memory.processes > 1:
        where += f", {memory.processes} processes" + (" FSDP" if memory.fsdp else " DDP")
    parts.add_row(
        "[bold]total[/bold]",
        f"[bold]{memory.total / GiB:.2f}[/bold]",
        f"{verdict} in {report.budget / GiB:.2f} GiB ({where})",
    )
    summary = Table(title="the run", show_header=False, title_justify="left")
    summary.add_row("model config", report.config_source)
    summary.add_row("data", report.data.how)
    tcfg = report.recipe.train
    summary.add_row(
        "batch",
        f"micro-batch {tcfg.micro_batch_size} x accumulation {tcfg.gradient_accumulation_steps}, "
        f"max_seq_len {report.recipe.data.max_seq_len}",
    )
    for decision in report.decisions:
        summary.add_row(f"auto {decision.key}", f"{decision.value} ({decision.why})")
    summary.add_row(
        "largest that fit",
        f"micro_batch_size {report.largest_micro_batch or 'none'}, "
        f"max_seq_len {report.largest_seq_len or 'none'} (each with the rest as set)",
    )
    steps = f"{report.steps} optimizer steps, {report.micro_batches} micro-batches"
    summary.add_row("steps", steps)
    if report.seconds_per_micro_batch is not None:
        total = report.seconds_per_micro_batch * report.micro_batches
        summary.add_row(
            "time (probe)",
            f"≈ {_duration(total)} ({report.seconds_per_micro_batch:.2f} s per micro-batch "
            "measured on this machine; evaluations and saving add to it)",
        )
    else:
        summary.add_row("time", "--probe times a few real steps for an estimate")
    for note in memory.notes:
        summary.add_row("note", note)
    tables = [parts, summary]
    if not report.fits:
        options = Table(title="levers (each alone)", title_justify="left")
        for column in ("set", "why", "GiB", "fits"):
            options.add_column(column)
        found = levers(sized(report.recipe, report.data.longest), config, report.budget, **shape)
        for lever in found:
            fits = "yes" if lever.fits else "no"
            options.add_row(lever.change, lever.why, f"{lever.total / GiB:.2f}", fits)
        tables.append(options)
    return tables


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def probe(recipe: Recipe, device: str, micro_batches: int = 3) -> float:
    """Seconds per micro-batch (forward and backward) of the real model on this machine: one
    warm-up micro-batch, then the mean of `micro_batches`. This loads the model. Eager: a
    compiled run's steps are faster once compiled, after the compilation's own time."""
    from lorakit.data import make_loader
    from lorakit.models import loadable
    from lorakit.peft_setup import build_trainable_model
    from lorakit.training.objective import training_objective

    recipe = with_values(recipe, train__torch_compile=False)
    resolved = resolve_model(recipe.model.name_or_path, convert=False)
    tokenizer = load_tokenizer(resolved.location, recipe.model.trust_remote_code)
    data = prepare_data(recipe, tokenizer)
    target = torch.device(device)
    model, _ = build_trainable_model(recipe, loadable(resolved).location, target)
    objective = training_objective(recipe, model).train()
    loader = make_loader(
        data.train,
        recipe.train.micro_batch_size,
        tokenizer.pad_token_id,
        recipe.train.seed,
        shuffle=True,
        group_by_length=recipe.data.group_by_length,
    )
    times = []
    for index, batch in enumerate(loader):
        if index > micro_batches:
            break
        started = time.perf_counter()
        batch = {k: None if v is None else v.to(target) for k, v in batch.items()}
        total, count = objective(**batch)
        (total / count).backward()
        if index:  # the first one warms up kernels and caches
            times.append(time.perf_counter() - started)
    return sum(times) / max(len(times), 1)
