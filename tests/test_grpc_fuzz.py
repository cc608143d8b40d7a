"""Hypothesis fuzzing of the decoder and of a live trainer behind the gRPC transport.

The live party is a real `Trainer` (trainer_2) in its own transport over mutual TLS. The fuzzer
holds trainer_1's valid certificate (the strongest position an outsider can reach: a compromised
neighbour) and sends malformed frames on one raw stream: random bytes, mutated valid frames,
wrong shapes and dtypes, NaN/Inf, oversize header lengths, spoofed senders, kinds not allowed on
the link, replayed and out-of-order sequence numbers. Every frame must be answered: refused with a
reason by the transport, or accepted and then either processed or reported by the trainer as an
Abort to the data owner. Afterwards the trainer still serves honest traffic, forward and backward.
"""

from __future__ import annotations

import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from clicooper.parties.trainer import Trainer
from clicooper.transport import (
    Backward,
    CodecError,
    Forward,
    Header,
    Targets,
    TransportError,
    decode,
    encode,
    encode_frame,
)
from clicooper.transport.codec import _LAYOUT_BY_ID, WIRE_VERSION
from clicooper.transport.grpc import LocalCA, RemoteAbort, Roster
from clicooper.transport.messages import Abort, Nonce
from tests.grpc_helpers import RawLink, endpoint
from tests.strategies import tensors

pytestmark = pytest.mark.timeout(240)

JOB = "fuzzjob"
IN = 4
FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Live:
    def __init__(self) -> None:
        self.roster = Roster.chain(JOB, 3)
        ca = LocalCA.create("fuzz CA")
        self.pki = {p: ca.issue(JOB, p) for p in self.roster.parties}
        book: dict[str, str] = {}
        self.t3 = endpoint(self.roster, self.pki, "trainer_3", None, book)  # pulls what trainer_2 sends on
        self.do = endpoint(self.roster, self.pki, "data_owner", None, book)  # pulls the aborts
        self.t2 = endpoint(self.roster, self.pki, "trainer_2", None, book, register=False)
        torch.manual_seed(0)
        seg = nn.Sequential(nn.Linear(IN, 3))
        self.trainer = Trainer(
            name="trainer_2",
            position=2,
            job_id=JOB,
            transport=self.t2,
            segment=seg,
            optimizer=torch.optim.SGD(seg.parameters(), lr=0.1),
            prev="trainer_1",
            next="trainer_3",
            data_owner="data_owner",
            input_shape=(IN,),
        )
        book["trainer_2"] = self.t2.addresses["trainer_2"]
        self.t3.addresses.update(book)
        self.t1 = endpoint(self.roster, self.pki, "trainer_1", None, book)
        self.t2.addresses.update(book)
        self.raw = RawLink(self.pki["trainer_1"], book["trainer_2"], "trainer_2")
        self.seq = 0
        self.accepted = 0
        self.refused = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def close(self) -> None:
        self.raw.close()
        for t in (self.t1, self.t2, self.t3, self.do):
            t.close()


@pytest.fixture(scope="module")
def live():
    lv = Live()
    yield lv
    lv.close()


# -- frame strategies ---------------------------------------------------------------------------
@st.composite
def messages(draw, lv: Live):
    kind = draw(st.sampled_from([Forward, Forward, Forward, Backward, Targets]))
    sender = draw(st.sampled_from(["trainer_1"] * 6 + ["data_owner", "trainer_3", "mallory"]))
    receiver = draw(st.sampled_from(["trainer_2"] * 8 + ["trainer_3"]))
    job = draw(st.sampled_from([JOB] * 8 + ["otherjob"]))
    seq_mode = draw(st.sampled_from(["next"] * 6 + ["replay", "huge_gap"]))
    seq = {"next": None, "replay": max(lv.seq - draw(st.integers(0, 3)), 0), "huge_gap": None}[seq_mode]
    if seq is None:
        seq = lv.next_seq()
    rnd = draw(st.integers(-2, 1000))
    step = draw(st.integers(-2, 1000))
    h = Header(job, sender, receiver, rnd, step, seq)
    if kind is Forward:
        right = draw(st.booleans())  # the right shape and dtype, or anything
        x = torch.randn(draw(st.integers(1, 5)), IN) if right else draw(tensors())
        return Forward(header=h, activation=x, train=draw(st.booleans()))
    if kind is Backward:
        return Backward(header=h, grad=draw(tensors()), loss=draw(st.floats(-10, 10)))
    return Targets(header=h, labels=torch.zeros(2, dtype=torch.int64))


def _header(seq: int) -> Header:
    return Header(JOB, "trainer_1", "trainer_2", 0, 0, seq)


# valid messages of several kinds (by sequence number), whose header fields the fuzzer then spoils
_HEADER_BASES = [
    lambda seq: Forward(header=_header(seq), activation=torch.randn(2, IN)),
    lambda seq: Backward(header=_header(seq), grad=torch.randn(2, 3), loss=0.5),
    lambda seq: Nonce(header=_header(seq), nonce="ab" * 16, links="[]"),
    lambda seq: Abort(header=_header(seq), reason="stop"),
]
# hostile values for each kind of value in a header (struct format character)
_HOSTILE = {
    "B": [0, 1, 2, 9, 255],
    "I": [0, 1, 63, 2**20 + 1, 2**32 - 1],
    "q": [-(2**63), -1, 0, 1, 2**31, 2**63 - 1],
    "Q": [0, 1, 2**31, 2**40, 2**64 - 1],
    "d": [float("nan"), float("inf"), -0.0, 1e308],
}


