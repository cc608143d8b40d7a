"""Relay overhead: one training epoch, centralized vs the in-process chain (issue 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from clicooper.bench.common import interleaved, median, timed
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
    name: str = field(default="relay")

    @property
    def ratio(self) -> float:
        return median(self.chain_s) / median(self.centralized_s)

    def title(self) -> str:
        return (
            f"relay: one epoch, {self.n_train} samples, batch {self.batch_size}, {self.n_trainers} trainers"
        )

    def columns(self) -> list[str]:
        return ["mode", "epoch times (s)", "median (s)"]

    def rows(self) -> list[list[str]]:
        return [
            [m, ", ".join(f"{x:.2f}" for x in ts), f"{median(ts):.2f}"]
            for m, ts in (("centralized", self.centralized_s), ("in-process chain", self.chain_s))
        ]

    def notes(self) -> list[str]:
        return [f"ratio chain / centralized: {self.ratio:.3f} (target <= 1.10)"]


def chain_epoch(cfg: JobConfig, data: DatasetSplits, model: nn.Sequential | None = None) -> float:
    """Seconds for one training round of a freshly built chain (construction excluded)."""
    job = ChainJob(cfg, data, None, model=model)
    return timed(lambda: job.data_owner.train_round(0))


def bench_relay(cfg: JobConfig, data: DatasetSplits, repeats: int = 3) -> RelayBench:
    """Time one training epoch (evaluation excluded) `repeats` times for each mode, interleaved."""
    cfg = cfg.replace(training={"epochs": 1})
    times = interleaved(
        {
            "centralized": lambda: train_centralized(cfg, data)[0].epoch_times_s[0],
            "chain": lambda: chain_epoch(cfg, data),
        },
        repeats,
    )
    t = cfg.training
    return RelayBench(
        times["centralized"], times["chain"], len(data.train_x), t.batch_size, cfg.model.n_trainers
    )
