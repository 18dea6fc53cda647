"""Data: files → rows → formatted segments → tokens with a label mask → batches.

The names below are loaded on first use, so that the recipe schema can read the format registry
(`lorakit.data.formats`) without importing the whole pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IGNORE_INDEX": "lorakit.data.formats",
    "Example": "lorakit.data.pipeline",
    "PreparedData": "lorakit.data.pipeline",
    "prepare_data": "lorakit.data.pipeline",
    "collate": "lorakit.data.batching",
    "make_loader": "lorakit.data.batching",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
