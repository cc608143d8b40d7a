"""Freed memory is kept for reuse (`job.keep_freed_memory`): a process that frees and reallocates
the same large buffers step after step stops faulting their pages in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from clicooper import allocator
from clicooper.config import RESUME_MUTABLE, ConfigError, parse_config

# Each "step" allocates three 4 MB buffers, writes every page, and frees them. glibc's defaults
# return the heap's top to the kernel once more than twice the largest freed block is free there,
# so every step faults about two thirds of its 3,072 pages in again (2,016 on our machine); the
# raised thresholds keep them all.
_STEPS = """
import resource, sys
from clicooper.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    blocks = [b"\\x01" * (4 << 20) for _ in range(3)]
    del blocks
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own defaults
    out = subprocess.run(
        [sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
@pytest.mark.skipif("LD_PRELOAD" in os.environ, reason="another allocator may be preloaded")
def test_kept_memory_is_reused_without_page_faults():
    returned, kept = _page_faults("default"), _page_faults("keep")
    assert returned > 10 * 1000, returned  # over 1,000 pages faulted in again every step
    assert kept < 100, (kept, returned)


def test_the_setting_is_on_by_default_and_a_resume_may_change_it():
    assert parse_config({}, allow_empty=True).job.keep_freed_memory is True
    assert parse_config({"job": {"keep_freed_memory": False}}).job.keep_freed_memory is False
    with pytest.raises(ConfigError, match="keep_freed_memory"):
        parse_config({"job": {"keep_freed_memory": "yes"}})
    assert "job.keep_freed_memory" in RESUME_MUTABLE  # a deployment setting, like job.threads


def test_a_large_buffer_is_reused_only_once_nothing_views_it(large_buffers):
    a = allocator.byte_buffer(4096)
    address = a.ctypes.data
    view = np.frombuffer(memoryview(a)[64:128], dtype=np.float32)
    del a
    b = allocator.byte_buffer(4096)  # `a` is viewed still: a buffer of its own
    assert b.ctypes.data != address
    del view
    c = allocator.byte_buffer(2048)  # `a`'s is free and large enough
    assert c.ctypes.data == address and c.nbytes == 2048
    assert allocator.byte_buffer(8192).ctypes.data not in (address, b.ctypes.data)  # both in use


def test_small_buffers_and_a_process_that_returns_memory_get_fresh_arrays(large_buffers):
    assert allocator.byte_buffer(512).base is None  # below the threshold: numpy's own array
    large_buffers.enabled = False
    assert allocator.byte_buffer(4096).base is None and not large_buffers._buffers
