"""Quantization of the embedded SmolLM2-135M-Instruct, measured in one run.

bitsandbytes 4-bit (nf4, nf4 + double quantization, fp4, fp4 + double quantization): size on
disk and in memory against fp16, bits per quantized parameter (measured from the saved tensors,
beside the QLoRA paper's formula), reconstruction error, perplexity before and after.
GGUF (f16, q8_0, q4_0): file size, bits per parameter, perplexity in llama.cpp, and greedy
agreement with transformers.

    PYTHONPATH=. python benchmarks/quantize_report.py [--data FILE] [--work DIR]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from lorakit.cli import quiet_libraries
from lorakit.data.pipeline import IGNORE_INDEX, Example
from lorakit.models import load_tokenizer, resolve_model
from lorakit.quantization.bnb import (
    QuantizeReport,
    layers_by_kind,
    load_eval_examples,
    mean_token_nll,
    quantize_model,
    weighted_error,
)
from lorakit.quantization.gguf import export_gguf, verify_gguf

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).parent / "data" / "general_qa.jsonl"
BNB = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
GGUF = ["f16", "q8_0", "q4_0"]


def gguf_mean_token_nll(gguf_file: Path, examples: list[Example]) -> float:
    """Mean NLL of the trained tokens, computed from llama.cpp's logits (same masking)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_file),
        n_ctx=max(len(e.input_ids) for e in examples) + 8,
        logits_all=True,
        verbose=False,
        n_threads=1,
        n_threads_batch=1,
    )
    nll, count = 0.0, 0
    for example in examples:
        llm.reset()
        llm.eval(example.input_ids)
        logits = np.asarray(llm.scores[: len(example.input_ids) - 1], dtype=np.float64)
        labels = np.asarray(example.labels[1:])
        keep = labels != IGNORE_INDEX
        logits, labels = logits[keep], labels[keep]
        top = logits.max(-1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        nll += float((log_norm - logits[np.arange(len(labels)), labels]).sum())
        count += int(keep.sum())
    llm.close()
    return nll / count


def bnb_table(reports: list[QuantizeReport]) -> Table:
    table = Table(title=f"bitsandbytes 4-bit, {MODEL} ({reports[0].dtype})", title_justify="left")
    columns = [
        "method",
        "disk",
        "memory",
        "vs fp16",
        "bits/param",
        "QLoRA formula",
        "+constants",
        "rel. error",
        "worst layer",
        "perplexity",
        "change",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in reports:
        before, after = math.exp(r.loss_before), math.exp(r.loss_after)
        table.add_row(
            r.method + (" + DQ" if r.double_quant else ""),
            f"{r.disk_bytes / 2**20:.1f} MiB",
            f"{r.memory_bytes / 2**20:.1f} MiB",
            f"{r.fp16_bytes / r.disk_bytes:.2f}x",
            f"{r.block_bits:.3f}",
            f"{r.paper_bits:.3f}",
            f"{r.stored_bits:.3f}",
            f"{r.mean_error:.4f}",
            f"{r.worst_layer.relative_error:.4f}",
            f"{before:.3f} → {after:.3f}",
            f"{100 * (after / before - 1):+.2f}%",
        )
    return table


def layer_kind_table(reports: list[QuantizeReport]) -> Table:
    table = Table(title="mean relative reconstruction error by layer kind", title_justify="left")
    table.add_column("layer")
    for r in reports:
        table.add_column(r.method + (" + DQ" if r.double_quant else ""), justify="right")
    groups = [layers_by_kind(r.layers) for r in reports]
    for kind in groups[0]:
        table.add_row(kind, *(f"{weighted_error(g[kind]):.4f}" for g in groups))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=None, help="where outputs go (temp dir)")
    parser.add_argument("--dtype", default="bfloat16", help="bnb: unquantized/compute dtype")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(2)
    console = Console(width=150)
    work = args.work or Path(tempfile.mkdtemp(prefix="lorakit-quantize-"))
    started = time.perf_counter()

    reports = []
    for method, double_quant in BNB:
        reports.append(
            quantize_model(
                MODEL,
                work / f"{method}{'-dq' if double_quant else ''}",
                method=method,
                double_quant=double_quant,
                dtype=args.dtype,
                data=args.data,
                overwrite=True,
            )
        )
    console.print(bnb_table(reports))
    console.print(layer_kind_table(reports))
    r = reports[1]
    console.print(
        f"parameters quantized: {r.quantized_parameters:,} of {r.parameters:,} "
        f"({100 * r.quantized_parameters / r.parameters:.1f}%; the tied embedding/head stays "
        f"{r.dtype}); fp16 size {r.fp16_bytes / 2**20:.1f} MiB; evaluated on "
        f"{r.eval_tokens:,} trained tokens of {args.data.name}"
    )
    console.print(
        f"double quantization saves {reports[0].block_bits - reports[1].block_bits:.3f} "
        "bits/param (nf4), QLoRA paper: ~0.37"
    )

    location = resolve_model(MODEL).location
    examples = load_eval_examples(args.data, load_tokenizer(location), 512)
    reference = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    fp32_loss = mean_token_nll(reference, examples, 4, load_tokenizer(location).pad_token_id)
    del reference
    table = Table(title=f"GGUF, {MODEL}, run in llama.cpp", title_justify="left")
    for column in (
        "type",
        "file",
        "bits/param",
        "perplexity",
        "change vs fp32",
        "greedy agreement",
        "identical prefix",
        "max |Δlogit|",
    ):
        table.add_column(column, justify="left" if column == "type" else "right")
    table.add_row(
        "transformers fp32", "", "", f"{math.exp(fp32_loss):.3f}", "", "", "", "", style="dim"
    )
    for gguf_type in GGUF:
        out = work / f"model-{gguf_type}.gguf"
        report = export_gguf(MODEL, out, gguf_type=gguf_type, overwrite=True)
        loss = gguf_mean_token_nll(out, examples)
        checks = verify_gguf(out, location, new_tokens=32)
        agree = sum(c.agreement for c in checks) / len(checks)
        prefixes = "/".join(str(c.identical_prefix) for c in checks)
        table.add_row(
            gguf_type,
            f"{report.file_bytes / 2**20:.1f} MiB",
            f"{report.bits_per_parameter:.2f}",
            f"{math.exp(loss):.3f}",
            f"{100 * (math.exp(loss) / math.exp(fp32_loss) - 1):+.2f}%",
            f"{100 * agree:.1f}%",
            f"{prefixes} of {checks[0].new_tokens}",
            f"{max(c.max_logit_diff for c in checks):.3f}",
        )
        assert all(c.same_prompt_tokens for c in checks), "llama.cpp tokenized a prompt differently"
    console.print(table)
    console.print(
        f"greedy agreement: llama.cpp's next-token choice given transformers' greedy "
        f"continuation, 3 prompts x 32 tokens; outputs in {work}; "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
