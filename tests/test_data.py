"""Data loaders on tiny files written here, the built-ins, and the errors users will meet."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clicooper.data import (
    DatasetSplits,
    DatasetUnavailable,
    UnsafePickleError,
    available_datasets,
    load_dataset,
    loaders,
    read_idx,
    restricted_load,
)

# -------------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_idx(folder: Path, *, gz: bool, sep: str = "-", n_train: int = 20, n_test: int = 10) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 5, 4), dtype=np.uint8)
        y = (np.arange(n) % 3).astype(np.uint8)
        arrays[stem] = (x, y)
        for kind, arr, rank in (("images", x, 3), ("labels", y, 1)):
            name = f"{stem}-{kind}{sep}idx{rank}-ubyte"
            data = _idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return arrays


def _cifar_dict(n: int, label_key: str, k: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "batch_label": "tiny",
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in np.arange(n) % k],
        "filenames": [f"img{i}.png" for i in range(n)],
    }


def _dump(obj: object, path: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


# -------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize(("gz", "sep"), [(True, "-"), (False, "-"), (False, "."), (True, ".")])
def test_idx_folder_gz_and_plain(tmp_path: Path, gz: bool, sep: str) -> None:
    arrays = _write_idx(tmp_path, gz=gz, sep=sep)
    d = load_dataset("idx", tmp_path)
    assert d.train_x.shape == (20, 1, 5, 4) and d.test_x.shape == (10, 1, 5, 4)
    assert d.input_shape == (1, 5, 4) and d.num_classes == 3
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    np.testing.assert_allclose(d.train_x[:, 0].numpy(), arrays["train"][0] / 255.0, rtol=1e-6)
    assert d.test_y.tolist() == arrays["t10k"][1].tolist()


def test_read_idx_parses_big_endian_header(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    wide = np.array([1, -2, 300], dtype=">i4")
    (tmp_path / "b").write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + wide.tobytes())
    assert read_idx(tmp_path / "b").tolist() == [1, -2, 300]


def test_corrupt_idx_rejected(tmp_path: Path) -> None:
    _write_idx(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-7])  # truncated payload
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated or corrupt"):
        load_dataset("idx", tmp_path)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="10 images but .* 4 labels"):
        load_dataset("idx", tmp_path)


# -------------------------------------------------------------------------------- CIFAR


def test_cifar10_batches(tmp_path: Path) -> None:
    for i in (1, 2):
        _dump(_cifar_dict(6, "labels", 10, seed=i), tmp_path / f"data_batch_{i}")
    test = _cifar_dict(4, "labels", 10, seed=9)
    _dump(test, tmp_path / "test_batch")
    names = [f"c{i}" for i in range(10)]
    _dump({"label_names": names, "num_cases_per_batch": 6}, tmp_path / "batches.meta")
    d = load_dataset("cifar10", tmp_path)
    assert d.train_x.shape == (12, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.num_classes == 10 and d.class_names == tuple(names)
    expect = test["data"].reshape(4, 3, 32, 32) / 255.0
    np.testing.assert_allclose(d.test_x.numpy(), expect, rtol=1e-6)


def test_cifar10_bytes_keys_and_protocol5(tmp_path: Path) -> None:
    """Python 2 pickles come back with bytes keys; numpy's protocol-5 path uses _frombuffer."""
    for name in ("data_batch_1", "test_batch"):
        b = _cifar_dict(3, "labels", 10, seed=1)
        _dump({k.encode(): v for k, v in b.items()}, tmp_path / name, protocol=5)
    d = load_dataset("cifar10", tmp_path)
    assert d.train_x.shape == (3, 3, 32, 32) and d.class_names is None


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"  # the parent folder is accepted too
    root.mkdir()
    _dump(_cifar_dict(5, "fine_labels", 100, seed=1) | {"coarse_labels": [0] * 5}, root / "train")
    _dump(_cifar_dict(3, "fine_labels", 100, seed=2) | {"coarse_labels": [0] * 3}, root / "test")
    _dump({"fine_label_names": [f"f{i}" for i in range(100)]}, root / "meta")
    d = load_dataset("cifar100", tmp_path)
    assert d.num_classes == 100 and d.train_y.tolist() == [0, 1, 2, 3, 4]
    assert d.class_names is not None and d.class_names[99] == "f99"


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    _dump({"data": _Evil(), "labels": [0]}, tmp_path / "data_batch_1")
    _dump(_cifar_dict(2, "labels", 10, seed=0), tmp_path / "test_batch")
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os|nt)\.system"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "evil2").write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_load(tmp_path / "evil2")


