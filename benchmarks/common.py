"""What both benchmark arms share: the recipe, the data, the measurements, the FLOP count.

Each arm runs in its own process (`lorakit_arm.py`, `trl_sft.py`) and prints one JSON line
starting with `RESULT ` for `run.py` to collect.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


WARM_CACHE_ENV = "LORAKIT_BENCH_KERNEL_CACHE"
"""The inductor cache folder an earlier run filled (lever `warm_kernel_cache`)."""


@dataclass(frozen=True)
class Spec:
    """One QLoRA recipe, the same for both arms."""

    model: str
    """The resolved model folder (both arms load the same files)."""
    train_file: str
    heldout_file: str
    compute_dtype: str
    max_seq_len: int = 256
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 2
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    optimizer: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    checkpoint_every_n_layers: int = 1
    """lorakit only (a lever); the TRL arm checkpoints every layer."""
    torch_compile: bool = False
    """lorakit only (a lever)."""
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    seed: int = 42
    epochs: int = 1
    threads: int = 0
    """torch.set_num_threads (0: torch's default)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))


@dataclass
class ArmResult:
    arm: str
    trained_tokens: int
    real_tokens: int
    """Non-padding tokens processed (every token of every example seen)."""
    padded_tokens: int
    """Token positions the model ran: padding included, a shared prompt prefix counted once."""
    steps: int
    loop_seconds: float
    step_seconds: list[float]
    losses: list[float]
    heldout_loss: float
    heldout_se: float
    """Standard error of the held-out loss over its examples."""
    peak_rss_mb: float
    """ru_maxrss of the arm's process: model loading, training and evaluation."""
    train_peak_rss_mb: float
    """Largest RSS sampled (every 20 ms) from the first optimizer step to the end of training."""
    setup_seconds: float
    loop_cpu_seconds: float
    """CPU time of the training loop, all threads."""
    shared_tokens: int = 0
    """Prefix tokens not run again because a micro-batch shared them (lorakit.shared_prefix)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trained_tokens_per_s(self) -> float:
        return self.trained_tokens / self.loop_seconds

    @property
    def median_step_s(self) -> float:
        ordered = sorted(self.step_seconds)
        return ordered[len(ordered) // 2]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


def emit(result: ArmResult) -> None:
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)


def parse(stdout: str) -> ArmResult:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return ArmResult(**json.loads(line[len(RESULT_PREFIX) :]))
    raise RuntimeError("the arm printed no result")


def set_threads(spec: Spec) -> None:
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)


def peak_rss_mb() -> float:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024**2 if sys.platform == "darwin" else maxrss / 1024  # bytes vs KiB


class RssSampler:
    """The largest resident set size seen while the `with` block runs, or since `restart()`
    (called as the first optimizer step begins: model loading is not the training loop)."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process(os.getpid())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def restart(self) -> None:
        self.peak = self._process.memory_info().rss

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 1024**2


def heldout_loss(model, tokenizer, spec: Spec) -> tuple[float, float]:
    """Mean NLL per trained token on the held-out rows, computed the same way for both arms
    (lorakit's tokenization and masking, its TokenNLL, no grad), and the standard error of
    that mean over examples."""
    import torch

    from lorakit.data.batching import collate
    from lorakit.data.pipeline import load_rows, tokenize_rows
    from lorakit.loss import TokenNLL
    from lorakit.peft_setup import keep_4bit_layers_differentiable
    from lorakit.recipe import DatasetSpec

    keep_4bit_layers_differentiable(model)
    rows = load_rows([DatasetSpec(path=spec.heldout_file)])
    examples, _ = tokenize_rows(rows, tokenizer, spec.max_seq_len, "completions")
    loss_module = TokenNLL(model).eval()
    per_example = []
    # Eager: a compiled model (train.torch_compile) would otherwise compile a no-grad graph.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for example in examples:
            nll, count = loss_module(**collate([example], tokenizer.pad_token_id))
            per_example.append((float(nll), int(count)))
    total = sum(n for n, _ in per_example) / sum(c for _, c in per_example)
    means = [n / c for n, c in per_example]
    mean = sum(means) / len(means)
    spread = math.sqrt(sum((m - mean) ** 2 for m in means) / max(len(means) - 1, 1))
    return total, spread / math.sqrt(len(means))


class StepClock:
    """Wall and CPU time of each optimizer step, from the first step's start to the last
    step's end. CPU time (all threads of the process) shows how much work a step took even
    when other processes compete for the cores."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def start(self) -> None:
        if not self.marks:
            self.tick()

    def tick(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    @property
    def step_seconds(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:], strict=False)]

    @property
    def total(self) -> float:
        return self.marks[-1][0] - self.marks[0][0]

    @property
    def cpu_total(self) -> float:
        return self.marks[-1][1] - self.marks[0][1]


# ---------------------------------------------------------------------------------------------
# FLOPs and the machine's matmul peak


def model_flops(
    model_dir: str,
    r: int,
    seq_lengths: list[int],
    trained_tokens: int,
    gradient_checkpointing: bool,
) -> dict[str, float]:
    """FLOPs the training of these examples needs, whatever the implementation.

    Per real (non-padding) token, over the decoder's frozen linear weights (N_lin, the
    non-embedding matmul parameters): forward 2·N_lin + backward to the input 2·N_lin (no
    weight gradient: the base is frozen) + 2·N_lin for the forward recomputed under gradient
    checkpointing. LoRA (N_lora = Σ r·(in+out) over adapted layers): forward 2·N_lora,
    recompute 2·N_lora, backward 4·N_lora (input and weight gradients). Attention scores and
    values: 4·d_attn·c FLOPs forward per token per layer for a causal context of c tokens,
    8·d_attn·c backward, again 4·d_attn·c recomputed. Output head (vocab V, hidden d) on
    trained positions only: forward 2·V·d + backward to the input 2·V·d. Prompt tokens count
    because their forward and backward are needed to train the response tokens; padding does
    not count."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    d = config["hidden_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or d // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    shapes = [  # (in, out) of q, k, v, o, gate, up, down
        (d, heads * head_dim),
        (d, kv_heads * head_dim),
        (d, kv_heads * head_dim),
        (heads * head_dim, d),
        (d, inter),
        (d, inter),
        (inter, d),
    ]
    n_lin = layers * sum(i * o for i, o in shapes)
    n_lora = layers * sum(r * (i + o) for i, o in shapes)
    recompute = 1 if gradient_checkpointing else 0
    real = sum(seq_lengths)
    context = sum(n * (n + 1) / 2 for n in seq_lengths)  # Σ over tokens of causal context
    attention = layers * heads * head_dim * context * (4 + 8 + 4 * recompute)
    linear = real * (2 + 2 + 2 * recompute) * n_lin
    lora = real * (2 + 4 + 2 * recompute) * n_lora
    head = trained_tokens * 4 * vocab * d
    return {
        "n_linear": n_lin,
        "n_lora": n_lora,
        "linear": linear,
        "lora": lora,
        "attention": attention,
        "head": head,
        "total": linear + lora + attention + head,
        "real_tokens": real,
    }


