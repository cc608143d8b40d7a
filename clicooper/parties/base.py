"""What every party shares: identity in the job, numbered sends, inbound checks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from clicooper.checkpoint import atomic_write_bytes
from clicooper.finite import all_finite
from clicooper.transport.base import Transport
from clicooper.transport.messages import Header, Message

SEQ_INCARNATION_BITS = 32  # a restarted party numbers its messages from (incarnation << 32) + 1


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
        self.incarnation = 0  # how many times a party was started over its folder

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

    # -- sequence counters (checkpointed with each party's state) ------------
    def seq_state(self) -> dict:
        """The counters to checkpoint: the last seq sent, and the last accepted from each peer."""
        return {"out": self._seq_out, "in": dict(self._seq_in)}

    def start_incarnation(self, folder: Path | None) -> None:
        """Number this start's messages above every earlier start's: a party rebuilt over its own
        folder (a restart, a resume) is a new incarnation, and peers that kept running accept it."""
        n = next_incarnation(folder)
        self.incarnation = n
        self._seq_out = max(self._seq_out, n << SEQ_INCARNATION_BITS)

    def load_seq_state(self, state: dict | None) -> None:
        """Restore the inbound counters from a checkpoint (peers only ever number upwards, so
        nothing honest is refused; old messages replayed are). Outbound numbering stays in this
        incarnation, and above the checkpoint's, even if the incarnation counter was lost."""
        if not state:
            return
        self._seq_in = {str(k): int(v) for k, v in dict(state.get("in", {})).items()}
        saved = int(state.get("out", 0)) >> SEQ_INCARNATION_BITS
        self._seq_out = max(self._seq_out, (saved + 1) << SEQ_INCARNATION_BITS)


def next_incarnation(folder: Path | None) -> int:
    """A per-party restart counter in `folder/incarnation`, incremented on every call (0 without a
    folder), so two restarts from the same checkpoint never reuse sequence numbers."""
    if folder is None:
        return 0
    path = folder / "incarnation"
    try:
        n = int(path.read_text().strip()) + 1
    except (OSError, ValueError):
        n = 1
    atomic_write_bytes(path, str(n).encode())
    return n


def check_tensor(t: torch.Tensor, *, where: str, dtype: torch.dtype, shape: tuple[int | None, ...]) -> None:
    """Check dtype and shape (None matches any size in that dimension)."""
    if t.dtype != dtype:
        raise ProtocolError(f"{where}: dtype {t.dtype}, expected {dtype}")
    if t.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape, strict=True)):
        raise ProtocolError(f"{where}: shape {tuple(t.shape)}, expected {shape}")


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.zero_grad(set_to_none=True)`: the gradient of every parameter in the optimiser's
    groups set to None. A party clears its gradients every step, four parties where centralized
    training clears once, and torch's `zero_grad` (wrapped to keep dynamo out and to record a
    profiler range) cost about 0.1 ms a call in a running chain (BENCHMARKS.md, fifteenth stop);
    this loop does what it does for a plain optimiser. An optimiser whose class has a `zero_grad`
    of its own is asked to clear itself."""
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def optimizer_grads(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor | None]:
    """The gradients of the parameters in the optimiser's groups, what a plain optimiser's `step()`
    steps on: for `require_finite` to check first."""
    return (p.grad for group in optimizer.param_groups for p in group["params"])


def require_finite(tensors: Iterable[torch.Tensor | None], *, where: str) -> None:
    """Refuse non-finite gradients before they are stepped on or sent on. A neighbour's gradient (or
    activation) can be finite, and pass every message check, yet overflow once back-propagated
    (1e38 times a weight): one optimiser step would then turn the weights, and every checkpoint
    after, to inf or NaN."""
    if not all_finite(tensors):
        raise ProtocolError(f"{where}: not finite; no optimiser step was taken here")
