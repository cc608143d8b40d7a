"""Host one party of a job in this process: the other parties' registrations are ignored.

`ChainJob` wires every party to one transport; a benchmark that runs each party in its own process
builds the same job in every process (the model's initial weights are seeded, so every process cuts
identical segments) and lets only its own party reach the network. Once the separate party programs
(`clicooper launch`) exist, the multi-process benchmark can start those instead.
"""

from __future__ import annotations

from clicooper.transport.base import Handler, Transport
from clicooper.transport.messages import Message


class HostOnly(Transport):
    """Delegates to `inner` for one hosted party; registering any other party is a no-op."""

    def __init__(self, inner: Transport, party: str) -> None:
        super().__init__()
        self.inner, self.party = inner, party
        self.concurrent = inner.concurrent
        self.bytes_sent = inner.bytes_sent
        self.messages_sent = inner.messages_sent

    def register(self, party: str, handler: Handler | None) -> None:
        if party == self.party:
            self.inner.register(party, handler)

    def send(self, msg: Message) -> None:
        self.inner.send(msg)

    def receive(self, party: str, timeout: float | None = None) -> Message:
        return self.inner.receive(party, timeout)
