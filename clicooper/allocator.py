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
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("clicooper.allocator")

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused: the largest glibc accepts, 32 MiB on
# 64-bit (larger ones, rare here, are still mapped and unmapped one by one).
MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
TRIM_THRESHOLD = 512 * 1024 * 1024  # free memory a heap's top may hold before it is returned


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether they were set (False on a
    C library other than glibc, where nothing changes). Call once, at the start of a process."""
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
        log.warning("glibc refused the allocator settings; freed memory is returned as usual")
    return ok
