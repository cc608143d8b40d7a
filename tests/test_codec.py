import struct
import sys
import threading
import time

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
    codec,
    copy_message,
    decode,
    encode,
    encode_frame,
)
from clicooper.transport.messages import Abort, Nonce, Register, RoundEnd, StageSealed

H = Header("job", "a", "b", 1, 2, 3)


@pytest.fixture(autouse=True, params=["native", "reference"])
def implementation(request, monkeypatch):
    """Every test here runs against both codecs: the native fast path (where it is built) and the
    Python reference alone (tests/test_native_codec.py compares the two directly)."""
    if request.param == "reference":
        monkeypatch.setattr(codec, "_native", None)
    elif codec._native is None:
        pytest.skip("the native codec is not built on this machine")
    return request.param


MESSAGES = [
    Forward(header=H, activation=torch.randn(4, 3, 5, 5), train=False),
    Backward(header=H, grad=torch.randn(7, 11), loss=0.25),
    Targets(header=H, labels=torch.tensor([0, 5, 19])),
    Output(header=H, output=torch.randn(2, 20).double(), train=True),
    RoundSealed(header=H),
    StageSealed(header=H, record='{"a": 1}', attestations="[]"),
    Forward(header=H, activation=torch.empty(0, 3)),
    Backward(header=H, grad=torch.randn(3, 5).bfloat16(), loss=0.5),  # training.wire_dtype
    Forward(header=H, activation=torch.randn(2, 3, 4).half()),
    Forward(header=H, activation=torch.tensor(1.5)),  # 0-d: one element, no dimensions
]
# messages whose fields are strings, with text beyond ASCII
TEXT_MESSAGES = [
    Register(
        header=Header("jöb", "trainer_1", "vérifier", 0, 0, 1), position=1, public_key="ab", wm_key="cd"
    ),
    Nonce(header=H, nonce="00ff", links='["a", "b"]'),
    Abort(header=H, reason="trainer_2 refusé: NaN ✗"),
    RoundEnd(header=H, steps=2**40, samples=0),
]


@pytest.mark.parametrize("msg", MESSAGES)
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


@pytest.mark.parametrize("msg", TEXT_MESSAGES)
def test_round_trip_of_scalar_and_text_fields(msg):
    assert decode(encode_frame(msg)) == msg  # dataclass equality: every header and scalar field


@pytest.mark.parametrize("msg", MESSAGES)
def test_a_frame_for_the_network_is_the_same_bytes_as_the_aligned_buffer(msg):
    frame = encode_frame(msg)
    assert type(frame) is bytes and frame == bytes(encode(msg))


def test_frames_take_the_values_of_transposed_and_autograd_tensors():
    x = torch.randn(5, 3, requires_grad=True)
    for t in (x.t(), x * 2, torch.arange(12).reshape(3, 4)[:, ::2]):
        msg = Forward(header=H, activation=t) if t.is_floating_point() else Targets(header=H, labels=t)
        out = decode(encode_frame(msg))
        got = out.activation if isinstance(out, Forward) else out.labels
        assert torch.equal(got, t.detach()) and got.is_contiguous()


def test_tensors_are_aligned_and_independent():
    msg = Forward(header=H, activation=torch.randn(3, 5))
    out = decode(encode(msg))
    assert out.activation.data_ptr() % 64 == 0  # zero-copy views start on a 64-byte boundary
    out.activation.add_(1)  # decoded tensors are writable and do not alias the sender's tensor
    assert not torch.equal(out.activation, msg.activation)


def _tamper(data: bytes, changes: dict[str, int | float]) -> bytes:
    """`data` with values of its fixed header part replaced, named as in its layout's slots
    ("step", "activation.dtype", "activation.shape[0]", ...)."""
    layout = codec._LAYOUT_BY_ID[data[5]]
    values = list(layout.fixed.unpack_from(data))
    for name, value in changes.items():
        values[layout.slots.index(name)] = value
    return layout.fixed.pack(*values) + data[layout.fixed.size :]


def test_rejects_nan_and_inf():
    for bad in (float("nan"), float("inf")):
        t = torch.zeros(2, 2)
        t[1, 1] = bad
        with pytest.raises(CodecError, match="NaN or infinity"):
            decode(bytes(encode(Forward(header=H, activation=t))))