def test_cifar_wrong_shape_rejected(tmp_path: Path) -> None:
    _dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, tmp_path / "data_batch_1")
    _dump(_cifar_dict(2, "labels", 10, seed=0), tmp_path / "test_batch")
    with pytest.raises(ValueError, match=r"data_batch_1.*\(N, 3072\)"):
        load_dataset("cifar10", tmp_path)


# -------------------------------------------------------------------------------- image folder


def _png(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, colour).save(path)


def test_image_folder_grey_split_here(tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        for i in range(5):
            _png(tmp_path / c / f"{i}.png", (6, 4), "L", 40 * i)
    d = load_dataset("image-folder", tmp_path, test_fraction=0.4, seed=1)
    assert d.input_shape == (1, 4, 6) and d.class_names == ("cat", "dog")
    assert len(d.train_y) == 6 and len(d.test_y) == 4
    assert torch.bincount(d.test_y).tolist() == [2, 2]  # stratified
    assert float(d.train_x.min()) >= 0.0 and float(d.train_x.max()) <= 1.0


def test_image_folder_rgb_train_test(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 1)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.jpg", (5, 5), "RGB", 200)
    d = load_dataset("image-folder", tmp_path)
    assert d.train_x.shape == (6, 3, 5, 5) and d.test_x.shape == (2, 3, 5, 5)
    assert abs(float(d.train_x[0, 0, 0, 0]) - 200 / 255) < 0.05  # R channel first


def test_image_folder_size_mismatch(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "0.png", (4, 4), "L", 0)
    _png(tmp_path / "b" / "0.png", (5, 4), "L", 0)
    with pytest.raises(ValueError, match=r"b/0\.png is 5x4 .* same size"):
        load_dataset("image-folder", tmp_path)


# -------------------------------------------------------------------------------- CSV and NPZ


def test_csv_label_column_and_standardisation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["f1,label,f2"] + [f"{rng.normal(5, 2):.4f},{['10', '2', '7'][i % 3]},{i}" for i in range(30)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    d = load_dataset("csv", tmp_path / "t.csv", seed=3)
    assert d.input_shape == (2,) and d.num_classes == 3
    assert d.class_names == ("2", "7", "10")  # numeric order, not string order
    np.testing.assert_allclose(d.train_x.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.train_x.std(0, unbiased=False).numpy(), 1.0, atol=1e-4)


def test_csv_last_column_and_bad_cell(tmp_path: Path) -> None:
    rows = ["a,b,cls"] + [f"{i},{i * 2},{'xy'[i % 2]}" for i in range(10)]
    (tmp_path / "ok.csv").write_text("\n".join(rows))
    d = load_dataset("csv", tmp_path / "ok.csv")
    assert d.class_names == ("x", "y") and d.input_shape == (2,)
    (tmp_path / "bad.csv").write_text("a,label\n1,0\nnan,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3, column 'a': NaN"):
        load_dataset("csv", tmp_path / "bad.csv")
    (tmp_path / "txt.csv").write_text("a,label\n1,0\nhello,1\n")
    with pytest.raises(ValueError, match="'hello' is not a number"):
        load_dataset("csv", tmp_path / "txt.csv")


def test_npz_both_key_styles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7))
    y = np.arange(40) % 4
    np.savez(tmp_path / "one.npz", x=x, y=y)
    d = load_dataset("npz", tmp_path / "one.npz", test_fraction=0.25)
    assert d.input_shape == (7,) and len(d.train_y) == 30 and d.num_classes == 4
    imgs = rng.integers(0, 256, size=(8, 6, 6, 3), dtype=np.uint8)  # NHWC -> NCHW
    np.savez(tmp_path / "two.npz", x_train=imgs, y_train=np.arange(8) % 2, x_test=imgs[:2], y_test=[0, 1])
    d2 = load_dataset("npz", tmp_path / "two.npz")
    assert d2.train_x.shape == (8, 3, 6, 6) and d2.test_y.tolist() == [0, 1]
    np.testing.assert_allclose(d2.train_x[1, 2].numpy(), imgs[1, :, :, 2] / 255.0, rtol=1e-6)


