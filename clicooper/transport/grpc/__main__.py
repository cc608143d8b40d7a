"""python -m clicooper.transport.grpc OUT JOB PARTY [PARTY ...]: a local CA and party certificates."""

from clicooper.transport.grpc.tls import main

main()
