"""The gRPC transport: parties in different processes (or machines), mutual TLS by default.

Each process hosts the parties it registers: every registered party gets its own gRPC server on its
address-book entry, with its own certificate. To send, a party dials the receiver's address and
keeps one bidirectional stream per directed link (sender -> receiver), presenting its own
certificate. A frame on that stream is one message exactly as the codec encodes it (`encode_frame`);
the receiver answers every frame with one acknowledgement frame:

    b"\\x00"                 accepted: decoded, checked, and queued for the receiving party
    b"\\x01" + UTF-8 reason  refused: the reason says what was wrong; every later frame on the
                             same stream is refused too (the sender dials a new stream)

With `GrpcOptions.ack_window = 1` (the default) `send` returns only once the receiver has queued the
message, so a message a party sends after another message was acknowledged can never overtake it at
any receiver: the causal order the in-process transport's global FIFO gave (Targets and Nonce before
the Forward that needs them) holds over the network too. With a window of W > 1, a send returns
while up to W - 1 earlier frames on its link still await acknowledgement (a reader thread takes
them), so a sender streams frames over a slow link; a refusal found then is reported to the data
owner at once (its `receive` raises it, or the sender reports an `Abort`). The causal order still
holds: before a party sends on a different link than the last it sent an ordered message on, it
waits until everything on that one is acknowledged (`Abort` and `Backward` need no order:
`roster.UNORDERED_KINDS`), and a stream stops delivering at its first refused frame, so nothing
arrives out of order or past a gap. Each receiving party has one queue: reactive parties are called
from one dispatch thread each; a pulling party (the data owner) reads its queue with `receive`.

The server checks, before anything reaches a party: the peer's certificate chains to the job's CA
(TLS), its identity is in the roster with a link to the receiving party (`Roster.check_link`),
every frame decodes (`decode` validates kinds, dtypes, shapes, sizes, finiteness), its header names
the authenticated peer as sender, this party as receiver and this job, its kind is allowed on the
link, and its sequence number grows on the link (no replays, no reordering). A handler that raises
is reported to the data owner as an `Abort` message; the data owner's `receive` raises it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from clicooper.transport.base import Handler, Transport, TransportError
from clicooper.transport.codec import CodecError, decode, encode_frame
from clicooper.transport.grpc.roster import ABORT, UNORDERED_KINDS, Roster
from clicooper.transport.grpc.tls import TlsCredentials, TlsError, cert_identity, server_name
from clicooper.transport.messages import Abort, Header, Message

log = logging.getLogger("clicooper.transport.grpc")

SERVICE = "clicooper.Link"
METHOD = "Exchange"
ACK_OK = b"\x00"
ACK_ERR = b"\x01"
_STOP = object()


class RemoteAbort(TransportError):
    """Another party reported a failure (an `Abort` message) to a pulling party."""

    def __init__(self, msg: Abort) -> None:
        self.message = msg
        super().__init__(f"{msg.header.sender} aborted: {msg.reason}")


@dataclass(frozen=True)
class GrpcOptions:
    """Limits and timings. `receive_timeout` is used when `receive` is called without one
    (None: wait for ever); `send_timeout` bounds the wait for each frame's acknowledgement."""

    max_message_bytes: int = 64 * 1024 * 1024
    connect_timeout: float = 10.0
    connect_retries: int = 5
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    send_timeout: float = 120.0
    receive_timeout: float | None = 600.0
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    max_workers: int = 16
    max_pending: int = 256  # messages queued for one party before further frames are refused
    # frames a link may have awaiting acknowledgement when `send` returns, plus one: 1 = every send
    # waits for its own acknowledgement; more lets a sender stream frames over a slow link
    ack_window: int = 1

    def __post_init__(self) -> None:
        if self.ack_window < 1:  # 0 would make every send wait for ever
            raise ValueError(f"ack_window must be at least 1, not {self.ack_window}")

    def _common(self) -> list[tuple[str, int | str]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
        ]

    def channel_options(self) -> list[tuple[str, int | str]]:
        return [
            *self._common(),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", int(self.backoff_initial * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(self.backoff_initial * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.backoff_max * 1000)),
        ]

    def server_options(self) -> list[tuple[str, int | str]]:
        return [
            *self._common(),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.keepalive_time * 500)),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.so_reuseport", 0),
        ]


