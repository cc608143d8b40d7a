"""Print a benchmark result as a table, and record it as JSON."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from clicooper.bench.common import BenchResult


def render(result: BenchResult, console: Console) -> None:
    table = Table(title=result.title())
    for c in result.columns():
        table.add_column(c)
    for row in result.rows():
        table.add_row(*row)
    console.print(table)
    for note in result.notes():
        console.print(f"  {note}", highlight=False)


def machine_line(m: dict) -> str:
    """`m`, what `machine_info()` returned, in one line."""
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}, "
        f"Python {m['python']}, load average {m['load_avg'][0]}"
    )