def matmul_peak(dtype_name: str, seconds: float = 1.5) -> tuple[float, float]:
    """Best GFLOP/s of a few large matmuls (on the GPU when there is one), per second of wall
    time and per second of CPU time (the latter is what one core does, even on a busy
    machine)."""
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shapes = ((8192, 8192, 8192),) if cuda else ((2048, 576, 1536), (2048, 2048, 2048))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    wall = cpu = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        sync()
        reps, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds / len(shapes):
            a @ b
            reps += 1
            sync()
        flop = 2 * m * k * n * reps / 1e9
        wall = max(wall, flop / (time.perf_counter() - started))
        cpu = max(cpu, flop / (time.process_time() - cpu_started))
    return wall, cpu


def device_peak_memory() -> dict[str, float]:
    """Peak GPU memory of this process (empty on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 1024**2,
        "cuda_peak_reserved_mb": torch.cuda.max_memory_reserved() / 1024**2,
    }


# ---------------------------------------------------------------------------------------------
# Profiling two optimizer steps

CATEGORIES = [
    # (category, substrings of profiler op names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("4-bit dequantize", ("dequantize_4bit", "dequantize_blockwise")),
    ("optimizer", ("optimizer_update", "quantize_blockwise")),
    ("log-softmax / cross-entropy", ("log_softmax", "nll_loss", "logsumexp", "cross_entropy")),
    ("dtype casts and copies", ("aten::copy_", "aten::_to_copy", "aten::clone")),
]


class StepProfiler:
    """Profiles optimizer steps 3 and 4 (after warm-up): `step()` is called as each optimizer
    step begins; `report()` prints the top ops and the time per category."""

    def __init__(self, first: int = 3, count: int = 2) -> None:
        self.first, self.last, self.seen, self.profile = first, first + count, 0, None

    def step(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.seen += 1
        if self.seen == self.first:
            self.profile = profile(activities=[ProfilerActivity.CPU])
            self.profile.__enter__()
            self.started = time.perf_counter()
        elif self.seen == self.last:
            self.stop()

    def stop(self) -> None:
        if self.profile is not None and self.seen < self.last + 1:
            self.profile.__exit__(None, None, None)
            self.wall = time.perf_counter() - self.started
            self.seen = self.last + 1

    def report(self, title: str) -> str:
        self.stop()
        if self.profile is None:
            return f"{title}: too few steps to profile"
        events = self.profile.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        spent = dict.fromkeys([c for c, _ in CATEGORIES] + ["everything else"], 0.0)
        for event in events:
            category = next(
                (c for c, keys in CATEGORIES if any(k in event.key for k in keys)),
                "everything else",
            )
            spent[category] += event.self_cpu_time_total
        lines = [
            f"{title}: 2 optimizer steps, {self.wall:.2f} s wall, "
            f"{total / 1e6:.2f} s CPU in {sum(e.count for e in events)} op calls"
        ]
        lines += [f"  {c:30} {t / total:6.1%}" for c, t in spent.items()]
        lines.append(
            events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        )
        return "PROFILE\n" + "\n".join(lines)
