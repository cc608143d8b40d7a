"""One party of the multi-process benchmark chain.

    python -m clicooper.bench.party_process CONFIG_JSON PARTY PKI_DIR THREADS SHAPES_JSON

Loads the job configuration (JSON) and, for the data owner, its data (trainers never see the data:
they get a two-sample stand-in of the shapes in SHAPES_JSON, so their memory is their own), builds
the job hosting only PARTY over gRPC + mTLS (credentials from PKI/PARTY), prints `READY host:port`,
and reads the address book as one JSON line from stdin. The data owner then trains one round for
every `go` line and prints its epoch time as JSON; every party, when stdin closes, prints its peak
RSS as JSON (`rss` line) and exits.

Peak RSS (Linux `VmHWM`) is measured twice: over set-up (imports, data, model), and over training
only, after resetting the high-water mark through /proc/self/clear_refs. (`ru_maxrss` would not do:
after fork and exec it still counts the parent's memory.)
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from clicooper.allocator import keep_freed_memory
from clicooper.threads import apply_threads

JOB = "bench-mp"


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _stand_in(shapes: dict):
    """Two zero samples of the job's shapes: all a trainer's copy of the job needs to cut the model."""
    import torch

    from clicooper.data import DatasetSplits

    x, y = torch.zeros(2, *shapes["input_shape"]), torch.zeros(2, dtype=torch.int64)
    return DatasetSplits(shapes["name"], x, y, x, y, shapes["num_classes"], tuple(shapes["input_shape"]))


def main() -> None:
    cfg_path, party, pki, threads, shapes = (
        sys.argv[1],
        sys.argv[2],
        sys.argv[3],
        int(sys.argv[4]),
        sys.argv[5],
    )
    apply_threads(threads)
    from clicooper.bench.hosting import HostOnly
    from clicooper.config import JobConfig
    from clicooper.job import ChainJob, prepare_data
    from clicooper.transport.grpc import GrpcOptions, GrpcTransport, Roster, TlsCredentials

    cfg = JobConfig.model_validate_json(Path(cfg_path).read_text(), context={"programmatic": True})
    if cfg.job.keep_freed_memory:
        keep_freed_memory()
    data = prepare_data(cfg) if party == "data_owner" else _stand_in(json.loads(Path(shapes).read_text()))
    roster = Roster.chain(JOB, cfg.model.n_trainers)
    tls = {party: TlsCredentials.load(f"{pki}/{party}")}
    options = GrpcOptions(ack_window=cfg.link_window())  # as the party programs take it
    grpc = GrpcTransport(roster, {party: "127.0.0.1:0"}, tls=tls, options=options)
    job = ChainJob(cfg, data, None, transport=HostOnly(grpc, party), job_id=JOB)
    print("READY", grpc.addresses[party], flush=True)
    grpc.addresses.update(json.loads(sys.stdin.readline()))
    setup_peak = _status_kib("VmHWM")
    reset = _reset_peak_rss()
    rnd = 0
    for line in sys.stdin:  # trainers: until the parent closes stdin
        if party != "data_owner" or line.strip() != "go":
            continue
        t0 = time.perf_counter()
        job.data_owner.train_round(rnd)
        print(json.dumps({"epoch_s": time.perf_counter() - t0}), flush=True)
        rnd += 1
    out = {
        "party": party,
        "setup_peak_kib": setup_peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "training_peak_kib": _status_kib("VmHWM") if reset else None,
    }
    print("rss", json.dumps(out), flush=True)
    grpc.close()


if __name__ == "__main__":
    main()