def test_npz_validation(tmp_path: Path) -> None:
    np.savez(tmp_path / "nan.npz", x=np.array([[np.nan, 1.0]] * 4), y=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"nan\.npz 'x'.*NaN"):
        load_dataset("npz", tmp_path / "nan.npz")
    np.savez(tmp_path / "lab.npz", x=np.ones((4, 2)), y=[0.5, 1, 0, 1])
    with pytest.raises(ValueError, match="labels must be integers"):
        load_dataset("npz", tmp_path / "lab.npz")
    np.savez(tmp_path / "keys.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="expected keys"):
        load_dataset("npz", tmp_path / "keys.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=[0])
    with pytest.raises(ValueError, match="object arrays"):
        load_dataset("npz", tmp_path / "obj.npz")


# -------------------------------------------------------------------------------- registry errors


@pytest.mark.parametrize("fmt", ["idx", "cifar10", "cifar100", "image-folder", "csv", "npz"])
def test_format_without_path_says_so(fmt: str) -> None:
    with pytest.raises(ValueError, match=f"'{fmt}' needs a path"):
        load_dataset(fmt)


def test_missing_path_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("idx", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*fashion-mnist"):
        load_dataset("imagenet")


def test_available_datasets_lists_all() -> None:
    infos = {i.name: i for i in available_datasets()}
    assert {"fashion-mnist", "mnist-5k", "digits", "breast-cancer", "idx", "cifar10", "cifar100",
            "image-folder", "csv", "npz"} <= set(infos)  # fmt: skip
    assert infos["fashion-mnist"].kind == "builtin" and not infos["fashion-mnist"].requires_path
    assert infos["csv"].kind == "format" and infos["csv"].requires_path
    assert "apt-get" in infos["fashion-mnist"].how_to_get


def test_fashion_unavailable_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist", empty)
    assert "scripts/setup.sh" in str(e.value) and "dpkg-deb -x" in str(e.value)
    monkeypatch.setattr(loaders, "SYSTEM_DATASETS_DIR", tmp_path / "no-system")
    monkeypatch.setenv("CLICOOPER_DATA_DIR", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DatasetUnavailable, match=r"empty/fashion-mnist.*scripts/setup\.sh"):
        load_dataset("fashion-mnist")


def test_fashion_found_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path / "fashion-mnist", gz=True, n_train=20, n_test=10)
    monkeypatch.setattr(loaders, "SYSTEM_DATASETS_DIR", tmp_path / "no-system")
    monkeypatch.setenv("CLICOOPER_DATA_DIR", str(tmp_path))
    (tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes((np.arange(20) % 10).astype(np.uint8)))
    )
    d = load_dataset("fashion-mnist")
    assert d.num_classes == 10 and d.class_names is not None and d.class_names[0] == "T-shirt/top"


# -------------------------------------------------------------------------------- built-ins


def test_digits_and_breast_cancer() -> None:
    dg = load_dataset("digits", seed=0)
    assert dg.input_shape == (1, 8, 8) and dg.num_classes == 10
    assert len(dg.train_y) + len(dg.test_y) == 1797
    assert float(dg.train_x.min()) == 0.0 and float(dg.train_x.max()) == 1.0
    bc = load_dataset("breast_cancer", seed=0)  # underscores are accepted
    assert bc.input_shape == (30,) and bc.num_classes == 2 and len(bc.train_y) + len(bc.test_y) == 569
    np.testing.assert_allclose(bc.train_x.mean(0).numpy(), 0.0, atol=1e-5)
    again = load_dataset("digits", seed=0)
    assert torch.equal(dg.test_y, again.test_y)
    assert not torch.equal(dg.test_y, load_dataset("digits", seed=1).test_y)


def test_mnist_5k() -> None:
    d = load_dataset("mnist-5k")
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert torch.bincount(d.test_y).tolist() == [100] * 10


def test_fashion_mnist_full() -> None:
    try:
        d = load_dataset("fashion-mnist")
    except DatasetUnavailable:
        pytest.skip("Fashion-MNIST is not installed here")
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and len(d.class_names or ()) == 10
    assert d.train_x.dtype == torch.float32 and 0.0 <= float(d.test_x.min()) <= float(d.test_x.max()) <= 1.0


# -------------------------------------------------------------------------------- subset


def test_subset_deterministic_and_balanced() -> None:
    d = load_dataset("digits")
    a, b = d.subset(100, 30, seed=5), d.subset(100, 30, seed=5)
    assert len(a.train_y) == 100 and len(a.test_y) == 30
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_y, d.subset(100, 30, seed=6).train_y)
    counts = torch.bincount(a.train_y, minlength=10)
    assert int(counts.min()) >= 9 and int(counts.max()) <= 11  # each class keeps its share
    whole = d.subset(None, 10**9)
    assert len(whole.train_y) == len(d.train_y) and len(whole.test_y) == len(d.test_y)
    with pytest.raises(ValueError, match="n_train must be positive"):
        d.subset(0, None)


def test_splits_validate_shapes() -> None:
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        DatasetSplits(
            "t", x, torch.zeros(3, dtype=torch.int64), x, torch.zeros(4, dtype=torch.int64), 2, (4,)
        )
