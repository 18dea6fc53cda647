"""`lorakit eval`: several targets (base models, adapters, merged models) on one dataset, side by
side: token-weighted loss (masked exactly as in training), perplexity and generation metrics.

Loss and perplexity go through the training pipeline (same formatting, chat template, masking
and `max_seq_len`), so a training validation file works as it is. Generation metrics decode
greedily in batches (left padding, KV cache) from the prompt part of each row, which is
tokenized segment by segment exactly as in training.
"""

from __future__ import annotations

import gc
import json
import re
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from lorakit.artifacts import LoadedTarget, load_target, resolve_target
from lorakit.data.batching import make_loader
from lorakit.data.formats import render_segments
from lorakit.data.pipeline import load_rows, tokenize_rows
from lorakit.data.sources import Row
from lorakit.decoding import greedy_continuations
from lorakit.errors import LorakitError
from lorakit.files import atomic_write_text, check_writable
from lorakit.loss import TokenNLL, evaluate_loss_and_tokens, perplexity
from lorakit.metrics import (
    GENERATION_METRICS,
    LOSS_METRICS,
    PREFERENCE_METRICS,
    score_generations,
)
from lorakit.preference import preference_accuracy
from lorakit.recipe import DataSection, DatasetSpec

PROMPT_FORMATS = ("chat", "alpaca")
"""Formats whose rows hold a prompt and a reference answer (generation metrics)."""


REPORT_FILE = "report.json"


GENERATIONS_FILE = "generations.jsonl"


