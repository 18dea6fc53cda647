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
    gradient_checkpointing: bool | str = True
    """True, False, or (lorakit only) "auto": decided by lorakit's memory plan."""
    checkpoint_every_n_layers: int = 1
    """lorakit only (a lever); the TRL arm checkpoints every layer."""
    torch_compile: bool | str = False
    """lorakit only (a lever, or "auto": on for runs of 200 micro-batches or more)."""
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    seed: int = 42
    epochs: int = 1
    threads: int = 0
    """torch.set_num_threads (0: torch's default)."""
    method: str = "sft"
    """`sft`, or `dpo` (train_file and heldout_file then hold preference pairs; the micro-batch
    size and the counts are in pairs)."""
    beta: float = 0.1
    """dpo: the KL coefficient (sigmoid loss, no label smoothing, on both arms)."""
    precompute_ref_log_probs: bool = False
    """dpo: the reference log-probs of every training pair computed once before training."""

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


_PEAK_BEFORE_RESET_MB = 0.0
"""The process's peak RSS before `RssSampler.restart` reset the kernel's high-water mark."""


def peak_rss_mb() -> float:
    """The process's peak RSS so far (ru_maxrss, and the peak before a reset by RssSampler)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = maxrss / 1024**2 if sys.platform == "darwin" else maxrss / 1024  # bytes vs KiB
    return max(peak, _PEAK_BEFORE_RESET_MB)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, which ru_maxrss reads too) to the current RSS,
    keeping the peak so far for `peak_rss_mb`; False where the kernel does not allow it (not
    Linux): the sampled peak is all there is then."""
    from lorakit.files import reset_peak_mark

    global _PEAK_BEFORE_RESET_MB
    before = peak_rss_mb()
    if not reset_peak_mark():
        return False
    _PEAK_BEFORE_RESET_MB = before
    return True


class RssSampler:
    """The largest resident set size while the `with` block runs, or since `restart()` (called
    as the first optimizer step begins: model loading is not the training loop).

    Sampled every 20 ms, which can miss a short transient (a chunk of logits lives a few ms);
    on Linux `restart()` also resets the kernel's exact peak mark, read when the block ends."""

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
        self._exact = reset_peak_rss()

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if getattr(self, "_exact", False):
            from lorakit.files import status_bytes

            self.peak = max(self.peak, status_bytes("VmHWM") or 0)

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


def heldout_preference(model, tokenizer, spec: Spec, batch_pairs: int = 8) -> dict[str, float]:
    """DPO's implicit reward on the held-out pairs, computed the same way for both arms.

    Per pair, with lorakit's tokenization (chat template, answers labelled) in padded rows, no
    grad: the summed answer log-probs under the trained adapter (π) and under the base with the
    adapter disabled (π_ref, the reference both arms trained against); reward = β·(log π −
    log π_ref) of each answer, as TRL logs `rewards/*`. Returns the reward accuracy (share of
    pairs whose chosen reward is higher), the mean margin (chosen − rejected reward), the DPO
    sigmoid loss −log σ(margin) with its standard error over pairs, and the length-normalized
    log-prob accuracy of `lorakit eval --metrics preference_accuracy` (mean log-prob per answer
    token, policy only)."""
    import torch
    import torch.nn.functional as F

    from lorakit.data.batching import collate_pairs
    from lorakit.data.pipeline import load_rows, tokenize_rows
    from lorakit.peft_setup import keep_4bit_layers_differentiable
    from lorakit.preference import pair_log_probs
    from lorakit.recipe import DatasetSpec

    keep_4bit_layers_differentiable(model)
    rows = load_rows([DatasetSpec(path=spec.heldout_file)])
    pairs, _ = tokenize_rows(rows, tokenizer, spec.max_seq_len, "completions")
    model.eval()
    margins, normalized_wins = [], 0
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for start in range(0, len(pairs), batch_pairs):
            batch = collate_pairs(pairs[start : start + batch_pairs], tokenizer.pad_token_id)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            policy, _ = pair_log_probs(model, **inputs)
            with model.disable_adapter():
                reference, _ = pair_log_probs(model, **inputs)
            rewards = spec.beta * (policy.sums.double() - reference.sums.double())
            chosen, rejected = rewards.chunk(2)
            margins += (chosen - rejected).tolist()
            chosen_mean, rejected_mean = policy.means.chunk(2)
            normalized_wins += int((chosen_mean > rejected_mean).sum())
    margin = torch.tensor(margins, dtype=torch.float64)
    losses = -F.logsigmoid(margin)
    spread = float(losses.std()) if len(margins) > 1 else 0.0
    return {
        "heldout_pairs": len(margins),
        "heldout_reward_accuracy": float((margin > 0).double().mean()),
        "heldout_reward_margin": float(margin.mean()),
        "heldout_dpo_loss": float(losses.mean()),
        "heldout_dpo_loss_se": spread / math.sqrt(len(margins)),
        "heldout_normalized_accuracy": normalized_wins / len(margins),
    }


