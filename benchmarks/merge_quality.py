"""Which base to merge a QLoRA adapter into: eval loss of `--base original` and
`--base dequantized` merges against the adapter as trained (4-bit base + adapter, unmerged), on
the run's own validation set, in one run.

Usage (from the repository root, after `lorakit train configs/quickstart.yaml`):
    python benchmarks/merge_quality.py runs/quickstart [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder written by lorakit train")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--work", type=Path, help="where merged models go (default: temp)")
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from lorakit.commands.merge import MergeOptions, merge
    from lorakit.data import make_loader, prepare_data
    from lorakit.loss import TokenNLL, evaluate_loss
    from lorakit.models import load_tokenizer, resolve_model
    from lorakit.peft_setup import choose_compute_dtype, load_adapter_as_trained
    from lorakit.recipe import load_recipe

    recipe = load_recipe(args.run / "recipe.resolved.yaml")
    adapter = args.run / "adapter"
    location = resolve_model(recipe.model.name_or_path).location
    tokenizer = load_tokenizer(str(adapter))
    data = prepare_data(recipe, tokenizer)
    loader = make_loader(
        data.validation,
        recipe.train.micro_batch_size,
        tokenizer.pad_token_id,
        recipe.train.seed,
        shuffle=False,
    )
    accelerator = Accelerator(cpu=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-quality-"))

    def loss_of(model) -> float:
        with torch.no_grad():
            return evaluate_loss(TokenNLL(model.eval()), loader, accelerator)

    results: list[tuple[str, float]] = []

    def record(label: str, model) -> None:
        started = time.perf_counter()
        results.append((label, loss_of(model)))
        print(f"  {label}: {results[-1][1]:.4f} ({time.perf_counter() - started:.0f} s)")

    print(f"eval loss on {len(data.validation)} validation examples of {args.run}")
    trained = load_adapter_as_trained(location, adapter, recipe.quant, recipe.model)
    compute = choose_compute_dtype(recipe.quant.bnb_4bit_compute_dtype, torch.device("cpu"))
    record(f"as trained: NF4 base + adapter, unmerged ({str(compute)[6:]})", trained)
    with trained.disable_adapter():
        record("NF4 base alone", trained)
    del trained
    record("original base alone (float32)", AutoModelForCausalLM.from_pretrained(location))
    for dtype in args.dtypes:
        for base in ("original", "dequantized"):
            out = work / f"{base}-{dtype}"
            merge(MergeOptions(source=args.run, out=out, base=base, dtype=dtype, force=True))
            merged = AutoModelForCausalLM.from_pretrained(out)
            record(f"merge --base {base} --dtype {dtype}", merged)

    reference = results[0][1]
    print(f"\n  {'model':58s} {'eval loss':>9s} {'Δ vs trained':>13s} {'perplexity':>10s}")
    for label, loss in results:
        print(f"  {label:58s} {loss:9.4f} {loss - reference:+13.4f} {math.exp(loss):10.3f}")


if __name__ == "__main__":
    main()
