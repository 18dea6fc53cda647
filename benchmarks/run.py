"""`make bench`: lorakit against a plain TRL SFTTrainer + PEFT script on one QLoRA recipe.

Both arms train the embedded SmolLM2-135M-Instruct (4-bit NF4 + double quant, LoRA r=16 on
every linear layer, paged_adamw_8bit, gradient checkpointing) on the same instruction examples
with the same hyperparameters, for one epoch, each in its own process, alternating
(lorakit, TRL, lorakit, TRL, ...) so that load from other work on the machine hits both. The
machine's matmul peak is measured in the same run.

    python benchmarks/run.py                 # the comparison (~2 min on 2 idle CPU cores)
    python benchmarks/run.py --levers        # lorakit's speed choices, one by one
    python benchmarks/run.py --profile       # where a TRL step and a lorakit step spend time
    python benchmarks/run.py --defaults --rounds 1   # defaults vs defaults, 200 steps (~10 min)

    python benchmarks/run.py --method dpo    # DPO: lorakit against TRL's DPOTrainer + PEFT
    python benchmarks/run.py --method dpo --precompute   # also both with precomputed reference
    python benchmarks/run.py --method dpo --profile      # where a DPO step of each spends time

`--method dpo` trains on the first `--examples` pairs of examples/preference_concise (micro-batch
and counts in pairs), alternating lorakit DPO, TRL DPO and a lorakit SFT run on prompt + chosen
answer with the same settings and steps (lorakit's DPO memory against its SFT memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ROOT,
    WARM_CACHE_ENV,
    ArmResult,
    Spec,
    matmul_peak,
    model_flops,
    parse,
)

DATA = ROOT / "examples" / "alpaca_instruct"
PAIRS = ROOT / "examples" / "preference_concise"
HERE = Path(__file__).resolve().parent
DPO_DEFAULTS = {
    "examples": 48,
    "heldout": 64,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 5e-4,
    "warmup_ratio": 0.1,
}
"""`--method dpo` unless given: 12 steps of 4 pairs, the shipped DPO recipe's learning rate and
warmup (configs/use-cases/preference-concise.yaml), every held-out pair."""
SFT_DEFAULTS = {
    "examples": 64,
    "heldout": 30,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 2e-4,
    "warmup_ratio": 0.05,
}


def prepare_data(
    folder: Path, source_dir: Path, examples: int, heldout: int
) -> tuple[str, str, str]:
    """The first `examples` rows of the shipped instruction set for training and its
    validation file for the held-out loss; a generated stand-in when the set is missing."""
    train_src, val_src = source_dir / "train.jsonl", source_dir / "val.jsonl"
    if train_src.is_file():
        rows = _jsonl(train_src)
        held = _jsonl(val_src) if val_src.is_file() else rows[examples:]
        source = str(train_src.relative_to(ROOT) if train_src.is_relative_to(ROOT) else train_src)
    else:
        rows = generated_rows(examples + heldout)
        held = rows[examples:]
        source = f"generated instructions ({train_src} is missing)"
    if len(rows) < examples:
        raise SystemExit(f"{train_src} has {len(rows)} rows; --examples asks for {examples}")
    train, val = folder / "train.jsonl", folder / "heldout.jsonl"
    _write_jsonl(train, rows[:examples])
    _write_jsonl(val, held[:heldout])
    return str(train), str(val), source


def prepare_pairs(folder: Path, source_dir: Path, pairs: int, heldout: int) -> dict[str, str]:
    """The first `pairs` rows of the shipped preference set (TRL's string shape) for training
    and the first `heldout` of its validation file; and the same prompts with their chosen
    answers as chat rows, for the SFT arm (`sft_train`, `sft_heldout`)."""
    train_src, val_src = source_dir / "train.jsonl", source_dir / "val.jsonl"
    rows, held = _jsonl(train_src), _jsonl(val_src)
    if len(rows) < pairs:
        raise SystemExit(f"{train_src} has {len(rows)} pairs; --examples asks for {pairs}")
    files = {
        "train": (rows[:pairs], False),
        "heldout": (held[:heldout], False),
        "sft_train": (rows[:pairs], True),
        "sft_heldout": (held[:heldout], True),
    }
    paths = {}
    for name, (part, as_chat) in files.items():
        paths[name] = str(folder / f"{name}.jsonl")
        _write_jsonl(Path(paths[name]), [chosen_chat(r) for r in part] if as_chat else part)
    paths["source"] = str(
        train_src.relative_to(ROOT) if train_src.is_relative_to(ROOT) else train_src
    )
    return paths


def chosen_chat(pair: dict) -> dict:
    """A preference row as the SFT example of its chosen answer (the same chat template
    rendering, so the tokens are those of the pair's chosen side)."""
    return {
        "messages": [
            {"role": "user", "content": pair["prompt"]},
            {"role": "assistant", "content": pair["chosen"]},
        ]
    }


def generated_rows(count: int) -> list[dict]:
    rng = random.Random(0)
    subjects = ["the moon", "a volcano", "rain", "bees", "the ocean", "gravity", "coffee"]
    tasks = [
        ("Explain {s} in one sentence.", "{S} follows simple rules that can be measured."),
        ("Give a fact about {s}.", "People have studied {s} for a very long time."),
        ("Describe {s} to a child.", "Think of {s} as a quiet helper that works every day."),
    ]
    rows = []
    for _ in range(count):
        subject = rng.choice(subjects)
        question, answer = rng.choice(tasks)
        rows.append(
            {
                "instruction": question.format(s=subject),
                "input": "",
                "output": answer.format(s=subject, S=subject.capitalize()),
            }
        )
    return rows


def _jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_arm(script: str, spec: Spec, *extra: str) -> tuple[ArmResult, float]:
    started = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(HERE / script), spec.to_json(), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{script} failed (exit {proc.returncode})")
    if "--profile" in extra:
        print(proc.stdout.split("RESULT ")[0].strip().split("PROFILE\n", 1)[-1])
    return parse(proc.stdout), time.perf_counter() - started


def sequence_lengths(spec: Spec) -> tuple[list[int], int]:
    """Token counts of the training examples (lorakit's tokenization; the TRL arm's token
    counts are printed next to them to show they agree)."""
    from lorakit.data.pipeline import load_rows, tokenize_rows
    from lorakit.models import load_tokenizer
    from lorakit.recipe import DatasetSpec

    tokenizer = load_tokenizer(spec.model)
    rows = load_rows([DatasetSpec(path=spec.train_file)])
    examples, stats = tokenize_rows(rows, tokenizer, spec.max_seq_len, "completions")
    return [len(e.input_ids) for e in examples] * spec.epochs, stats.trained_tokens * spec.epochs


def describe(result: ArmResult, wall: float) -> str:
    return (
        f"  {result.arm:<8} {result.trained_tokens_per_s:7.1f} trained tok/s  "
        f"{result.median_step_s:6.2f} s/step  peak RSS {result.peak_rss_mb:6.0f} MB  "
        f"final loss {result.final_loss:.4f}  held-out {result.heldout_loss:.4f}  "
        f"({wall:.0f} s in all)"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def compare(spec: Spec, rounds: int, source: str, lorakit_spec: Spec | None = None) -> None:
    """Both arms on `spec`, alternating; the lorakit arm on `lorakit_spec` where given (the
    defaults comparison: lorakit's `auto`s against TRL's recommended QLoRA settings)."""
    import torch

    lorakit_spec = lorakit_spec or spec
    print(f"machine: {machine()}; CPU flags: {cpu_flags()}")
    print(f"data: {source}; recipe: {json.dumps(dataclasses.asdict(spec))}")
    if lorakit_spec != spec:
        changed = {
            k: v for k, v in dataclasses.asdict(lorakit_spec).items() if getattr(spec, k) != v
        }
        print(f"lorakit arm only: {json.dumps(changed)}")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    results: dict[str, list[ArmResult]] = {"lorakit": [], "trl": []}
    for round_ in range(1, rounds + 1):
        print(f"round {round_}/{rounds}")
        for arm, script in (("lorakit", "lorakit_arm.py"), ("trl", "trl_sft.py")):
            result, wall = run_arm(script, lorakit_spec if arm == "lorakit" else spec)
            results[arm].append(result)
            print(describe(result, wall), flush=True)
    for d, before in peaks.items():  # again at the end: the best the machine did in the run
        after = matmul_peak(d)
        peaks[d] = (max(before[0], after[0]), max(before[1], after[1]))

    lengths, trained = sequence_lengths(spec)
    flops = model_flops(spec.model, spec.r, lengths, trained, spec.gradient_checkpointing)
    lk, trl = results["lorakit"], results["trl"]
    rows = []

    def row(name: str, get, fmt: str = "{:.1f}", ratio: bool = True) -> None:
        a, b = median([get(r) for r in lk]), median([get(r) for r in trl])
        rows.append((name, fmt.format(a), fmt.format(b), f"{a / b:.2f}x" if ratio else ""))

    row("trained tokens/s", lambda r: r.trained_tokens_per_s)
    row("time per optimizer step (s, median)", lambda r: r.median_step_s, "{:.2f}")
    row("training loop (s)", lambda r: r.loop_seconds, "{:.1f}")
    row("CPU time of the loop (s, all threads)", lambda r: r.loop_cpu_seconds, "{:.1f}")
    row("peak RSS, whole process (MB)", lambda r: r.peak_rss_mb, "{:.0f}")
    row("peak RSS, training loop (MB)", lambda r: r.train_peak_rss_mb, "{:.0f}")
    row("final step loss", lambda r: r.final_loss, "{:.4f}", ratio=False)
    row("mean train loss", lambda r: statistics.fmean(r.losses), "{:.4f}", ratio=False)
    row("held-out loss after training", lambda r: r.heldout_loss, "{:.4f}", ratio=False)
    row("trained tokens", lambda r: r.trained_tokens, "{:.0f}", ratio=False)
    row("tokens (non-padding)", lambda r: r.real_tokens, "{:.0f}", ratio=False)
    row("prompt-prefix tokens run once per batch", lambda r: r.shared_tokens, "{:.0f}", False)
    row("token positions run (incl. padding)", lambda r: r.padded_tokens, "{:.0f}")
    row("padding share of batches", padding, "{:.1%}", ratio=False)
    if "cuda_peak_allocated_mb" in lk[0].extra:
        row("peak GPU memory allocated (MB)", lambda r: r.extra["cuda_peak_allocated_mb"], "{:.0f}")
        row("peak GPU memory reserved (MB)", lambda r: r.extra["cuda_peak_reserved_mb"], "{:.0f}")
    row("recipe GFLOP/s (formula below)", lambda r: flops["total"] / r.loop_seconds / 1e9)
    row("executed GFLOP/s", lambda r: executed_flops(flops, r) / r.loop_seconds / 1e9)
    print()
    print(f"{'':38} {'lorakit':>10} {'TRL':>10} {'ratio':>7}")
    for name, a, b, ratio in rows:
        print(f"{name:38} {a:>10} {b:>10} {ratio:>7}")

    dtype = spec.compute_dtype
    # Achieved rates count the FLOPs each arm executed: a prefix run once is work not done.
    achieved = median([executed_flops(flops, r) / r.loop_seconds / 1e9 for r in lk])
    trl_achieved = median([executed_flops(flops, r) / r.loop_seconds / 1e9 for r in trl])
    per_cpu = median([executed_flops(flops, r) / r.loop_cpu_seconds / 1e9 for r in lk])
    trl_per_cpu = median([executed_flops(flops, r) / r.loop_cpu_seconds / 1e9 for r in trl])
    se = max(median([r.heldout_se for r in lk]), median([r.heldout_se for r in trl]))
    gap = median([r.heldout_loss for r in lk]) - median([r.heldout_loss for r in trl])
    print()
    print(
        f"matmul peak: {peaks['float32'][0]:.0f} GFLOP/s fp32, {peaks['bfloat16'][0]:.0f} "
        f"GFLOP/s bf16 ({torch.get_num_threads()} threads); per CPU-second (one core): "
        f"{peaks['float32'][1]:.0f} fp32, {peaks['bfloat16'][1]:.0f} bf16; "
        f"compute dtype: {dtype}"
    )
    print(
        f"model FLOPs of the run: {flops['total'] / 1e12:.2f} TFLOP "
        f"({flops['total'] / trained / 1e9:.2f} GFLOP per trained token; linear "
        f"{flops['linear'] / flops['total']:.0%}, LoRA {flops['lora'] / flops['total']:.0%}, "
        f"attention {flops['attention'] / flops['total']:.0%}, head "
        f"{flops['head'] / flops['total']:.0%}); N_linear={flops['n_linear'] / 1e6:.1f}M, "
        f"N_lora={flops['n_lora'] / 1e6:.2f}M"
    )
    print(
        f"executed by lorakit: {median([executed_flops(flops, r) for r in lk]) / 1e12:.2f} "
        f"TFLOP ({median([r.shared_tokens for r in lk]):.0f} prompt-prefix tokens run once per "
        "micro-batch instead of once per example)"
    )
    print(
        f"achieved (executed FLOPs): lorakit {achieved:.0f} GFLOP/s = "
        f"{achieved / peaks[dtype][0]:.0%} of the "
        f"{dtype} matmul peak ({achieved / peaks['float32'][0]:.0%} of the fp32 peak); TRL "
        f"{trl_achieved:.0f} GFLOP/s = {trl_achieved / peaks[dtype][0]:.0%}"
    )
    print(
        f"achieved per CPU-second (robust to other load on the machine): lorakit "
        f"{per_cpu:.0f} GFLOP = {per_cpu / peaks[dtype][1]:.0%} of a core's {dtype} peak; "
        f"TRL {trl_per_cpu:.0f} GFLOP = {trl_per_cpu / peaks[dtype][1]:.0%}"
    )
    if lk[0].extra.get("planned_mb"):
        planned = median([r.extra["planned_mb"] for r in lk])
        measured = median([r.extra["planned_peak_mb"] for r in lk])
        where = "max_memory_allocated" if "cuda_peak_allocated_mb" in lk[0].extra else "loop RSS"
        print(
            f"lorakit's memory plan: {planned:.0f} MB against {measured:.0f} MB measured "
            f"({where}; ratio {planned / measured:.3f}; README: Will it fit?)"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(
        f"held-out loss difference lorakit - TRL: {gap:+.4f} "
        f"(standard error over held-out examples: {se:.4f})"
    )
    print(
        "FLOPs per run = Σ real tokens × (6·N_linear + 8·N_lora) + attention "
        "(16·d_attn·causal context per token and layer) + Σ trained tokens × 4·V·d "
        "(benchmarks/common.py: model_flops)."
    )


LONG_EPOCHS = 4
"""`--defaults`: 4 epochs of the 200 shipped examples at micro-batch 4, no accumulation: 200
optimizer steps (200 micro-batches: lorakit's `torch_compile: auto` threshold)."""


def defaults_specs(spec: Spec) -> tuple[Spec, Spec]:
    """Defaults against defaults on a longer run. TRL: the settings its QLoRA documentation and
    the QLoRA paper recommend (4-bit NF4 with double quantization, gradient checkpointing on
    every layer, paged 8-bit AdamW), as `spec` has them. lorakit: the same recipe with its
    defaults, which leave `gradient_checkpointing` to the memory plan, and `torch_compile`
    `auto` (on for a run of this length)."""
    long = dataclasses.replace(spec, epochs=LONG_EPOCHS, gradient_accumulation_steps=1)
    return long, dataclasses.replace(long, gradient_checkpointing="auto", torch_compile="auto")


DPO_ARMS = {
    # name: (script, which Spec)
    "lorakit": ("lorakit_arm.py", "dpo"),
    "trl": ("trl_dpo.py", "dpo"),
    "lorakit_sft": ("lorakit_arm.py", "sft"),
    "lorakit_pre": ("lorakit_arm.py", "dpo_pre"),
    "trl_pre": ("trl_dpo.py", "dpo_pre"),
}


def dpo_specs(spec: Spec, sft_train: str, sft_heldout: str) -> dict[str, Spec]:
    """The DPO Spec, the same with precomputed reference log-probs, and the SFT Spec of the
    lorakit memory baseline: prompt + chosen answer of the same pairs, same micro-batch (one
    example per pair), same steps."""
    return {
        "dpo": spec,
        "dpo_pre": dataclasses.replace(spec, precompute_ref_log_probs=True),
        "sft": dataclasses.replace(
            spec, method="sft", train_file=sft_train, heldout_file=sft_heldout
        ),
    }


def describe_dpo(name: str, result: ArmResult, wall: float) -> str:
    extra = result.extra
    held = (
        f"held-out reward accuracy {extra['heldout_reward_accuracy']:.3f} margin "
        f"{extra['heldout_reward_margin']:+.3f}"
        if "heldout_reward_accuracy" in extra
        else f"held-out loss {result.heldout_loss:.4f}"
    )
    speed = (
        f"{extra['pairs'] / result.loop_seconds:6.2f} pairs/s"
        if "pairs" in extra
        else f"{result.trained_tokens_per_s:6.1f} tok/s"
    )
    return (
        f"  {name:<12} {speed}  {result.median_step_s:6.2f} s/step  loop peak RSS "
        f"{result.train_peak_rss_mb:6.0f} MB  process {result.peak_rss_mb:6.0f} MB  final loss "
        f"{result.final_loss:.4f}  {held}  ({wall:.0f} s in all; other processes kept "
        f"{extra.get('other_cores_during_loop', math.nan):.1f} cores busy during the loop)"
    )


def compare_dpo(specs: dict[str, Spec], rounds: int, source: str, precompute: bool) -> None:
    """lorakit DPO, TRL DPO and lorakit SFT (and, with `precompute`, both DPO arms with
    precomputed reference log-probs), alternating, one process each; then the table."""
    started = time.perf_counter()
    spec = specs["dpo"]
    print(f"machine: {machine()}; CPU flags: {cpu_flags()}")
    print(
        f"data: first {count_rows(spec.train_file)} pairs of {source}; held-out: "
        f"{count_rows(spec.heldout_file)} pairs of its val.jsonl"
    )
    print(f"recipe: {json.dumps(dataclasses.asdict(spec))}")
    names = ["lorakit", "trl", "lorakit_sft"] + (["lorakit_pre", "trl_pre"] if precompute else [])
    results: dict[str, list[ArmResult]] = {name: [] for name in names}
    for round_ in range(1, rounds + 1):
        print(f"round {round_}/{rounds}", flush=True)
        for name in names:
            script, which = DPO_ARMS[name]
            result, wall = run_arm(script, specs[which])
            results[name].append(result)
            print(describe_dpo(name, result, wall), flush=True)
    print()
    print(dpo_table(results["lorakit"], results["trl"], "reference forward in every step"))
    if precompute:
        print()
        print(
            dpo_table(
                results["lorakit_pre"], results["trl_pre"], "precompute_ref_log_probs on both"
            )
        )
    print()
    print(dpo_goals(results, precompute))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"the whole benchmark took {time.perf_counter() - started:.0f} s")


def dpo_table(lk: list[ArmResult], trl: list[ArmResult], title: str) -> str:
    """Medians over the rounds, side by side with lorakit / TRL ratios."""
    rows = []

    def row(name: str, get, fmt: str = "{:.2f}", ratio: bool = True) -> None:
        a, b = median([get(r) for r in lk]), median([get(r) for r in trl])
        rows.append((name, fmt.format(a), fmt.format(b), f"{a / b:.2f}x" if ratio and b else ""))

    extra = lambda key: lambda r: r.extra[key]  # noqa: E731
    row("pairs/s (training loop)", pairs_per_s)
    if lk[0].extra.get("precompute_s") or trl[0].extra.get("precompute_s"):
        row("reference precompute (s, before the loop)", extra("precompute_s"), "{:.1f}")
        row(
            "pairs/s incl. the precompute",
            lambda r: r.extra["pairs"] / (r.loop_seconds + r.extra["precompute_s"]),
        )
    row("time per optimizer step (s, median)", lambda r: r.median_step_s)
    row("training loop (s)", lambda r: r.loop_seconds, "{:.1f}")
    row("CPU time of the loop (s, all threads)", lambda r: r.loop_cpu_seconds, "{:.1f}")
    others = extra("other_cores_during_loop")
    row("other processes' busy cores during the loop", others, "{:.1f}", ratio=False)
    row("peak RSS, training loop (MB)", lambda r: r.train_peak_rss_mb, "{:.0f}")
    row("peak RSS, whole process to the end of training", extra("peak_rss_trained_mb"), "{:.0f}")
    row("peak RSS, whole process incl. held-out eval", lambda r: r.peak_rss_mb, "{:.0f}")
    row("final step loss", lambda r: r.final_loss, "{:.4f}", ratio=False)
    row("mean train loss", lambda r: statistics.fmean(r.losses), "{:.4f}", ratio=False)
    row("held-out reward accuracy", extra("heldout_reward_accuracy"), "{:.3f}", ratio=False)
    row("held-out mean reward margin", extra("heldout_reward_margin"), "{:+.3f}", ratio=False)
    row("held-out DPO loss", lambda r: r.heldout_loss, "{:.4f}", ratio=False)
    normalized = extra("heldout_normalized_accuracy")
    row("held-out accuracy, mean log-prob/token", normalized, "{:.3f}", ratio=False)
    row("pairs trained", extra("pairs"), "{:.0f}", ratio=False)
    row("optimizer steps", lambda r: r.steps, "{:.0f}", ratio=False)
    row("answer tokens trained (both sides)", lambda r: r.trained_tokens, "{:.0f}", ratio=False)
    row("tokens (non-padding, both sides)", lambda r: r.real_tokens, "{:.0f}", ratio=False)
    row("prompt tokens run once per micro-batch", lambda r: r.shared_tokens, "{:.0f}", False)
    row("token positions run per forward", lambda r: r.padded_tokens, "{:.0f}")
    row("padding share of batches", padding, "{:.1%}", ratio=False)
    if lk[0].extra.get("cuda_peak_allocated_mb") is not None:
        row("peak GPU memory allocated (MB)", extra("cuda_peak_allocated_mb"), "{:.0f}")
    lines = [f"DPO, {title} ({len(lk)} runs per arm, medians)"]
    lines.append(f"{'':48} {'lorakit':>10} {'TRL':>10} {'ratio':>7}")
    lines += [f"{name:48} {a:>10} {b:>10} {ratio:>7}" for name, a, b, ratio in rows]
    repacked = [r.extra.get("repacked_4bit_layers_before_training", 0) for r in trl]
    if any(repacked):
        lines.append(f"TRL: 4-bit layers repacked for inference before training: {repacked}")
    return "\n".join(lines)


def pairs_per_s(result: ArmResult) -> float:
    return result.extra["pairs"] / result.loop_seconds


def dpo_goals(results: dict[str, list[ArmResult]], precompute: bool) -> str:
    """The issue's goals, each with its measured ratio (medians over the rounds)."""
    lk, trl, sft = results["lorakit"], results["trl"], results["lorakit_sft"]

    def ratio(a: list[ArmResult], b: list[ArmResult], get) -> float:
        return median([get(r) for r in a]) / median([get(r) for r in b])

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    speed = ratio(lk, trl, pairs_per_s)
    loop_rss = ratio(lk, trl, lambda r: r.train_peak_rss_mb)
    vs_sft = ratio(lk, sft, lambda r: r.train_peak_rss_mb)
    vs_sft_process = ratio(lk, sft, lambda r: r.peak_rss_mb)
    sft_loop = median([r.train_peak_rss_mb for r in sft])
    sft_process = median([r.peak_rss_mb for r in sft])
    sft_step = median([r.median_step_s for r in sft])
    lines = [
        f"goal lorakit DPO pairs/s >= 2x TRL: {speed:.2f}x ({verdict(speed >= 2)})",
        f"goal lorakit DPO loop peak RSS <= TRL's: {loop_rss:.2f}x ({verdict(loop_rss <= 1)})",
        f"goal lorakit DPO loop peak RSS <= 1.15x lorakit SFT's (prompt + chosen, same pairs "
        f"and steps: {sft_loop:.0f} MB loop, {sft_process:.0f} MB process, "
        f"{sft_step:.2f} s/step): {vs_sft:.2f}x ({verdict(vs_sft <= 1.15)}); whole process "
        f"{vs_sft_process:.2f}x",
    ]
    if precompute:
        pre = ratio(results["lorakit_pre"], results["trl_pre"], pairs_per_s)
        lines.append(f"with precomputed reference log-probs on both: pairs/s {pre:.2f}x TRL")
    return "\n".join(lines)


def count_rows(path: str) -> int:
    return len(_jsonl(Path(path)))


def cpu_flags() -> str:
    """The flags that decide the CPU's bf16 speed (README: Performance)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_tile", "avx512_fp16") if f in flags]
    return " ".join(found) or "none of avx512_bf16/amx_tile"


LEVER_RUNS = [
    # (label, Spec changes, lorakit_arm levers)
    (
        "all six code levers below off (lorakit before them)",
        {},
        [
            "no_fast_lora",
            "fp32_embeddings",
            "checkpointed_head",
            "no_group_by_length",
            "no_shared_prefix",
            "non_reentrant_checkpointing",
        ],
    ),
    ("no shared prompt prefix (each example runs its own)", {}, ["no_shared_prefix"]),
    ("non-re-entrant checkpointing (transformers' default)", {}, ["non_reentrant_checkpointing"]),
    ("compute dtype float32 (auto picks bf16 here)", {"compute_dtype": "float32"}, []),
    ("PEFT's LoRA forward, not the fused dropout-free path", {}, ["no_fast_lora"]),
    ("lora_dropout 0.05 (PEFT's path)", {"lora_dropout": 0.05}, []),
    ("head: checkpointed chunks (3 matmuls/token)", {}, ["checkpointed_head"]),
    ("head: full [tokens x vocab] logits", {}, ["full_logits"]),
    ("frozen embeddings/head kept in fp32", {}, ["fp32_embeddings"]),
    ("no length grouping", {}, ["no_group_by_length"]),
    ("1 thread (torch.set_num_threads)", {"threads": 1}, []),
    ("gradient checkpointing off (reference)", {"gradient_checkpointing": False}, []),
    (
        "checkpoint 1 layer in 2 (train.checkpoint_every_n_layers: 2)",
        {"checkpoint_every_n_layers": 2},
        [],
    ),
    ("train.torch_compile: true (with non-re-entrant checkpointing)", {"torch_compile": True}, []),
    (
        "train.torch_compile: true, kernels cached by an earlier run of the recipe",
        {"torch_compile": True},
        ["warm_kernel_cache"],
    ),
]


def levers(spec: Spec, only: list[str]) -> None:
    """Each lever against the default, alternating in this one run, as a Markdown table."""
    print(f"machine: {machine()}")
    print(
        "| lever (changed from lorakit's default) | trained tok/s default / lever "
        "| default is (wall) | median s per step default / lever "
        "| CPU s per step default / lever | default is (CPU) "
        "| held-out loss default / lever | loop peak RSS MB default / lever | padding |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, changes, flags in LEVER_RUNS:
        if only and not any(o in label or o in flags for o in only):
            continue
        lever_spec = dataclasses.replace(spec, **changes)
        if "warm_kernel_cache" in flags:  # the earlier run: it compiles and caches the kernels
            os.environ[WARM_CACHE_ENV] = tempfile.mkdtemp(prefix="lorakit-inductor-")
            run_arm("lorakit_arm.py", lever_spec, *flags)
        base, _ = run_arm("lorakit_arm.py", spec)
        variant, _ = run_arm("lorakit_arm.py", lever_spec, *flags)
        fast, slow = base.trained_tokens_per_s, variant.trained_tokens_per_s
        cpu, cpu_lever = (r.loop_cpu_seconds / r.steps for r in (base, variant))
        print(
            f"| {label} | {fast:.1f} / {slow:.1f} | {fast / slow:.2f}x "
            f"| {base.median_step_s:.2f} / {variant.median_step_s:.2f} "
            f"| {cpu:.2f} / {cpu_lever:.2f} | {cpu_lever / cpu:.2f}x "
            f"| {base.heldout_loss:.4f} / {variant.heldout_loss:.4f} "
            f"| {base.train_peak_rss_mb:.0f} / {variant.train_peak_rss_mb:.0f} "
            f"| {padding(base):.1%} / {padding(variant):.1%} |",
            flush=True,
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def padding(result: ArmResult) -> float:
    return 1 - (result.real_tokens - result.shared_tokens) / result.padded_tokens


def executed_flops(flops: dict[str, float], result: ArmResult) -> float:
    """The recipe's FLOPs less the linear and LoRA work of prefix tokens run once for a whole
    micro-batch instead of once per example (attention and head are unchanged by it)."""
    per_token = (flops["linear"] + flops["lora"]) / flops["real_tokens"]
    return flops["total"] - per_token * result.shared_tokens


def machine() -> str:
    import platform

    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )


def build_random_llama(folder: Path, tokenizer_from: str) -> str:
    """A ~1.1B-parameter Llama (Llama-3.2-1B's shape, SmolLM2's tokenizer) with random weights:
    throughput and memory need the shapes, not the knowledge, and nothing is downloaded."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def spec_from(
    args: argparse.Namespace, model: str, dtype: str, train: str, heldout: str, **more: object
) -> Spec:
    """The benchmark recipe from the command line's settings."""
    return Spec(
        model=model,
        train_file=train,
        heldout_file=heldout,
        compute_dtype=dtype,
        max_seq_len=args.max_seq_len,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio,
        threads=args.threads,
        **more,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("sft", "dpo"), default="sft")
    parser.add_argument(
        "--examples", type=int, help="training examples, or pairs (1 epoch; sft 64, dpo 48)"
    )
    parser.add_argument("--heldout", type=int, help="held-out examples or pairs (30; dpo 64)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per arm")
    parser.add_argument("--levers", nargs="*", help="measure lorakit's levers (optionally some)")
    parser.add_argument("--profile", action="store_true", help="profile 2 steps of each arm")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="defaults against defaults: lorakit's autos vs TRL's QLoRA settings, 200 steps",
    )
    parser.add_argument("--data", type=Path, default=DATA, help="folder with alpaca train.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or folder")
    parser.add_argument("--build-model", type=Path, help="build a random ~1B Llama here, use it")
    parser.add_argument("--micro-batch-size", type=int, help="examples or pairs (sft 4, dpo 2)")
    parser.add_argument("--gradient-accumulation-steps", type=int, help="(sft 2, dpo 2)")
    parser.add_argument(
        "--precompute", action="store_true", help="dpo: also both arms with precomputed reference"
    )
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, help="(sft 2e-4, dpo 5e-4; cosine)")
    parser.add_argument("--warmup-ratio", type=float, help="(sft 0.05, dpo 0.1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: default)")
    args = parser.parse_args()
    defaults = DPO_DEFAULTS if args.method == "dpo" else SFT_DEFAULTS
    if args.defaults:
        defaults = defaults | {"examples": 200}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)

    import torch

    from lorakit.models import resolve_model
    from lorakit.peft_setup import choose_compute_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = str(choose_compute_dtype("auto", device)).removeprefix("torch.")
    model = resolve_model(args.model).location
    if args.build_model:
        model = build_random_llama(args.build_model, model)
    if args.method == "dpo":
        with tempfile.TemporaryDirectory(prefix="lorakit-bench-dpo-") as folder:
            files = prepare_pairs(Path(folder), PAIRS, args.examples, args.heldout)
            spec = spec_from(args, model, dtype, files["train"], files["heldout"], method="dpo")
            specs = dpo_specs(spec, files["sft_train"], files["sft_heldout"])
            if args.profile:
                for script in ("lorakit_arm.py", "trl_dpo.py"):
                    run_arm(script, spec, "--profile")
            else:
                compare_dpo(specs, args.rounds, files["source"], args.precompute)
        return
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as folder:
        train, heldout, source = prepare_data(Path(folder), args.data, args.examples, args.heldout)
        spec = spec_from(args, model, dtype, train, heldout)
        if args.profile:
            for script in ("lorakit_arm.py", "trl_sft.py"):
                run_arm(script, spec, "--profile")
        elif args.levers is not None:
            levers(spec, args.levers)
        elif args.defaults:
            trl_spec, lorakit_spec = defaults_specs(spec)
            compare(trl_spec, args.rounds, source, lorakit_spec)
        else:
            compare(spec, args.rounds, source)


if __name__ == "__main__":
    main()
