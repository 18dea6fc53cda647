"""Read datasets into rows, remembering where each row came from for error messages.

A source is a file (.jsonl, .json, .csv, .parquet, .arrow, .txt), a folder of .txt files, a
folder written by `datasets`' `save_to_disk`, or a hub dataset id (online). JSON is read here,
line by line, so a malformed line is reported as `file:line`; the columnar formats and the hub
go through `datasets`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.files import hash_file_into, looks_like_hub_id

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str
    """`file:line N` (jsonl) or `file: row N`, for one-line error messages."""


def read_rows(path: str, split: str = "train", name: str | None = None) -> list[Row]:
    """Every row of one source, in order; an empty source is an error."""
    source = Path(path).expanduser()
    if source.is_dir():
        rows = _read_folder(source, path, split)
    elif source.is_file():
        rows = _read_file(source, path)
    elif looks_like_hub_dataset(path):
        rows = _rows_of(_load_hub(path, split, name), path)
    else:
        raise LorakitError(f"{path}: dataset file not found")
    if not rows:
        raise LorakitError(f"{path}: the dataset is empty")
    return rows


def looks_like_hub_dataset(path: str) -> bool:
    """`owner/name` that is not a missing local file such as `data/train.jsonl`."""
    return looks_like_hub_id(path) and Path(path).suffix.lower() not in SUPPORTED_SUFFIXES


def source_fingerprint(path: str, split: str = "train", name: str | None = None) -> str:
    """A digest of the source's content: file bytes, every file of a folder, or the fingerprint
    `datasets` keeps for a hub dataset. Equal digests mean equal rows."""
    source = Path(path).expanduser()
    digest = hashlib.sha256()
    if source.is_file():
        hash_file_into(digest, source)
    elif source.is_dir():
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(source)).encode() + b"\0")
            hash_file_into(digest, file)
    elif looks_like_hub_dataset(path):
        digest.update(_load_hub(path, split, name)._fingerprint.encode())
    else:
        raise LorakitError(f"{path}: dataset file not found")
    return digest.hexdigest()


def _read_file(file: Path, path: str) -> list[Row]:
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(file)
    if suffix == ".json":
        return _read_json(file)
    if suffix == ".txt":
        return [Row({"text": read_text(file)}, str(file))]
    if suffix == ".csv":
        return _read_csv(file)
    if suffix in (".parquet", ".arrow"):
        return _rows_of(_read_table(file, suffix), str(file))
    raise LorakitError(
        f"{path}: unsupported dataset file type (use {', '.join(SUPPORTED_SUFFIXES)}, "
        "a folder of .txt files, or a folder written by save_to_disk)"
    )


def _read_folder(folder: Path, path: str, split: str) -> list[Row]:
    if any((folder / name).is_file() for name in _SAVED_DATASET_FILES):
        return _rows_of(_load_saved(folder, path, split), path)
    texts = sorted(folder.rglob("*.txt"))
    if not texts:
        raise LorakitError(
            f"{path}: the folder holds neither .txt files nor a dataset written by save_to_disk"
        )
    return [Row({"text": read_text(file)}, str(file)) for file in texts]


def read_text(file: Path) -> str:
    """A text file's contents as UTF-8, a leading byte-order mark dropped (Excel and Windows
    editors write one). Anything else is one error line naming the line and column."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw.count(b"\n", 0, exc.start) + 1
        raise LorakitError(
            f"{file}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
            f"{exc.start - start + 1}); re-save the file as UTF-8"
        ) from None


def _read_jsonl(file: Path) -> list[Row]:
    rows = []
    # Split at \n only: JSON strings may hold U+2028 and other characters str.splitlines() cuts.
    for number, line in enumerate(read_text(file).split("\n"), start=1):
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


def _read_csv(file: Path) -> list[Row]:
    """A CSV file with a header row; each record is checked against the header, so a stray
    comma is an error at its line instead of a silently shifted row."""
    reader = csv.reader(io.StringIO(read_text(file), newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        if len(set(header)) != len(header) or not all(name.strip() for name in header):
            raise LorakitError(f"{file}:1: the header needs distinct, non-empty column names")
        rows = []
        start = reader.line_num + 1
        for record in reader:
            if record:
                if len(record) != len(header):
                    raise LorakitError(
                        f"{file}:{start}: {len(record)} field(s) where the header has "
                        f"{len(header)} (quote values that hold a comma)"
                    )
                rows.append(Row(dict(zip(header, record, strict=True)), f"{file}:{start}"))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise LorakitError(f"{file}:{reader.line_num}: malformed CSV: {exc}") from None
    return rows


def _read_json(file: Path) -> list[Row]:
    try:
        value = json.loads(read_text(file))
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{file}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise LorakitError(f"{file}: a .json dataset must be a list of objects")
    return [Row(v, f"{file}: row {i}") for i, v in enumerate(value, start=1)]


def _read_table(file: Path, suffix: str):
    from datasets import Dataset

    # `datasets` logs the reader's failure besides raising it: the error line says it once.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        if suffix == ".arrow":
            return _read_arrow(file)
        return Dataset.from_parquet(str(file), keep_in_memory=True)
    except Exception as exc:  # the readers raise many types; the user needs the first line
        # DatasetGenerationError wraps the reader's own error, which says what is wrong.
        raise LorakitError(f"{file}: cannot read: {_first_line(exc.__cause__ or exc)}") from None
    finally:
        logger.setLevel(level)


def _read_arrow(file: Path):
    """An Arrow stream (what `datasets` writes) or an Arrow IPC file."""
    import pyarrow as pa
    from datasets import Dataset

    try:
        return Dataset.from_file(str(file), in_memory=True)
    except Exception:  # not a stream: try the random-access file format
        with pa.memory_map(str(file)) as source:
            return Dataset(pa.ipc.open_file(source).read_all())


def _load_saved(folder: Path, path: str, split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        saved = load_from_disk(str(folder), keep_in_memory=True)
    except Exception as exc:
        raise LorakitError(f"{path}: cannot read the saved dataset: {_first_line(exc)}") from None
    if isinstance(saved, DatasetDict):
        if split not in saved:
            raise LorakitError(
                f"{path}: no split {split!r} (it has {', '.join(saved)}); set split:"
            )
        return saved[split]
    return saved


def _load_hub(path: str, split: str, name: str | None):
    from datasets import load_dataset

    try:
        return load_dataset(path, name=name, split=split)
    except Exception as exc:
        raise LorakitError(
            f"{path}: cannot load the hub dataset (offline, or not a dataset id?): "
            f"{_first_line(exc)}"
        ) from None


def _rows_of(table, path: str) -> list[Row]:
    return [Row(v, f"{path}: row {i}") for i, v in enumerate(table.to_list(), start=1)]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
