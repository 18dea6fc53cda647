"""The comparison arm for preference tuning: the plain TRL DPOTrainer + PEFT QLoRA script a
user writes.

The training part is what TRL's documentation shows: a 4-bit model from `from_pretrained`, a
`LoraConfig`, a `DPOConfig` with the recipe's hyperparameters, a conversational preference
dataset (`prompt` / `chosen` / `rejected` message lists: TRL renders them with the chat template,
as lorakit does) and `trainer.train()`. With a PEFT model and no `ref_model`, TRL's reference is
the base with the adapter disabled, as lorakit's. The DPOConfig fields whose TRL defaults differ
from lorakit's recipe are set to lorakit's (`max_length`, `learning_rate`, `logging_steps`,
`precompute_ref_log_probs`); TRL's `disable_dropout=True` and `keep_start` truncation are what
lorakit does (dropout 0; truncation keeps the prompt). The rest only measures: a callback times
the optimizer steps, the collator is wrapped to count pairs and tokens, and the held-out metrics
are computed by the function the lorakit arm uses.

    python benchmarks/trl_dpo.py '<Spec JSON>' [--profile]
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ArmResult,
    RssSampler,
    Spec,
    StepClock,
    StepProfiler,
    device_peak_memory,
    emit,
    heldout_preference,
    measuring_callback,
    peak_rss_mb,
    region,
    set_threads,
    trl_arguments,
    trl_model,
)


def conversational_pairs(path: str) -> list[dict]:
    """TRL's string preference rows as its conversational ones (the chat lorakit renders from
    the string rows: the prompt as the user turn, each answer as the assistant's reply)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        rows.append(
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
        )
    return rows


def repacked_layers(model) -> int:
    """4-bit layers bitsandbytes has repacked into its CPU inference layout (which has no
    backward: LoRA below them would stop learning)."""
    import bitsandbytes as bnb

    return sum(
        1
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
        and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    )


def main(spec: Spec, profile: bool = False) -> None:
    setup_started = time.perf_counter()
    set_threads(spec)
    import trl.trainer.dpo_trainer as dpo_trainer
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer, model, peft_config = trl_model(spec)
    if spec.precompute_ref_log_probs:
        # TRL precomputes in its constructor, with the model still in eval mode (as
        # from_pretrained leaves it) and without grad: on CPUs with AVX-512-BF16/AMX that makes
        # bitsandbytes repack every 4-bit weight into a layout without backward, after which
        # LoRA stops learning (docs: lorakit's `keep_4bit_layers_differentiable`). This is the
        # switch that avoids it; `repacked_4bit_layers_before_training` in the result checks.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    args = DPOConfig(
        **trl_arguments(spec, str(Path(spec.train_file).parent / "trl-dpo-out")),
        truncation_mode="keep_start",
        disable_dropout=True,
        beta=spec.beta,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        precompute_ref_log_probs=spec.precompute_ref_log_probs,
    )

    clock, losses, rss = StepClock(), [], RssSampler()
    profiler = StepProfiler() if profile else None

    measure = measuring_callback(clock, losses, rss, profiler)

    precompute = {"seconds": 0.0}
    precompute_ref_logps = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        started = time.perf_counter()
        try:
            return precompute_ref_logps(self, *a, **kw)
        finally:
            precompute["seconds"] += time.perf_counter() - started

    DPOTrainer._precompute_ref_logps = timed_precompute
    if profiler:  # TRL enters `use_adapter` only for the reference forward
        use_adapter = dpo_trainer.use_adapter

        @contextlib.contextmanager
        def profiled_use_adapter(*a, **kw):
            with region("reference forward (no grad)"), use_adapter(*a, **kw):
                yield

        dpo_trainer.use_adapter = profiled_use_adapter

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(conversational_pairs(spec.train_file)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[measure],
    )
    counts = {"pairs": 0, "trained": 0, "real": 0, "padded": 0}
    collator = trainer.data_collator

    def counting_collator(examples):
        batch = collator(examples)
        counts["pairs"] += len(examples)
        counts["trained"] += int(batch["completion_mask"][:, 1:].sum())
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting_collator
    repacked = repacked_layers(trainer.model)
    setup_seconds = time.perf_counter() - setup_started
    with rss:
        trainer.train()
    memory = device_peak_memory() | {
        "peak_rss_trained_mb": peak_rss_mb(),
        "other_cores_during_loop": clock.other_cores,
    }
    if profiler:
        print(profiler.report("TRL"))
    metrics = heldout_preference(trainer.model, tokenizer, spec)
    emit(
        ArmResult(
            arm="trl-dpo",
            trained_tokens=counts["trained"],
            real_tokens=counts["real"],
            padded_tokens=counts["padded"],
            steps=len(clock.step_seconds),
            loop_seconds=clock.total,
            step_seconds=clock.step_seconds,
            losses=losses,
            heldout_loss=metrics["heldout_dpo_loss"],
            heldout_se=metrics["heldout_dpo_loss_se"],
            peak_rss_mb=peak_rss_mb(),
            train_peak_rss_mb=rss.peak_mb,
            setup_seconds=setup_seconds,
            loop_cpu_seconds=clock.cpu_total,
            extra=memory
            | metrics
            | {
                "pairs": counts["pairs"],
                "precompute_s": precompute["seconds"],
                "repacked_4bit_layers_before_training": repacked,
            },
        )
    )


if __name__ == "__main__":
    main(Spec.from_json(sys.argv[1]), profile="--profile" in sys.argv[2:])
