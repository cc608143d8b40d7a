"""Relay overhead: one training epoch, centralized vs the in-process chain (issue 2), optionally at
several torch thread counts (the per-process thread setting, `job.threads`), all interleaved."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clicooper.bench.common import interleaved, median, timed
from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.job import ChainJob, train_centralized
from clicooper.transport import InProcTransport


@dataclass
class RelayBench:
    centralized_s: dict[int, list[float]]  # per torch thread count
    chain_s: dict[int, list[float]]
    wire_s: dict[int, list[float]]  # the chain with every message encoded and decoded (`wire=True`)
    n_train: int
    batch_size: int
    n_trainers: int
    name: str = field(default="relay")

    def ratio(self, threads: int, wire: bool = False) -> float:
        chain = self.wire_s if wire else self.chain_s
        return median(chain[threads]) / median(self.centralized_s[threads])

    def title(self) -> str:
        return (
            f"relay: one epoch, {self.n_train} samples, batch {self.batch_size}, {self.n_trainers} trainers"
        )

    def columns(self) -> list[str]:
        return ["mode", "torch threads", "epoch times (s)", "median (s)", "chain / centralized"]

    def rows(self) -> list[list[str]]:
        out = []
        for n in self.chain_s:
            for mode, ts, r in (
                ("centralized", self.centralized_s[n], ""),
                ("in-process chain", self.chain_s[n], f"{self.ratio(n):.3f}"),
                ("in-process chain, bytes encoded", self.wire_s[n], f"{self.ratio(n, wire=True):.3f}"),
            ):
                out.append([mode, str(n), ", ".join(f"{x:.2f}" for x in ts), f"{median(ts):.2f}", r])
        return out

    def notes(self) -> list[str]:
        best = min(self.chain_s, key=self.ratio)
        return [f"ratio chain / centralized: {self.ratio(best):.3f} at {best} thread(s) (target <= 1.10)"]


def chain_epoch(
    cfg: JobConfig, data: DatasetSplits, model: nn.Sequential | None = None, wire: bool = False
) -> float:
    """Seconds for one training round of a freshly built chain (construction excluded); `wire`:
    every message encoded to bytes and decoded, as over the network."""
    job = ChainJob(cfg, data, None, model=model, transport=InProcTransport(wire=True) if wire else None)
    return timed(lambda: job.data_owner.train_round(0))


def _at(threads: int, fn):
    def run() -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def bench_relay(
    cfg: JobConfig, data: DatasetSplits, repeats: int = 3, threads: list[int] | None = None
) -> RelayBench:
    """Time one training epoch (evaluation excluded) `repeats` times for each mode and thread count
    (default: the current one), interleaved."""
    cfg = cfg.replace(training={"epochs": 1})
    counts = threads or [torch.get_num_threads()]
    variants = {}
    for n in counts:
        variants[("centralized", n)] = _at(n, lambda: train_centralized(cfg, data)[0].epoch_times_s[0])
        variants[("chain", n)] = _at(n, lambda: chain_epoch(cfg, data))
        variants[("wire", n)] = _at(n, lambda: chain_epoch(cfg, data, wire=True))
    times = interleaved(variants, repeats)
    t = cfg.training
    return RelayBench(
        {n: times[("centralized", n)] for n in counts},
        {n: times[("chain", n)] for n in counts},
        {n: times[("wire", n)] for n in counts},
        len(data.train_x),
        t.batch_size,
        cfg.model.n_trainers,
    )
