import struct

import pytest
import torch

from clicooper.transport import (
    Backward,
    CodecError,
    Forward,
    Header,
    Output,
    RoundSealed,
    Targets,
    decode,
    encode,
)
from clicooper.transport.messages import StageSealed

H = Header("job", "a", "b", 1, 2, 3)


@pytest.mark.parametrize(
    "msg",
    [
        Forward(header=H, activation=torch.randn(4, 3, 5, 5), train=False),
        Backward(header=H, grad=torch.randn(7, 11), loss=0.25),
        Targets(header=H, labels=torch.tensor([0, 5, 19])),
        Output(header=H, output=torch.randn(2, 20).double(), train=True),
        RoundSealed(header=H),
        StageSealed(header=H, record='{"a": 1}', attestations="[]"),
        Forward(header=H, activation=torch.empty(0, 3)),
    ],
)
def test_round_trip(msg):
    out = decode(bytes(encode(msg)))  # bytes: the read-only (network) path
    assert type(out) is type(msg) and out.header == msg.header
    for f in ("activation", "grad", "labels", "output"):
        if hasattr(msg, f):
            a, b = getattr(msg, f), getattr(out, f)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    out2 = decode(encode(msg))  # writable buffer: the zero-copy in-process path
    for f in ("activation", "grad", "labels", "output"):
        if hasattr(msg, f):
            assert torch.equal(getattr(out2, f), getattr(msg, f))
    for f in ("loss", "train", "record"):
        if hasattr(msg, f):
            assert getattr(out, f) == getattr(msg, f)


def test_tensors_are_aligned_and_independent():
    msg = Forward(header=H, activation=torch.randn(3, 5))
    out = decode(encode(msg))
    assert out.activation.data_ptr() % 64 == 0  # zero-copy views start on a 64-byte boundary
    out.activation.add_(1)  # decoded tensors are writable and do not alias the sender's tensor
    assert not torch.equal(out.activation, msg.activation)


def _tamper(data: bytes, old: bytes, new: bytes) -> bytes:
    (n,) = struct.unpack(">I", data[:4])
    head = data[4 : 4 + n].rstrip(b" ").replace(old, new)
    assert len(head) <= n
    head += b" " * (n - len(head))  # keep the padded header length
    return data[:4] + head + data[4 + n :]


def test_rejects_nan_and_inf():
    for bad in (float("nan"), float("inf")):
        t = torch.zeros(2, 2)
        t[1, 1] = bad
        with pytest.raises(CodecError, match="NaN or infinity"):
            decode(bytes(encode(Forward(header=H, activation=t))))


def test_rejects_bad_dtype_shape_kind_and_truncation():
    data = bytes(encode(Forward(header=H, activation=torch.randn(2, 3))))
    with pytest.raises(CodecError, match="not allowed"):
        decode(_tamper(data, b'"float32"', b'"object" '))
    with pytest.raises(CodecError, match="truncated"):
        decode(_tamper(data, b"[2,3]", b"[9,9]"))
    with pytest.raises(CodecError, match="padding"):
        decode(_tamper(data, b"[2,3]", b"[1,3]"))
    with pytest.raises(CodecError, match="trailing"):
        decode(_tamper(data, b"[2,3]", b"[0,3]"))
    with pytest.raises(CodecError, match="unknown message kind"):
        decode(_tamper(data, b'"forward"', b'"pickle" '))
    with pytest.raises(CodecError):
        decode(data[:10])
    with pytest.raises(CodecError, match="not valid JSON"):
        decode(_tamper(data, b"{", b"["))
    with pytest.raises(CodecError, match="expected int"):
        decode(_tamper(data, b'"step":2', b'"step":"2"'))


def test_rejects_disallowed_dtype_on_encode():
    with pytest.raises(CodecError, match="not allowed"):
        encode(Forward(header=H, activation=torch.zeros(2, dtype=torch.bool)))
