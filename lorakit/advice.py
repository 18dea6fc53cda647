"""Best-practice advice: warnings (never errors) about settings that are legal but usually wrong.

The thresholds come from the LoRA/QLoRA papers and common practice; each message says why.
"""

from __future__ import annotations

from lorakit.recipe import Recipe, TrainSection

SMALL_DATASET_EXAMPLES = 2_000
COMPILE_PAYS_OFF_MICRO_BATCHES = 500
"""`train.torch_compile` measured on 2 CPU cores (the benchmark recipe, README: Performance):
~0.17 s saved per micro-batch of 4, with checkpointing on or off, after a first compilation of
~35 s (checkpointing on) to ~75 s (off, new sequence lengths compiled as they come). In the
200-step defaults comparison the compiled run's loop took 172 s against 138 s eager: it pays
off after ~450 micro-batches."""


def recipe_advice(recipe: Recipe) -> list[str]:
    """Advice that needs only the recipe."""
    lora = recipe.lora
    notes: list[str] = []
    ratio = lora.lora_alpha / (lora.r**0.5 if lora.use_rslora else lora.r)
    if not 0.5 <= ratio <= 4:
        scale = "alpha/sqrt(r)" if lora.use_rslora else "alpha/r"
        notes.append(
            f"lora: {scale} = {ratio:g} is unusual (1-2 is common practice; the update is scaled "
            "by it, so the effective learning rate changes with it)"
        )
    if lora.target_modules == "attention" or (
        isinstance(lora.target_modules, list)
        and set(lora.target_modules) <= {"q_proj", "k_proj", "v_proj", "o_proj", "c_attn"}
    ):
        notes.append(
            "lora.target_modules: attention only; QLoRA found that LoRA on all linear layers "
            "is needed to match full fine-tuning (target_modules: all-linear)"
        )
    if lora.r > 128 and not lora.use_rslora:
        notes.append(f"lora.r = {lora.r}: at high ranks set use_rslora: true so the rank pays off")
    return notes


def data_advice(
    recipe: Recipe, examples: int, trained_tokens: int, trainable_parameters: int
) -> list[str]:
    """Advice that needs the size of the data and of the adapter."""
    notes: list[str] = []
    small = examples < SMALL_DATASET_EXAMPLES
    if small and recipe.lora.lora_dropout == 0 and recipe.train.weight_decay == 0:
        notes.append(
            f"{examples} training examples with lora_dropout 0 and weight_decay 0: small datasets "
            "overfit quickly; consider lora_dropout: 0.05 or weight_decay: 0.01 and watch eval loss"
        )
    seen = trained_tokens * max(recipe.train.epochs, 1.0)
    if trainable_parameters > 50 * seen:
        notes.append(
            f"lora.r = {recipe.lora.r} gives {trainable_parameters:,} trainable parameters for "
            f"{trained_tokens:,} trained tokens: far more capacity than the data needs; "
            "a smaller r trains as well, faster"
        )
    return notes


def compile_advice(train: TrainSection, optimizer_steps: int) -> list[str]:
    """`train.torch_compile` on a run too short for the compilation to pay off."""
    micro_batches = optimizer_steps * train.gradient_accumulation_steps
    if not train.torch_compile or micro_batches >= COMPILE_PAYS_OFF_MICRO_BATCHES:
        return []
    return [
        f"train.torch_compile on a run of {micro_batches} micro-batches: the first step "
        "compiles the decoder layers (~35-75 s on 2 CPU cores), which takes longer than the "
        f"compiled steps save before ~{COMPILE_PAYS_OFF_MICRO_BATCHES} micro-batches"
    ]