def test_rejects_bad_dtype_shape_kind_and_truncation():
    data = bytes(encode(Forward(header=H, activation=torch.randn(2, 3))))
    assert decode(_tamper(data, {"step": 2})).header == H  # the helper itself changes nothing else
    refused = [
        ({"activation.dtype": 99}, "not allowed"),
        ({"activation.dtype": 0}, "not allowed"),
        ({"activation.shape[0]": 9, "activation.shape[1]": 9}, "truncated"),
        ({"activation.shape[0]": 1}, "padding"),  # 12 bytes, then 52 of the real tensor's as padding
        ({"activation.shape[0]": 0}, "trailing"),
        ({"activation.ndim": 9}, "bad shape"),
        ({"activation.shape[2]": 1}, "bad shape"),  # a dimension beyond ndim
        ({"activation.shape[0]": 2**63}, "bad shape"),
        ({"kind": 200}, "unknown message kind"),
        ({"version": 1}, "wire format version 1, expected 2"),
        ({"round": -1}, "must be >= 0"),
        ({"step": -1}, "must be >= 0"),
        ({"seq": -(2**63)}, "must be >= 0"),
        ({"train": 2}, "expected bool"),
        ({"job_id.len": 10**6}, "run past the header"),
        ({"job_id.len": 2}, "not padded"),  # the strings end early: slack before the tensors
        ({"header_length": 2**20 + 60}, "bad header length"),
        ({"header_length": 4}, "bad header length"),  # shorter than the kind's fixed part
    ]
    for changes, match in refused:
        with pytest.raises(CodecError, match=match):
            decode(_tamper(data, changes))
    for cut in (0, 3, 10, len(data) - 1):
        with pytest.raises(CodecError):
            decode(data[:cut])
    dims = {"activation.ndim": 8, "activation.shape[0]": 0} | {
        f"activation.shape[{i}]": 2**29 for i in range(1, 8)
    }
    with pytest.raises(CodecError):  # no elements, but a shape numpy cannot hold
        decode(_tamper(data, dims))


def test_rejects_slack_and_stray_bytes_around_the_tensors():
    data = bytes(encode(Forward(header=H, activation=torch.randn(2, 3))))
    end = 4 + codec._PREFIX.unpack_from(data)[0]
    slack = _tamper(data, {"header_length": end - 4 + 64})
    with pytest.raises(CodecError, match="not padded"):  # one more block of zeros than needed
        decode(slack[:end] + bytes(64) + slack[end:])
    with pytest.raises(CodecError, match="padding"):  # the first byte after the tensor's 24
        decode(data[: end + 24] + b"\x01" + data[end + 25 :])
    half = bytes(encode(Forward(header=H, activation=torch.randn(8))))  # 32 bytes, 32 of padding
    with pytest.raises(CodecError, match="padding"):  # the last byte of the message
        decode(half[:-1] + b"\x01")


def test_rejects_oversize_messages_and_version_1_peers(monkeypatch):
    data = bytes(encode(Forward(header=H, activation=torch.randn(2, 3))))
    json_frame = struct.pack(">I", 60) + b'{"kind":"forward"}'.ljust(60)  # how version 1 began
    with pytest.raises(CodecError, match="JSON header"):
        decode(json_frame)
    monkeypatch.setattr(codec, "MAX_MESSAGE_BYTES", len(data) - 1)
    monkeypatch.setattr(codec, "_native", None)  # the native limit is compiled in (512 MiB)
    with pytest.raises(CodecError, match="exceeds"):
        decode(data)


def test_rejects_a_malformed_header_body():
    msg = Backward(header=Header("job", "a", "b", 1, 2, 3), grad=torch.zeros(1), loss=0.5)
    data = bytes(encode(msg))
    at = codec._LAYOUTS[Backward].fixed.size  # the strings follow the fixed part: "job", "a", "b"
    assert data[at : at + 5] == b"jobab"
    for bad in (b"\xff\xff\xff", b"\xed\xa0\x80", b"\xc0\x80o"):  # not UTF-8; a surrogate; overlong NUL
        with pytest.raises(CodecError, match="not valid UTF-8"):
            decode(data[:at] + bad + data[at + 3 :])
    with pytest.raises(CodecError, match="not padded"):
        decode(data[: at + 5] + b"\x01" + data[at + 6 :])  # padding must be zeros
    with pytest.raises(CodecError, match="not finite"):
        decode(_tamper(data, {"loss": float("nan")}))


@pytest.mark.parametrize("msg", MESSAGES + TEXT_MESSAGES)
def test_the_encoding_is_canonical(msg):
    """One message, one byte string: what a decoder accepts re-encodes to the same bytes."""
    frame = encode_frame(msg)
    assert encode_frame(decode(frame)) == frame


