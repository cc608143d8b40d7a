"""Shared fixtures: tiny real datasets built directly (independent of the loaders under test)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from clicooper.config import JobConfig, parse_config
from clicooper.data import DatasetSplits

# One intra-op thread: the tests' tensors are small, and on a busy 2-core machine OpenMP threads
# waiting on each other made the suite 20-40x slower in CPU time (measured).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> DatasetSplits:
    """sklearn's 8x8 digits as 1x8x8 images in [0,1]: 1,200 train / 400 test."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1200], perm[1200:1600]
    return DatasetSplits("digits", x[tr], y[tr], x[te], y[te], 10, (1, 8, 8))


def tiny_config(**sections: dict) -> JobConfig:
    base = {
        "job": {"name": "t", "seed": 0},
        "data": {"dataset": "digits"},
        "model": {"arch": "small-cnn", "n_trainers": 3},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.05, "eval_batch_size": 200},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return parse_config(base)


def copy_run(src: Path, tmp_path: Path) -> Path:
    """A private copy of a finished run folder, for a test that damages it."""
    d = tmp_path / "run"
    shutil.copytree(src, d)
    return d


@pytest.fixture
def large_buffers(monkeypatch):
    """A fresh cache of large encoding buffers (`allocator.byte_buffer`), on, from 1 KiB up."""
    from clicooper import allocator

    monkeypatch.setattr(allocator, "MMAP_THRESHOLD", 1024)
    cache = allocator._LargeBuffers(keep=2)
    cache.enabled = True
    monkeypatch.setattr(allocator, "_LARGE", cache)
    return cache
