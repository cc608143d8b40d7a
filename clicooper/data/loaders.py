"""Loaders for standard on-disk formats: MNIST IDX, CIFAR-10/100 python batches, image
folders, CSV and NPZ. Every loader validates what it reads and names the file at fault.

CIFAR batches are pickles. They are read with a restricted unpickler that can build
only plain containers and numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import csv
import gzip
import io
import pickle
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file and the problem."""


def _open(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic, big-endian dims, then the data."""
    path = Path(path)
    raw = _open(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataFormatError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(f"{path}: header says {dims} ({expected} bytes), file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            p = folder / f"{stem.replace('|', sep)}{suffix}"
            if p.exists():
                return p
    raise FileNotFoundError(f"{folder}: no {stem.replace('|', '-')}[.gz] (or with '.') found")


def load_idx_folder(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four MNIST-style files: train/t10k images and labels."""
    folder = Path(folder)
    out = []
    for split in ("train", "t10k"):
        x = read_idx(_find(folder, f"{split}-images|idx3-ubyte"))
        y = read_idx(_find(folder, f"{split}-labels|idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataFormatError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match")
        out += [x, y]
    return out[0], out[1], out[2], out[3]


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only numpy arrays and dtypes (plus plain Python containers, which need no lookup)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def safe_unpickle(path: Path) -> object:
    try:
        return _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataFormatError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error
        raise DataFormatError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None


def _key(d: dict, name: str):
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise KeyError(name)


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path)
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: expected a dict, got {type(d).__name__}")
    try:
        x, y = np.asarray(_key(d, "data")), np.asarray(_key(d, label_key))
    except KeyError as e:
        raise DataFormatError(f"{path}: missing key {e}") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataFormatError(f"{path}: data {x.shape} / labels {y.shape} are not CIFAR-shaped (N x 3072)")
    return x.reshape(-1, 3, 32, 32).astype(np.uint8), y.astype(np.int64)


def load_cifar(
    folder: str | Path, variant: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = Path(folder)
    if variant == 10:
        parts = [
            _cifar_batch(folder / f"data_batch_{i}", "labels")
            for i in range(1, 6)
            if (folder / f"data_batch_{i}").exists()
        ]
        if not parts:
            raise FileNotFoundError(f"{folder}: no data_batch_1..5")
        xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        xte, yte = _cifar_batch(folder / "test_batch", "labels")
    else:
        xtr, ytr = _cifar_batch(folder / "train", "fine_labels")
        xte, yte = _cifar_batch(folder / "test", "fine_labels")
    return xtr, ytr, xte, yte


def load_image_folder(folder: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """root/<class>/<image>; all images must share one size. Greyscale stays 1 channel."""
    from PIL import Image

    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataFormatError(f"{folder}: no class sub-folders")
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                arr = np.asarray(im.convert("L") if im.mode in ("L", "1", "I;16") else im.convert("RGB"))
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if xs and arr.shape != xs[0].shape:
                raise DataFormatError(
                    f"{f}: size {arr.shape} differs from {xs[0].shape}; resize images first"
                )
            xs.append(arr)
            ys.append(ci)
    if not xs:
        raise DataFormatError(f"{folder}: no images")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def load_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Header row; label column named `label` (else the last); numeric features."""
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DataFormatError(f"{path}: needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    li = header.index("label") if "label" in header else len(header) - 1
    try:
        x = np.array([[float(v) for j, v in enumerate(r) if j != li] for r in body], dtype=np.float32)
    except ValueError as e:
        raise DataFormatError(f"{path}: non-numeric feature ({e})") from None
    if x.ndim != 2 or x.shape[1] != len(header) - 1:
        raise DataFormatError(f"{path}: rows have inconsistent lengths")
    names = sorted({r[li] for r in body})
    y = np.array([names.index(r[li]) for r in body], dtype=np.int64)
    return x, y, names


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        if {"x", "y"} <= keys:
            return {"x": z["x"], "y": z["y"]}
    raise DataFormatError(
        f"{path}: expected keys x, y or x_train, y_train, x_test, y_test; found {sorted(keys)}"
    )
