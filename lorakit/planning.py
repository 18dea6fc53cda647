"""What the memory plan decides for a run on this machine: the memory it may use, the `auto`
recipe values (checkpointing, micro-batch size, torch.compile) and the check that refuses a
recipe that cannot fit before anything loads. The estimates themselves are
`lorakit.memory_plan`'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from lorakit.advice import COMPILE_PAYS_OFF_MICRO_BATCHES
from lorakit.errors import LorakitError
from lorakit.files import reset_peak_mark, status_bytes
from lorakit.memory_plan import GiB, MemoryPlan, estimate, levers, with_values
from lorakit.recipe import Recipe
from lorakit.training.optim import count_optimizer_steps

HEADROOM = 0.8
"""`auto` spends at most this share of the budget: the plan is within ±15% of the measured
peaks of a training step (benchmarks/plan_accuracy.py), a long CPU run's resident set holds
more (README: Will it fit?), and the machine runs other things."""
CHECKPOINTING_CHOICES = (0, 4, 3, 2, 1)
"""Checkpoint no layer, then every 4th … every layer: fastest first."""
AUTO_MICRO_BATCH = 4
"""`micro_batch_size: auto` keeps the effective batch of this micro-batch size (the default)
times `gradient_accumulation_steps`."""
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, option: str = "--memory") -> int:
    """`24GiB`, `24 GB`, `1.5TiB`, `512MiB` → bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise LorakitError(f"{option}: {text!r} is not a size (e.g. 24GiB, 80GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def available_memory(device: str) -> int:
    """What a run may use: the GPU's free memory, or the RAM the kernel counts as available."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_kind(device: torch.device | str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def plan_of(
    recipe: Recipe,
    config: PretrainedConfig,
    device: str,
    processes: int = 1,
    fsdp: bool = False,
    longest: int | None = None,
) -> MemoryPlan:
    """The memory plan of a recipe whose values are all concrete. `longest`: the longest
    tokenized row of the data, when known (rows are padded to the longest of their batch, not
    to `max_seq_len`; packed rows fill it)."""
    return estimate(sized(recipe, longest), config, device=device, processes=processes, fsdp=fsdp)


def sized(recipe: Recipe, longest: int | None) -> Recipe:
    """The recipe as the memory plan sees its batches: rows as long as the data's longest (when
    known and shorter, and not packed)."""
    if longest is None or recipe.data.packing or longest >= recipe.data.max_seq_len:
        return recipe
    return with_values(recipe, data__max_seq_len=max(1, longest))


@dataclass(frozen=True)
class Decision:
    key: str
    value: object
    why: str


def resolve_auto(
    recipe: Recipe,
    config: PretrainedConfig,
    *,
    device: str,
    budget: int,
    train_examples: int,
    processes: int = 1,
    fsdp: bool = False,
    longest: int | None = None,
) -> tuple[Recipe, list[Decision]]:
    """The recipe with every `auto` replaced by a value, and why. `train_examples`: the rows
    (or pairs) one epoch trains on, for the length of the run; `longest`: its longest row."""
    decisions: list[Decision] = []
    tcfg = recipe.train
    kwargs = {"device": device, "processes": processes, "fsdp": fsdp, "longest": longest}
    if tcfg.micro_batch_size == "auto":
        recipe, decision = _micro_batch(recipe, config, budget, **kwargs)
        decisions.append(decision)
    if tcfg.gradient_checkpointing == "auto":
        recipe, decision = _checkpointing(recipe, config, budget, **kwargs)
        decisions.append(decision)
    if tcfg.torch_compile == "auto":
        recipe, decision = _compile(recipe, train_examples, processes, fsdp)
        decisions.append(decision)
    return recipe, decisions


def run_length(recipe: Recipe, train_examples: int, processes: int = 1) -> tuple[int, int]:
    """Optimizer steps and micro-batches (per process) of a run over `train_examples` rows (or
    pairs) an epoch."""
    tcfg = recipe.train
    per_epoch = math.ceil(train_examples / (tcfg.micro_batch_size * processes))
    steps = count_optimizer_steps(tcfg, per_epoch)
    return steps, steps * tcfg.gradient_accumulation_steps


def _fits(recipe: Recipe, config: PretrainedConfig, budget: int, **kwargs) -> bool:
    """Whether the plan fits with headroom; an `auto` checkpointing counts as on (it then
    turns itself off where the memory allows)."""
    concrete = recipe
    if recipe.train.gradient_checkpointing == "auto":
        concrete = with_values(recipe, train__gradient_checkpointing=True)
    return plan_of(concrete, config, **kwargs).total <= HEADROOM * budget


def _micro_batch(recipe: Recipe, config, budget: int, **kwargs) -> tuple[Recipe, Decision]:
    """The largest power-of-two micro-batch that divides the effective batch and fits, with
    accumulation raised so the effective batch (and the token-normalized loss) is unchanged."""
    effective = AUTO_MICRO_BATCH * recipe.train.gradient_accumulation_steps
    choice = 1
    size = 1
    while size <= effective:
        candidate = with_values(
            recipe,
            train__micro_batch_size=size,
            train__gradient_accumulation_steps=effective // size,
        )
        if effective % size == 0 and _fits(candidate, config, budget, **kwargs):
            choice = size
        size *= 2
    steps = effective // choice
    resolved = with_values(
        recipe, train__micro_batch_size=choice, train__gradient_accumulation_steps=steps
    )
    why = (
        f"the largest of the effective batch {effective} that fits in {HEADROOM:.0%} of "
        f"{budget / GiB:.1f} GiB; accumulation {steps}"
    )
    return resolved, Decision("train.micro_batch_size", choice, why)


def _checkpointing(recipe: Recipe, config, budget: int, **kwargs) -> tuple[Recipe, Decision]:
    """Checkpoint the fewest layers that fit (none when memory allows: steps run ~1.5x faster
    without, README Performance)."""
    for every in CHECKPOINTING_CHOICES:
        values = {"train__gradient_checkpointing": every > 0}
        if every:
            values["train__checkpoint_every_n_layers"] = every
        candidate = with_values(recipe, **values)
        plan = plan_of(candidate, config, **kwargs)
        if plan.total <= HEADROOM * budget or every == 1:
            label = "off" if not every else "on" if every == 1 else f"1 layer in {every}"
            why = f"{plan.total / GiB:.2f} GiB planned of {budget / GiB:.1f} GiB available"
            return candidate, Decision("train.gradient_checkpointing", label, why)
    raise AssertionError("unreachable: every == 1 always decides")


def _compile(
    recipe: Recipe, train_examples: int, processes: int, fsdp: bool
) -> tuple[Recipe, Decision]:
    """Compile when the run is long enough to pay the compilation back (`advice`'s
    COMPILE_PAYS_OFF_MICRO_BATCHES, measured), never under FSDP."""
    _, micro_batches = run_length(recipe, train_examples, processes)
    long_enough = micro_batches >= COMPILE_PAYS_OFF_MICRO_BATCHES
    on = long_enough and not fsdp and compiler_found()
    if fsdp:
        why = "FSDP"
    elif long_enough and not on:
        why = "no C++ compiler for inductor here (g++, c++ or clang++ on PATH, or $CXX)"
    else:
        relation = ">=" if on else "<"
        pays = COMPILE_PAYS_OFF_MICRO_BATCHES
        why = f"{micro_batches} micro-batches {relation} {pays}, where compiling pays off"
    return with_values(recipe, train__torch_compile=on), Decision(
        "train.torch_compile", "on" if on else "off", why
    )


def compiler_found() -> bool:
    """Whether inductor has a C++ compiler to build its CPU kernels with."""
    import os
    import shutil

    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(name and shutil.which(name) for name in names)


def check_compiler(recipe: Recipe, device: str) -> None:
    """A recipe that asks for `torch.compile` on a CPU with no C++ compiler to build the kernels
    fails here, not at the first step after loading."""
    if recipe.train.torch_compile is True and device == "cpu" and not compiler_found():
        raise LorakitError(
            "train.torch_compile: inductor needs a C++ compiler for CPU kernels and none is here "
            "(g++, c++ or clang++ on PATH, or $CXX); install one or set it to false"
        )


def check_fits(
    recipe: Recipe,
    config: PretrainedConfig,
    plan: MemoryPlan,
    budget: int,
    longest: int | None = None,
    **kwargs,
) -> None:
    """Refuse, before loading, a recipe whose plan exceeds the memory there is, naming the
    numbers and the first lever that makes it fit."""
    if plan.total <= budget:
        return
    found = levers(sized(recipe, longest), config, budget, **kwargs)
    fixes = [lever for lever in found if lever.fits]
    fix = (
        f"set {fixes[0].change} ({fixes[0].why}: {fixes[0].total / GiB:.2f} GiB)"
        if fixes
        else "no single setting makes it fit: use a smaller model or more memory"
    )
    raise LorakitError(
        f"the recipe needs about {plan.total / GiB:.2f} GiB at its peak (memory plan) and "
        f"{budget / GiB:.2f} GiB is available: {fix}; `lorakit plan` shows the parts "
        "(`train --skip-memory-check` trains anyway)"
    )


# --- measuring what the plan estimates ----------------------------------------------------------


class PeakMeter:
    """The training loop's peak memory: on the CPU the resident set's high-water mark, reset
    when the loop starts (what loading and quantizing took is not the loop's); on a GPU the
    allocator's peak, reset the same way."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "loop"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not reset_peak_mark():
            self.scope = "process"  # the whole process's peak, loading included

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return status_bytes("VmHWM")
