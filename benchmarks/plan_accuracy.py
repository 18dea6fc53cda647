"""The memory plan against the training loop's measured peak, on the embedded SmolLM2-135M.

Each setting runs lorakit's real training loop (`lorakit.commands.train.train`, a few optimizer
steps) in a fresh child process and prints the plan's estimate (`lorakit.memory_plan.estimate`)
beside the measured peak, and their ratio.

What "the training loop's peak" is, and how the child measures it: the whole process peaks
while it loads and quantizes the fp32 checkpoint (~1.4 GiB here, more than most loops need), so
neither `ru_maxrss` nor `ru_maxrss` minus a baseline says anything about the loop. At the first
micro-batch's forward (a wrapper around the train module's `forward_backward`) the child resets
the kernel's resident-set high-water mark (`/proc/self/clear_refs` <- 5); after each logged step
(a `MetricsLog` subclass) it reads the mark (`VmHWM`): the exact peak resident memory from the
first forward to the end of the last step, however short the spike.

The allocator: glibc's default raises its mmap threshold (up to 32 MiB) each time a large
block is freed, which loading does thousands of times; from then on every tensor under 32 MiB
comes from the heap, and freed ones stay resident. Measured with `--glibc-default`, the same
loops peaked 25-40% higher after only two steps (4x256: 1208 vs 950 MiB; 16x512: 2312 vs
1651; fp32 4x256: 1789 vs 1430), and the peak grows from step to step (8x512 in a separate
probe, trimmed before the loop: 841 MiB above the loop's start after one step, 1075 after
two, for 523 MiB allocated). The children therefore run with `MALLOC_MMAP_THRESHOLD_=131072`
(a fixed threshold: blocks of 128 KiB and more are mapped and unmapped), which makes resident
memory follow what torch allocates: the plan estimates that. lorakit itself does not set it:
it makes training 1.8x slower (README: Will it fit?).

Data fills every row, so the activation terms are exercised at full size: `tokenized` rows of
exactly max_seq_len tokens of the astronomy text (no padding, no mask: `full_rows=True`), or
the pirate chat set packed into rows of max_seq_len (`data.packing`, a block-diagonal mask).

    python benchmarks/plan_accuracy.py                # every setting (~20 min on 2 busy cores)
    python benchmarks/plan_accuracy.py --only 1 3     # some of them
    python benchmarks/plan_accuracy.py --parts        # with the plan's parts per setting
    python benchmarks/plan_accuracy.py --glibc-default  # glibc's default allocator policy

Last run (2-core Xeon with AMX, shared; compute `auto` = bf16 here), MiB:

     #  setting                                           estimate measured  ratio  peak in
     1   1x128  r8  ckpt on      4-bit      full               689      711  0.969  head
     2   4x256  r16 ckpt on      4-bit      full               923      950  0.972  head
     3  16x512  r16 ckpt on      4-bit      full              1624     1651  0.984  backward
     4   8x1024 r32 ckpt on      4-bit      packed            1739     1729  1.006  backward
     5   2x1024 r16 ckpt every 2 4-bit      full              1990     2005  0.993  head
     6   2x512  r64 ckpt off     4-bit      full              2103     2067  1.017  head
     7   1x256  r16 ckpt off     4-bit      packed drop 0.05  1291     1203  1.073  head
     8   4x512  r16 ckpt on      bf16 base  full              1074     1103  0.973  head
     9   1x1024 r8  ckpt off     bf16 base  packed            1743     1755  0.993  head
    10   4x256  r16 ckpt on      4-bit fp32 full adamw_torch  1408     1430  0.984  head
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.files import reset_peak_mark, status_bytes  # noqa: E402  (no torch: measured first)

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "
MiB = 2**20


@dataclass(frozen=True)
class Setting:
    name: str
    micro_batch: int
    seq_len: int
    r: int = 16
    checkpointing: str = "on"
    """`on`, `off`, or `every N`."""
    load_in_4bit: bool = True
    compute: str = "auto"
    data: str = "full"
    """`full`: tokenized rows of exactly seq_len tokens; `packed`: chat examples packed."""
    dropout: float = 0.0
    optimizer: str = "paged_adamw_8bit"
    steps: int = 2

    def recipe(self, data_file: str, out: str) -> dict:
        every = int(self.checkpointing.split()[-1]) if self.checkpointing.startswith("every") else 1
        data: dict = {"train": data_file, "max_seq_len": self.seq_len, "train_on": "all"}
        if self.data == "packed":
            data["packing"] = True
        return {
            "model": {"name_or_path": "smollm2-135m-instruct"},
            "quant": {"load_in_4bit": self.load_in_4bit, "bnb_4bit_compute_dtype": self.compute},
            "lora": {"r": self.r, "lora_alpha": 2 * self.r, "lora_dropout": self.dropout},
            "data": data,
            "train": {
                "max_steps": self.steps,
                "micro_batch_size": self.micro_batch,
                "gradient_accumulation_steps": 1,
                "optimizer": self.optimizer,
                "gradient_checkpointing": self.checkpointing != "off",
                "checkpoint_every_n_layers": every,
                "warmup_steps": 0,
                "logging_steps": 1,
            },
            "output": {"dir": out},
        }


SETTINGS = [
    Setting("1", 1, 128, r=8),
    Setting("2", 4, 256),
    Setting("3", 16, 512),
    Setting("4", 8, 1024, r=32, data="packed"),
    Setting("5", 2, 1024, checkpointing="every 2"),
    Setting("6", 2, 512, r=64, checkpointing="off"),
    Setting("7", 1, 256, checkpointing="off", data="packed", dropout=0.05),
    Setting("8", 4, 512, load_in_4bit=False),
    Setting("9", 1, 1024, r=8, checkpointing="off", load_in_4bit=False, data="packed"),
    Setting("10", 4, 256, compute="float32", optimizer="adamw_torch"),
]


# --- The child: one training run, measured ----------------------------------------------------


def child(recipe_json: str, trim: bool) -> None:
    """`trim`: collect garbage and hand glibc's free heap memory back before the loop (what a
    run with the default allocator policy could do after loading)."""
    started = status_bytes("VmRSS")
    import ctypes
    import gc
    import importlib

    from lorakit.commands.train import train
    from lorakit.recipe import Recipe

    after_imports = status_bytes("VmRSS")
    module = importlib.import_module(train.__module__)
    marks: dict = {"rss_at_start": started, "rss_after_imports": after_imports, "steps": 0}
    forward_backward = module.forward_backward

    def first_forward_resets_the_mark(*args, **kwargs):
        if "loop_start" not in marks:
            marks["setup_peak"] = status_bytes("VmHWM")
            if trim:
                gc.collect()
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            marks["loop_start"] = status_bytes("VmRSS")
            reset_peak_mark()
        return forward_backward(*args, **kwargs)

    class StepMarks(module.MetricsLog):
        def write(self, record):
            if "loss" in record:
                marks["loop_peak"] = status_bytes("VmHWM")
                marks["steps"] += 1
            super().write(record)

    module.forward_backward = first_forward_resets_the_mark
    module.MetricsLog = StepMarks
    result = train(Recipe.model_validate(json.loads(recipe_json)), overwrite=True)
    marks["trained_tokens"] = result.trained_tokens
    print(RESULT_PREFIX + json.dumps(marks), flush=True)


# --- The parent: data, settings, table ---------------------------------------------------------


def full_rows_file(folder: Path, tokenizer, seq_len: int, rows: int) -> str:
    """`rows` tokenized rows of exactly `seq_len` tokens of the astronomy text (repeated as
    needed), every token trained."""
    texts = [json.loads(line)["text"] for line in _lines(ROOT / "examples/domain_astronomy")]
    stream: list[int] = []
    while len(stream) < rows * seq_len:
        for text in texts:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
            stream.append(tokenizer.eos_token_id)
    path = folder / f"full-{seq_len}.jsonl"
    with path.open("w") as out:
        for i in range(rows):
            out.write(json.dumps({"input_ids": stream[i * seq_len : (i + 1) * seq_len]}) + "\n")
    return str(path)


def _lines(folder: Path) -> list[str]:
    return [line for line in (folder / "train.jsonl").read_text().splitlines() if line.strip()]


def packed_file(folder: Path) -> str:
    """The pirate chat set, three times over (packing fills rows of any max_seq_len here)."""
    path = folder / "pirate.jsonl"
    path.write_text("\n".join(_lines(ROOT / "examples/pirate") * 3) + "\n")
    return str(path)


@dataclass
class Row:
    setting: Setting
    estimate: int
    measured: int | None
    loop_start: int | None = None
    runtime_measured: int | None = None
    seconds: float = 0.0
    peak_in: str = ""
    parts: list = field(default_factory=list)
    error: str = ""

    @property
    def ratio(self) -> float | None:
        return self.estimate / self.measured if self.measured else None


FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_setting(
    setting: Setting, data_file: str, trim: bool, glibc_default: bool, timeout: float
) -> dict:
    with tempfile.TemporaryDirectory() as out:
        recipe = json.dumps(setting.recipe(data_file, str(Path(out) / "run")))
        command = [sys.executable, __file__, "--child", recipe] + (["--trim"] if trim else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if not glibc_default:
            env.update(FIXED_MMAP_THRESHOLD)
        done = subprocess.run(
            command, cwd=out, env=env, capture_output=True, text=True, timeout=timeout
        )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "no result")


def estimate_for(setting: Setting, data_file: str, config):
    from lorakit import memory_plan
    from lorakit.recipe import Recipe

    recipe = Recipe.model_validate(setting.recipe(data_file, "unused"))
    return memory_plan.estimate(recipe, config, full_rows=setting.data == "full")


def describe(setting: Setting) -> str:
    quant = "4-bit" if setting.load_in_4bit else "bf16 base"
    if setting.compute == "float32":
        quant += " fp32"
    extra = f" drop {setting.dropout:g}" if setting.dropout else ""
    extra += f" {setting.optimizer}" if setting.optimizer != "paged_adamw_8bit" else ""
    shape = f"{setting.micro_batch:>2}x{setting.seq_len:<4} r{setting.r:<2}"
    return f"{shape} ckpt {setting.checkpointing:<7} {quant:<10} {setting.data:<6}{extra}"


def print_table(rows: list[Row], show_parts: bool) -> None:
    print(f"{'#':>2}  {'setting':<58} {'estimate':>9} {'measured':>9} {'ratio':>6}  peak in")
    for row in rows:
        measured = f"{row.measured / MiB:8.0f}M" if row.measured else f"{'-':>9}"
        ratio = f"{row.ratio:6.3f}" if row.ratio else f"{'-':>6}"
        print(
            f"{row.setting.name:>2}  {describe(row.setting):<58} {row.estimate / MiB:8.0f}M "
            f"{measured} {ratio}  {row.peak_in}{'  ' + row.error if row.error else ''}"
        )
        if show_parts:
            for name, size, how in row.parts:
                print(f"{'':6}{name:32s} {size / MiB:9.1f} MiB  {how}")
    ratios = [row.ratio for row in rows if row.ratio]
    if ratios:
        worst = max(ratios, key=lambda x: abs(x - 1))
        print(f"worst ratio {worst:.3f} over {len(ratios)} settings (goal: within 0.85-1.15)")
    runtimes = [row.runtime_measured for row in rows if row.runtime_measured]
    if runtimes:
        print(
            f"RSS after `import lorakit.commands.train` in the children: "
            f"{min(runtimes) / MiB:.0f}-{max(runtimes) / MiB:.0f} MiB "
            f"(the plan's constant: {_runtime_constant() / MiB:.0f} MiB)"
        )


def _runtime_constant() -> int:
    from lorakit import memory_plan

    return memory_plan.CPU_RUNTIME_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="setting numbers to run")
    parser.add_argument("--parts", action="store_true", help="print the plan's parts")
    parser.add_argument(
        "--glibc-default", action="store_true", help="glibc's default mmap threshold policy"
    )
    parser.add_argument(
        "--trim", action="store_true", help="malloc_trim(0) before the loop (glibc's leftovers)"
    )
    parser.add_argument("--estimate-only", action="store_true", help="no training runs")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    from lorakit.models import load_config, load_tokenizer, resolve_model

    location = resolve_model("smollm2-135m-instruct").location
    config = load_config(location)
    tokenizer = load_tokenizer(location)
    settings = [s for s in SETTINGS if not args.only or s.name in args.only]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        packed = packed_file(folder)
        for setting in settings:
            if setting.data == "full":
                needed = setting.micro_batch * (setting.steps + 1)
                data_file = full_rows_file(folder, tokenizer, setting.seq_len, needed)
            else:
                data_file = packed
            plan = estimate_for(setting, data_file, config)
            row = Row(setting, plan.total, None, peak_in=plan.peak_in, parts=plan.parts())
            if not args.estimate_only:
                started = time.perf_counter()
                try:
                    marks = run_setting(
                        setting, data_file, args.trim, args.glibc_default, args.timeout
                    )
                    row.measured = marks["loop_peak"]
                    row.loop_start = marks["loop_start"]
                    row.runtime_measured = marks["rss_after_imports"]
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    row.error = str(exc)[:80]
                row.seconds = time.perf_counter() - started
            rows.append(row)
            print(
                f"[{setting.name}] {describe(setting)}: estimate {plan.total / MiB:.0f} MiB, "
                f"measured {row.measured / MiB if row.measured else float('nan'):.0f} MiB "
                f"({row.seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    print_table(rows, args.parts)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "setting": describe(r.setting),
                        "estimate": r.estimate,
                        "measured": r.measured,
                        "loop_start": r.loop_start,
                        "ratio": r.ratio,
                    }
                    for r in rows
                ],
                indent=1,
            )
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], trim="--trim" in sys.argv)
    else:
        main()
