"""Print a benchmark result as a table, and record it as JSON."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from clicooper.bench.common import BenchResult, machine_info


def render(result: BenchResult, console: Console) -> None:
    table = Table(title=result.title())
    for c in result.columns():
        table.add_column(c)
    for row in result.rows():
        table.add_row(*row)
    console.print(table)
    for note in result.notes():
        console.print(f"  {note}", highlight=False)


def machine_line(m: dict | None = None) -> str:
    """`machine_info()` (or `m`, taken earlier) in one line."""
    m = machine_info() if m is None else m
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}, "
        f"Python {m['python']}, load average {m['load_avg'][0]}"
    )
