"""The chain with every party in its own process over gRPC + mutual TLS, against the in-process chain.

Each variant (e.g. unpipelined and pipelined) gets its own group of processes (`party_process`:
data owner and trainers, each with its own certificate and server on loopback, `threads` torch
threads each); the in-process chain runs in this process. Epochs are interleaved: in-process, then
each group in turn. The first (`warmup`) epochs of each are reported on their own and left out of
the medians: they open every connection (TLS handshakes) and grow every process's memory once per
job, where a job's later epochs do neither. Bytes per step per hop come from the in-process run
(the same codec frames).
Peak RSS is per process (`VmHWM`), for set-up and for training separately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clicooper.bench.common import median, timed
from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.job import ChainJob
from clicooper.threads import threads_for
from clicooper.transport.grpc import Roster
from clicooper.transport.grpc.tls import make_local_pki

JOB = "bench-mp"


@dataclass
class PartyRss:
    variant: str
    party: str
    setup_peak_mib: float  # imports, data (data owner only), model, server
    training_peak_mib: float | None


@dataclass
class MultiprocessBench:
    epoch_s: dict[str, list[float]]  # "in-process" and one entry per process group
    first_epoch_s: dict[str, list[float]]  # the warm-up epochs before them (not in the medians)
    n_train: int
    batch_size: int
    n_trainers: int
    threads_per_process: int
    bytes_per_step: dict[str, float]
    rss: list[PartyRss]
    name: str = field(default="multiprocess")

    def ratio(self, variant: str) -> float:
        return median(self.epoch_s[variant]) / median(self.epoch_s["in-process"])

    def title(self) -> str:
        return (
            f"multi-process gRPC + mTLS chain: one epoch, {self.n_train} samples, batch {self.batch_size}, "
            f"{self.n_trainers} trainers, {self.threads_per_process} torch thread(s) per process"
        )

    def columns(self) -> list[str]:
        return ["chain", "epoch times (s)", "median (s)", "/ in-process"]

    def rows(self) -> list[list[str]]:
        return [
            [v, ", ".join(f"{x:.2f}" for x in ts), f"{median(ts):.2f}", f"{self.ratio(v):.3f}"]
            for v, ts in self.epoch_s.items()
        ]

    def notes(self) -> list[str]:
        hops = ", ".join(f"{h} {b / 1e6:.3f} MB" for h, b in self.bytes_per_step.items() if b >= 1000)
        rss = ", ".join(
            f"{r.variant}/{r.party} {r.setup_peak_mib:.0f}"
            + (f"/{r.training_peak_mib:.0f}" if r.training_peak_mib else "")
            for r in self.rss
        )
        out = [f"bytes per step per hop: {hops}", f"peak RSS per process, set-up/training (MiB): {rss}"]
        if self.first_epoch_s.get("in-process"):
            first = ", ".join(
                f"{v} {', '.join(f'{x:.2f}' for x in ts)}" for v, ts in self.first_epoch_s.items()
            )
            out.insert(0, f"first epoch(s) (s; the chains' connections opened), not in the medians: {first}")
        return out


class _Group:
    """One job's parties, each in its own process, ready to train."""

    def __init__(self, cfg: JobConfig, data: DatasetSplits, tmp: Path, tag: str, threads: int) -> None:
        self.tag = tag
        cfg_path, shapes = tmp / f"{tag}.json", tmp / f"{tag}-shapes.json"
        cfg_path.write_text(cfg.model_dump_json())
        shapes.write_text(
            json.dumps(
                {"name": data.name, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
            )
        )
        roster = Roster.chain(JOB, cfg.model.n_trainers)
        pki = tmp / f"{tag}-pki"
        make_local_pki(pki, JOB, roster.parties)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.procs = {
            p: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "clicooper.bench.party_process",
                    str(cfg_path),
                    p,
                    str(pki),
                    str(threads),
                    str(shapes),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for p in roster.parties
        }
        book = {}
        for p, proc in self.procs.items():
            line = proc.stdout.readline().split()
            if not line or line[0] != "READY":
                self.close()
                raise RuntimeError(f"{tag}/{p} did not start (exit code {proc.poll()})")
            book[p] = line[1]
        for proc in self.procs.values():
            proc.stdin.write(json.dumps(book) + "\n")
            proc.stdin.flush()

    def epoch(self) -> float:
        do = self.procs["data_owner"]
        do.stdin.write("go\n")
        do.stdin.flush()
        line = do.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.tag}: the data owner's process ended (exit code {do.wait()})")
        return json.loads(line)["epoch_s"]

    def close(self) -> list[PartyRss]:
        out = []
        for proc in self.procs.values():
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
        for p, proc in self.procs.items():
            rest = proc.stdout.read()  # until the process exits (it does once stdin is closed)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            for line in rest.splitlines():
                if line.startswith("rss "):
                    r = json.loads(line[4:])
                    peak = r["training_peak_kib"]
                    out.append(
                        PartyRss(self.tag, p, r["setup_peak_kib"] / 1024, peak / 1024 if peak else None)
                    )
        return out


def bench_multiprocess(
    cfg: JobConfig,
    data: DatasetSplits,
    repeats: int = 3,
    variants: dict[str, dict[str, dict]] | None = None,
    threads: int | None = None,
    warmup: int = 1,
) -> MultiprocessBench:
    """`variants`: name -> configuration overrides by section (e.g. `{"training": {"micro_batches":
    4}}`), each run as its own process group. `threads` per process defaults to this machine's
    cores shared among one group's processes (`threads_for`). `warmup` epochs of each come first
    and are reported apart (`first_epoch_s`)."""
    cfg = cfg.replace(training={"epochs": 1})
    threads = threads_for(threads, cfg.model.n_trainers + 1)
    variants = variants or {"gRPC + mTLS": {}}
    job = ChainJob(cfg, data, None)  # the in-process reference, re-used round after round
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same per-party thread budget as every process
    times: dict[str, list[float]] = {"in-process": [], **{v: [] for v in variants}}
    first: dict[str, list[float]] = {v: [] for v in times}
    rss: list[PartyRss] = []
    with tempfile.TemporaryDirectory(prefix="clicooper-mp-") as tmp:
        groups = {}
        try:
            for v, over in variants.items():
                groups[v] = _Group(cfg.replace(**over), data, Path(tmp), f"g{len(groups)}", threads)
            for rnd in range(warmup + repeats):
                into = first if rnd < warmup else times
                into["in-process"].append(timed(lambda r=rnd: job.data_owner.train_round(r)))
                for v, g in groups.items():
                    into[v].append(g.epoch())
        finally:
            for v, g in groups.items():
                rss += [PartyRss(v, r.party, r.setup_peak_mib, r.training_peak_mib) for r in g.close()]
            torch.set_num_threads(before)
    steps = max((warmup + repeats) * -(-len(data.train_x) // cfg.training.batch_size), 1)
    sent = Counter(job.transport.bytes_sent)
    hops = {f"{s}->{r}": b / steps for (s, r), b in sorted(sent.items())}
    return MultiprocessBench(
        times, first, len(data.train_x), cfg.training.batch_size, cfg.model.n_trainers, threads, hops, rss
    )
