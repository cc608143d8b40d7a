"""Relay overhead: one training epoch, centralized vs the in-process chain (issue 2), optionally at
several torch thread counts (the per-process thread setting, `job.threads`), all interleaved.

Two readings of the same ratio. Whole epochs, interleaved: what a user sees, but on a shared VM one
epoch moves by 10% from one run to the next. Step by step: one chain epoch with a centralized step
on the same batch run between each two of its steps, so that the machine's slow spells fall on both
alike; the sums of the step times give the ratio of the two epochs' training time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from clicooper.bench.common import interleaved, median, timed
from clicooper.build import lr_schedule
from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.job import ChainJob, centralized_setup, centralized_step, train_centralized
from clicooper.schedule import set_lr
from clicooper.seeding import epoch_batches
from clicooper.transport import InProcTransport

BLOCK_STEPS = 50  # steps per block of the step-by-step reading's spread


@dataclass
class StepInterleaved:
    """One chain epoch with a centralized step on the same batch between each two of its steps; the
    chain's first step (which opens the round) and the centralized step beside it are left out.

    `block_ratios` read the same ratio over consecutive blocks of BLOCK_STEPS steps (the last,
    shorter block joined to the one before): how far it moves within the run, for a reader to judge
    a figure near a target by."""

    chain_s: float  # the chain's steps, summed
    centralized_s: float  # the centralized steps on the same batches, summed
    steps: int
    chain_median_ms: float
    centralized_median_ms: float
    block_ratios: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.chain_s / self.centralized_s

    def spread(self) -> str:
        """The block ratios' quartiles and range, or '' with fewer than four blocks."""
        if len(self.block_ratios) < 4:
            return ""
        q1, q2, q3 = statistics.quantiles(self.block_ratios, n=4)
        lo, hi = min(self.block_ratios), max(self.block_ratios)
        return (
            f"{len(self.block_ratios)} blocks of {BLOCK_STEPS} steps or more: median {q2:.3f}, "
            f"quartiles {q1:.3f}-{q3:.3f}, range {lo:.3f}-{hi:.3f}"
        )


def block_ratios(chain: list[float], centralized: list[float], block: int = BLOCK_STEPS) -> list[float]:
    """sum(chain) / sum(centralized) over consecutive blocks of `block` paired steps; a last block
    shorter than `block` is joined to the one before (one block if there are fewer steps)."""
    n = len(chain)
    starts = list(range(0, n - block + 1, block)) if n >= block else [0]
    ends = [*starts[1:], n]
    return [sum(chain[a:b]) / sum(centralized[a:b]) for a, b in zip(starts, ends, strict=True) if b > a]


@dataclass
class RelayBench:
    centralized_s: dict[int, list[float]]  # per torch thread count
    chain_s: dict[int, list[float]]
    wire_s: dict[int, list[float]]  # the chain with every message encoded and decoded (`wire=True`)
    by_step: dict[int, StepInterleaved]  # per torch thread count
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
            b = self.by_step[n]
            out.append(
                [
                    "step by step (chain / centralized)",
                    str(n),
                    f"{b.steps} steps: {b.chain_s:.2f} / {b.centralized_s:.2f}",
                    f"{b.chain_median_ms:.1f} / {b.centralized_median_ms:.1f} ms a step",
                    f"{b.ratio:.3f}",
                ]
            )
        return out

    def notes(self) -> list[str]:
        best = min(self.chain_s, key=self.ratio)
        notes = [
            f"ratio chain / centralized: {self.ratio(best):.3f} at {best} thread(s) (target <= 1.10); "
            f"step by step {self.by_step[best].ratio:.3f}"
        ]
        for n, b in self.by_step.items():
            if spread := b.spread():
                notes.append(f"step by step at {n} thread(s), {spread}")
        return notes


def chain_epoch(
    cfg: JobConfig, data: DatasetSplits, model: nn.Sequential | None = None, wire: bool = False
) -> float:
    """Seconds for one training round of a freshly built chain (construction excluded); `wire`:
    every message encoded to bytes and decoded, as over the network."""
    job = ChainJob(cfg, data, None, model=model, transport=InProcTransport(wire=True) if wire else None)
    return timed(lambda: job.data_owner.train_round(0))


def step_interleaved(cfg: JobConfig, data: DatasetSplits) -> StepInterleaved:
    """Time one chain epoch and centralized training on the same batches, a step of each in turn."""
    model, opt = centralized_setup(cfg, data)
    lr_at = lr_schedule(cfg.training)
    if lr_at is not None:
        set_lr(opt, lr_at(0))
    t = cfg.training
    batches = epoch_batches(cfg.job.seed, 0, len(data.train_x), t.batch_size, poisson=t.sampling == "poisson")
    chain: list[float] = []
    centralized: list[float] = []
    mark: float | None = None

    def between(step: int, _: int) -> None:  # called after each chain step that had samples
        nonlocal mark
        if mark is not None:
            chain.append(time.perf_counter() - mark)
        ids = batches[step - 1]
        took = timed(lambda: centralized_step(model, opt, data.train_x[ids], data.train_y[ids]))
        if mark is not None:
            centralized.append(took)
        mark = time.perf_counter()

    ChainJob(cfg, data, None).data_owner.train_round(0, on_step=between)
    return StepInterleaved(
        sum(chain),
        sum(centralized),
        len(chain),
        1e3 * median(chain),
        1e3 * median(centralized),
        block_ratios(chain, centralized),
    )


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
    (default: the current one), interleaved; then one epoch step by step at each thread count."""
    cfg = cfg.replace(training={"epochs": 1})
    counts = threads or [torch.get_num_threads()]
    variants = {}
    for n in counts:
        variants[("centralized", n)] = _at(n, lambda: train_centralized(cfg, data)[0].epoch_times_s[0])
        variants[("chain", n)] = _at(n, lambda: chain_epoch(cfg, data))
        variants[("wire", n)] = _at(n, lambda: chain_epoch(cfg, data, wire=True))
    times = interleaved(variants, repeats)
    by_step = {n: _at(n, lambda: step_interleaved(cfg, data))() for n in counts}
    t = cfg.training
    return RelayBench(
        {n: times[("centralized", n)] for n in counts},
        {n: times[("chain", n)] for n in counts},
        {n: times[("wire", n)] for n in counts},
        by_step,
        len(data.train_x),
        t.batch_size,
        cfg.model.n_trainers,
    )
