"""`clicooper bench NAME|all [--quick] [--repeats N] [--threads N] [--images N] [--out DIR]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from clicooper.allocator import keep_freed_memory
from clicooper.bench.common import machine_info, write_json
from clicooper.bench.report import machine_line, render
from clicooper.bench.suite import BENCHMARKS, Benchmark, Options

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (results go to BENCHMARKS.md).")
console = Console()

QuickOpt = Annotated[bool, typer.Option("--quick", help="Seconds instead of minutes (what the tests run).")]
RepeatsOpt = Annotated[int | None, typer.Option(min=1, help="Repeats per variant (default per benchmark).")]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="torch intra-op threads in this process (default: torch's).")
]
ImagesOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Training images per epoch for protections / verification (default 12,800)."),
]
OutOpt = Annotated[Path | None, typer.Option(help="Folder for one JSON file per benchmark.")]


def _run(benches: list[Benchmark], o: Options, out: Path | None) -> None:
    if o.threads is not None:
        torch.set_num_threads(o.threads)
    keep_freed_memory()  # as every party process does by default (`job.keep_freed_memory`)
    for b in benches:
        started = machine_info()  # the load average before this benchmark, not one of its own
        console.print(machine_line(started), highlight=False)
        result = b.run(o)
        render(result, console)
        if out is not None:
            console.print(f"  -> {write_json(result, out, started)}", highlight=False)


def _command(b: Benchmark) -> None:
    def cmd(
        quick: QuickOpt = False,
        repeats: RepeatsOpt = None,
        threads: ThreadsOpt = None,
        images: ImagesOpt = None,
        out: OutOpt = None,
    ):
        _run([b], Options(quick, repeats, threads, images), out)

    cmd.__doc__ = b.help[0].upper() + b.help[1:] + "."
    bench_app.command(b.name)(cmd)


for _b in BENCHMARKS.values():
    _command(_b)


@bench_app.command("all")
def bench_all(
    quick: QuickOpt = False,
    repeats: RepeatsOpt = None,
    threads: ThreadsOpt = None,
    images: ImagesOpt = None,
    out: OutOpt = None,
):
    """Every benchmark in turn (about ten minutes on an idle 2-core machine)."""
    _run(list(BENCHMARKS.values()), Options(quick, repeats, threads, images), out)
