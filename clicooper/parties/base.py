"""What every party shares: identity in the job, numbered sends, inbound checks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from clicooper.transport.base import Transport
from clicooper.transport.messages import Header, Message


class ProtocolError(RuntimeError):
    """A peer sent something the protocol does not allow; the message names what and who."""


class Party:
    """Base for data owner, trainers and verifier: sequence-numbered sends and inbound validation."""

    def __init__(self, name: str, job_id: str, transport: Transport) -> None:
        self.name = name
        self.job_id = job_id
        self.transport = transport
        self._seq_out = 0
        self._seq_in: dict[str, int] = {}

    def send(self, cls: type[Message], receiver: str, rnd: int, step: int, **fields: Any) -> Message:
        self._seq_out += 1
        msg = cls(header=Header(self.job_id, self.name, receiver, rnd, step, self._seq_out), **fields)
        self.transport.send(msg)
        return msg

    def check_incoming(self, msg: Message, allowed: dict[type[Message], Iterable[str]]) -> None:
        """Reject messages of the wrong job, receiver, kind or sender, and replays (seq must grow)."""
        h = msg.header
        if h.job_id != self.job_id:
            raise ProtocolError(
                f"{self.name}: {msg.KIND} from {h.sender} is for job {h.job_id!r}, not {self.job_id!r}"
            )
        if h.receiver != self.name:
            raise ProtocolError(f"{self.name}: received a {msg.KIND} addressed to {h.receiver!r}")
        senders = allowed.get(type(msg))
        if senders is None:
            raise ProtocolError(f"{self.name}: does not accept {msg.KIND} messages (from {h.sender})")
        if h.sender not in senders:
            raise ProtocolError(f"{self.name}: {msg.KIND} from unexpected sender {h.sender!r}")
        if h.round < 0 or h.step < 0:
            raise ProtocolError(f"{self.name}: negative round/step in {msg.KIND} from {h.sender}")
        last = self._seq_in.get(h.sender, 0)
        if h.seq <= last:
            raise ProtocolError(
                f"{self.name}: {msg.KIND} from {h.sender} has seq {h.seq} <= {last} (replayed or reordered)"
            )
        self._seq_in[h.sender] = h.seq


def check_tensor(t: torch.Tensor, *, where: str, dtype: torch.dtype, shape: tuple[int | None, ...]) -> None:
    """Check dtype and shape (None matches any size in that dimension)."""
    if t.dtype != dtype:
        raise ProtocolError(f"{where}: dtype {t.dtype}, expected {dtype}")
    if t.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape, strict=True)):
        raise ProtocolError(f"{where}: shape {tuple(t.shape)}, expected {shape}")
