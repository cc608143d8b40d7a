"""Per-process allocator settings: reuse freed memory instead of faulting in fresh pages.

Every step a party allocates and frees the same few multi-megabyte buffers: frames gRPC received,
decoded tensors, activations and their gradients. glibc serves a block above its mmap threshold
with fresh pages from the kernel and unmaps them on free, and returns the top of its heap to the
kernel once more than its trim threshold is free there; either way the next step faults every page
in again on first touch. On our 2-core virtual machine those page faults were a third of a 1.6 MB
round trip over gRPC (BENCHMARKS.md, "Page faults"). `keep_freed_memory` raises both thresholds so
that freed blocks stay in the process for the next step. The price: a process keeps the memory
it needed at its peak, in every one of its allocator's arenas (what `clicooper bench` reports as
peak RSS), until it exits. The setting is for the whole process and is not undone: call it from a
process's entry point (`clicooper run`, the party programs, `clicooper bench`, whose in-process
chains run with it too).

glibc never keeps blocks above 32 MiB (its largest mmap threshold): each is mapped afresh and
unmapped on free. For the one such buffer we allocate ourselves, a message's encoding buffer
(`byte_buffer`), a process that keeps freed memory reuses the last two once nothing refers to them.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
import threading

import numpy as np

log = logging.getLogger("clicooper.allocator")

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused: the largest glibc accepts, 32 MiB on
# 64-bit (larger ones, rare here, are still mapped and unmapped one by one).
MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
TRIM_THRESHOLD = 512 * 1024 * 1024  # free memory a heap's top may hold before it is returned


class _LargeBuffers:
    """Byte buffers above glibc's largest kept block, handed out again once no view of them is alive.

    A buffer is free when the only references to it are this cache's: whoever holds a buffer or
    anything derived from it (a slice, a memoryview, a numpy array or tensor viewing it) holds a
    reference to it, so a buffer still in use is never handed out twice."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.enabled = False
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _free(self, i: int) -> bool:
        return sys.getrefcount(self._buffers[i]) == 2  # the list's and getrefcount's argument's

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            free = [i for i in range(len(self._buffers)) if self._free(i)]
            for i in free:
                if self._buffers[i].nbytes >= nbytes:
                    return self._buffers[i][:nbytes]
            buf = np.empty(nbytes, dtype=np.uint8)
            if len(self._buffers) < self.keep:
                self._buffers.append(buf)
            elif free:  # too small for this message: make room for the larger one
                self._buffers[free[0]] = buf
            return buf


def _refcounts_are_exact() -> bool:
    """Whether `_LargeBuffers._free` can trust reference counts: CPython with its GIL, where an
    object held by one list reads 2 and by one more name 3 (checked, not assumed). Elsewhere the
    cache stays off and every large buffer is new."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    if sys.implementation.name != "cpython" or not gil:
        return False
    probe = [np.empty(1, dtype=np.uint8)]
    alone = sys.getrefcount(probe[0])
    held = probe[0]
    return alone == 2 and sys.getrefcount(held) == 3


_LARGE = _LargeBuffers(keep=2)  # a sender's last two large messages: enough to alternate
_REFCOUNTS_EXACT = _refcounts_are_exact()


def byte_buffer(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes`. Above MMAP_THRESHOLD, in a process that keeps freed
    memory, a buffer from an earlier call that nothing refers to any more is reused: its pages are
    in memory already (a 64 MB message's encoding took twice a copy when every page was faulted in
    afresh: BENCHMARKS.md, codec)."""
    if nbytes < MMAP_THRESHOLD or not _LARGE.enabled:
        return np.empty(nbytes, dtype=np.uint8)
    return _LARGE.get(nbytes)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process and let `byte_buffer` keep its large
    buffers (on any C library; on CPython with its GIL, `_refcounts_are_exact`). Returns whether the
    thresholds were set (False on a C library other than glibc). Call once, at a process's start."""
    _LARGE.enabled = _REFCOUNTS_EXACT
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    results = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    ok = results == [1, 1]
    if not ok:
        log.warning("glibc refused the allocator settings; the blocks it frees are returned as usual")
    return ok