class _Link:
    """One directed link: a channel to the receiver and one bidirectional stream on it."""

    def __init__(self, t: GrpcTransport, sender: str, receiver: str) -> None:
        self.t, self.sender, self.receiver = t, sender, receiver
        self.lock = threading.Lock()
        self.channel: grpc.Channel | None = None
        self.requests: queue.Queue | None = None
        self.call = None
        self.done: threading.Event | None = None
        self.waiting_since: float | None = None  # when the oldest unacknowledged frame was sent
        self.overdue = False
        # windowed links (ack_window > 1): each frame awaiting acknowledgement (what it is, when it
        # was sent), taken off by `_read_acks`; `failed` once the stream lost one (already reported)
        self.acks = threading.Condition()
        self.unacked: deque[tuple[str, float]] = deque()
        self.failed = False

    def _make_channel(self) -> grpc.Channel:
        addr = self.t.addresses.get(self.receiver)
        if addr is None:
            raise TransportError(f"{self.sender}: no address for {self.receiver!r} in the address book")
        opts = self.t.options.channel_options()
        if self.t.insecure:
            return grpc.insecure_channel(addr, options=opts)
        c = self.t.credentials(self.sender)
        creds = grpc.ssl_channel_credentials(
            root_certificates=c.ca_cert, private_key=c.private_key, certificate_chain=c.cert_chain
        )
        name = self.t.server_names.get(self.receiver) or server_name(self.receiver)
        return grpc.secure_channel(addr, creds, options=[*opts, ("grpc.ssl_target_name_override", name)])

    def _open(self) -> None:
        o = self.t.options
        delay, last = o.backoff_initial, "not tried"
        for attempt in range(1, o.connect_retries + 1):
            if self.channel is None:
                self.channel = self._make_channel()
            try:
                grpc.channel_ready_future(self.channel).result(timeout=o.connect_timeout)
                break
            except grpc.FutureTimeoutError:
                last = f"not ready within {o.connect_timeout:g}s"
            log.info("%s -> %s: connect attempt %d failed (%s)", self.sender, self.receiver, attempt, last)
            if attempt < o.connect_retries:
                time.sleep(delay)
                delay = min(delay * 2, o.backoff_max)
        else:
            self.close()
            raise TransportError(
                f"{self.sender}: could not connect to {self.receiver} at "
                f"{self.t.addresses.get(self.receiver)} after {o.connect_retries} attempts ({last}; "
                "a TLS handshake refused by either side looks the same)"
            )
        requests: queue.Queue = queue.Queue()

        def frames():
            while (f := requests.get()) is not _STOP:
                yield f

        call = self.channel.stream_stream(f"/{SERVICE}/{METHOD}")(frames())
        done = threading.Event()
        threading.Thread(
            target=self._watch,
            args=(call, done),
            name=f"ack-deadline-{self.sender}-{self.receiver}",
            daemon=True,
        ).start()
        self.requests, self.call, self.done = requests, call, done
        if self.t.options.ack_window > 1:
            threading.Thread(
                target=self._read_acks,
                args=(call,),
                name=f"acks-{self.sender}-{self.receiver}",
                daemon=True,
            ).start()

    def _watch(self, call, done: threading.Event) -> None:
        """The acknowledgement deadline: cancel the stream when an acknowledgement is overdue."""
        limit = self.t.options.send_timeout
        while not done.wait(min(1.0, limit / 4)):
            since = self.waiting_since
            if since is not None and time.monotonic() - since > limit:
                self.overdue = True
                call.cancel()
                return

    def send(self, frame: bytes, what: str) -> None:
        if self.t.options.ack_window > 1:
            self._send_windowed(frame, what)
            return
        with self.lock:
            self._ensure_stream()
            self.overdue = False
            self.waiting_since = time.monotonic()
            self.requests.put(frame)
            try:  # read the acknowledgement in this thread: no extra thread hand-off per frame
                ack: bytes | Exception = next(self.call)
            except StopIteration:
                ack = TransportError("the receiver closed the stream")
            except grpc.RpcError as e:
                ack = e
            finally:
                self.waiting_since = None
            error = self._ack_error(ack, what)
            if error is not None:
                self.close()  # the receiver refuses the rest of a stream with a refused frame
                raise error

    def _ack_error(self, ack: bytes | Exception, what: str) -> TransportError | None:
        """None for an acceptance; otherwise the error that the frame `what` was not delivered."""
        if isinstance(ack, bytes):
            if ack == ACK_OK:
                return None
            reason = ack[1:].decode(errors="replace")
            return TransportError(f"{self.receiver} refused {what} from {self.sender}: {reason}")
        if self.overdue:
            return TransportError(
                f"{self.sender}: {self.receiver} did not acknowledge {what} within "
                f"{self.t.options.send_timeout:g}s"
            )
        if isinstance(ack, grpc.RpcError):
            code = ack.code()
            detail = ack.details()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                detail = f"{detail} (the receiver's message limit)"
            return TransportError(
                f"{self.sender} -> {self.receiver}: {what} not delivered: {code.name}: {detail}"
            )
        return TransportError(f"{self.sender} -> {self.receiver}: {what} not delivered: {ack}")

    # -- windowed links (ack_window > 1) --------------------------------------
    def _send_windowed(self, frame: bytes, what: str) -> None:
        """Queue the frame on the stream and return once at most `ack_window - 1` of this link's
        frames await acknowledgement. A refusal, or a stream that ends with frames unacknowledged,
        is found by the acknowledgement reader after the send returned: it reports it to the data
        owner at once (`GrpcTransport._link_failed`), and the link's next send dials a new stream."""
        with self.lock:
            self._ensure_stream()
            with self.acks:
                now = time.monotonic()
                if not self.unacked:
                    self.overdue, self.waiting_since = False, now
                self.unacked.append((what, now))
            self.requests.put(frame)
            self._wait_acks(self.t.options.ack_window - 1)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no frame on this link awaits acknowledgement; True if all were accepted (False
        if one failed, reported already, or `timeout` ran out first)."""
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return False  # a send holds the link (waiting on the window) for longer
        try:
            return self._wait_acks(0, timeout)
        finally:
            self.lock.release()

    def _wait_acks(self, most: int, timeout: float | None = None) -> bool:
        """Wait until at most `most` frames await acknowledgement (a failure clears them all);
        whether the stream is still intact."""
        with self.acks:  # the deadline thread cancels a stream whose acknowledgement is overdue
            done = self.acks.wait_for(lambda: len(self.unacked) <= most, timeout)
            return done and not self.failed

    def _ensure_stream(self) -> None:
        """A stream to send on (called holding `lock`): dial again when the stream ended before
        this frame (the peer went away, or closed it idle) or lost a frame (a windowed link's
        failure, already reported: the stream delivers nothing more)."""
        with self.acks:
            stale = self.failed or (self.call is not None and self.call.done())
        if stale:
            self.close()
        if self.call is None:
            self._open()
        assert self.requests is not None

    def _read_acks(self, call) -> None:
        """Reader of one windowed stream's acknowledgements, in order of the frames they answer."""
        error: TransportError | None = None
        try:
            for ack in call:
                with self.acks:
                    what = self.unacked.popleft()[0] if self.unacked else "a frame"
                    self.waiting_since = self.unacked[0][1] if self.unacked else None
                    self.acks.notify_all()
                error = self._ack_error(ack, what)
                if error is not None:
                    break
        except grpc.RpcError as e:
            with self.acks:
                what = self.unacked[0][0] if self.unacked else None
            if what is not None:
                error = self._ack_error(e, what)
        with self.acks:
            if error is None and self.unacked:
                error = TransportError(
                    f"{self.sender} -> {self.receiver}: the stream ended with {len(self.unacked)} "
                    f"frame(s) unacknowledged, the first {self.unacked[0][0]}"
                )
            current = error is not None and self.call is call  # not a stream that close() ended
            if current:
                self.failed = True
                self.unacked.clear()
                self.waiting_since = None
            self.acks.notify_all()
        if current:  # the sender may send nothing more on this link for a long time: tell now
            self.t._link_failed(self.sender, error)

    def close(self) -> None:
        """End the stream and forget what it had outstanding (the next send dials again)."""
        with self.acks:  # an acknowledgement reader of the old stream no longer reports to the link
            call, self.call = self.call, None
            self.unacked.clear()
            self.failed, self.waiting_since = False, None
        if self.done is not None:
            self.done.set()
        if self.requests is not None:
            self.requests.put(_STOP)
        if call is not None:
            call.cancel()
        if self.channel is not None:
            self.channel.close()
        self.channel = self.requests = self.done = None


