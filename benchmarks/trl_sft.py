"""The comparison arm: the plain TRL SFTTrainer + PEFT QLoRA script a user writes.

The training part is what TRL's documentation shows: a 4-bit model from `from_pretrained`,
a `LoraConfig`, an `SFTConfig` with the recipe's hyperparameters, a prompt-completion dataset
(loss on the completion only) and `trainer.train()`. The rest only measures: a callback times
the optimizer steps, the collator is wrapped to count tokens, and the held-out loss is
computed by the function the lorakit arm uses.

    python benchmarks/trl_sft.py '<Spec JSON>'
"""

from __future__ import annotations

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
    heldout_loss,
    measuring_callback,
    peak_rss_mb,
    set_threads,
    trl_arguments,
    trl_model,
)


def prompt_completion_rows(path: str) -> list[dict]:
    """Alpaca rows as TRL's conversational prompt-completion rows (the same chat lorakit
    renders: the user turn is the instruction, plus the input when there is one)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        rows.append(
            {
                "prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": row["output"]}],
            }
        )
    return rows


def main(spec: Spec, profile: bool = False) -> None:
    setup_started = time.perf_counter()
    set_threads(spec)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, model, peft_config = trl_model(spec)
    args = SFTConfig(
        **trl_arguments(spec, str(Path(spec.train_file).parent / "trl-out")),
    )

    clock, losses, rss = StepClock(), [], RssSampler()
    profiler = StepProfiler() if profile else None

    measure = measuring_callback(clock, losses, rss, profiler)

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(prompt_completion_rows(spec.train_file)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[measure],
    )
    counts = {"trained": 0, "real": 0, "padded": 0}
    collator = trainer.data_collator

    def counting_collator(examples):
        batch = collator(examples)
        counts["trained"] += int((batch["labels"][:, 1:] != -100).sum())
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting_collator
    setup_seconds = time.perf_counter() - setup_started
    with rss:
        trainer.train()
    memory = device_peak_memory()
    if profiler:
        print(profiler.report("TRL"))
    loss, se = heldout_loss(trainer.model, tokenizer, spec)
    emit(
        ArmResult(
            arm="trl",
            trained_tokens=counts["trained"],
            real_tokens=counts["real"],
            padded_tokens=counts["padded"],
            steps=len(clock.step_seconds),
            loop_seconds=clock.total,
            step_seconds=clock.step_seconds,
            losses=losses,
            heldout_loss=loss,
            heldout_se=se,
            peak_rss_mb=peak_rss_mb(),
            train_peak_rss_mb=rss.peak_mb,
            setup_seconds=setup_seconds,
            loop_cpu_seconds=clock.cpu_total,
            extra=memory,
        )
    )


if __name__ == "__main__":
    main(Spec.from_json(sys.argv[1]), profile="--profile" in sys.argv[2:])
