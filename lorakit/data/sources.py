"""Read datasets into rows, remembering where each row came from for error messages.

A source is a file (.jsonl, .json, .csv, .parquet, .arrow, .txt), a folder of .txt files, a
folder written by `datasets`' `save_to_disk`, or a hub dataset id (online). JSON is read here,
line by line, so a malformed line is reported as `file:line`; the columnar formats and the hub
go through `datasets`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.models import hash_file_into, looks_like_hub_id

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
        return [Row({"text": file.read_text(encoding="utf-8")}, str(file))]
    if suffix in (".csv", ".parquet", ".arrow"):
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
    return [Row({"text": file.read_text(encoding="utf-8")}, str(file)) for file in texts]


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


def _read_table(file: Path, suffix: str):
    from datasets import Dataset

    try:
        if suffix == ".arrow":
            return _read_arrow(file)
        reader = Dataset.from_csv if suffix == ".csv" else Dataset.from_parquet
        return reader(str(file), keep_in_memory=True)
    except Exception as exc:  # the readers raise many types; the user needs the first line
        raise LorakitError(f"{file}: cannot read: {_first_line(exc)}") from None


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
