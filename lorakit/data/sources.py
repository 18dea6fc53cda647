"""Read dataset files into rows, remembering where each row came from for error messages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str
    """`file:line N` (jsonl) or `file: row N`, for one-line error messages."""


def read_rows(path: str) -> list[Row]:
    file = Path(path)
    if not file.is_file():
        raise LorakitError(f"{path}: dataset file not found")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(file)
    elif suffix == ".json":
        rows = _read_json(file)
    elif suffix in (".csv", ".parquet"):
        rows = _read_tabular(file, suffix)
    else:
        raise LorakitError(
            f"{path}: unsupported dataset file type (use {', '.join(SUPPORTED_SUFFIXES)})"
        )
    if not rows:
        raise LorakitError(f"{path}: the dataset is empty")
    return rows


def _read_jsonl(file: Path) -> list[Row]:
    rows = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LorakitError(f"{file}:{number}: malformed JSON: {exc.msg}") from None
            if not isinstance(value, dict):
                raise LorakitError(f"{file}:{number}: each line must be a JSON object")
            rows.append(Row(value, f"{file}:{number}"))
    return rows


def _read_json(file: Path) -> list[Row]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{file}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise LorakitError(f"{file}: a .json dataset must be a list of objects")
    return [Row(v, f"{file}: row {i}") for i, v in enumerate(value, start=1)]


def _read_tabular(file: Path, suffix: str) -> list[Row]:
    from datasets import Dataset

    reader = Dataset.from_csv if suffix == ".csv" else Dataset.from_parquet
    try:
        table = reader(str(file), keep_in_memory=True)
    except Exception as exc:  # the readers raise many types; the user needs the first line
        raise LorakitError(f"{file}: cannot read: {str(exc).splitlines()[0]}") from None
    return [Row(dict(v), f"{file}: row {i}") for i, v in enumerate(table, start=1)]
