"""Learning-rate schedules by round, the same pure function in every party.

Each party steps its own optimiser, so each sets its own learning rate from the round number
and the job's public training settings; nothing is exchanged and a resumed party recomputes
the same value. Cosine decay matters for learning from a noised one-shot release: with a
constant rate the read-out's weights keep jumping with the noise of each batch (measured in
EXPERIMENTS.md), while a decaying rate averages it out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from clicooper.config import COSINE_FLOOR  # the default of `training.lr_floor`

LrScheduleKind = Literal["constant", "cosine"]
RoundLr = Callable[[int], float]


def round_lr(base: float, rnd: int, epochs: int, kind: LrScheduleKind, floor: float = COSINE_FLOOR) -> float:
    """The learning rate of round `rnd` (0-based) of `epochs`: constant, or cosine-decayed from
    `base` to `floor * base`, evaluated at the round's midpoint."""
    if kind == "constant":
        return base
    cos = 0.5 * (1.0 + math.cos(math.pi * (rnd + 0.5) / max(epochs, 1)))
    return base * (floor + (1.0 - floor) * cos)


def schedule(base: float, epochs: int, kind: LrScheduleKind, floor: float = COSINE_FLOOR) -> RoundLr:
    return lambda rnd: round_lr(base, rnd, epochs, kind, floor)


def set_lr(optimizer: torch.optim.Optimizer | None, lr: float) -> None:
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
