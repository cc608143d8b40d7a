"""Scaling: epoch time of the in-process chain with 1..8 trainers, and with the batch size.

Trainer counts cut one model into more segments: the small CNN has only 5 blocks, so these rows
use a 10-block MLP (9 hidden layers of 256, `models.zoo.mlp`) cut by FLOPs after a 1-block head;
the centralized epoch of the same model is the reference of every row. Batch sizes change the
number of steps per epoch, so they show the fixed per-step cost of the relay (messages, codec,
per-party optimiser steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clicooper.bench.common import interleaved, median
from clicooper.bench.relay import chain_epoch
from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.job import train_centralized
from clicooper.models.zoo import mlp

TRAINERS = [1, 2, 3, 4, 6, 8]
BATCHES = [32, 64, 128, 256, 512]


@dataclass
class ScalingRow:
    knob: str
    value: int
    arch: str
    centralized_s: list[float]
    chain_s: list[float]

    @property
    def ratio(self) -> float:
        return median(self.chain_s) / median(self.centralized_s)


@dataclass
class ScalingBench:
    points: list[ScalingRow]
    n_train: int
    name: str = field(default="scaling")

    def title(self) -> str:
        return f"scaling: one epoch of {self.n_train} samples, in-process chain vs centralized"

    def columns(self) -> list[str]:
        return ["knob", "value", "model", "centralized (s)", "chain (s)", "chain / centralized"]

    def rows(self) -> list[list[str]]:
        return [
            [
                p.knob,
                str(p.value),
                p.arch,
                f"{median(p.centralized_s):.2f}",
                f"{median(p.chain_s):.2f}",
                f"{p.ratio:.3f}",
            ]
            for p in self.points
        ]

    def notes(self) -> list[str]:
        return []


DEEP_MLP = "mlp 9x256"


def deep_mlp(data: DatasetSplits) -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(data.input_shape, data.num_classes, hidden=256, depth=9)


def _point(
    cfg: JobConfig, data: DatasetSplits, knob: str, value: int, repeats: int, model: nn.Sequential | None
) -> ScalingRow:
    times = interleaved(
        {
            "centralized": lambda: train_centralized(cfg, data, model=model)[0].epoch_times_s[0],
            "chain": lambda: chain_epoch(cfg, data, model=model),
        },
        repeats,
    )
    return ScalingRow(knob, value, DEEP_MLP if model is not None else cfg.model.arch, *times.values())


def bench_scaling(
    cfg: JobConfig,
    data: DatasetSplits,
    repeats: int = 3,
    trainers: list[int] | None = None,
    batches: list[int] | None = None,
) -> ScalingBench:
    cfg = cfg.replace(training={"epochs": 1})
    points, model = [], deep_mlp(data)
    for k in trainers or TRAINERS:
        c = cfg.replace(model={"arch": "mlp", "n_trainers": k, "capacities": None, "cut_points": None})
        points.append(_point(c, data, "trainers", k, repeats, model))
    for b in batches or BATCHES:
        points.append(_point(cfg.replace(training={"batch_size": b}), data, "batch size", b, repeats, None))
    return ScalingBench(points, len(data.train_x))
