"""gRPC transport with mutual TLS (needs the `grpcio` package; imported only when used)."""

from clicooper.transport.grpc.roster import Roster
from clicooper.transport.grpc.tls import (
    LocalCA,
    TlsCredentials,
    TlsError,
    cert_identity,
    make_local_pki,
    server_name,
)
from clicooper.transport.grpc.transport import GrpcOptions, GrpcTransport, RemoteAbort

__all__ = [
    "GrpcOptions",
    "GrpcTransport",
    "LocalCA",
    "RemoteAbort",
    "Roster",
    "TlsCredentials",
    "TlsError",
    "cert_identity",
    "make_local_pki",
    "server_name",
]
