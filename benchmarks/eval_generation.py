"""Batched eval generation against one-by-one generation, on the embedded SmolLM2-135M-Instruct.

Both decode the same prompts greedily (KV cache, stop at end-of-turn) with the same loaded model,
in one run: one prompt at a time, and in batches (left padding, finished rows leave the batch),
without and with the shared prompt prefix (the chat template's system prompt) computed once.
The script prints the times, the ratios and whether the answers agree.

    python benchmarks/eval_generation.py [--rows 32] [--batch-sizes 8,16,32] [--max-new-tokens 32]
                                         [--dtype auto] [--load-in-4bit] [--threads N]

The one-by-one pass runs before and after the batched passes and its mean is the baseline, so a
machine whose load drifts during the run does not favour either side.

On CPUs with AVX-512-BF16, `auto` is bf16; with --load-in-4bit bitsandbytes runs its fused bf16
inference kernel there (whatever the compute dtype), so 4-bit numbers measure that kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakit.cli import quiet_libraries  # noqa: E402

quiet_libraries()  # before bitsandbytes is imported: it warns about optional kernels on import

from lorakit.artifacts import load_target, resolve_target  # noqa: E402
from lorakit.commands.evaluate import load_eval_rows, prompt_token_ids  # noqa: E402
from lorakit.data.batching import shared_prefix_length  # noqa: E402
from lorakit.decoding import greedy_continuations  # noqa: E402


def timed_generation(loaded, prompts, max_new_tokens: int, batch_size: int, share_prefix=True):
    started = time.perf_counter()
    new = greedy_continuations(
        loaded.model, loaded.tokenizer, prompts, max_new_tokens, batch_size, share_prefix
    )
    return time.perf_counter() - started, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "examples/eval/capitals.jsonl"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-sizes", default="8,16,32", help="16 is lorakit eval's default")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target = resolve_target("smollm2-135m-instruct")
    loaded = load_target(target, torch.device("cpu"), args.load_in_4bit, args.dtype)
    rows = load_eval_rows([args.data], "auto", args.rows)
    prompts = prompt_token_ids(rows, loaded.tokenizer)
    print(
        f"model: {target.reference} ({loaded.precision}), {len(prompts)} prompts, "
        f"max_new_tokens={args.max_new_tokens}, {torch.get_num_threads()} threads"
    )
    # Warm-up: first-call costs (kernel selection, 4-bit repacking) stay out of both timings.
    timed_generation(loaded, prompts[:2], 2, 2)

    single_before, single = timed_generation(loaded, prompts, args.max_new_tokens, 1)
    batched_runs = []
    for size in [int(b) for b in args.batch_sizes.split(",")]:
        for share in (False, True):
            seconds, batched = timed_generation(loaded, prompts, args.max_new_tokens, size, share)
            batched_runs.append((size, share, seconds, batched))
    single_after, _ = timed_generation(loaded, prompts, args.max_new_tokens, 1)
    single_s = (single_before + single_after) / 2
    tokens = sum(len(n) for n in single)
    print(
        f"{'one by one':29s}: {single_s:7.2f} s  ({tokens / single_s:6.1f} new tokens/s; "
        f"{single_before:.2f} s before, {single_after:.2f} s after the batched passes)"
    )
    print(f"shared prompt prefix: {shared_prefix_length(prompts)} tokens")
    for size, share, seconds, batched in batched_runs:
        agree = sum(a == b for a, b in zip(batched, single, strict=True))
        label = f"batch {size:3d}" + (" + shared prefix" if share else "")
        print(
            f"{label:29s}: {seconds:7.2f} s  ({tokens / seconds:6.1f} new tokens/s)  "
            f"speed-up {single_s / seconds:5.2f}x  identical answers {agree}/{len(prompts)}"
        )
    batched = batched_runs[-1][-1]
    decoded = loaded.tokenizer.batch_decode(batched[:3], skip_special_tokens=True)
    for item, answer in zip(rows, decoded, strict=False):
        print(f"  {item.prompt_preview!r} -> {answer.strip()!r} (reference {item.reference!r})")


if __name__ == "__main__":
    main()