def test_encoding_a_malformed_message_raises_codec_error():
    for msg in (
        Forward(header=Header("job", "a", "b", 1, 2, 2**63), activation=torch.zeros(1)),  # past i64
        Forward(header=Header("job", "a", "b", 1.5, 2, 3), activation=torch.zeros(1)),
        Forward(header=Header("job", 7, "b", 1, 2, 3), activation=torch.zeros(1)),
        Abort(header=H, reason="\ud800"),  # a lone surrogate: no UTF-8 for it
        Nonce(header=H, nonce=None),
    ):
        with pytest.raises(CodecError):
            encode_frame(msg)


def test_rejects_disallowed_dtype_on_encode():
    with pytest.raises(CodecError, match="not allowed"):
        encode(Forward(header=H, activation=torch.zeros(2, dtype=torch.bool)))


@pytest.mark.parametrize("msg", MESSAGES)
def test_in_process_copy_is_what_decoding_returns(msg):
    """`copy_message` (in-process delivery) gives the message `decode(encode(msg))` gives, with
    tensors that do not alias the sender's, and the hop is charged the encoded size."""
    wire, (copy, nbytes) = decode(bytes(encode(msg))), copy_message(msg)
    assert type(copy) is type(wire) and copy.header == wire.header
    assert nbytes == len(encode(msg))
    for f in ("activation", "grad", "labels", "output"):
        if hasattr(msg, f):
            a, b = getattr(wire, f), getattr(copy, f)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            assert b.numel() == 0 or b.data_ptr() != getattr(msg, f).data_ptr()
    for f in ("loss", "train", "record", "attestations", "micro", "micros"):
        if hasattr(msg, f):
            assert getattr(copy, f) == getattr(wire, f)


def test_in_process_copy_rejects_what_decoding_rejects():
    nan = torch.zeros(2, 2)
    nan[0, 1] = float("nan")
    bad = [
        (Forward(header=H, activation=nan), "NaN or infinity"),
        (Forward(header=H, activation=torch.zeros(2, dtype=torch.bool)), "not allowed"),
        (Forward(header=H, activation=torch.zeros([1] * 9)), "exceeds the message limits"),
        (Forward(header=Header("job", "a", "b", 1, -2, 3), activation=torch.zeros(1)), "must be >= 0"),
        (Forward(header=Header("job", "a", "b", 1, "2", 3), activation=torch.zeros(1)), "expected int"),
        (Backward(header=H, grad=torch.zeros(1), loss=float("inf")), "not finite"),
        (StageSealed(header=H, record="x" * (1024 * 1024 + 1), attestations="[]"), "header exceeds"),
        (Forward(header={"sender": "a"}, activation=torch.zeros(1)), "malformed message"),
    ]
    for msg, match in bad:
        with pytest.raises(CodecError, match=match):
            copy_message(msg)
        # encode refuses some before any byte exists (JSON: a non-finite float; a header without fields)
        with pytest.raises((CodecError, ValueError, AttributeError)):
            decode(bytes(encode(msg)))
    t = torch.randn(3, 4)
    copy, _ = copy_message(Forward(header=H, activation=t.T))  # a non-contiguous view: copied contiguous
    assert copy.activation.is_contiguous() and torch.equal(copy.activation, t.T)


def test_a_reused_encoding_buffer_never_changes_a_message_decoded_from_it(large_buffers):
    """Large encoding buffers are reused (`allocator.byte_buffer`), but only once nothing views them."""
    first = decode(encode(Forward(header=H, activation=torch.zeros(64, 8))))  # views its buffer
    kept = first.activation.clone()
    for _ in range(4):
        assert bool((decode(encode(Forward(header=H, activation=torch.ones(64, 8)))).activation == 1).all())
    assert torch.equal(first.activation, kept)  # its buffer was not handed out again
    address = first.activation.data_ptr()
    del first
    again = decode(encode(Forward(header=H, activation=torch.full((64, 8), 2.0))))
    assert again.activation.data_ptr() == address and torch.equal(again.activation, torch.full((64, 8), 2.0))


def test_senders_on_several_threads_never_share_an_encoding_buffer(large_buffers):
    """Pipelined links encode on several threads at once: each decoded message keeps its values."""
    wrong: list[float] = []

    def sender(thread: int) -> None:
        for i in range(1500):
            value = float(thread * 10_000 + i)
            rows = (64, 96)[i % 2]  # buffers made fresh and buffers cut from larger ones
            out = decode(encode(Forward(header=H, activation=torch.full((rows, 8), value))))
            time.sleep(0)  # let the other senders encode before this one looks at its message
            if not bool((out.activation == value).all()):
                wrong.append(value)

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows, to provoke a race
    try:
        threads = [threading.Thread(target=sender, args=(v,)) for v in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(before)
    assert not wrong