def _raw_encode(msg) -> bytes:
    """encode() refuses unknown dtypes and malformed fields; NaN/Inf scalars and tensors, and
    negative counters, still encode (the receiver refuses them)."""
    try:
        return bytes(encode(msg))
    except CodecError:
        return b"\x00\x00\x00\x00"


@st.composite
def frames(draw, lv: Live) -> bytes:
    how = draw(st.sampled_from(["message", "message", "mutated", "random", "header", "length"]))
    if how == "random":
        return draw(st.binary(max_size=512))
    if how == "length":  # a header length pointing past the frame or past the limit
        n = draw(st.sampled_from([0, 5, 63, 2**20 + 1, 2**31, 2**32 - 1]))
        return struct.pack("<IBB", n, WIRE_VERSION, 0) + draw(st.binary(max_size=64))
    if how == "header":  # a well-framed message with hostile values in its binary header
        data = _raw_encode(draw(st.sampled_from(_HEADER_BASES))(lv.next_seq()))
        layout = _LAYOUT_BY_ID[data[5]]
        values = list(layout.fixed.unpack_from(data))
        formats = layout.fixed.format.removeprefix("<")  # one format character a value
        # not seq: one accepted frame with seq 2**63 - 1 would leave later frames on the link none
        spoilable = [i for i, slot in enumerate(layout.slots) if slot != "seq"]
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.sampled_from(spoilable))
            values[i] = draw(st.sampled_from(_HOSTILE[formats[i]]))
        return layout.fixed.pack(*values) + data[layout.fixed.size :] + draw(st.binary(max_size=8))
    data = bytearray(_raw_encode(draw(messages(lv))))
    if how == "mutated" and data:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    return bytes(data)


# -- the decoder alone ---------------------------------------------------------------------------
@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.binary(max_size=1024))
def test_decoder_only_raises_codec_errors_on_random_bytes(data):
    try:
        msg = decode(data)
    except CodecError as e:
        assert str(e)
    else:  # what a decoder accepts is the one encoding of what it returns
        assert encode_frame(msg) == data


def test_decoder_refuses_an_oversize_header():
    n = 2**20 + 60  # 4 + n is 64-byte aligned, and past the limit
    with pytest.raises(CodecError, match="bad header length"):
        decode(struct.pack("<IBB", n, WIRE_VERSION, 0) + bytes(n - 2))


def _drain(t, party: str) -> list:
    """Everything queued for a pulling party right now (an Abort is returned as its RemoteAbort)."""
    out = []
    while True:
        try:
            out.append(t.receive(party, timeout=0.001))
        except RemoteAbort as e:
            out.append(e)
        except TransportError:
            return out


# -- a live trainer --------------------------------------------------------------------------------
def test_live_trainer_survives_fuzzing_and_keeps_serving(live):
    forwarded, aborts = 0, []

    def collect() -> None:
        """Take what trainer_2 sent on or reported so far: the receivers' queues hold at most
        `max_pending` messages, and more accepted frames than that can fail before the end."""
        nonlocal forwarded
        relayed = _drain(live.t3, "trainer_3")
        assert all(isinstance(m, Forward) for m in relayed), relayed
        forwarded += len(relayed)
        aborts.extend(str(e) for e in _drain(live.do, "data_owner"))

    @FUZZ
    @given(frames(live))
    def one(frame):
        ack = live.raw.exchange(frame)
        assert ack[:1] in (b"\x00", b"\x01"), ack
        if ack[:1] == b"\x01":
            assert ack.startswith(b"\x01trainer_2: ") and len(ack) > 20, ack
            live.refused += 1
        else:
            assert ack == b"\x00"
            live.accepted += 1
            collect()

    one()
    assert live.refused > 500 and live.accepted > 100, (live.refused, live.accepted)
    assert len(live.t2.refused) == live.refused
    # every accepted frame was either processed (sent on to trainer_3) or reported as an Abort
    deadline = time.time() + 60
    while forwarded + len(aborts) < live.accepted and time.time() < deadline:
        collect()
        time.sleep(0.02)
    assert forwarded + len(aborts) == live.accepted, (forwarded, len(aborts), live.accepted)
    assert aborts and all(a.startswith("trainer_2 aborted: trainer_2 failed on ") for a in aborts)
    assert any("ProtocolError" in a for a in aborts)
    assert len(live.t2.handler_errors) == len(aborts)

    # honest traffic afterwards: an inference pass, then a full training step forward and back
    seq = 10**9
    x = torch.randn(3, IN)
    live.t1.send(Forward(header=Header(JOB, "trainer_1", "trainer_2", 0, 0, seq), activation=x, train=False))
    out = live.t3.receive("trainer_3", timeout=10)
    with torch.no_grad():
        expect = live.trainer.segment(x)
    assert isinstance(out, Forward) and torch.allclose(out.activation, expect)
    key = (10**6, 0)
    live.t1.send(Forward(header=Header(JOB, "trainer_1", "trainer_2", *key, seq + 1), activation=x))
    out = live.t3.receive("trainer_3", timeout=10)
    assert (out.header.round, out.header.step) == key
    g = torch.ones_like(out.activation)
    live.t3.send(Backward(header=Header(JOB, "trainer_3", "trainer_2", *key, seq), grad=g, loss=0.5))
    back = live.t1.receive("trainer_1", timeout=10)
    assert isinstance(back, Backward) and back.grad.shape == x.shape and back.loss == 0.5
    assert live.raw.exchange(b"junk")[:1] == b"\x01"  # and the fuzzer's own stream is still open
