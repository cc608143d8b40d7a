"""Loopback benchmarks of the gRPC transport (not tests).

    python -m clicooper.transport.grpc.bench [--mb 1] [--n 50] [--plaintext]
    python -m clicooper.transport.grpc.bench --chain [--samples 6400] [--batch 128] [--repeats 3]

Round trip: one activation data_owner -> trainer_1 (Forward) and back (Backward), two transports
in one process (each party its own server and certificate), so the numbers include TLS, HTTP/2
framing, the codec on both sides and the acknowledgement of every frame, but not a real network.
The in-process transport is measured on the same messages for reference.

Chain: one training epoch of the plain default job (small CNN, 3 trainers, Fashion-MNIST subset)
with every party in this process, in-process transport vs gRPC + mTLS over loopback, interleaved.
All parties share one interpreter (one GIL), unlike the multi-process deployment.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clicooper.transport import Backward, Forward, Header, InProcTransport
from clicooper.transport.base import Transport
from clicooper.transport.grpc.roster import Roster
from clicooper.transport.grpc.tls import make_local_pki
from clicooper.transport.grpc.transport import GrpcTransport

JOB = "bench"


def _echo(t: dict[str, Transport]):
    def handle(msg):
        h = msg.header
        t["t1"].send(
            Backward(
                header=Header(JOB, "trainer_1", "data_owner", h.round, h.step, h.seq), grad=msg.activation
            )
        )

    return handle


def round_trips(do: Transport, n: int, x: torch.Tensor, pump=None, first_seq: int = 0) -> list[float]:
    times = []
    for i in range(first_seq, first_seq + n):
        t0 = time.perf_counter()
        do.send(Forward(header=Header(JOB, "data_owner", "trainer_1", 0, i, i + 1), activation=x))
        if pump is not None:
            pump()
        reply = do.receive("data_owner", timeout=60)
        times.append(time.perf_counter() - t0)
        assert reply.grad.shape == x.shape
    return times


def grpc_pair(plaintext: bool = False) -> tuple[GrpcTransport, GrpcTransport]:
    roster = Roster.chain(JOB, 1)
    pki = None if plaintext else make_local_pki(None, JOB, roster.parties)
    kw = {"insecure": True} if plaintext else {}
    refs: dict[str, Transport] = {}
    t1 = GrpcTransport(
        roster, {"trainer_1": "127.0.0.1:0"}, tls=pki and {"trainer_1": pki["trainer_1"]}, **kw
    )
    refs["t1"] = t1
    t1.register("trainer_1", _echo(refs))
    do = GrpcTransport(
        roster,
        {"data_owner": "127.0.0.1:0", **t1.addresses},
        tls=pki and {"data_owner": pki["data_owner"]},
        **kw,
    )
    do.register("data_owner", None)
    t1.addresses.update(do.addresses)
    return do, t1


def bench_chain(samples: int, batch: int, repeats: int) -> None:
    from clicooper.cli import PLAIN
    from clicooper.config import parse_config
    from clicooper.job import ChainJob, prepare_data

    cfg = parse_config(PLAIN).replace(
        data={"train_subset": samples, "test_subset": 100}, training={"epochs": 1, "batch_size": batch}
    )
    data = prepare_data(cfg)
    times: dict[str, list[float]] = {"in-process": [], "gRPC + mTLS": []}
    for _ in range(repeats):
        for mode in times:
            tr = None
            if mode != "in-process":
                roster = Roster.chain(JOB, cfg.model.n_trainers)
                pki = make_local_pki(None, JOB, roster.parties)
                tr = GrpcTransport(roster, {p: "127.0.0.1:0" for p in roster.parties}, tls=pki)
            job = ChainJob(cfg, data, None, transport=tr, job_id=JOB)
            t0 = time.perf_counter()
            job.data_owner.train_round(0)
            times[mode].append(time.perf_counter() - t0)
            if tr is not None:
                tr.close()
    steps = -(-len(data.train_x) // batch)
    for mode, ts in times.items():
        med = statistics.median(ts)
        per_step = med / steps * 1e3
        print(f"{mode:>12}: epoch {[round(t, 2) for t in ts]} s, median {med:.2f} s, {per_step:.1f} ms/step")
    ratio = statistics.median(times["gRPC + mTLS"]) / statistics.median(times["in-process"])
    print(f"ratio gRPC / in-process: {ratio:.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1.0, help="activation size in MB (float32)")
    ap.add_argument("--n", type=int, default=50, help="round trips")
    ap.add_argument("--plaintext", action="store_true", help="no TLS (measures TLS's share)")
    ap.add_argument("--chain", action="store_true", help="epoch time of the default job's chain instead")
    ap.add_argument("--samples", type=int, default=6400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.chain:
        bench_chain(args.samples, args.batch, args.repeats)
        return
    x = torch.randn(max(int(args.mb * 1e6 / 4), 1))
    mb = x.numel() * 4 / 1e6
    inproc = InProcTransport()
    refs: dict[str, Transport] = {"t1": inproc}
    inproc.register("trainer_1", _echo(refs))
    inproc.register("data_owner", None)
    base = round_trips(inproc, args.n, x, pump=inproc.pump)
    do, t1 = grpc_pair(args.plaintext)
    try:
        round_trips(do, 3, x)  # connect and warm up
        net = round_trips(do, args.n, x, first_seq=3)
    finally:
        t1.close()
        do.close()
    mode = "gRPC plaintext" if args.plaintext else "gRPC + mTLS"
    for name, ts in (("in-process", base), (mode, net)):
        med = statistics.median(ts)
        print(
            f"{name:>15}: {mb:.2f} MB each way, median round trip {med * 1e3:.2f} ms "
            f"(p90 {sorted(ts)[int(0.9 * len(ts))] * 1e3:.2f} ms), {2 * mb / med:.0f} MB/s"
        )


if __name__ == "__main__":
    main()
