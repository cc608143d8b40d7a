"""The chain over shaped links (one-way latency and rate), pipelined and not.

Every party runs on its own thread (`ThreadedTransport`) behind a `LinkShim`; one training epoch of
a subset of the default job at batch 128 per (link, micro-batches) point, with each party's idle
share (1 - busy / epoch). Two more points repeat 10 ms / 100 Mbit/s with acknowledgements modelled
as the gRPC transport's: every send waiting for its own (`ack_window` 1), and a window of 16; the
last repeats the window of 16 with activations and gradients in bfloat16 on the wire
(`training.wire_dtype`), half the bytes. The issue's target: at 10 ms and 100 Mbit/s with 3
trainers, the pipelined epoch at most half the unpipelined one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clicooper.bench.common import median, timed
from clicooper.bench.links import LinkShim, LinkSpec, ThreadedTransport
from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.job import ChainJob

WINDOWED = LinkSpec(0.010, 100e6, acked=True, window=16)  # `ack_window` 16 (2 x 8 micro-batches)
LINKS = [LinkSpec(latency, rate) for latency in (0.001, 0.010, 0.050) for rate in (100e6, 1e9)] + [
    LinkSpec(0.010, 100e6, acked=True),  # the gRPC transport waiting for each acknowledgement
    WINDOWED,
]
HALF_LINKS = [WINDOWED]  # repeated with bfloat16 on the wire
MICROS = [1, 8]


@dataclass
class WanPoint:
    link: str
    latency_s: float
    rate_bps: float | None
    micro_batches: int
    epoch_s: list[float]
    idle_share: dict[str, float]
    acked: bool = False
    wire_dtype: str = "float32"


@dataclass
class WanBench:
    points: list[WanPoint]
    n_train: int
    batch_size: int
    n_trainers: int
    name: str = field(default="wan")

    def point(self, link: str, wire_dtype: str, micro_batches: int) -> WanPoint | None:
        """The run of `link` with that wire precision and micro-batch count, if there was one."""
        key = (link, wire_dtype, micro_batches)
        return next((p for p in self.points if (p.link, p.wire_dtype, p.micro_batches) == key), None)

    def speedup(self, p: WanPoint) -> float:
        base = self.point(p.link, p.wire_dtype, 1)
        assert base is not None, f"{p.link}, {p.wire_dtype}: no unpipelined run"
        return median(base.epoch_s) / median(p.epoch_s)

    def title(self) -> str:
        return (
            f"shaped links: one epoch of {self.n_train} samples, batch {self.batch_size}, "
            f"{self.n_trainers} trainers, every party on its own thread"
        )

    def columns(self) -> list[str]:
        return [
            "link (one way)",
            "wire",
            "micro-batches",
            "epoch (s)",
            "pipelined speedup",
            "idle share per party",
        ]

    def rows(self) -> list[list[str]]:
        return [
            [
                p.link,
                p.wire_dtype,
                str(p.micro_batches),
                f"{median(p.epoch_s):.2f}",
                f"{self.speedup(p):.2f}x",
                ", ".join(f"{k.replace('trainer_', 't')} {v:.0%}" for k, v in p.idle_share.items()),
            ]
            for p in self.points
        ]

    def notes(self) -> list[str]:
        notes = [
            "target: at 10 ms / 100 Mbit/s, pipelined epoch <= 0.5 x unpipelined "
            "(speedup >= 2x); parties share one interpreter (GIL) and this machine's cores"
        ]
        for p in self.points:
            full = self.point(p.link, "float32", p.micro_batches) if p.wire_dtype != "float32" else None
            if full is not None:
                notes.append(
                    f"{p.link}, {p.micro_batches} micro-batches: {p.wire_dtype} links take "
                    f"{median(p.epoch_s) / median(full.epoch_s):.2f} x the float32 epoch"
                )
        return notes


def shaped_epoch(cfg: JobConfig, data: DatasetSplits, link: LinkSpec) -> tuple[float, dict[str, float]]:
    shim = LinkShim(ThreadedTransport(), link)
    try:
        job = ChainJob(cfg, data, None, transport=shim)
        epoch = timed(lambda: job.data_owner.train_round(0))
        busy = {"data_owner": epoch - shim.waiting["data_owner"]}
        busy.update({t.name: shim.busy[t.name] for t in job.trainers})
        return epoch, {p: max(0.0, 1 - b / epoch) for p, b in busy.items()}
    finally:
        shim.close()


def bench_wan(
    cfg: JobConfig,
    data: DatasetSplits,
    repeats: int = 1,
    links: list[LinkSpec] | None = None,
    micros: list[int] | None = None,
    half_links: list[LinkSpec] | None = None,
) -> WanBench:
    """Every link in `links` with float32 on the wire, then every one in `half_links` with bfloat16
    (by default those of HALF_LINKS that are among `links`: each compared with its float32 run)."""
    cfg = cfg.replace(training={"epochs": 1})
    links = links or LINKS
    if half_links is None:
        half_links = [link for link in HALF_LINKS if link in links]
    cases = [(link, "float32") for link in links] + [(link, "bfloat16") for link in half_links]
    points = []
    for link, wire in cases:
        runs = {m: [] for m in micros or MICROS}
        idle: dict[int, list[dict[str, float]]] = {m: [] for m in runs}
        for _ in range(repeats):  # interleaved: unpipelined, pipelined, unpipelined, ...
            for m in runs:
                job_cfg = cfg.replace(training={"micro_batches": m, "wire_dtype": wire})
                t, share = shaped_epoch(job_cfg, data, link)
                runs[m].append(t)
                idle[m].append(share)
        for m, ts in runs.items():
            share = {p: median([s[p] for s in idle[m]]) for p in idle[m][0]}
            points.append(
                WanPoint(link.label(), link.latency_s, link.rate_bps, m, ts, share, link.acked, wire)
            )
    return WanBench(points, len(data.train_x), cfg.training.batch_size, cfg.model.n_trainers)
