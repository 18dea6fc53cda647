"""Tokenizing chat data: examples per second on 2 cores with the embedded SmolLM2 tokenizer.

    python benchmarks/data_tokenize.py [--rows 100000] [--reference-rows 20000]

Writes N short synthetic chat rows (one or two turns) to a temporary .jsonl and times, in one
run: lorakit's path (read + check + render + tokenize + mask + fit, cache off), the same work
rendering every conversation prefix with apply_chat_template (the straightforward way, on a
subset), and reading the result back from the tokenization cache. The two paths must produce
identical tokens and labels; the script checks that on the subset.

Wall times stretch when other processes share the cores (the load average is printed); CPU
seconds do not, and examples per CPU-second is a lower bound for the wall rate on idle cores.
"""

from __future__ import annotations

import os

# Two cores, for the Rust tokenizer's thread pool too (read when it first runs).
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

_WORD_LIST = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find"
)
WORDS = _WORD_LIST.split(" ")


def write_rows(path: Path, count: int) -> None:
    rng = random.Random(0)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            messages = [
                {"role": "user", "content": sentence(rng.randint(6, 20))},
                {"role": "assistant", "content": sentence(rng.randint(8, 30))},
            ]
            if i % 5 == 0:  # every fifth conversation has a second turn
                messages += [
                    {"role": "user", "content": sentence(8)},
                    {"role": "assistant", "content": sentence(12)},
                ]
            handle.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reference-rows", type=int, default=20_000)
    args = parser.parse_args()

    from lorakit.data import cache, chat, pipeline
    from lorakit.models import load_tokenizer, resolve_model
    from lorakit.recipe import DataSection, DatasetSpec

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct").location)
    fingerprint = cache.tokenizer_fingerprint(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        cache.cache_dir = lambda: Path(tmp) / "cache"  # a cold tokenization cache
        full, subset = Path(tmp) / "chat.jsonl", Path(tmp) / "subset.jsonl"
        write_rows(full, args.rows)
        write_rows(subset, args.reference_rows)

        def timed(path: Path) -> tuple[float, float, list, pipeline.DatasetStats]:
            spec = DatasetSpec(path=str(path))
            data = DataSection(train=[spec], max_seq_len=512)
            wall, cpu = time.perf_counter(), time.process_time()
            examples, stats = pipeline.dataset_examples(spec, data, tokenizer, fingerprint)
            return time.perf_counter() - wall, time.process_time() - cpu, examples, stats

        load_before = os.getloadavg()[0]
        fast_s, fast_cpu, fast, stats = timed(full)
        assert not stats.cached and stats.examples == args.rows
        cached_s, cached_cpu, cached, stats = timed(full)
        assert stats.cached and [e.labels for e in cached] == [e.labels for e in fast]

        # The straightforward way (lorakit before this pipeline): every prefix rendered with
        # apply_chat_template, every segment encoded through tokenizer(...).
        split, encode = chat.ChatSegmenter.split, pipeline.encode_texts
        chat.ChatSegmenter.split = lambda self, messages: chat.split_by_prefixes(
            self.tokenizer, messages
        )
        pipeline.encode_texts = lambda tok, texts: tok(texts, add_special_tokens=False)["input_ids"]
        try:
            reference_s, reference_cpu, reference, _ = timed(subset)
        finally:
            chat.ChatSegmenter.split, pipeline.encode_texts = split, encode
        same = [(e.input_ids, e.labels) for e in reference] == [
            (e.input_ids, e.labels) for e in fast[: args.reference_rows]
        ]
        load_after = os.getloadavg()[0]

    tokens = sum(len(e.input_ids) for e in fast)
    rows = [
        ("lorakit, cold cache", args.rows, fast_s, fast_cpu),
        ("every prefix rendered (before)", args.reference_rows, reference_s, reference_cpu),
        ("lorakit, cache hit", args.rows, cached_s, cached_cpu),
    ]
    print(f"{args.rows:,} chat rows ({tokens:,} tokens), SmolLM2 tokenizer, 2 cores")
    print(f"{'path':<34}{'rows':>9}{'wall s':>9}{'examples/s':>12}{'CPU s':>9}{'per CPU-s':>11}")
    for name, count, wall, cpu in rows:
        rates = f"{count / wall:>12,.0f}{cpu:>9.2f}{count / cpu:>11,.0f}"
        print(f"{name:<34}{count:>9,}{wall:>9.2f}{rates}")
    rate, reference_rate = args.rows / fast_s, args.reference_rows / reference_s
    print(
        f"speed-up over rendering every prefix: {rate / reference_rate:.2f}x (wall), "
        f"{(args.rows / fast_cpu) / (args.reference_rows / reference_cpu):.2f}x (CPU); "
        f"identical tokens and labels: {same}"
    )
    print(
        f"load average (1 min) before/after: {load_before:.1f} / {load_after:.1f} "
        "(above 2, other processes share the 2 cores and wall times stretch)"
    )
    # A CPU-bound run on otherwise idle cores takes at most its CPU time in wall time, so the
    # per-CPU-second rate bounds the idle wall rate from below (contention inflates CPU time).
    bound = args.rows / fast_cpu
    print(
        f"target >= 5,000 examples/s: wall {'met' if rate >= 5000 else 'not met'} "
        f"({rate:,.0f}/s); idle-core lower bound {'met' if bound >= 5000 else 'NOT met'} "
        f"({bound:,.0f}/s)"
    )


if __name__ == "__main__":
    main()