def machine_cpu_seconds() -> float:
    """CPU time all processes of the machine have used since boot (/proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class StepClock:
    """Wall and CPU time of each optimizer step, from the first step's start to the last
    step's end. CPU time (all threads of the process) shows how much work a step took even
    when other processes compete for the cores; `other_cores` how busy those were."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, float]] = []

    def start(self) -> None:
        if not self.marks:
            self.tick()

    def tick(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time(), machine_cpu_seconds()))

    @property
    def step_seconds(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:], strict=False)]

    @property
    def total(self) -> float:
        return self.marks[-1][0] - self.marks[0][0]

    @property
    def cpu_total(self) -> float:
        return self.marks[-1][1] - self.marks[0][1]

    @property
    def other_cores(self) -> float:
        """Cores the machine's other processes kept busy, on average, during the steps."""
        others = self.marks[-1][2] - self.marks[0][2] - self.cpu_total
        return max(others, 0.0) / max(self.total, 1e-9)


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


REGION_PREFIX = "region: "


def region(name: str):
    """A named span in the profile (`torch.profiler.record_function`): `StepProfiler.report`
    prints the time spent inside it, everything it calls included."""
    from torch.profiler import record_function

    return record_function(REGION_PREFIX + name)


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
        for event in events:  # the arm's own regions (`region`), inclusive of what they call
            if event.key.startswith(REGION_PREFIX):
                lines.append(
                    f"  region {event.key.removeprefix(REGION_PREFIX)!r}: {event.count} calls, "
                    f"{event.cpu_time_total / 1e6:.2f} s = {event.cpu_time_total / total:.1%} "
                    "of the profiled time"
                )
        lines.append(
            events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        )
        return "PROFILE\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The TRL arms' shared parts (trl_sft.py, trl_dpo.py)
# ---------------------------------------------------------------------------------------------


def trl_model(spec: Spec):
    """The tokenizer, 4-bit model and LoRA config as TRL's QLoRA documentation writes them."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    compute_dtype = getattr(torch, spec.compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    model = AutoModelForCausalLM.from_pretrained(
        spec.model,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        ),
        dtype=compute_dtype,
    )
    peft_config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    return tokenizer, model, peft_config


def trl_arguments(spec: Spec, output_dir: str) -> dict[str, Any]:
    """The recipe's hyperparameters as TRL's config fields (both trainers' configs take them)."""
    import torch

    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "learning_rate": spec.learning_rate,
        "lr_scheduler_type": spec.lr_scheduler_type,
        "warmup_steps": spec.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "optim": spec.optimizer,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "max_length": spec.max_seq_len,
        "num_train_epochs": spec.epochs,
        "seed": spec.seed,
        "bf16": spec.compute_dtype == "bfloat16",
        "use_cpu": not torch.cuda.is_available(),
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }


def measuring_callback(
    clock: StepClock, losses: list[float], rss: RssSampler, profiler: StepProfiler | None
):
    """A TrainerCallback that times the optimizer steps, restarts the RSS sampler as the first
    step begins, drives the profiler and collects the logged losses."""
    from transformers import TrainerCallback

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not clock.marks:  # the first step begins
                rss.restart()
            clock.start()
            if profiler:
                profiler.step()

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Measure()
