"""The pipelined relay on paper: one machine per party, from measured per-stage times.

The in-process chain runs every party in turn, so it measures each party's busy time per step
exactly (`StageTimer`: trainers' time in their handlers, the data owner's time outside `receive`).
With S stages (data owner + trainers) on their own machines and free links, the unpipelined step
takes the sum of the stage times; the pipelined one (GPipe, M micro-batches) takes about
max(stage time with M micro-batches) * (M + S - 1) / M: the slowest stage sets the pace, and the
bubble fraction (S - 1) / (M + S - 1) of its time is idle filling and draining the pipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clicooper.bench.common import median, timed
from clicooper.bench.links import StageTimer
from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.job import ChainJob
from clicooper.transport import InProcTransport

MICROS = [1, 2, 4, 8]


@dataclass
class StageTimes:
    micro_batches: int
    epoch_s: float  # in-process (all stages in turn)
    stage_s: dict[str, float]  # busy seconds per party over the epoch

    @property
    def stages(self) -> int:
        return len(self.stage_s)

    @property
    def bubble(self) -> float:
        m, s = self.micro_batches, self.stages
        return (s - 1) / (m + s - 1)

    @property
    def modelled_s(self) -> float:
        """Epoch time with one machine per party (communication free)."""
        m = self.micro_batches
        if m == 1:
            return sum(self.stage_s.values())
        return max(self.stage_s.values()) * (m + self.stages - 1) / m


@dataclass
class PipelineBench:
    points: list[StageTimes]
    n_train: int
    batch_size: int
    n_trainers: int
    name: str = field(default="pipeline")

    def speedup(self, p: StageTimes) -> float:
        return self.points[0].modelled_s / p.modelled_s

    def title(self) -> str:
        return (
            f"pipeline model, one machine per party: {self.n_train} samples, batch {self.batch_size}, "
            f"{self.n_trainers} trainers (stage times measured in-process)"
        )

    def columns(self) -> list[str]:
        parties = list(self.points[0].stage_s)
        return [
            "micro-batches",
            "in-process (s)",
            *[f"{p} (s)" for p in parties],
            "bubble",
            "modelled (s)",
            "speedup",
        ]

    def rows(self) -> list[list[str]]:
        return [
            [
                str(p.micro_batches),
                f"{p.epoch_s:.2f}",
                *[f"{t:.2f}" for t in p.stage_s.values()],
                f"{p.bubble:.2f}",
                f"{p.modelled_s:.2f}",
                f"{self.speedup(p):.2f}x",
            ]
            for p in self.points
        ]

    def notes(self) -> list[str]:
        return ["modelled: sum of stage times unpipelined; max stage * (M + S - 1) / M pipelined"]


def stage_times(cfg: JobConfig, data: DatasetSplits) -> tuple[float, dict[str, float]]:
    """One epoch of a fresh in-process chain: its time and each party's busy time."""
    timer = StageTimer(InProcTransport())
    job = ChainJob(cfg, data, None, transport=timer)
    epoch = timed(lambda: job.data_owner.train_round(0))
    busy = {"data_owner": epoch - timer.waiting["data_owner"]}
    busy.update({t.name: timer.busy[t.name] for t in job.trainers})
    return epoch, busy


def bench_pipeline(
    cfg: JobConfig, data: DatasetSplits, repeats: int = 3, micros: list[int] | None = None
) -> PipelineBench:
    """Medians over `repeats` of every micro-batch count, interleaved (1, 2, 4, 8, 1, 2, ...)."""
    cfg = cfg.replace(training={"epochs": 1})
    runs: dict[int, list[tuple[float, dict[str, float]]]] = {m: [] for m in micros or MICROS}
    for _ in range(repeats):
        for m in runs:
            runs[m].append(stage_times(cfg.replace(training={"micro_batches": m}), data))
    points = [
        StageTimes(m, median([e for e, _ in rs]), {p: median([b[p] for _, b in rs]) for p in rs[0][1]})
        for m, rs in runs.items()
    ]
    return PipelineBench(points, len(data.train_x), cfg.training.batch_size, cfg.model.n_trainers)
