"""Typed messages exchanged between parties.

Every message carries a header (job, sender, receiver, round, step, seq) and typed
fields. Tensor fields travel as raw bytes with dtype and shape (see codec.py); scalar
fields travel in a JSON header. Nothing is ever pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Header:
    job_id: str
    sender: str
    receiver: str
    round: int
    step: int
    seq: int = 0


@dataclass(frozen=True)
class Message:
    """Base class; subclasses set KIND and declare their fields."""

    KIND: ClassVar[str] = ""
    header: Header


@dataclass(frozen=True)
class Forward(Message):
    """Activations flowing down the chain. `train=False` marks an inference pass."""

    KIND: ClassVar[str] = "forward"
    activation: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    train: bool = True


@dataclass(frozen=True)
class Targets(Message):
    """Pseudo-labels for one step, sent by the data owner straight to the last trainer."""

    KIND: ClassVar[str] = "targets"
    labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))


@dataclass(frozen=True)
class Backward(Message):
    """Gradient w.r.t. the receiver's output, flowing up the chain."""

    KIND: ClassVar[str] = "backward"
    grad: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    loss: float = 0.0


@dataclass(frozen=True)
class Output(Message):
    """The last trainer's output returned to the data owner: pseudo-logits at inference,
    or features in U-shaped mode (train=True then expects a Backward in reply)."""

    KIND: ClassVar[str] = "output"
    output: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    train: bool = False


@dataclass(frozen=True)
class RoundEnd(Message):
    """The data owner closes a round (an epoch); trainers seal their stage for it."""

    KIND: ClassVar[str] = "round_end"
    steps: int = 0
    samples: int = 0


@dataclass(frozen=True)
class RoundSealed(Message):
    """A trainer's acknowledgement that it sealed the round (and, with provenance on,
    signed its stage record). `record` is canonical JSON or empty."""

    KIND: ClassVar[str] = "round_sealed"
    record: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls for cls in (Forward, Targets, Backward, Output, RoundEnd, RoundSealed)
}
