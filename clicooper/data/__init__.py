"""Datasets: the registry of built-in offline datasets and loaders for on-disk formats."""

from clicooper.data.loaders import DataFormatError, read_idx, safe_unpickle
from clicooper.data.registry import (
    DatasetInfo,
    DatasetSplits,
    DatasetUnavailable,
    available_datasets,
    fashion_search_path,
    load_dataset,
)

__all__ = [
    "DataFormatError",
    "DatasetInfo",
    "DatasetSplits",
    "DatasetUnavailable",
    "available_datasets",
    "fashion_search_path",
    "load_dataset",
    "read_idx",
    "safe_unpickle",
]
