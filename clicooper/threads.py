"""Per-process torch thread settings, so that parties sharing a machine do not oversubscribe it.

Every party program sets its intra-op threads once at start: `job.threads` when configured, else an
equal share of this machine's cores among the party processes on it. OpenMP workers of several
processes (or of one process whose parties take turns on small tensors) that outnumber the cores
spin and wait on each other: BENCHMARKS.md measured the in-process chain at 1.13x centralized with
one thread against 1.30x with two on a 2-core machine.
"""

from __future__ import annotations

import os

import torch


def threads_for(configured: int | None, processes_on_machine: int = 1) -> int:
    """`configured`, or this machine's cores divided among its party processes (at least 1)."""
    if configured is not None:
        return configured
    return max(1, (os.cpu_count() or 1) // max(processes_on_machine, 1))


def apply_threads(configured: int | None, processes_on_machine: int = 1) -> int:
    """Set torch's intra-op threads for this process and return how many. In-process (one process
    for every party) with nothing configured, torch's own default is kept."""
    if configured is None and processes_on_machine <= 1:
        return torch.get_num_threads()
    n = threads_for(configured, processes_on_machine)
    torch.set_num_threads(n)
    return n
