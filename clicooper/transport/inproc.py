"""In-process transport: a message queue pumped synchronously.

Every message is encoded to bytes and decoded on delivery, exactly as over the
network, so the codec and its validation run in simulations and tests too.
"""

from __future__ import annotations

from collections import deque

from clicooper.transport.base import Handler, Transport, TransportError
from clicooper.transport.codec import decode, encode
from clicooper.transport.messages import Message


class InProcTransport(Transport):
    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[str, Handler | None] = {}
        self._queue: deque[tuple[str, memoryview]] = deque()
        self._inboxes: dict[str, deque[Message]] = {}

    def register(self, party: str, handler: Handler | None) -> None:
        if party in self._handlers:
            raise TransportError(f"party {party!r} is already registered")
        self._handlers[party] = handler
        self._inboxes[party] = deque()

    def send(self, msg: Message) -> None:
        receiver = msg.header.receiver
        if receiver not in self._handlers:
            raise TransportError(f"{msg.header.sender} sent {msg.KIND} to unknown party {receiver!r}")
        data = encode(msg)
        self._count(msg, len(data))
        self._queue.append((receiver, data))

    def _deliver_one(self) -> None:
        receiver, data = self._queue.popleft()
        msg = decode(data)
        handler = self._handlers[receiver]
        if handler is None:
            self._inboxes[receiver].append(msg)
        else:
            handler(msg)

    def pump(self) -> None:
        """Deliver queued messages until the queue is empty."""
        while self._queue:
            self._deliver_one()

    def receive(self, party: str, timeout: float | None = None) -> Message:
        inbox = self._inboxes.get(party)
        if inbox is None:
            raise TransportError(f"unknown party {party!r}")
        while not inbox and self._queue:
            self._deliver_one()
        if not inbox:
            raise TransportError(f"{party}: waited for a message but the network is idle")
        return inbox.popleft()
