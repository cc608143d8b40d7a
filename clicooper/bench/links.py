"""Transports for the benchmarks only: parties on their own threads, per-party busy time, and links
shaped to a one-way latency and a rate.

- `ThreadedTransport`: every party in this process but on its own dispatch thread, as it would be in
  its own process (one interpreter, so Python code shares the GIL; torch kernels release it). Every
  message is encoded and decoded, as over the network.
- `StageTimer`: wraps any transport and adds up each party's busy time (reactive parties: time in
  their handler; the data owner: time outside `receive`), for idle shares and per-stage times.
- `LinkShim`: a `StageTimer` whose sends are delayed as on a WAN link: each directed link carries
  one message at a time at `rate_bps` (serialisation), then the message arrives `latency_s` later.
  Delivery order per link is kept. Sizes are the tensors' bytes plus a 256-byte header allowance.
  With `acked`, the link's acknowledgements are modelled as the gRPC transport's are: each comes
  back one latency after its message arrives, `send` returns once at most `window - 1` of the
  link's messages await one (window 1: it waits for its own), and a party sending an ordered
  message on a different link than its last ordered one first waits for every acknowledgement on
  that one (`GrpcOptions.ack_window`, `roster.UNORDERED_KINDS`).
"""

from __future__ import annotations

import dataclasses
import heapq
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from clicooper.transport.base import Handler, Transport, TransportError
from clicooper.transport.codec import decode, encode
from clicooper.transport.grpc.roster import UNORDERED_KINDS
from clicooper.transport.messages import Message

_STOP = object()
HEADER_ALLOWANCE = 256


class ThreadedTransport(Transport):
    """Each registered party gets a queue; reactive parties a dispatch thread of their own."""

    def __init__(self) -> None:
        super().__init__()
        self._queues: dict[str, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.errors: list[str] = []

    def register(self, party: str, handler: Handler | None) -> None:
        if party in self._queues:
            raise TransportError(f"party {party!r} is already registered")
        q: queue.Queue = queue.Queue()
        self._queues[party] = q
        if handler is not None:
            th = threading.Thread(target=self._dispatch, args=(party, handler, q), daemon=True)
            th.start()
            self._threads.append(th)

    def _dispatch(self, party: str, handler: Handler, q: queue.Queue) -> None:
        while (item := q.get()) is not _STOP:
            try:
                handler(decode(item))
            except Exception as e:  # noqa: BLE001 - reported to every pulling party, which raises it
                self.errors.append(f"{party}: {type(e).__name__}: {e}")
                for p, other in self._queues.items():
                    if p != party:
                        other.put(_STOP)
                return

    def send(self, msg: Message) -> None:
        q = self._queues.get(msg.header.receiver)
        if q is None:
            raise TransportError(
                f"{msg.header.sender} sent {msg.KIND} to unknown party {msg.header.receiver!r}"
            )
        data = encode(msg)
        with self._lock:
            self._count(msg, len(data))
        q.put(data)

    def receive(self, party: str, timeout: float | None = None) -> Message:
        try:
            item = self._queues[party].get(timeout=timeout or 600)
        except queue.Empty:
            raise TransportError(f"{party}: no message within {timeout or 600:g}s") from None
        if item is _STOP:
            raise TransportError(f"{party}: a party failed: {'; '.join(self.errors) or 'transport closed'}")
        return decode(item)

    def close(self) -> None:
        for q in self._queues.values():
            q.put(_STOP)
        for th in self._threads:
            th.join(timeout=5)


class StageTimer(Transport):
    """Delegates to `inner` and adds up each party's busy seconds (see the module docstring)."""

    def __init__(self, inner: Transport) -> None:
        super().__init__()
        self.inner = inner
        self.concurrent = inner.concurrent
        self.bytes_sent, self.messages_sent = inner.bytes_sent, inner.messages_sent
        self.busy: Counter[str] = Counter()
        self.waiting: Counter[str] = Counter()  # pulling parties: seconds inside receive

    def register(self, party: str, handler: Handler | None) -> None:
        if handler is None:
            self.inner.register(party, None)
            return

        def timed(msg: Message, handler: Handler = handler) -> None:
            t0 = time.perf_counter()
            try:
                handler(msg)
            finally:
                self.busy[party] += time.perf_counter() - t0

        self.inner.register(party, timed)

    def send(self, msg: Message) -> None:
        self.inner.send(msg)

    def receive(self, party: str, timeout: float | None = None) -> Message:
        t0 = time.perf_counter()
        try:
            return self.inner.receive(party, timeout)
        finally:
            self.waiting[party] += time.perf_counter() - t0

    def reset(self) -> None:
        self.busy.clear()
        self.waiting.clear()

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class LinkSpec:
    latency_s: float  # one way
    rate_bps: float | None  # bits per second; None: unlimited
    acked: bool = False  # sends wait for acknowledgements as the gRPC transport's do
    window: int = 1  # with `acked`: messages a link may have awaiting acknowledgement

    def label(self) -> str:
        rate = "unlimited" if self.rate_bps is None else _rate(self.rate_bps)
        label = f"{self.latency_s * 1e3:g} ms, {rate}"
        if self.acked:
            label += ", acked sends"
            if self.window > 1:
                label += f", window {self.window}"
        return label


def _rate(bps: float) -> str:
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"


def wire_size(msg: Message) -> int:
    """The bytes a message occupies on the link (tensors plus a header allowance), without encoding it."""
    n = HEADER_ALLOWANCE
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, torch.Tensor):
            n += v.numel() * v.element_size()
    return n


