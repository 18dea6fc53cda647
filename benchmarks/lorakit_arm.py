"""The lorakit arm: `lorakit.commands.train.train` on the benchmark recipe, measured.

    python benchmarks/lorakit_arm.py '<Spec JSON>' [LEVER ...] [--profile]

The recipe is SFT, or DPO when the Spec says `method: dpo` (its data then holds preference
pairs; the counts are pairs and the held-out metrics DPO's implicit reward).

A LEVER turns one of lorakit's speed choices back off, to measure what it is worth (see
`LEVERS`); the recipe-level ones (dtype, threads, checkpointing, dropout, compile) are Spec
fields.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    WARM_CACHE_ENV,
    ArmResult,
    RssSampler,
    Spec,
    StepClock,
    StepProfiler,
    device_peak_memory,
    emit,
    heldout_loss,
    heldout_preference,
    peak_rss_mb,
    region,
    set_threads,
)


def recipe_dict(
    spec: Spec, output_dir: str, group_by_length: bool = True, shared_prefix: bool = True
) -> dict:
    recipe = {
        "model": {"name_or_path": spec.model},
        "quant": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": spec.compute_dtype,
        },
        "lora": {
            "r": spec.r,
            "lora_alpha": spec.lora_alpha,
            "lora_dropout": spec.lora_dropout,
            "target_modules": spec.target_modules,
        },
        "data": {
            "train": spec.train_file,
            "max_seq_len": spec.max_seq_len,
            "group_by_length": group_by_length,
            "shared_prefix": shared_prefix,
        },
        "train": {
            "epochs": spec.epochs,
            "micro_batch_size": spec.micro_batch_size,
            "gradient_accumulation_steps": spec.gradient_accumulation_steps,
            "learning_rate": spec.learning_rate,
            "lr_scheduler_type": spec.lr_scheduler_type,
            "warmup_ratio": spec.warmup_ratio,
            "optimizer": spec.optimizer,
            "gradient_checkpointing": spec.gradient_checkpointing,
            "checkpoint_every_n_layers": spec.checkpoint_every_n_layers,
            "torch_compile": spec.torch_compile,
            "seed": spec.seed,
            "logging_steps": 1,
        },
        "output": {"dir": output_dir},
    }
    if spec.method == "dpo":
        recipe["train"] |= {
            "method": "dpo",
            "beta": spec.beta,
            "loss_type": "sigmoid",
            "label_smoothing": 0.0,
            "precompute_ref_log_probs": spec.precompute_ref_log_probs,
        }
    return recipe


def no_fast_lora() -> None:
    import lorakit.peft_setup

    lorakit.peft_setup.enable_fast_lora = lambda model, dtype: 0


def fp32_embeddings() -> None:
    import lorakit.peft_setup

    lorakit.peft_setup.keep_frozen_embeddings_in = lambda model, dtype: None


def checkpointed_head() -> None:
    """The head as before: chunks of 1024 positions, each under activation checkpointing (the
    logits are recomputed in backward: three head matmuls per trained token)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    import lorakit.commands.train
    from lorakit.data import IGNORE_INDEX
    from lorakit.loss import TokenNLL, _chunk_nll, causal_lm_of

    class CheckpointedChunks(TokenNLL):
        def forward(self, input_ids, attention_mask, labels, position_ids=None):
            causal_lm = causal_lm_of(self.model)
            backbone = getattr(causal_lm, causal_lm.base_model_prefix)
            head = causal_lm.get_output_embeddings()
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).last_hidden_state
            keep = labels[:, 1:] != IGNORE_INDEX
            hidden, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, targets.numel(), 1024):
                part = (hidden[start : start + 1024], targets[start : start + 1024])
                total = total + checkpoint(_chunk_nll, *part, head, None, use_reentrant=False)
            return total, keep.sum()

    lorakit.commands.train.TokenNLL = CheckpointedChunks


def non_reentrant_checkpointing() -> None:
    import lorakit.peft_setup

    lorakit.peft_setup.REENTRANT_CHECKPOINTING = False


def full_logits() -> None:
    """The transformers default: the model's forward builds [batch, seq, vocab] logits."""
    import torch
    import torch.nn.functional as F

    import lorakit.commands.train
    from lorakit.data import IGNORE_INDEX
    from lorakit.loss import TokenNLL

    class FullLogits(TokenNLL):
        def forward(self, input_ids, attention_mask, labels, position_ids=None):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = labels[:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),
                targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            return nll, (targets != IGNORE_INDEX).sum().to(torch.int64)

    lorakit.commands.train.TokenNLL = FullLogits


LEVERS = {
    "no_fast_lora": no_fast_lora,
    "fp32_embeddings": fp32_embeddings,
    "checkpointed_head": checkpointed_head,
    "full_logits": full_logits,
    "no_group_by_length": None,  # a recipe key
    "no_shared_prefix": None,  # a recipe key
    "non_reentrant_checkpointing": non_reentrant_checkpointing,
    "warm_kernel_cache": None,  # with torch_compile: the kernels an earlier run compiled
}


