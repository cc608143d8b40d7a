"""The transport interface every party talks through.

Reactive parties (trainers, the verifier) register a handler and are called for
each message; the driving party (the data owner) pulls its replies with
`receive`. The same party code therefore runs in-process and across processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable

from clicooper.transport.messages import Message

Handler = Callable[[Message], None]


class TransportError(RuntimeError):
    """Delivery failed: unknown party, nothing to receive, or a rejected message."""


class Transport(ABC):
    """Delivers encoded messages between named parties and counts bytes per hop."""

    # whether the parties on it run concurrently (each on its own thread or in its own process);
    # the in-process transport runs them one after another in the caller's thread
    concurrent: bool = True

    def __init__(self) -> None:
        self.bytes_sent: Counter[tuple[str, str]] = Counter()
        self.messages_sent: Counter[tuple[str, str]] = Counter()

    @abstractmethod
    def register(self, party: str, handler: Handler | None) -> None:
        """Attach a party: with a handler it is reactive, without one it pulls via `receive`."""

    @abstractmethod
    def send(self, msg: Message) -> None:
        """Encode and send `msg` to `msg.header.receiver`."""

    @abstractmethod
    def receive(self, party: str, timeout: float | None = None) -> Message:
        """Block until a message for a pulling party arrives and return it."""

    def _count(self, msg: Message, nbytes: int) -> None:
        hop = (msg.header.sender, msg.header.receiver)
        self.bytes_sent[hop] += nbytes
        self.messages_sent[hop] += 1
