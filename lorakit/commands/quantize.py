"""`lorakit quantize`: a model to 4 bits (bitsandbytes NF4/FP4, measured) or to a GGUF file for
llama.cpp (verified in llama.cpp on request). The backends are `lorakit.quantization.bnb` and
`lorakit.quantization.gguf`; this module checks which options go with which and prints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lorakit.errors import LorakitError

FORMATS = ("bnb", "gguf")


@dataclass(frozen=True)
class QuantizeOptions:
    model: str
    out: Path
    format: str = "bnb"
    method: str | None = None
    double_quant: bool | None = None
    blocksize: int | None = None
    type: str | None = None
    data: Path | None = None
    max_seq_len: int = 512
    dtype: str = "auto"
    verify: bool = False
    overwrite: bool = False


def quantize(options: QuantizeOptions, console: Console) -> None:
    if options.format == "bnb":
        quantize_bnb(options, console)
    elif options.format == "gguf":
        export_gguf(options, console)
    else:
        raise LorakitError(f"--format: {options.format!r} is not {' or '.join(FORMATS)}")


def quantize_bnb(options: QuantizeOptions, console: Console) -> None:
    from lorakit.quantization import bnb

    if options.type is not None or options.verify:
        raise LorakitError("--type and --verify apply to --format gguf")
    report = bnb.quantize_model(
        options.model,
        options.out,
        method=options.method or "nf4",
        double_quant=True if options.double_quant is None else options.double_quant,
        blocksize=options.blocksize or 64,
        dtype=options.dtype,
        data=options.data,
        max_seq_len=options.max_seq_len,
        overwrite=options.overwrite,
    )
    for table in bnb.report_tables(report):
        console.print(table)


def export_gguf(options: QuantizeOptions, console: Console) -> None:
    from lorakit.quantization import gguf

    given = [
        flag
        for flag, value in (
            ("--method", options.method),
            ("--double-quant", options.double_quant),
            ("--blocksize", options.blocksize),
            ("--data", options.data),
        )
        if value is not None
    ]
    if given:
        raise LorakitError(f"{', '.join(given)} apply to --format bnb; GGUF takes --type")
    out = options.out
    report = gguf.export_gguf(
        options.model, out, gguf_type=options.type or "f16", overwrite=options.overwrite
    )
    try:
        checks = gguf.verify_gguf(out, report.location) if options.verify else []
    except LorakitError:
        console.print(gguf.gguf_table(report, []))  # the file is written: say what it is
        raise
    console.print(gguf.gguf_table(report, checks))