def main(spec: Spec, levers: list[str]) -> None:
    setup_started = time.perf_counter()
    set_threads(spec)
    if spec.torch_compile:  # a cold start, as a recipe's first run has: no cached kernels
        warm = os.environ.get(WARM_CACHE_ENV) if "warm_kernel_cache" in levers else None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = warm or tempfile.mkdtemp(prefix="lorakit-inductor-")
    profiler = StepProfiler() if "--profile" in levers else None
    levers = [lever for lever in levers if lever != "--profile"]
    for lever in levers:
        if LEVERS[lever] is not None:
            LEVERS[lever]()
    import lorakit.commands.train
    import lorakit.data.batching as batching
    from lorakit.commands.train import train
    from lorakit.data.pipeline import PreferencePair
    from lorakit.preference import PreferenceObjective
    from lorakit.recipe import Recipe
    from lorakit.tracking import read_metrics

    counts = {"real": 0, "padded": 0, "shared": 0, "trained": 0, "pairs": 0}
    collate = batching.collate
    pairs_from_loader = [False]
    """collate_pairs collates a batch's 2P rows through `batching.collate` again: only those of
    the training loader count (not those of the reference precompute)."""

    def counting_collate(examples, *args, **kwargs):
        if isinstance(examples[0], PreferencePair):
            counts["pairs"] += len(examples)
            pairs_from_loader[0] = True
            try:
                return collate(examples, *args, **kwargs)
            finally:
                pairs_from_loader[0] = False
        batch = collate(examples, *args, **kwargs)
        if spec.method != "sft" and not pairs_from_loader[0]:
            return batch
        real = sum(len(e.input_ids) for e in examples)
        counts["real"] += real
        counts["trained"] += sum(e.trained_tokens for e in examples)
        counts["padded"] += batch["input_ids"].numel()
        if batch.get("segments") is not None:
            counts["shared"] += real - batch["input_ids"].numel()
        return batch

    precompute = {"seconds": 0.0}
    precompute_reference = lorakit.commands.train.precompute_reference

    def timed_precompute(run):
        started = time.perf_counter()
        precompute_reference(run)
        precompute["seconds"] += time.perf_counter() - started

    lorakit.commands.train.precompute_reference = timed_precompute
    if profiler:  # the reference forward of each micro-batch, as one region of the profile
        reference_log_probs = PreferenceObjective.reference_log_probs

        def profiled_reference(self, *args, **kwargs):
            with region("reference forward (no grad)"):
                return reference_log_probs(self, *args, **kwargs)

        PreferenceObjective.reference_log_probs = profiled_reference

    with tempfile.TemporaryDirectory() as out:
        raw = recipe_dict(
            spec,
            str(Path(out) / "run"),
            group_by_length="no_group_by_length" not in levers,
            shared_prefix="no_shared_prefix" not in levers,
        )
        recipe = Recipe.model_validate(yaml.safe_load(yaml.safe_dump(raw)))
        batching.collate = counting_collate
        clock, rss = StepClock(), RssSampler()
        forward_backward = lorakit.commands.train.forward_backward

        def timed(*args, **kwargs):
            if not clock.marks:  # the first step begins
                rss.restart()
            clock.start()
            if profiler:
                profiler.step()
            return forward_backward(*args, **kwargs)

        class TimedLog(lorakit.commands.train.MetricsLog):
            def write(self, record):
                if "loss" in record:
                    clock.tick()  # a step ends once it is logged
                super().write(record)

        lorakit.commands.train.forward_backward = timed
        lorakit.commands.train.MetricsLog = TimedLog
        setup_seconds = time.perf_counter() - setup_started
        with rss:
            result = train(recipe, overwrite=True)
        batching.collate = collate
        records = read_metrics(result.run_dir)
        losses = [r["loss"] for r in records if "loss" in r]
        plan = next((r for r in records if "memory_planned_bytes" in r), {})
    memory = device_peak_memory() | {
        "peak_rss_trained_mb": peak_rss_mb(),
        "other_cores_during_loop": clock.other_cores,
        # lorakit's own memory plan and its measured peak (max_memory_allocated on GPU)
        "planned_mb": plan.get("memory_planned_bytes", 0) / 2**20,
        "planned_peak_mb": plan.get("memory_peak_bytes", 0) / 2**20,
    }
    if profiler:
        print(profiler.report("lorakit"))
    extra = dict(memory)
    if spec.method == "dpo":
        metrics = heldout_preference(result.model, _tokenizer(spec), spec)
        loss, se = metrics["heldout_dpo_loss"], metrics["heldout_dpo_loss_se"]
        extra |= metrics | {"pairs": counts["pairs"], "precompute_s": precompute["seconds"]}
        trained = counts["trained"]
    else:
        loss, se = heldout_loss(result.model, _tokenizer(spec), spec)
        trained = result.trained_tokens
    emit(
        ArmResult(
            arm="lorakit" + "".join(f"-{lever}" for lever in levers),
            trained_tokens=trained,
            real_tokens=counts["real"],
            padded_tokens=counts["padded"],
            shared_tokens=counts["shared"],
            steps=result.steps,
            loop_seconds=clock.total,
            step_seconds=clock.step_seconds,
            losses=losses,
            heldout_loss=loss,
            heldout_se=se,
            peak_rss_mb=peak_rss_mb(),
            train_peak_rss_mb=rss.peak_mb,
            setup_seconds=setup_seconds,
            loop_cpu_seconds=clock.cpu_total,
            extra=extra,
        )
    )


def _tokenizer(spec: Spec):
    from lorakit.models import load_tokenizer

    return load_tokenizer(spec.model)


if __name__ == "__main__":
    main(Spec.from_json(sys.argv[1]), sys.argv[2:])
