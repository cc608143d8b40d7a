"""A party in its own process for the gRPC tests: `python -m tests.grpc_peer JOB N PARTY PKI_DIR`.

Hosts PARTY (credentials read from PKI_DIR/PARTY only) with a handler that answers every Forward
from the data owner with a Backward of twice the activation; prints `READY host:port`, reads the
address book as one JSON line from stdin, and serves until stdin closes.
"""

from __future__ import annotations

import json
import sys

from clicooper.transport import Backward, Forward, Header
from clicooper.transport.grpc import GrpcTransport, Roster, TlsCredentials


def main() -> None:
    job, n, party, pki = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    roster = Roster.chain(job, n)
    t = GrpcTransport(roster, {party: "127.0.0.1:0"}, tls={party: TlsCredentials.load(f"{pki}/{party}")})

    def handle(msg: Forward) -> None:
        h = msg.header
        reply = Header(job, party, h.sender, h.round, h.step, h.seq)
        t.send(Backward(header=reply, grad=msg.activation * 2, loss=float(h.step)))

    t.register(party, handle)
    print("READY", t.addresses[party], flush=True)
    t.addresses.update(json.loads(sys.stdin.readline()))
    sys.stdin.read()  # until the parent closes stdin
    t.close()


if __name__ == "__main__":
    main()
