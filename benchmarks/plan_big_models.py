"""The memory plan for the shipped GPU recipes and for 65B/70B models, on one GPU, beside the
figures their authors published. Offline: the models' configs are built from their published
hyperparameters (`lorakit.memory_plan.PUBLISHED_CONFIGS`); nothing is downloaded or loaded.

    python benchmarks/plan_big_models.py            # the table
    python benchmarks/plan_big_models.py --parts    # with every part of each plan

Published figures compared with:
- configs/gpu/*.yaml say each 7-8B recipe runs "on one 24 GB+ GPU".
- QLoRA (Dettmers et al. 2023, arXiv:2305.14314, abstract): "finetune a 65B parameter model on
  a single 48GB GPU". Their Guanaco-65B run (artidoro/qlora, scripts/finetune_guanaco_65b.sh,
  qlora.py defaults): LLaMA-65B, NF4 + double quant, bf16, LoRA r=64 alpha=16 dropout 0.05 on
  every linear layer, micro-batch 4 of at most 16 + 512 tokens, gradient checkpointing,
  paged_adamw_32bit. qlora.py keeps the LoRA weights in bf16, where lorakit keeps fp32 masters,
  and paged optimizer state moves to CPU memory when the GPU runs short.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit import memory_plan as mp  # noqa: E402
from lorakit.recipe import Recipe, load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = mp.GiB


def shipped(name: str) -> Recipe:
    return load_recipe(ROOT / "configs" / "gpu" / name)


def cases() -> list[tuple[str, Recipe, str]]:
    """(label, recipe, what its authors say)."""
    llama8b = shipped("llama3-8b-qlora.yaml")
    guanaco = mp.with_values(
        llama8b,
        model__name_or_path="huggyllama/llama-65b",
        lora__r=64,
        lora__lora_alpha=16,
        lora__lora_dropout=0.05,
        data__max_seq_len=528,
        train__micro_batch_size=4,
        train__optimizer="paged_adamw_32bit",
    )
    return [
        ("Llama-3-8B, configs/gpu", llama8b, "one 24 GB+ GPU (recipe)"),
        ("Qwen2.5-7B, configs/gpu", shipped("qwen2.5-7b-qlora.yaml"), "one 24 GB+ GPU (recipe)"),
        ("Mistral-7B, configs/gpu", shipped("mistral-7b-qlora.yaml"), "one 24 GB+ GPU (recipe)"),
        (
            "Llama-3-70B, 8B recipe",
            mp.with_values(llama8b, model__name_or_path="meta-llama/Meta-Llama-3-70B-Instruct"),
            "-",
        ),
        (
            "Llama-3-70B, 1 x 2048",
            mp.with_values(
                llama8b,
                model__name_or_path="meta-llama/Meta-Llama-3-70B-Instruct",
                train__micro_batch_size=1,
            ),
            "-",
        ),
        ("LLaMA-65B, Guanaco run", guanaco, "one 48 GB GPU (QLoRA paper)"),
    ]


def qlora_paper_choices(plan: mp.MemoryPlan) -> int:
    """The plan's total with the two choices qlora.py makes differently: LoRA weights and
    gradients in bf16 (half of lorakit's fp32 masters) and the paged optimizer state counted
    off the GPU (bitsandbytes pages it to CPU memory under pressure)."""
    return plan.total - plan.lora_weights // 2 - plan.lora_gradients // 2 - plan.optimizer_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", action="store_true")
    args = parser.parse_args()
    header = (
        f"{'model, recipe':<26} {'setting':<27} {'4-bit':>6} {'other':>6} {'LoRA+':>6} "
        f"{'activ.':>7} {'total':>7}  {'fits 24/48/80':<14} {'max mbs 24/48/80':<17} published"
    )
    print(header)
    print("-" * len(header))
    for label, recipe, published in cases():
        config = mp.published_config(recipe.model.name_or_path)
        layout = mp.model_layout(config, recipe)
        plan = mp.estimate(recipe, config, device="cuda", layout=layout)
        t = recipe.train
        setting = (
            f"{t.micro_batch_size}x{recipe.data.max_seq_len} r{recipe.lora.r} "
            f"drop{recipe.lora.lora_dropout:g} {t.optimizer.replace('paged_adamw_', 'pg')}"
        )
        lora = plan.lora_weights + plan.lora_gradients + plan.optimizer_state
        runs = plan.activations + plan.working
        fits = "/".join("y" if plan.fits(g * GiB) else "n" for g in (24, 48, 80))
        largest = "/".join(
            str(mp.largest_micro_batch(recipe, config, g * GiB, layout=layout, device="cuda"))
            for g in (24, 48, 80)
        )
        print(
            f"{label:<26} {setting:<27} {plan.frozen_4bit / GiB:6.1f} "
            f"{plan.frozen_other / GiB:6.1f} {lora / GiB:6.1f} {runs / GiB:7.1f} "
            f"{plan.total / GiB:6.1f}G  {fits:<14} {largest:<17} {published}"
        )
        if published.endswith("(QLoRA paper)"):
            print(
                f"{'':<26} with qlora.py's bf16 LoRA weights and paged optimizer off the GPU: "
                f"{qlora_paper_choices(plan) / GiB:.1f}G"
            )
        if args.parts:
            for line in mp.describe(plan):
                print(f"{'':<4}{line}")
    print(
        "GiB; 'other' = embeddings, head, norms; 'LoRA+' = LoRA weights, gradients, optimizer "
        "state; 'activ.' = activations kept + the step's working memory; total adds the CUDA "
        f"context ({mp.CUDA_CONTEXT_BYTES / GiB:.1f} GiB) and {mp.CUDA_ALLOCATOR_SLACK:.0%} "
        "allocator slack (assumptions, see lorakit/memory_plan.py)."
    )


if __name__ == "__main__":
    main()
