"""Datasets: built-ins (Fashion-MNIST by default) and on-disk formats, loaded by name."""

from clicooper.data.loaders import (
    DatasetSplits,
    DatasetUnavailable,
    RestrictedUnpickler,
    UnsafePickleError,
    read_idx,
    restricted_load,
)
from clicooper.data.registry import DEFAULT_DATASET, DatasetInfo, available_datasets, load_dataset

__all__ = [
    "DEFAULT_DATASET",
    "DatasetInfo",
    "DatasetSplits",
    "DatasetUnavailable",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "available_datasets",
    "load_dataset",
    "read_idx",
    "restricted_load",
]
