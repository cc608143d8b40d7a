"""One party of the multi-process benchmark chain.

    python -m clicooper.bench.party_process CONFIG_JSON PARTY PKI_DIR THREADS

Loads the job configuration (JSON) and its data, builds the job hosting only PARTY over gRPC + mTLS
(credentials from PKI/PARTY), prints `READY host:port`, and reads the address book as one JSON line
from stdin. The data owner then trains one round for every `go` line and prints its epoch time as
JSON; every party, when stdin closes, prints its peak RSS as JSON (`rss` line) and exits.

Peak RSS is measured twice: over the whole process (`ru_maxrss`, including loading the data set),
and over training only (Linux: `VmHWM` after resetting it through /proc/self/clear_refs).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

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


def main() -> None:
    cfg_path, party, pki, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    apply_threads(threads)
    from clicooper.bench.hosting import HostOnly
    from clicooper.config import JobConfig
    from clicooper.job import ChainJob, prepare_data
    from clicooper.transport.grpc import GrpcTransport, Roster, TlsCredentials

    cfg = JobConfig.model_validate_json(Path(cfg_path).read_text(), context={"programmatic": True})
    data = prepare_data(cfg)
    if party != "data_owner":  # trainers never touch the data: keep shapes only
        data = data.subset(16, 16, seed=cfg.job.seed)
    roster = Roster.chain(JOB, cfg.model.n_trainers)
    grpc = GrpcTransport(roster, {party: "127.0.0.1:0"}, tls={party: TlsCredentials.load(f"{pki}/{party}")})
    job = ChainJob(cfg, data, None, transport=HostOnly(grpc, party), job_id=JOB)
    print("READY", grpc.addresses[party], flush=True)
    grpc.addresses.update(json.loads(sys.stdin.readline()))
    setup_rss = _status_kib("VmRSS")
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
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "setup_rss_kib": setup_rss,
        "training_peak_kib": _status_kib("VmHWM") if reset else None,
    }
    print("rss", json.dumps(out), flush=True)
    grpc.close()


if __name__ == "__main__":
    main()
