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
