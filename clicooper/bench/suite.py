"""The benchmark suite: each benchmark with its full and its quick settings, in one table.

Full settings are sized so that `clicooper bench all` takes about ten minutes on an idle 2-core
machine: the relay on the full training set, the others on subsets named in their titles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from clicooper.bench.codec import QUICK_SIZES, bench_codec
from clicooper.bench.common import BenchResult, bench_config
from clicooper.bench.links import LinkSpec
from clicooper.bench.multiprocess import bench_multiprocess
from clicooper.bench.pipeline import bench_pipeline
from clicooper.bench.protections import bench_protections
from clicooper.bench.relay import bench_relay
from clicooper.bench.scaling import bench_scaling
from clicooper.bench.verification import bench_verification
from clicooper.bench.wan import bench_wan
from clicooper.job import prepare_data


@dataclass(frozen=True)
class Options:
    quick: bool = False
    repeats: int | None = None  # None: each benchmark's default
    threads: int | None = None  # torch threads set for the run (None: torch's default)
    images: int | None = None  # training images per epoch (None: each benchmark's default subset)

    def subset(self, default: int) -> dict:
        """The `[data]` override for a benchmark whose full run uses `default` images."""
        return {"train_subset": self.images or default}


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    run: Callable[[Options], BenchResult]


def _relay(o: Options) -> BenchResult:
    """At one thread and at every core, unless --threads fixed the count."""
    cfg = bench_config(o.quick)
    threads = None if o.threads is not None else sorted({1, os.cpu_count() or 1})
    return bench_relay(cfg, prepare_data(cfg), o.repeats or (1 if o.quick else 3), threads)


def _protections(o: Options) -> BenchResult:
    cfg = bench_config(o.quick) if o.quick else bench_config(False, data=o.subset(12800))
    return bench_protections(cfg, prepare_data(cfg), o.repeats or (1 if o.quick else 3))


def _codec(o: Options) -> BenchResult:
    return bench_codec(QUICK_SIZES if o.quick else None, o.repeats or (1 if o.quick else 9))


def _verification(o: Options) -> BenchResult:
    cfg = bench_config(o.quick) if o.quick else bench_config(False, data=o.subset(12800))
    return bench_verification(cfg, prepare_data(cfg), o.repeats or 1)


def _scaling(o: Options) -> BenchResult:
    if o.quick:
        cfg = bench_config(True)
        return bench_scaling(cfg, prepare_data(cfg), o.repeats or 1, trainers=[1, 8], batches=[128])
    cfg = bench_config(False, data={"train_subset": 6400})
    return bench_scaling(cfg, prepare_data(cfg), o.repeats or 3)


def _multiprocess(o: Options) -> BenchResult:
    if o.quick:
        cfg = bench_config(True, model={"n_trainers": 1}, training={"batch_size": 128})
        return bench_multiprocess(cfg, prepare_data(cfg), o.repeats or 1, threads=o.threads)
    cfg = bench_config(False, data={"train_subset": 6400}, training={"batch_size": 128})
    piped = {"micro_batches": 4}
    variants = {
        "gRPC + mTLS": {},
        # as before upstream_grad_first: each trainer steps, then sends its upstream gradient (window 1)
        "gRPC + mTLS, upstream gradient after the step": {"job": {"upstream_grad_first": False}},
        "gRPC + mTLS, 4 micro-batches, window 1": {"training": piped, "job": {"ack_window": 1}},
        "gRPC + mTLS, 4 micro-batches, window 8": {"training": piped},  # the default window: 2 x 4
        "gRPC + mTLS, bfloat16 links": {"training": {"wire_dtype": "bfloat16"}},  # half the bytes
        # glibc's own thresholds: freed buffers go back to the kernel and are faulted in again
        "gRPC + mTLS, freed memory returned": {"job": {"keep_freed_memory": False}},
    }
    return bench_multiprocess(cfg, prepare_data(cfg), o.repeats or 3, variants=variants, threads=o.threads)


def _pipeline(o: Options) -> BenchResult:
    cfg = bench_config(o.quick, training={"batch_size": 128})
    if not o.quick:
        cfg = cfg.replace(data={"train_subset": 6400})
    return bench_pipeline(
        cfg, prepare_data(cfg), o.repeats or (1 if o.quick else 3), [1, 4] if o.quick else None
    )


def _wan(o: Options) -> BenchResult:
    cfg = bench_config(o.quick, training={"batch_size": 128})
    if o.quick:
        links = [LinkSpec(0.010, 100e6)]
        return bench_wan(cfg, prepare_data(cfg), 1, links, [1, 4], half_links=links)
    cfg = cfg.replace(data={"train_subset": 1280})
    return bench_wan(cfg, prepare_data(cfg), o.repeats or 1)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("relay", "centralized vs in-process chain, one epoch", _relay),
        Benchmark("protections", "each protection alone and together vs the plain chain", _protections),
        Benchmark("codec", "codec encode/decode throughput vs a memory copy, 4 KB..64 MB", _codec),
        Benchmark("verification", "verify job time vs training time", _verification),
        Benchmark("scaling", "1..8 trainers and batch sizes, chain vs centralized", _scaling),
        Benchmark(
            "multiprocess", "every party its own process (gRPC + mTLS), peak RSS per process", _multiprocess
        ),
        Benchmark(
            "pipeline", "micro-batches: per-stage times and the one-machine-per-party model", _pipeline
        ),
        Benchmark("wan", "shaped links (1/10/50 ms, 100 Mbit/s / 1 Gbit/s), pipelined and not", _wan),
    )
}
