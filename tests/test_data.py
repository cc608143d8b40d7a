"""Loaders on tiny files the tests write; the registry's built-ins; clear errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from clicooper.data import DataFormatError, DatasetUnavailable, load_dataset, read_idx
from clicooper.data import registry as reg


def _idx_bytes(arr: np.ndarray) -> bytes:
    return (
        struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
        + b"".join(struct.pack(">I", d) for d in arr.shape)
        + arr.tobytes()
    )


def _write_idx_folder(folder, gz: bool, sep: str = "-"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        x = rng.integers(0, 256, (n, 4, 4), dtype=np.uint8)
        y = (np.arange(n) % 3).astype(np.uint8)
        for kind, arr, dims in (("images", x, "idx3"), ("labels", y, "idx1")):
            name = f"{split}-{kind}{sep}{dims}-ubyte" + (".gz" if gz else "")
            data = _idx_bytes(arr)
            (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return folder


@pytest.mark.parametrize(("gz", "sep"), [(True, "-"), (False, "."), (False, "-")])
def test_idx_folder(tmp_path, gz, sep):
    d = load_dataset("idx", _write_idx_folder(tmp_path / "d", gz, sep))
    assert d.train_x.shape == (12, 1, 4, 4) and d.test_x.shape == (6, 1, 4, 4)
    assert d.train_x.dtype == torch.float32 and float(d.train_x.min()) >= 0 and float(d.train_x.max()) <= 1
    assert d.num_classes == 3 and d.train_y.dtype == torch.int64


def test_corrupt_idx_is_rejected(tmp_path):
    p = tmp_path / "bad-idx1-ubyte"
    p.write_bytes(_idx_bytes(np.zeros(10, dtype=np.uint8))[:-3])
    with pytest.raises(DataFormatError, match="header says"):
        read_idx(p)
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataFormatError, match="magic"):
        read_idx(p)


def _cifar_dict(n: int, label_key: str, k: int) -> dict:
    rng = np.random.default_rng(1)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key.encode(): list(np.arange(n) % k),
    }


def test_cifar10_and_cifar100(tmp_path):
    c10 = tmp_path / "c10"
    c10.mkdir()
    for i in range(1, 6):
        (c10 / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_dict(4, "labels", 10)))
    (c10 / "test_batch").write_bytes(pickle.dumps(_cifar_dict(5, "labels", 10)))
    d = load_dataset("cifar10", c10)
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (5, 3, 32, 32)
    c100 = tmp_path / "c100"
    c100.mkdir()
    (c100 / "train").write_bytes(pickle.dumps(_cifar_dict(8, "fine_labels", 100)))
    (c100 / "test").write_bytes(pickle.dumps(_cifar_dict(3, "fine_labels", 100)))
    assert load_dataset("cifar100", c100).train_x.shape == (8, 3, 32, 32)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/clicooper_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    c10 = tmp_path / "evil"
    c10.mkdir()
    (c10 / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    (c10 / "test_batch").write_bytes(pickle.dumps(_cifar_dict(2, "labels", 10)))
    with pytest.raises(DataFormatError, match="refusing to load"):
        load_dataset("cifar10", c10)
    assert not os.path.exists("/tmp/clicooper_pwned")


def test_image_folder_split_and_presplit(tmp_path):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((6, 6, 3), i * 40 + (c == "dog") * 10, dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    d = load_dataset("image-folder", root, test_fraction=0.4)
    assert d.train_x.shape[1:] == (3, 6, 6) and len(d.train_x) + len(d.test_x) == 10
    assert d.class_names == ("cat", "dog")
    pre = tmp_path / "pre"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (pre / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(pre / split / c / "x.png")
    g = load_dataset("image-folder", pre)
    assert g.train_x.shape == (2, 1, 5, 5)
    Image.fromarray(np.zeros((7, 7), dtype=np.uint8)).save(pre / "train" / "a" / "y.png")
    with pytest.raises(DataFormatError, match="differs"):
        load_dataset("image-folder", pre)


def test_csv_and_npz(tmp_path):
    f = tmp_path / "t.csv"
    rows = ["f1,f2,label"] + [f"{i},{i * 2 % 7},{'yes' if i % 2 else 'no'}" for i in range(20)]
    f.write_text("\n".join(rows))
    d = load_dataset("csv", f)
    assert d.input_shape == (2,) and d.num_classes == 2 and d.class_names == ("no", "yes")
    assert abs(float(d.train_x.mean())) < 1e-5  # standardised with train statistics
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\nx,1\n")
    with pytest.raises(DataFormatError, match="non-numeric"):
        load_dataset("csv", bad)
    n1 = tmp_path / "a.npz"
    np.savez(n1, x=np.random.rand(20, 3), y=np.arange(20) % 2)
    assert load_dataset("npz", n1).input_shape == (3,)
    n2 = tmp_path / "b.npz"
    np.savez(
        n2,
        x_train=np.random.rand(6, 1, 4, 4),
        y_train=np.arange(6) % 2,
        x_test=np.random.rand(2, 1, 4, 4),
        y_test=np.arange(2),
    )
    assert load_dataset("npz", n2).test_x.shape == (2, 1, 4, 4)
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((10, 2), np.nan), y=np.arange(10) % 2)
    with pytest.raises(DataFormatError, match="NaN"):
        load_dataset("npz", nan)


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("npz", tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(reg, "fashion_search_path", lambda: [tmp_path / "empty"])
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_builtins_and_subset():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10 and float(d.train_x.max()) <= 1.0
    b = load_dataset("breast-cancer")
    assert b.input_shape == (30,) and b.num_classes == 2
    s1, s2 = d.subset(100, 50, seed=3), d.subset(100, 50, seed=3)
    assert len(s1.train_x) == 100 and len(s1.test_x) == 50 and torch.equal(s1.train_x, s2.train_x)


def test_fashion_mnist_full():
    try:
        d = load_dataset("fashion-mnist")
    except DatasetUnavailable:
        pytest.skip("Fashion-MNIST is not installed (scripts/setup.sh installs it)")
    assert len(d.train_x) == 60000 and len(d.test_x) == 10000 and d.input_shape == (1, 28, 28)
    assert d.class_names[9] == "Ankle boot"
