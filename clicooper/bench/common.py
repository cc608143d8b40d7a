"""What every benchmark shares: the result protocol, interleaved repeats, the job it times."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from clicooper.config import JobConfig, parse_config
from clicooper.data import DatasetSplits

# The undefended default job (issue 2 and 12's reference): small CNN, 3 trainers, plain chain.
PLAIN_JOB: dict = {
    "job": {"name": "bench"},
    "model": {"arch": "small-cnn", "n_trainers": 3},
    "training": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}
QUICK_SAMPLES = 256  # training samples in --quick mode: seconds, not minutes


class BenchResult(Protocol):
    """A benchmark's typed result: JSON for the record, rows for the printed table."""

    name: str

    def title(self) -> str: ...
    def columns(self) -> list[str]: ...
    def rows(self) -> list[list[str]]: ...
    def notes(self) -> list[str]: ...


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine_info() -> dict[str, Any]:
    """Where a figure was taken; `load_avg` says whether other work shared the machine."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def interleaved(variants: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each variant once per repeat, in turn, so that machine drift hits all of them alike."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            out[name].append(fn())
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_config(quick: bool, **sections: dict) -> JobConfig:
    """The plain default job for one timed epoch; `quick` takes a small subset."""
    cfg = parse_config(PLAIN_JOB)
    if quick:
        cfg = cfg.replace(data={"train_subset": QUICK_SAMPLES, "test_subset": 100})
    return cfg.replace(**sections) if sections else cfg


def to_json(result: object, started: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result dataclass as JSON, with the machine it ran on: `machine` as the run ends and, given
    `started` (`machine_info()` taken before the run), `machine_at_start`. A load average read at
    the end also counts the run's own processes; the one read at the start says whether other
    work shared the machine."""
    assert dataclasses.is_dataclass(result)
    at_start = {} if started is None else {"machine_at_start": started}
    return {"benchmark": result.name, **at_start, "machine": machine_info(), **dataclasses.asdict(result)}


def write_json(result: object, out_dir: Path, started: dict[str, Any] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.name}.json"
    path.write_text(json.dumps(to_json(result, started), indent=2, default=str) + "\n")
    return path


def epoch_of(data: DatasetSplits) -> int:
    return len(data.train_x)
