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
    peak_rss_mb,
    set_threads,
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
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
    )
    from trl import SFTConfig, SFTTrainer

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
    args = SFTConfig(
        output_dir=str(Path(spec.train_file).parent / "trl-out"),
        per_device_train_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler_type,
        warmup_steps=spec.warmup_ratio,  # a float below 1 is a ratio of the total steps
        optim=spec.optimizer,
        gradient_checkpointing=spec.gradient_checkpointing,
        max_length=spec.max_seq_len,
        num_train_epochs=spec.epochs,
        seed=spec.seed,
        bf16=compute_dtype == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )

    clock, losses, rss = StepClock(), [], RssSampler()
    profiler = StepProfiler() if profile else None

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

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(prompt_completion_rows(spec.train_file)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Measure()],
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
