"""In-process transport: a message queue pumped synchronously.

Every message is validated on delivery as a peer's message is over the network, and its tensors
copied, so that no party shares memory with another (`codec.copy_message`). With `wire=True` each
message is also encoded to bytes and decoded, exactly as over the network, to exercise the codec
itself; the default skips the bytes, which parties in one process do not need (about half a
millisecond a message: BENCHMARKS.md, relay). Bytes per hop are counted as encoded either way.
"""

from __future__ import annotations

from collections import deque

from clicooper.transport.base import Handler, Transport, TransportError
from clicooper.transport.codec import copy_message, decode, encode
from clicooper.transport.messages import Message


class InProcTransport(Transport):
    concurrent = False  # every handler runs in the sender's thread, one after another

    def __init__(self, *, wire: bool = False) -> None:
        super().__init__()
        self.wire = wire
        self._handlers: dict[str, Handler | None] = {}
        self._queue: deque[tuple[str, memoryview | Message]] = deque()
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
        if self.wire:
            data = encode(msg)
            self._count(msg, len(data))
            self._queue.append((receiver, data))
        else:  # validated and copied now, as encoding would snapshot the tensors now
            copy, nbytes = copy_message(msg)
            self._count(msg, nbytes)
            self._queue.append((receiver, copy))

    def _deliver_one(self) -> None:
        receiver, item = self._queue.popleft()
        msg = item if isinstance(item, Message) else decode(item)
        handler = self._handlers[receiver]
        if handler is None:
            self._inboxes[receiver].append(msg)
        else:
            handler(msg)

    def discard_pending(self) -> int:
        """Drop every undelivered message (a failed round's, before a resume); how many."""
        n = len(self._queue) + sum(len(box) for box in self._inboxes.values())
        self._queue.clear()
        for box in self._inboxes.values():
            box.clear()
        return n

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
