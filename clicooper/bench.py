"""Benchmarks (not tests): epoch time of centralized training vs the in-process chain.

Runs are interleaved (centralized, chain, centralized, ...) so that machine drift
hits both alike; medians and their ratio are reported from one invocation.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.job import ChainJob, train_centralized


@dataclass
class RelayBench:
    centralized_s: list[float]
    chain_s: list[float]
    n_train: int
    batch_size: int
    n_trainers: int

    @property
    def ratio(self) -> float:
        return statistics.median(self.chain_s) / statistics.median(self.centralized_s)

    def machine(self) -> str:
        cpu = platform.processor() or platform.machine()
        return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def bench_relay(cfg: JobConfig, data: DatasetSplits, repeats: int = 3) -> RelayBench:
    """Time one training epoch (evaluation excluded) `repeats` times for each mode."""
    cfg = cfg.replace(training={"epochs": 1})
    central, chain = [], []
    for _ in range(repeats):
        summary, _ = train_centralized(cfg, data)
        central.append(summary.epoch_times_s[0])
        job = ChainJob(cfg, data, None)
        t0 = time.perf_counter()
        job.data_owner.train_round(0)
        chain.append(time.perf_counter() - t0)
    return RelayBench(central, chain, len(data.train_x), cfg.training.batch_size, cfg.model.n_trainers)