class GrpcTransport(Transport):
    """`Transport` over gRPC. `addresses` maps every party this process talks to (and every party
    it hosts) to host:port (port 0 for hosted parties picks a free port, written back into
    `addresses`). `tls` maps each hosted party to its credentials; without `insecure=True` every
    hosted party needs them. `server_names` overrides the DNS name checked in a receiver's
    certificate (default `tls.server_name(party)`), for certificates from your own CA."""

    def __init__(
        self,
        roster: Roster,
        addresses: Mapping[str, str],
        *,
        tls: Mapping[str, TlsCredentials] | None = None,
        insecure: bool = False,
        options: GrpcOptions | None = None,
        server_names: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.roster = roster
        self.addresses = dict(addresses)
        self.options = options or GrpcOptions()
        self.insecure = insecure
        self._tls = dict(tls or {})
        self.server_names = dict(server_names or {})
        if insecure:
            log.warning(
                "job %s: gRPC transport in PLAINTEXT (insecure=True): peers are not authenticated and "
                "traffic, activations included, can be read and forged on the network",
                roster.job_id,
            )
        elif not self._tls:
            raise TlsError("mutual TLS needs credentials for the hosted parties (or insecure=True)")
        self._lock = threading.Lock()
        self._servers: dict[str, grpc.Server] = {}
        self._pools: list[ThreadPoolExecutor] = []
        self._queues: dict[str, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        self._links: dict[tuple[str, str], _Link] = {}
        self._sending: dict[str, threading.Lock] = {}  # per hosted party: one ordered send at a time
        self._last_link: dict[str, _Link] = {}  # per hosted party: the link it sent on last
        self._seq_in: dict[tuple[str, str], int] = {}
        self._closed = False
        self.refused: list[str] = []  # every refused frame or stream, with its reason
        self.aborts: list[Abort] = []  # Abort messages received by reactive parties
        self.handler_errors: list[str] = []

    # -- identity ----------------------------------------------------------
    def credentials(self, party: str) -> TlsCredentials:
        c = self._tls.get(party)
        if c is None:
            raise TlsError(f"no TLS credentials for hosted party {party!r}")
        return c

    # -- hosting -------------------------------------------------------------
    def register(self, party: str, handler: Handler | None) -> None:
        if party in self._queues:
            raise TransportError(f"party {party!r} is already registered")
        if party not in self.roster.parties:
            raise TransportError(f"{party!r} is not in the roster of job {self.roster.job_id!r}")
        addr = self.addresses.get(party)
        if addr is None:
            raise TransportError(f"no address to serve {party!r} on")
        opts = self.options
        pool = ThreadPoolExecutor(max_workers=opts.max_workers, thread_name_prefix=f"grpc-{party}")
        server = grpc.server(
            pool,
            options=opts.server_options(),
            maximum_concurrent_rpcs=opts.max_workers,
        )

        def exchange(request_iterator, context):
            return self._serve_stream(party, request_iterator, context)

        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(exchange)}
                ),
            )
        )
        try:
            if self.insecure:
                port = server.add_insecure_port(addr)
            else:
                c = self.credentials(party)
                job, name = c.identity()
                if name != party or job not in (None, self.roster.job_id):
                    raise TlsError(f"the certificate given for {party!r} names {name!r} in job {job!r}")
                creds = grpc.ssl_server_credentials(
                    [(c.private_key, c.cert_chain)], root_certificates=c.ca_cert, require_client_auth=True
                )
                port = server.add_secure_port(addr, creds)
        except RuntimeError as e:  # grpcio raises when the port cannot be bound
            port, why = 0, f" ({e})"
        else:
            why = ""
        if not port:
            server.stop(0)
            pool.shutdown(wait=False)
            raise TransportError(f"{party}: cannot listen on {addr}{why}")
        host = addr.rsplit(":", 1)[0]
        self.addresses[party] = f"{host}:{port}"
        q: queue.Queue = queue.Queue()
        self._queues[party] = q
        self._sending[party] = threading.Lock()
        if handler is not None:
            th = threading.Thread(
                target=self._dispatch, args=(party, handler, q), name=f"party-{party}", daemon=True
            )
            th.start()
            self._threads.append(th)
        server.start()
        self._servers[party] = server
        self._pools.append(pool)
        log.info(
            "%s serving on %s (%s)", party, self.addresses[party], "plaintext" if self.insecure else "mTLS"
        )

    def _refuse(self, reason: str) -> bytes:
        log.warning("refused: %s", reason)
        with self._lock:
            self.refused.append(reason)
        return ACK_ERR + reason.encode()

    def _peer(self, me: str, context) -> str | None:
        """The authenticated peer of a stream (None in plaintext), or abort the stream."""
        if self.insecure:
            return None
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            reason = f"{me}: peer {context.peer()} presented no client certificate"
            self._refuse(reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        try:
            job, name = cert_identity(pems[0])
        except TlsError as e:
            reason = f"{me}: peer certificate: {e}"
            self._refuse(reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        if job is not None and job != self.roster.job_id:
            reason = f"{me}: peer {name!r} is certified for job {job!r}, not {self.roster.job_id!r}"
            self._refuse(reason)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        why = self.roster.check_link(name, me)
        if why is not None:
            reason = f"{me}: refused {name!r}: {why}"
            self._refuse(reason)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        return name

    def _serve_stream(self, me: str, frames, context):
        peer = self._peer(me, context)
        refused = False
        for frame in frames:
            if refused:  # sent before the sender learnt of the refusal: delivering it would leave a gap
                yield ACK_ERR + b"an earlier frame on this stream was refused"
                continue
            try:
                err = self._accept(me, peer, frame)
            except Exception as e:  # never let a frame take the server down
                log.exception("%s: unexpected error on a frame from %s", me, peer)
                err = f"{me}: internal error on a frame from {peer}: {type(e).__name__}"
            if err is None:
                yield ACK_OK
            else:
                refused = True
                yield self._refuse(err)

    def _accept(self, me: str, peer: str | None, frame: bytes) -> str | None:
        """Decode and check one frame; queue it for `me` and return None, or return the reason."""
        who = peer or "an unauthenticated peer"
        try:
            msg = decode(frame)
        except CodecError as e:
            return f"{me}: malformed frame from {who}: {e}"
        h = msg.header
        if peer is not None and h.sender != peer:
            return f"{me}: {peer} sent a {msg.KIND} claiming to be from {h.sender!r}"
        if h.receiver != me:
            return f"{me}: {msg.KIND} from {h.sender} is addressed to {h.receiver!r}"
        if h.job_id != self.roster.job_id:
            return f"{me}: {msg.KIND} from {h.sender} is for job {h.job_id!r}, not {self.roster.job_id!r}"
        if msg.KIND not in self.roster.kinds(h.sender, me):
            return f"{me}: {h.sender} may not send {msg.KIND} messages to {me}"
        if self._queues[me].qsize() >= self.options.max_pending:
            n = self.options.max_pending
            return f"{me}: {n} messages already pending; {msg.KIND} from {h.sender} refused"
        if msg.KIND != ABORT:
            with self._lock:
                last = self._seq_in.get((h.sender, me), 0)
                if h.seq <= last:
                    return (
                        f"{me}: {msg.KIND} from {h.sender} has seq {h.seq} <= {last} (replayed or reordered)"
                    )
                self._seq_in[(h.sender, me)] = h.seq
        self._queues[me].put(msg)
        return None

    def _dispatch(self, party: str, handler: Handler, q: queue.Queue) -> None:
        while (msg := q.get()) is not _STOP:
            if isinstance(msg, Abort):
                log.error("%s: %s aborted: %s", party, msg.header.sender, msg.reason)
                with self._lock:
                    self.aborts.append(msg)
                continue
            try:
                handler(msg)
            except Exception as e:
                if self._closed:  # a send cut short by close(): nobody is left to tell
                    continue
                reason = f"{party} failed on {msg.KIND} from {msg.header.sender}: {type(e).__name__}: {e}"
                log.error("%s", reason)
                with self._lock:
                    self.handler_errors.append(reason)
                self.report(party, reason, msg.header)

    def _link_failed(self, sender: str, error: TransportError) -> None:
        """A windowed link learnt after its `send` returned that a frame was refused or lost. The
        data owner hears of it at once, as of a party's failure with a window of 1: its own
        `receive` raises it, or the sending party reports it as an `Abort` (on a new stream if the
        failed link is the one to the data owner)."""
        if self._closed:
            return
        do = self.roster.data_owner
        if sender == do:
            self._queues[do].put(error)
            return
        log.error("%s", error)
        self.report(sender, str(error))

    def report(self, party: str, reason: str, about: Header | None = None) -> bool:
        """Send an Abort from hosted `party` to the data owner, naming the round and step of `about`
        (best effort: a failure to report is logged). Whether it was delivered."""
        do = self.roster.data_owner
        if party == do or self._closed:
            return False
        rnd, step = (about.round, about.step) if about is not None else (0, 0)
        try:
            self.send(Abort(header=Header(self.roster.job_id, party, do, rnd, step, 0), reason=reason))
        except TransportError as e:
            log.error("%s: could not report to %s: %s", party, do, e)
            return False
        return True

    # -- sending and receiving -----------------------------------------------
    def send(self, msg: Message) -> None:
        h = msg.header
        if h.sender not in self._queues:
            raise TransportError(f"{h.sender!r} is not hosted by this transport")
        if msg.KIND not in self.roster.kinds(h.sender, h.receiver):
            raise TransportError(f"{h.sender} may not send {msg.KIND} messages to {h.receiver!r}")
        try:
            data = encode_frame(msg)
        except CodecError as e:
            raise TransportError(f"{h.sender}: cannot encode {msg.KIND}: {e}") from None
        limit = self.options.max_message_bytes
        what = f"{msg.KIND} (round {h.round} step {h.step}, {len(data)} bytes)"
        if len(data) > limit:
            raise TransportError(f"{h.sender}: {what} to {h.receiver} exceeds the {limit}-byte message limit")
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            link = self._links.get((h.sender, h.receiver))
            if link is None:
                link = self._links[(h.sender, h.receiver)] = _Link(self, h.sender, h.receiver)
        with self._lock:  # counted when handed to the link (before the receiver can act on it)
            self._count(msg, len(data))
        if self.options.ack_window == 1 or msg.KIND in UNORDERED_KINDS:  # nothing to wait for first
            link.send(data, what)
            return
        with self._sending[h.sender]:
            prev = self._last_link.get(h.sender)
            if prev is not None and prev is not link:
                # causal order over windowed links: what this party sent before reaches its
                # receiver before anything this message sets off can reach it
                prev.flush()
            self._last_link[h.sender] = link
            link.send(data, what)

    def receive(self, party: str, timeout: float | None = None) -> Message:
        q = self._queues.get(party)
        if q is None:
            raise TransportError(f"unknown party {party!r}")
        if timeout is None:
            timeout = self.options.receive_timeout
        try:
            msg = q.get(timeout=timeout)
        except queue.Empty:
            raise TransportError(f"{party}: no message within {timeout:g}s") from None
        if msg is _STOP:
            raise TransportError(f"{party}: transport closed")
        if isinstance(msg, Abort):
            raise RemoteAbort(msg)
        if isinstance(msg, TransportError):  # one of this party's own windowed links failed
            raise msg
        return msg

    def drain(self, party: str) -> list[Message]:
        """Take every message already queued for a pulling party (stale replies after a failure)."""
        q = self._queues.get(party)
        out = []
        while q is not None:
            try:
                msg = q.get_nowait()
            except queue.Empty:
                break
            if msg is _STOP:
                q.put(_STOP)
                break
            if isinstance(msg, Message):  # not a failure notice of its own links: already handled
                out.append(msg)
        return out

    def abort_all(self, sender: str, reason: str) -> list[str]:
        """The data owner tells every party it has a link to that the job stops; returns who was told."""
        told = []
        for p in self.roster.parties:
            if p != sender and ABORT in self.roster.kinds(sender, p):
                try:
                    self.send(Abort(header=Header(self.roster.job_id, sender, p, 0, 0, 0), reason=reason))
                    told.append(p)
                except TransportError as e:
                    log.error("%s: could not tell %s to abort: %s", sender, p, e)
        return told

    def close(self, grace: float = 0.5) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links = list(self._links.values())
        for link in links:
            if link.unacked and not link.flush(grace + 1):  # windowed: let what was sent arrive
                log.warning("%s -> %s: not every frame acknowledged at close", link.sender, link.receiver)
            link.close()
        for q in self._queues.values():
            q.put(_STOP)
        for s in self._servers.values():
            s.stop(grace).wait(grace + 1)
        for pool in self._pools:
            pool.shutdown(wait=False)
        for th in self._threads:
            th.join(timeout=5)

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
