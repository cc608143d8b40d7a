"""Shared pieces for the gRPC transport tests: fast options, endpoints and a raw client."""

from __future__ import annotations

import grpc

from clicooper.transport.grpc import GrpcOptions, GrpcTransport, Roster, TlsCredentials, server_name
from clicooper.transport.grpc.transport import METHOD, SERVICE

FAST = GrpcOptions(
    connect_timeout=1.0,
    connect_retries=2,
    backoff_initial=0.05,
    backoff_max=0.2,
    send_timeout=10.0,
    receive_timeout=10.0,
    max_workers=8,
)


def endpoint(
    roster: Roster,
    pki: dict,
    party: str,
    handler,
    book: dict,
    options: GrpcOptions = FAST,
    *,
    register: bool = True,
):
    """One party in its own transport (as in its own process), listening on a free loopback port
    (with register=False the caller's party object registers itself)."""
    t = GrpcTransport(roster, {**book, party: "127.0.0.1:0"}, tls={party: pki[party]}, options=options)
    if register:
        t.register(party, handler)
        book[party] = t.addresses[party]
    return t


def raw_exchange(
    creds: TlsCredentials | None,
    ca: bytes,
    addr: str,
    receiver: str,
    frames: list[bytes],
    *,
    timeout: float = 10.0,
) -> list[bytes]:
    """Send frames on one stream as a bare gRPC client (optionally without a client certificate);
    returns the acknowledgements, or raises grpc.RpcError."""
    if creds is None:
        cc = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        cc = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=creds.private_key, certificate_chain=creds.cert_chain
        )
    opts = [("grpc.ssl_target_name_override", server_name(receiver)), *FAST.channel_options()]
    with grpc.secure_channel(addr, cc, options=opts) as ch:
        call = ch.stream_stream(f"/{SERVICE}/{METHOD}")(iter(frames), timeout=timeout)
        return list(call)


class RawLink:
    """A long-lived raw stream (for fuzzing): one frame in, one acknowledgement out."""

    def __init__(self, creds: TlsCredentials, addr: str, receiver: str) -> None:
        cc = grpc.ssl_channel_credentials(
            root_certificates=creds.ca_cert, private_key=creds.private_key, certificate_chain=creds.cert_chain
        )
        opts = [("grpc.ssl_target_name_override", server_name(receiver)), *FAST.channel_options()]
        self.channel = grpc.secure_channel(addr, cc, options=opts)
        self._stream()

    def _stream(self) -> None:
        import queue

        self.q: queue.Queue = queue.Queue()
        self.call = self.channel.stream_stream(f"/{SERVICE}/{METHOD}")(iter(self.q.get, None))

    def exchange(self, frame: bytes) -> bytes:
        """Send one frame and return its acknowledgement; after a refusal, continue on a new stream
        (the server refuses the rest of a stream with a refused frame, and the transport's senders
        dial a new one)."""
        self.q.put(frame)
        ack = next(self.call)
        if ack[:1] != b"\x00":
            self.q.put(None)
            self.call.cancel()
            self._stream()
        return ack

    def close(self) -> None:
        self.q.put(None)
        self.call.cancel()
        self.channel.close()