@dataclass(frozen=True)
class EvalRow:
    row: Row
    fmt: str

    @property
    def reference(self) -> str:
        """The answer the row teaches: alpaca's output, a conversation's last assistant turn."""
        if self.fmt == "alpaca":
            return self.row.data["output"]
        if self.fmt == "chat":
            return [m for m in self.row.data["messages"] if m["role"] == "assistant"][-1]["content"]
        raise LorakitError(
            f"{self.row.where}: generation metrics need rows with a prompt and a reference "
            f"answer (chat or alpaca); this row is {self.fmt} (use --metrics loss,perplexity)"
        )

    @property
    def prompt_preview(self) -> str:
        data = self.row.data
        if self.fmt == "alpaca":
            return "\n\n".join(s for s in (data["instruction"], data.get("input")) if s)
        messages = data["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        users = [m["content"] for m in messages[:last] if m["role"] == "user"]
        return users[-1] if users else ""


def prompt_token_ids(
    rows: Sequence[EvalRow], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """The tokens a model sees before the answer it is scored on: the row rendered as in
    training, up to the last trained response, tokenized segment by segment as in training."""
    prompt_segments = []
    for item in rows:
        segments = render_segments(item.row.data, item.fmt, tokenizer, "completions")
        end = max(i for i, (_, trained) in enumerate(segments) if trained)
        while end > 0 and segments[end - 1][1]:
            end -= 1
        prompt_segments.append([text for text, _ in segments[:end]])
    texts = [text for segments in prompt_segments for text in segments]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    return [[t for _ in segments for t in next(pieces)] for segments in prompt_segments]


@dataclass(frozen=True)
class EvalOptions:
    metrics: list[str] = field(default_factory=list)
    """Empty: loss and perplexity, plus exact_match, contains and chrf for prompt/answer rows."""
    normalizers: list[str] = field(default_factory=lambda: ["strip"])
    pattern: re.Pattern[str] | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    max_seq_len: int | None = None
    """None: the adapter's training value (else the recipe default)."""
    train_on: str | None = None
    load_in_4bit: bool | None = None
    dtype: str | None = None
    limit: int | None = None

    @property
    def wants_loss(self) -> bool:
        return any(m in LOSS_METRICS for m in self.metrics)

    @property
    def wants_generation(self) -> bool:
        return any(m in GENERATION_METRICS for m in self.metrics)


@dataclass
class TargetResult:
    label: str
    reference: str
    kind: str
    base: str | None
    precision: str
    scores: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    """Rows cut at max_seq_len for the loss."""
    generated_tokens: int = 0
    seconds: float = 0.0
    predictions: list[str] = field(default_factory=list)
    per_example: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "target": self.reference,
            "kind": self.kind,
            "base_model": self.base,
            "precision": self.precision,
            **self.scores,
            "examples": self.examples,
            "trained_tokens": self.trained_tokens,
            "truncated": self.truncated,
            "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class EvalReport:
    results: list[TargetResult]
    rows: list[EvalRow]
    options: EvalOptions
    data: list[str]
    out_dir: Path | None = None
    harness: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "rows": len(self.rows),
            "metrics": self.options.metrics,
            "normalize": self.options.normalizers,
            "max_new_tokens": self.options.max_new_tokens,
            "targets": [r.summary() for r in self.results],
            **({"harness": self.harness} if self.harness else {}),
        }


def data_settings(options: EvalOptions, trained_with: DataSection | None) -> tuple[int, str]:
    """max_seq_len and train_on: the command line, else what the adapter was trained with."""
    default = DataSection.model_fields
    max_seq_len = options.max_seq_len or (
        trained_with.max_seq_len if trained_with else default["max_seq_len"].default
    )
    train_on = options.train_on or (
        trained_with.train_on if trained_with else default["train_on"].default
    )
    return max_seq_len, train_on


def evaluate_target(
    loaded: LoadedTarget, rows: list[EvalRow], options: EvalOptions, accelerator: Accelerator
) -> TargetResult:
    """Loss/perplexity and generation metrics of one loaded target on the rows."""
    target, model, tokenizer = loaded.target, loaded.model, loaded.tokenizer
    result = TargetResult(
        label=target.label(),
        reference=target.reference,
        kind=target.kind,
        base=target.base_reference,
        precision=loaded.precision,
        examples=len(rows),
    )
    started = time.perf_counter()
    if options.wants_loss:
        max_seq_len, train_on = data_settings(options, target.data_settings)
        examples, stats = tokenize_rows(
            [(r.row, r.fmt) for r in rows], tokenizer, max_seq_len, train_on
        )
        if not examples:
            raise LorakitError(
                f"{target.reference}: no row has a trained token within max_seq_len={max_seq_len}"
            )
        loader = make_loader(
            examples, options.batch_size, tokenizer.pad_token_id, seed=0, shuffle=False
        )
        loss, tokens = evaluate_loss_and_tokens(
            TokenNLL(model), accelerator.prepare(loader), accelerator
        )
        result.trained_tokens, result.truncated = tokens, stats.truncated
        if "loss" in options.metrics:
            result.scores["loss"] = loss
        if "perplexity" in options.metrics:
            result.scores["perplexity"] = perplexity(loss)
    if "preference_accuracy" in options.metrics:
        max_seq_len, _ = data_settings(options, target.data_settings)
        pairs, stats = tokenize_rows([(r.row, r.fmt) for r in rows], tokenizer, max_seq_len, "")
        result.scores["preference_accuracy"] = preference_accuracy(
            model, pairs, options.batch_size, tokenizer.pad_token_id, accelerator.device
        )
        result.truncated = stats.truncated
    if options.wants_generation:
        prompts = prompt_token_ids(rows, tokenizer)
        new = greedy_continuations(
            model, tokenizer, prompts, options.max_new_tokens, options.batch_size
        )
        result.generated_tokens = sum(len(n) for n in new)
        result.predictions = tokenizer.batch_decode(new, skip_special_tokens=True)
        totals, result.per_example = score_generations(
            result.predictions,
            [r.reference for r in rows],
            options.metrics,
            options.normalizers,
            options.pattern,
        )
        result.scores.update(totals)
    result.seconds = time.perf_counter() - started
    return result


def dataset_specs(paths: Sequence[str], fmt: str) -> list[DatasetSpec]:
    allowed = typing.get_args(DatasetSpec.model_fields["format"].annotation)
    if fmt not in allowed:
        raise LorakitError(f"--format: unknown format {fmt!r} (choose from {', '.join(allowed)})")
    return [DatasetSpec(path=p, format=fmt) for p in paths]


def load_eval_rows(paths: Sequence[str], fmt: str, limit: int | None) -> list[EvalRow]:
    rows = [EvalRow(row, f) for row, f in load_rows(dataset_specs(paths, fmt))]
    return rows[:limit] if limit else rows


def check_metrics_fit_rows(metrics: list[str], rows: Sequence[EvalRow]) -> None:
    """Preference rows are scored by preference accuracy only, and only they are."""
    pairs = [item for item in rows if item.fmt == "preference"]
    if pairs and (others := [m for m in metrics if m not in PREFERENCE_METRICS]):
        raise LorakitError(
            f"--metrics {others[0]}: {pairs[0].row.where} is a preference pair; pairs are "
            "scored with --metrics preference_accuracy"
        )
    if "preference_accuracy" in metrics and len(pairs) < len(rows):
        other = next(item for item in rows if item.fmt != "preference")
        raise LorakitError(
            f"--metrics preference_accuracy: {other.row.where} is {other.fmt} data, not a "
            "preference pair (prompt, chosen, rejected)"
        )


def default_metrics(rows: Sequence[EvalRow]) -> list[str]:
    """Loss and perplexity always; the generation metrics when every row has a reference;
    preference accuracy on preference rows."""
    if rows and all(item.fmt == "preference" for item in rows):
        return list(PREFERENCE_METRICS)
    if rows and all(item.fmt in PROMPT_FORMATS for item in rows):
        return [*LOSS_METRICS, "exact_match", "contains", "chrf"]
    return list(LOSS_METRICS)


def run_eval(
    references: Sequence[str],
    data: Sequence[str],
    options: EvalOptions,
    *,
    fmt: str = "auto",
    out_dir: Path | None = None,
    harness_tasks: list[str] | None = None,
    harness_include: str | None = None,
    console: Console | None = None,
) -> EvalReport:
    """Evaluate every target on the same rows, one model in memory at a time; print the
    comparison table and write report.json + generations.jsonl into `out_dir`."""
    console = console or Console(stderr=True)
    # Everything that can fail on user input is checked before the first model loads.
    if out_dir is not None:
        check_writable(out_dir, "--out")
    targets = [resolve_target(r) for r in references]
    rows = load_eval_rows(data, fmt, options.limit) if data else []
    if not options.metrics:
        chosen = default_metrics(rows) + (["regex"] if options.pattern else [])
        options = replace(options, metrics=chosen)
    check_metrics_fit_rows(options.metrics, rows)
    if options.wants_generation:
        for item in rows:
            _ = item.reference  # a row without a reference answer fails here, before any model
    harness = _harness_available(console) if harness_tasks else False
    labels = unique_labels([t.label() for t in targets])
    report = EvalReport([], rows, options, list(data), out_dir)
    if not rows and not harness:
        return report
    accelerator = Accelerator()
    for target, label in zip(targets, labels, strict=True):
        console.print(f"evaluating {label} ({target.kind}) …")
        loaded = load_target(target, accelerator.device, options.load_in_4bit, options.dtype)
        if rows:
            result = evaluate_target(loaded, rows, options, accelerator)
        else:
            result = TargetResult(label, target.reference, target.kind, None, loaded.precision)
        result.label = label
        report.results.append(result)
        if harness:
            report.harness[label] = run_harness(loaded, harness_tasks, options, harness_include)
        del loaded
        gc.collect()
    if rows:
        console.print(comparison_table(report))
        if options.wants_generation:
            console.print(samples_table(report))
    if report.harness:
        console.print(harness_table(report.harness))
    if out_dir is not None:
        write_report(report, out_dir)
        console.print(f"report: {out_dir / REPORT_FILE}")
    return report


def unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


_LOWER_IS_BETTER = {"loss", "perplexity"}


def _format(metric: str, value: float) -> str:
    if metric in ("loss",):
        return f"{value:.4f}"
    if metric == "perplexity":
        return f"{value:.3f}"
    if metric == "chrf":
        return f"{value:.2f}"
    return f"{value:.3f}"


HEADERS = {"perplexity": "ppl", "exact_match": "exact", "chrf": "chrF"}


def comparison_table(report: EvalReport) -> Table:
    """One row per target; the best value of each metric in bold."""
    metrics = [m for m in report.options.metrics if any(m in r.scores for r in report.results)]
    table = Table(title=f"lorakit eval · {len(report.rows)} rows", title_justify="left")
    table.add_column("target")
    table.add_column("model")
    for metric in metrics:
        table.add_column(HEADERS.get(metric, metric), justify="right")
    table.add_column("time", justify="right")
    best = {}
    for metric in metrics:
        values = [r.scores[metric] for r in report.results if metric in r.scores]
        if len(values) > 1:
            best[metric] = min(values) if metric in _LOWER_IS_BETTER else max(values)
    for result in report.results:
        cells = []
        for metric in metrics:
            value = result.scores.get(metric)
            text = "-" if value is None else _format(metric, value)
            cells.append(
                f"[bold]{text}[/]" if value is not None and value == best.get(metric) else text
            )
        model = result.kind + (f" on {result.base}" if result.base else "")
        table.add_row(
            result.label, f"{model}\n{result.precision}", *cells, f"{result.seconds:.1f} s"
        )
    return table


def samples_table(report: EvalReport, count: int = 3) -> Table:
    table = Table(title="samples", title_justify="left", expand=True, show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("reference", ratio=1)
    for result in report.results:
        table.add_column(result.label, ratio=1)
    for i, item in enumerate(report.rows[:count]):
        outputs = [r.predictions[i] if r.predictions else "" for r in report.results]
        table.add_row(item.prompt_preview, item.reference, *outputs)
    return table


def write_report(report: EvalReport, out_dir: Path) -> None:
    """report.json and generations.jsonl, each replaced in one rename (never half-written)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LorakitError(f"--out: cannot create {out_dir}: {exc.strerror}") from None
    atomic_write_text(out_dir / REPORT_FILE, json.dumps(report.to_dict(), indent=2) + "\n")
    if report.options.wants_generation:
        lines = []
        for i, item in enumerate(report.rows):
            record = {
                "index": i,
                "where": item.row.where,
                "prompt": item.prompt_preview,
                "reference": item.reference,
                "outputs": {r.label: r.predictions[i] for r in report.results},
                "scores": {r.label: r.per_example[i] for r in report.results},
            }
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        atomic_write_text(out_dir / GENERATIONS_FILE, "".join(lines))


def _harness_available(console: Console) -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        console.print(
            "--harness skipped: lm-evaluation-harness is not installed "
            "(pip install 'lorakit[harness]')"
        )
        return False
    return True


def run_harness(
    loaded: LoadedTarget, tasks: list[str], options: EvalOptions, include: str | None = None
) -> dict[str, Any]:
    """lm-evaluation-harness tasks on the loaded model as it is (an adapter stays unmerged).
    `include` is a folder of task YAML files (the harness's --include_path), e.g. tasks on
    local data for machines without the hub."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # The harness warns that it was given a model object: that is how adapters stay unmerged.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    logging.getLogger("lm-eval").setLevel(logging.ERROR)

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=options.batch_size)
    try:
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=options.limit,
            task_manager=TaskManager(include_path=include),
        )
    except (KeyError, ValueError) as exc:
        raise LorakitError(f"--harness: {str(exc).splitlines()[0]}") from None
    return {task: _harness_scores(values) for task, values in output["results"].items()}


def _harness_scores(values: dict[str, Any]) -> dict[str, float]:
    """`acc,none` → `acc`; standard errors and bookkeeping fields left out."""
    scores = {}
    for key, value in values.items():
        name, _, filter_name = key.partition(",")
        if isinstance(value, int | float) and "stderr" not in name and name != "sample_len":
            scores[name if filter_name in ("", "none") else key] = float(value)
    return scores


def harness_table(harness: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="lm-evaluation-harness", title_justify="left")
    table.add_column("target")
    columns = sorted(
        {
            (task, metric)
            for results in harness.values()
            for task, v in results.items()
            for metric in v
        }
    )
    for task, metric in columns:
        table.add_column(f"{task} {metric}", justify="right")
    for label, results in harness.items():
        cells = [f"{results[t][m]:.4f}" if m in results.get(t, {}) else "-" for t, m in columns]
        table.add_row(label, *cells)
    return table
