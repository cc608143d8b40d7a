"""One background thread per process, for work that can overlap a party's training step.

Protections do work that no step waits for: hashing each relayed tensor into the provenance
transcript (about 7 ms a step on the default job), drawing the next step's secure DP noise
(about 9 ms) and computing the next step's watermark regulariser gradient (about 1 ms). All are
C code that releases the GIL (hashlib on buffers over 2 KB, ChaCha20 and torch kernels), so a
thread runs them beside torch's own. One thread per process keeps the work
in submission order, which the transcript's hash chains need, and adds one busy thread at most.
It pays where a core is free (one torch thread per party on a 2-core machine); on a saturated
machine it only moves the work.

`Backlog` bounds the work queued by one owner: a producer faster than the thread waits for the
oldest item instead of holding every pending tensor in memory.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_worker: tuple[int, ThreadPoolExecutor] | None = None  # (pid that created it, executor)


def submit(fn: Callable[..., T], *args: object) -> Future[T]:
    """Run `fn(*args)` on this process's background thread (created on first use, and again in a
    forked child, which inherits no threads)."""
    global _worker
    with _lock:
        if _worker is None or _worker[0] != os.getpid():
            _worker = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="clicooper-bg"))
        executor = _worker[1]
    return executor.submit(fn, *args)


class Backlog:
    """The futures one owner queued, oldest first; `settle` waits for all and re-raises the first
    error, so nothing the background thread did is ever silently lost."""

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self._pending: deque[Future] = deque()

    def add(self, future: Future) -> None:
        self._pending.append(future)
        while len(self._pending) > self.limit:
            self._pending.popleft().result()

    def settle(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __len__(self) -> int:
        return len(self._pending)
