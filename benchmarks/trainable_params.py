"""Trainable share of LoRA adapters on real architectures, counted by PEFT itself.

The models are built on the meta device from their published shapes (no weights, no download),
lorakit's target presets are resolved on them, PEFT wraps them, and the parameters are counted.

    python benchmarks/trainable_params.py [--ranks 8,16,64]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.models import load_config, resolve_model  # noqa: E402
from lorakit.peft_setup import build_lora_config, resolve_target_modules  # noqa: E402
from lorakit.recipe import LoraSection  # noqa: E402

# Published shapes (config.json of each model).
CONFIGS = {
    "Llama-3-8B": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    ),
    "Qwen2.5-7B": Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4,
    ),
    "Mistral-7B": MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    ),
}  # fmt: skip


def count(config_or_path, rank: int, targets: str) -> tuple[int, int]:
    config = load_config(config_or_path) if isinstance(config_or_path, str) else config_or_path
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    lora = LoraSection(r=rank, lora_alpha=2 * rank, target_modules=targets)
    model = get_peft_model(base, build_lora_config(lora, resolve_target_modules(base, targets)))
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="8,16,64")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    models = {"SmolLM2-135M (embedded)": resolve_model("smollm2-135m-instruct").location}
    models.update(CONFIGS)
    print("| model | targets | " + " | ".join(f"r={r}" for r in ranks) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in ranks) + " |")
    for name, config in models.items():
        for targets in ("all-linear", "attention"):
            cells = []
            for rank in ranks:
                trainable, total = count(config, rank, targets)
                cells.append(f"{trainable / 1e6:.2f} M ({100 * trainable / total:.2f}%)")
            print(f"| {name} | {targets} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
