"""Data: files → rows → formatted segments → tokens with a label mask → batches."""

from lorakit.data.batching import collate, make_loader
from lorakit.data.pipeline import IGNORE_INDEX, Example, PreparedData, prepare_data

__all__ = ["IGNORE_INDEX", "Example", "PreparedData", "collate", "make_loader", "prepare_data"]
