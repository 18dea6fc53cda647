"""`lorakit merge` on the embedded SmolLM2-135M: the "no added inference latency" promise and
the one-copy memory promise, measured in one run.

1. Train a short quickstart adapter (or reuse --run).
2. `lorakit merge RUN --dtype float32`, with and without --verify, each in a child process whose
   memory is sampled from /proc/<pid>/status every 10 ms (peak VmRSS and RssAnon; RssAnon
   leaves out file pages the kernel maps from the checkpoint), next to two reference children:
   one that only imports lorakit, one that loads the base in fp32 and writes to every weight
   (exactly one full-precision copy, resident).
3. Greedy generation time of the base, base + unmerged adapter, and the merged model, in
   rotating order over several rounds, plus the base timed twice per round (its own noise).

Usage (from the repository root):
    python benchmarks/merge_latency.py                    # trains 2 quickstart steps first
    python benchmarks/merge_latency.py --run runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_COPY = """
import torch, lorakit.commands.merge
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({location!r}, dtype=torch.float32)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.0)  # make every weight resident, as a merge does
"""


def run_sampled(command: list[str]) -> dict[str, float]:
    """Run a child process; return its wall time and peak VmRSS / RssAnon in MiB."""
    started = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = {"VmRSS": 0, "RssAnon": 0}
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            for line in status.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]) // 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    stderr = child.stderr.read() if child.stderr else ""
    if child.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{stderr}")
    return {"wall_s": time.perf_counter() - started, "rss": peak["VmRSS"], "anon": peak["RssAnon"]}


def lorakit_command(*args: str) -> list[str]:
    return [sys.executable, "-W", "ignore", "-m", "lorakit", *args]


def train_adapter(work: Path) -> Path:
    run = work / "run"
    subprocess.run(
        lorakit_command(
            "train",
            "configs/quickstart.yaml",
            "--set",
            "train.max_steps=2",
            "--set",
            "eval.sample_prompts=[]",
            "--set",
            f"output.dir={run}",
            "--overwrite",
        ),
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return run


def time_generation(models: dict, tokenizer, prompts: list[str], new_tokens: int, rounds: int):
    """Seconds per variant per round: greedy generation of exactly `new_tokens` per prompt."""
    import torch

    from lorakit.data.formats import render_prompt

    batches = [
        tokenizer(render_prompt(tokenizer, p), return_tensors="pt", add_special_tokens=False)
        for p in prompts
    ]
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:  # warm-up: first-call allocations and kernel selection
            models[name].generate(**batches[0], max_new_tokens=2, do_sample=False)
        for round_index in range(rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                started = time.perf_counter()
                for batch in batches:
                    models[name].generate(
                        **batch,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run folder to reuse instead of training")
    parser.add_argument("--work", type=Path, help="where to write (default: a temp folder)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_tokenizer, resolve_model
    from lorakit.recipe import load_recipe

    work = args.work or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    run = args.run or train_adapter(work)
    recipe = load_recipe(run / "recipe.resolved.yaml")
    location = resolve_model(recipe.model.name_or_path).location
    merged_dir = work / "merged"

    merge_args = ("merge", str(run), "--out", str(merged_dir), "--dtype", "float32", "--force")
    merge = run_sampled(lorakit_command(*merge_args))
    no_verify = ("--out", str(work / "merged-no-verify"), "--dtype", "float32", "--no-verify")
    merge_no_verify = run_sampled(lorakit_command("merge", str(run), *no_verify, "--force"))
    imports = run_sampled([sys.executable, "-c", "import lorakit.commands.merge"])
    one_copy = run_sampled([sys.executable, "-c", ONE_COPY.format(location=location)])
    base = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    model_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    verify = json.loads((merged_dir / "lorakit.json").read_text())["verify"]

    print(f"\nlorakit merge {run} --dtype float32 on {recipe.model.name_or_path}")
    print(f"  fp32 weights: {model_mib:.0f} MiB; merge wall time {merge['wall_s']:.1f} s")
    print(
        f"  verify: max |Δlogit| {verify['max_abs_logit_diff']:.2e}, mean KL "
        f"{verify['mean_kl']:.2e}, greedy agreement {100 * verify['greedy_agreement']:.1f}%"
    )
    print("\npeak memory (MiB)          VmRSS   RssAnon  above import (VmRSS / model size)")
    for label, peak in (
        ("import lorakit only", imports),
        ("one resident fp32 copy", one_copy),
        ("lorakit merge --no-verify", merge_no_verify),
        ("lorakit merge (verify on)", merge),
    ):
        above = peak["rss"] - imports["rss"]
        print(
            f"  {label:24s} {peak['rss']:7d} {peak['anon']:9d}  {above:6d} "
            f"({above / model_mib:.2f}x)"
        )

    tokenizer = load_tokenizer(str(merged_dir))
    unmerged_base = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    models = {
        "base": base,
        "base + adapter (unmerged)": PeftModel.from_pretrained(
            unmerged_base, run / "adapter"
        ).eval(),
        "merged": AutoModelForCausalLM.from_pretrained(merged_dir).eval(),
        "base (timed again)": base,
    }
    # The run was trained without sample prompts (they only slow training); use the recipe's.
    prompts = list(load_recipe(ROOT / "configs" / "quickstart.yaml").eval.sample_prompts)
    times = time_generation(models, tokenizer, prompts, args.new_tokens, args.rounds)
    base_median = statistics.median(times["base"])
    print(
        f"\ngreedy generation, {len(prompts)} prompts x {args.new_tokens} tokens, batch 1, "
        f"fp32, {args.rounds} rounds in rotating order, {torch.get_num_threads()} threads"
    )
    print("  model                        median s   ratio to base   per-round ratio min-max")
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times["base"], strict=True)]
        median = statistics.median(values)
        print(
            f"  {name:28s} {median:8.2f}   {median / base_median:13.3f}   "
            f"{min(ratios):.3f}-{max(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
