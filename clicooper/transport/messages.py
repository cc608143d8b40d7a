"""Typed messages exchanged between parties.

Every message carries a header (job, sender, receiver, round, step, seq) and typed
fields. Tensor fields travel as raw bytes with dtype and shape, scalar fields in a binary
header (see codec.py). Nothing is ever pickled.

A kind's place in MESSAGE_TYPES is its id on the wire: add new kinds at the end.
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
    """Activations flowing down the chain. `train=False` marks an inference pass.

    A pipelined step is split into `micros` micro-batches sent one after another (`micro` is this
    one's index); trainers accumulate gradients over all of them and step once per step."""

    KIND: ClassVar[str] = "forward"
    activation: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    train: bool = True
    micro: int = 0
    micros: int = 1


@dataclass(frozen=True)
class Targets(Message):
    """Pseudo-labels for one step (or one micro-batch of it), sent by the data owner straight to the
    last trainer. `batch_rows` is the whole step's size (0: the labels are the whole step): the loss
    of a micro-batch is weighted by its share of the step, so accumulated gradients equal the
    unpipelined step's."""

    KIND: ClassVar[str] = "targets"
    labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    micro: int = 0
    batch_rows: int = 0


@dataclass(frozen=True)
class Backward(Message):
    """Gradient w.r.t. the receiver's output, flowing up the chain."""

    KIND: ClassVar[str] = "backward"
    grad: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    loss: float = 0.0
    micro: int = 0


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
    """A trainer's acknowledgement to the data owner that it sealed and checkpointed the round
    (with provenance on, its signed stage record went to the verifier)."""

    KIND: ClassVar[str] = "round_sealed"


@dataclass(frozen=True)
class Register(Message):
    """A trainer registers with the verifier before training: its Ed25519 public key and its
    watermark key in escrow (hex). Over the network this travels only inside mutual TLS."""

    KIND: ClassVar[str] = "register"
    position: int = 0
    public_key: str = ""
    wm_key: str = ""


@dataclass(frozen=True)
class RoundOpen(Message):
    """The data owner asks the verifier to open a round (issue its nonce)."""

    KIND: ClassVar[str] = "round_open"


@dataclass(frozen=True)
class Nonce(Message):
    """The verifier's fresh nonce for a round, and the digests of the records the receiving
    trainer's watermark must be chained to (JSON list of hex digests)."""

    KIND: ClassVar[str] = "nonce"
    nonce: str = ""
    links: str = "[]"


@dataclass(frozen=True)
class RoundOpened(Message):
    """The verifier's acknowledgement to the data owner: every trainer has its nonce."""

    KIND: ClassVar[str] = "round_opened"


@dataclass(frozen=True)
class StageSealed(Message):
    """A trainer's signed stage record and transcript attestations for a round (JSON)."""

    KIND: ClassVar[str] = "stage_sealed"
    record: str = ""
    attestations: str = "[]"


@dataclass(frozen=True)
class FinalSegment(Message):
    """A trainer delivers its segment after the last round to the verifier: the weights as one
    safetensors blob (uint8; parsed with safetensors, never unpickled). The verifier checks them
    against the digest in the trainer's signed stage record for `header.round`."""

    KIND: ClassVar[str] = "final_segment"
    weights: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))


@dataclass(frozen=True)
class Rewind(Message):
    """The data owner resumes the job at round `header.round` after a failure: a trainer goes back
    to its checkpoint of the round before (its initial state for round 0), dropping any step in
    flight; the verifier forgets rounds from `header.round` on (logged, signed)."""

    KIND: ClassVar[str] = "rewind"


@dataclass(frozen=True)
class Abort(Message):
    """A party failed or refused a message and stops: the reason travels to the data owner, which
    drives the job (and from it to the others). Networked transports send it when a handler raises,
    and a party started again over its folder sends one to say it lost any step in flight; a
    pulling party's `receive` raises it as an error instead of returning it."""

    KIND: ClassVar[str] = "abort"
    reason: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Forward,
        Targets,
        Backward,
        Output,
        RoundEnd,
        RoundSealed,
        Register,
        RoundOpen,
        Nonce,
        RoundOpened,
        StageSealed,
        FinalSegment,
        Rewind,
        Abort,
    )
}
