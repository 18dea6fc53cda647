"""The tokenization cache: one entry per dataset, under `<cache root>/data/<key>/`.

The key is a digest of everything the tokenized examples depend on: the source's content
(file bytes, folder files, or the hub dataset's `datasets` fingerprint), the dataset entry
(path, format, columns, split), the data settings that shape tokens and labels (`max_seq_len`,
`train_on`, `strict`), the tokenizer (vocabulary, merges, special tokens, chat template) and the
lorakit version. Any change gives a new key, so a stale entry is never read. Weights, the
validation split and packing run after the cache, so changing them reuses it.

An entry is three flat int arrays (.npy, read without pickle) and the dataset's statistics
(JSON), written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

import lorakit
from lorakit.files import atomic_dir, cache_root

CACHE_FORMAT = 1
UNUSED_DAYS = 30
"""Entries not read for this long are removed when a new one is written."""


def cache_dir() -> Path:
    return cache_root() / "data"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode())
    digest.update(str(tokenizer.chat_template).encode())
    return digest.hexdigest()


def entry_key(**parts: Any) -> str:
    """A digest of JSON-serializable parts (plus the lorakit version and cache format)."""
    payload = {"lorakit": lorakit.__version__, "format": CACHE_FORMAT, **parts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load(key: str) -> tuple[list[list[int]], list[list[int]], dict[str, Any]] | None:
    """(input_ids per example, labels per example, stats) or None on a miss."""
    entry = cache_dir() / key
    try:
        stats = json.loads((entry / "stats.json").read_text(encoding="utf-8"))
        ids = np.load(entry / "input_ids.npy", allow_pickle=False)
        labels = np.load(entry / "labels.npy", allow_pickle=False)
        offsets = np.load(entry / "offsets.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    os.utime(entry / "stats.json")  # marks the entry as used, for pruning
    bounds = offsets.tolist()
    ids_list, labels_list = ids.tolist(), labels.tolist()
    return (
        [ids_list[a:b] for a, b in zip(bounds, bounds[1:], strict=False)],
        [labels_list[a:b] for a, b in zip(bounds, bounds[1:], strict=False)],
        stats,
    )


def store(key: str, input_ids: list[list[int]], labels: list[list[int]], stats: Any) -> None:
    """Write an entry atomically; a failure to write only costs the next run a re-tokenization."""
    root = cache_dir()
    try:
        with atomic_dir(root / key) as staging:
            offsets = np.cumsum([0] + [len(x) for x in input_ids], dtype=np.int64)
            total = int(offsets[-1])
            flat_ids = np.fromiter(chain.from_iterable(input_ids), np.int32, total)
            flat_labels = np.fromiter(chain.from_iterable(labels), np.int32, total)
            np.save(staging / "input_ids.npy", flat_ids)
            np.save(staging / "labels.npy", flat_labels)
            np.save(staging / "offsets.npy", offsets)
            record = asdict(stats) if hasattr(stats, "__dataclass_fields__") else stats
            (staging / "stats.json").write_text(json.dumps(record), encoding="utf-8")
    except OSError:
        return  # a read-only or full disk: the next run tokenizes again
    _prune(root, keep=key)


def _prune(root: Path, keep: str) -> None:
    cutoff = time.time() - UNUSED_DAYS * 86400
    for entry in root.iterdir():
        if entry.name == keep or entry.name.startswith("."):  # staging folders
            continue
        try:
            if (entry / "stats.json").stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue
