"""Per-process thread settings: configured, or the cores shared among a machine's party processes."""

from __future__ import annotations

import os

import torch

from clicooper.config import parse_config, resume_changes
from clicooper.threads import apply_threads, threads_for


def test_threads_for_shares_the_cores():
    cores = os.cpu_count() or 1
    assert threads_for(3, 4) == 3
    assert threads_for(None, 1) == cores
    assert threads_for(None, cores * 4) == 1


def test_apply_threads_sets_torch_and_keeps_the_default_in_process():
    before = torch.get_num_threads()
    try:
        assert apply_threads(None) == before
        assert apply_threads(1, 4) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_job_threads_is_configurable_and_resume_may_change_it():
    a = parse_config({"job": {"name": "x", "threads": 2}})
    b = parse_config({"job": {"name": "x", "threads": 1}})
    assert a.job.threads == 2
    assert resume_changes(a, b) == [{"field": "job.threads", "from": 2, "to": 1}]
