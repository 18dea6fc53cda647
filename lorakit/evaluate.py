"""Evaluation: token-weighted loss (masked exactly as in training), batched greedy generation,
and `lorakit eval`: several targets on one dataset, side by side.

Loss and perplexity go through the training pipeline (same formatting, chat template, masking
and `max_seq_len`), so a training validation file works as it is. Generation metrics decode
greedily in batches (left padding, KV cache) from the prompt part of each row, which is
tokenized segment by segment exactly as in training.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import re
import tempfile
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from lorakit.checkpoint import check_writable
from lorakit.data.batching import MIN_SHARED_PREFIX, make_loader, shared_prefix_length
from lorakit.data.formats import render_prompt, render_segments
from lorakit.data.pipeline import load_rows, tokenize_rows
from lorakit.data.sources import Row
from lorakit.errors import LorakitError
from lorakit.loss import TokenNLL, causal_lm_of
from lorakit.metrics import GENERATION_METRICS, LOSS_METRICS, score_generations
from lorakit.recipe import DataSection, DatasetSpec
from lorakit.targets import LoadedTarget, load_target, resolve_target

PROMPT_FORMATS = ("chat", "alpaca")
"""Formats whose rows hold a prompt and a reference answer (generation metrics)."""
# End-of-turn markers of common chat templates; a chat model stops at the one its template uses
# even when the tokenizer's EOS is another token (e.g. Qwen2 base: <|endoftext|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>")
# Cache layers whose rows can be dropped mid-generation (plain and sliding-window attention).
_ROW_SELECTABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
REPORT_FILE = "report.json"
GENERATIONS_FILE = "generations.jsonl"


@torch.no_grad()
def evaluate_loss(loss_module: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Mean NLL per trained token over the whole loader (all processes)."""
    return evaluate_loss_and_tokens(loss_module, loader, accelerator)[0]


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a compiled training model evaluates eager
def evaluate_loss_and_tokens(
    loss_module: nn.Module, loader: DataLoader, accelerator: Accelerator
) -> tuple[float, int]:
    was_training = loss_module.training
    loss_module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        nll, tokens = loss_module(**batch)
        total += torch.stack([nll.double(), tokens.double()])
    total = accelerator.reduce(total, reduction="sum")
    loss_module.train(was_training)
    loss = (total[0] / total[1]).item() if total[1] > 0 else math.nan
    return loss, int(total[1].item())


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS (tokenizer and generation config) and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if template:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab)
    return sorted(i for i in ids if i is not None)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # decoding shapes would recompile a compiled model
def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    share_prefix: bool = True,
) -> list[list[int]]:
    """Greedy new tokens for each prompt (token ids), cut at the first stop token.

    Prompts of similar length are batched together (less left padding). With `share_prefix`,
    the prefix all prompts of a batch share (a chat template's system prompt, few-shot examples)
    is computed once and its KV cache reused by every row."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    manual = _supports_manual_decoding(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [list(prompts[i]) for i in chunk]
        if manual:
            new = _greedy_batch(model, batch, max_new_tokens, stops, pad, share_prefix)
        else:
            new = _generate_batch(model, batch, max_new_tokens, stops, pad)
        for row, i in enumerate(chunk):
            results[i] = new[row]
    model.train(was_training)
    return results


def _supports_manual_decoding(model: nn.Module) -> bool:
    parameters = inspect.signature(causal_lm_of(model).forward).parameters
    return "position_ids" in parameters and "cache" in parameters


def _left_pad(
    prompts: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _greedy_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: Sequence[int],
    pad: int,
    share_prefix: bool,
) -> list[list[int]]:
    """Greedy decoding of one batch with a KV cache.

    Layout: [shared prefix, computed once] [left padding] [each prompt's own tokens]; the
    attention mask hides the padding and position ids count real tokens only. A row leaves the
    batch (and the cache) as soon as it emits a stop token, so a few long answers do not make
    every finished row pay for their remaining steps, as they do in `model.generate`."""
    causal_lm = causal_lm_of(model)
    device = _model_device(model)
    cache = DynamicCache(config=causal_lm.config)
    plain_cache = all(type(layer) in _ROW_SELECTABLE_LAYERS for layer in cache.layers)
    shared = shared_prefix_length(prompts) if share_prefix and plain_cache else 0
    if len(prompts) < 2 or shared < MIN_SHARED_PREFIX:
        shared = 0
    if shared:
        causal_lm(
            input_ids=torch.tensor([prompts[0][:shared]], device=device),
            position_ids=torch.arange(shared, device=device)[None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(len(prompts))
    input_ids, own_mask = _left_pad([p[shared:] for p in prompts], pad, device)
    attention_mask = torch.cat([own_mask.new_ones((len(prompts), shared)), own_mask], 1)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = causal_lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    stop_ids = torch.tensor(list(stops), device=device)
    rows = torch.arange(len(prompts), device=device)
    position = positions[:, -1]
    finished = torch.zeros_like(rows, dtype=torch.bool)
    new: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        done = torch.isin(tokens, stop_ids) | finished
        for row, token, stop in zip(rows.tolist(), tokens.tolist(), done.tolist(), strict=True):
            if not stop:
                new[row].append(token)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if plain_cache and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, position = rows[keep], tokens[keep], position[keep]
            attention_mask, done = attention_mask[keep], done[keep]
        finished = done
        position = position + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], 1)
        out = causal_lm(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=position[:, None],
            cache=cache,
            use_cache=True,
        )
    return new


def _generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: Sequence[int],
    pad: int,
) -> list[list[int]]:
    """transformers' generate, for models whose forward takes no cache/position_ids."""
    input_ids, attention_mask = _left_pad(prompts, pad, _model_device(model))
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=list(stops),
        pad_token_id=pad,
    )
    width = input_ids.shape[1]
    return [_cut_at_stop(row[width:].tolist(), stops) for row in output]


def _cut_at_stop(ids: list[int], stops: Sequence[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position]
    return ids


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to user prompts, batched with left padding and the KV cache."""
    if not prompts:
        return []
    texts = [render_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    new = greedy_continuations(model, tokenizer, ids, max_new_tokens, batch_size)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------
# Rows with a prompt and a reference answer


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


# ----------------------------------------------------------------------------------------------
# lorakit eval


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


def perplexity(loss: float) -> float:
    """exp(mean token NLL); infinite rather than an overflow error for a hopeless model."""
    return math.exp(loss) if loss < 700 else math.inf


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


def default_metrics(rows: Sequence[EvalRow]) -> list[str]:
    """Loss and perplexity always; the generation metrics when every row has a reference."""
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
    _atomic_write(out_dir / REPORT_FILE, json.dumps(report.to_dict(), indent=2) + "\n")
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
        _atomic_write(out_dir / GENERATIONS_FILE, "".join(lines))


def _atomic_write(path: Path, text: str) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


# ----------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional extra)


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