class LinkShim(StageTimer):
    """Every directed link delays its messages by serialisation at the link's rate plus its latency."""

    def __init__(self, inner: Transport, link: LinkSpec) -> None:
        super().__init__(inner)
        self.link = link
        self._free_at: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, int, Message]] = []
        self._order = 0
        self._cv = threading.Condition()
        self._closed = False
        self._acks: dict[tuple[str, str], deque[float]] = {}  # per link: when each ack is back
        self._last_hop: dict[str, tuple[str, str]] = {}  # per sender: the link it sent on last
        self._thread = threading.Thread(target=self._deliver, daemon=True)
        self._thread.start()

    def send(self, msg: Message) -> None:
        hop = (msg.header.sender, msg.header.receiver)
        if self.link.acked and msg.KIND not in UNORDERED_KINDS:
            last = self._last_hop.get(hop[0])
            if last is not None and last != hop:  # switching links: everything on the last acked
                self._wait_acks(last, 0)
            self._last_hop[hop[0]] = hop
        now = time.perf_counter()
        with self._cv:
            start = max(now, self._free_at.get(hop, 0.0))
            busy = wire_size(msg) * 8 / self.link.rate_bps if self.link.rate_bps else 0.0
            self._free_at[hop] = start + busy
            self._order += 1  # FIFO per link: a later message never arrives before an earlier one
            arrival = start + busy + self.link.latency_s
            heapq.heappush(self._heap, (arrival, self._order, msg))
            self._cv.notify()
        if self.link.acked:  # the acknowledgement travels back one latency after arrival
            self._acks.setdefault(hop, deque()).append(arrival + self.link.latency_s)
            self._wait_acks(hop, self.link.window - 1)

    def _wait_acks(self, hop: tuple[str, str], most: int) -> None:
        """Sleep until at most `most` of the link's messages await their acknowledgement (each
        link is used by its sender's thread only)."""
        pending = self._acks.get(hop, deque())
        while pending and (len(pending) > most or pending[0] <= time.perf_counter()):
            time.sleep(max(0.0, pending.popleft() - time.perf_counter()))

    def _deliver(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] > time.perf_counter()):
                    wait = self._heap[0][0] - time.perf_counter() if self._heap else None
                    self._cv.wait(wait)
                if self._closed:
                    return
                _, _, msg = heapq.heappop(self._heap)
            self.inner.send(msg)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)
        super().close()
