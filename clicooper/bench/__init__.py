"""Benchmarks (not tests): one module per question, each returning a typed result.

Every benchmark reports medians over repeats, takes ratios within one invocation, and interleaves
the variants it compares (A, B, A, B, ...) so that drift of a shared machine hits them alike.
`clicooper bench all --out DIR` runs the suite and writes one JSON file per benchmark; every
benchmark has a `quick` mode that the tests run.
"""

from clicooper.bench.common import BenchResult, machine_info
from clicooper.bench.relay import RelayBench, bench_relay

__all__ = ["BenchResult", "RelayBench", "bench_relay", "machine_info"]
