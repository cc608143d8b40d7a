"""Transcript and segment digests hash tensors straight from memory (no copies) and keep the digests
they had when the tensor's canonical bytes were built first."""

from __future__ import annotations

import hashlib
import struct

import torch

from clicooper.provenance.records import TranscriptHasher, _frame, segment_digest, tensor_payload


def test_streamed_transcript_equals_the_framed_bytes_definition():
    t = torch.randn(6, 5).t()  # not contiguous
    a, b = TranscriptHasher(), TranscriptHasher()
    for step in range(3):
        a.update_tensor("forward", 2, step, t * step)
        b.update("forward", struct.pack(">QQ", 2, step) + tensor_payload(t * step))
    a.update_tensor("backward", 2, 0, torch.zeros(0))
    b.update("backward", struct.pack(">QQ", 2, 0) + tensor_payload(torch.zeros(0)))
    assert a.digest() == b.digest()


def test_streamed_segment_digest_equals_the_framed_bytes_definition():
    sd = {"w": torch.randn(4, 3), "b": torch.arange(5), "v": torch.randn(3, 4).t()}
    h = hashlib.sha256(b"clicooper/segment/v1")
    for name in sorted(sd):
        h.update(_frame(name.encode(), tensor_payload(sd[name])))
    assert segment_digest(sd) == h.hexdigest()


def test_background_hashing_gives_the_same_digests_and_checkpoints():
    """Hashed on the background thread (more tensors than the backlog holds, raw payloads interleaved,
    a checkpoint taken and resumed midway): every digest equals the synchronous one."""
    tensors = [torch.randn(64, 16, 7, 7) * i for i in range(40)]
    sync, bg = TranscriptHasher(), TranscriptHasher(background=True)
    for i, t in enumerate(tensors):
        for h in (sync, bg):
            h.update_tensor("forward" if i % 3 else "backward", 1, i, t)
            if i == 20:
                h.update("forward", b"raw payload")
    assert bg.messages == sync.messages == 41
    state = bg.state_dict()
    resumed = TranscriptHasher(background=True)
    resumed.load_state_dict(state)
    for h in (sync, bg, resumed):
        h.update_tensor("backward", 1, 99, tensors[1].transpose(1, 3))  # not contiguous
    assert bg.digest() == sync.digest() == resumed.digest()


def test_the_backlog_is_bounded_and_surfaces_errors():
    from clicooper.background import Backlog, submit

    backlog = Backlog(limit=4)
    for i in range(10):
        backlog.add(submit(lambda i=i: i))
        assert len(backlog) <= 4
    backlog.settle()
    assert len(backlog) == 0

    def fail() -> None:
        raise RuntimeError("hash failed")

    backlog.add(submit(fail))
    try:
        backlog.settle()
    except RuntimeError as e:
        assert "hash failed" in str(e)
    else:
        raise AssertionError("an error on the background thread was lost")


def test_the_background_thread_is_recreated_in_a_forked_child():
    import multiprocessing as mp

    from clicooper.background import submit

    assert submit(lambda: 1).result() == 1  # the parent's thread exists before the fork
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(_in_child) == 2


def _in_child() -> int:
    from clicooper.background import submit

    return submit(lambda: 2).result(timeout=10)
