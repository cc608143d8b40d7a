"""The gRPC transport on loopback: a relay over mutual TLS, refused peers, limits, timeouts, aborts."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
import torch

from clicooper.transport import Backward, Forward, Header, Targets, TransportError, decode, encode
from clicooper.transport.grpc import (
    GrpcOptions,
    GrpcTransport,
    LocalCA,
    RemoteAbort,
    Roster,
    TlsError,
    cert_identity,
    make_local_pki,
)
from clicooper.transport.messages import Abort
from tests.grpc_helpers import FAST, endpoint, raw_exchange

pytestmark = pytest.mark.timeout(60)

JOB = "gjob"


@pytest.fixture(scope="module")
def roster() -> Roster:
    return Roster.chain(JOB, 3)


_CA: list[LocalCA] = []


@pytest.fixture(scope="module")
def pki(roster):
    """Certificates for the roster; the CA is kept to issue valid certificates outside the roster."""
    ca = LocalCA.create("test CA")
    _CA[:] = [ca]
    return {p: ca.issue(JOB, p) for p in roster.parties}


def _same_ca_cert(job, party):
    return _CA[0].issue(job, party)


@pytest.fixture
def closing():
    made: list[GrpcTransport] = []
    yield made
    for t in made:
        t.close()


def _fwd(sender, receiver, seq, x, *, step=0, job=JOB, kind=Forward):
    h = Header(job, sender, receiver, 0, step, seq)
    return kind(header=h, activation=x) if kind is Forward else kind(header=h, grad=x)


def _wait_for(pred, timeout: float = 5.0) -> None:
    """Poll until `pred()` holds or `timeout` seconds pass (the caller asserts what it needs)."""
    deadline = time.time() + timeout
    while not pred() and time.time() < deadline:
        time.sleep(0.01)


def test_relay_over_mutual_tls(roster, pki, closing, tmp_path):
    """data_owner -> trainer_1 -> trainer_2 -> trainer_3 and the gradient back, each party its own
    transport and server: tensors arrive bit-exact, bytes are counted per hop."""
    book: dict[str, str] = {}
    ts: dict[str, GrpcTransport] = {}
    names = list(roster.trainers)

    def trainer(i):
        me = names[i]

        def handle(msg):
            t = ts[me]
            h = msg.header
            if isinstance(msg, Forward):
                if i + 1 < len(names):
                    t.send(_fwd(me, names[i + 1], h.seq, msg.activation * 2, step=h.step))
                else:
                    t.send(_fwd(me, names[i - 1], h.seq, msg.activation + 1, step=h.step, kind=Backward))
            else:
                to = names[i - 1] if i else "data_owner"
                t.send(_fwd(me, to, h.seq, msg.grad, step=h.step, kind=Backward))

        return handle

    for i in reversed(range(len(names))):  # servers first, so every address is known when dialled
        ts[names[i]] = endpoint(roster, pki, names[i], trainer(i), book)
    ts["data_owner"] = endpoint(roster, pki, "data_owner", None, book)
    for i in range(len(names)):
        ts[names[i]].addresses.update(book)
    closing.extend(ts.values())
    do = ts["data_owner"]
    for step in range(3):
        x = torch.randn(8, 4, 3, 3)
        do.send(_fwd("data_owner", "trainer_1", step + 1, x, step=step))
        reply = do.receive("data_owner", timeout=10)
        assert isinstance(reply, Backward) and reply.header.step == step
        assert reply.header.sender == "trainer_1"
        assert torch.equal(reply.grad, x * 4 + 1)
    assert do.messages_sent[("data_owner", "trainer_1")] == 3
    assert do.bytes_sent[("data_owner", "trainer_1")] >= 3 * x.numel() * 4
    assert ts["trainer_3"].messages_sent[("trainer_3", "trainer_2")] == 3
    assert not any(t.refused for t in ts.values())


def test_receive_honours_its_timeout(roster, pki, closing):
    do = endpoint(roster, pki, "data_owner", None, {})
    closing.append(do)
    t0 = time.perf_counter()
    with pytest.raises(TransportError, match=r"data_owner: no message within 0.3s"):
        do.receive("data_owner", timeout=0.3)
    assert time.perf_counter() - t0 < 2


def test_credentials_are_party_bound(roster, pki):
    assert cert_identity(pki["trainer_2"].cert_chain) == (JOB, "trainer_2")
    t = GrpcTransport(roster, {"trainer_1": "127.0.0.1:0"}, tls={"trainer_1": pki["trainer_2"]}, options=FAST)
    with pytest.raises(TlsError, match="names 'trainer_2'"):
        t.register("trainer_1", None)
    t.close()
    with pytest.raises(TlsError, match="mutual TLS needs credentials"):
        GrpcTransport(roster, {})


def test_pki_files_keep_private_keys_private(tmp_path, roster):
    from clicooper.transport.grpc.tls import main

    main([str(tmp_path), JOB, *roster.parties])  # python -m clicooper.transport.grpc OUT JOB PARTY...
    for p in roster.parties:
        assert (tmp_path / p / "key.pem").stat().st_mode & 0o077 == 0
        assert sorted(f.name for f in (tmp_path / p).iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    from clicooper.transport.grpc import TlsCredentials

    assert TlsCredentials.load(tmp_path / "trainer_1").identity() == (JOB, "trainer_1")
    assert LocalCA.load(tmp_path / "ca").cert_pem == (tmp_path / "trainer_1" / "ca.pem").read_bytes()


# -- refused peers ----------------------------------------------------------------------------
@pytest.fixture
def trainer2(roster, pki, closing):
    got: list = []
    t = endpoint(roster, pki, "trainer_2", got.append, {})
    closing.append(t)
    return t, got


def _frame(sender="trainer_1", receiver="trainer_2", seq=1, job=JOB):
    return bytes(encode(_fwd(sender, receiver, seq, torch.ones(2, 3))))


def test_client_without_certificate_is_refused(pki, trainer2):
    t, got = trainer2
    with pytest.raises(grpc.RpcError):
        raw_exchange(None, pki["trainer_1"].ca_cert, t.addresses["trainer_2"], "trainer_2", [_frame()])
    time.sleep(0.1)
    assert got == []


def test_client_with_certificate_from_another_ca_is_refused(roster, trainer2, closing):
    t, got = trainer2
    other = make_local_pki(None, JOB, ["trainer_1"])["trainer_1"]  # right name, wrong CA
    with pytest.raises(grpc.RpcError):
        raw_exchange(other, other.ca_cert, t.addresses["trainer_2"], "trainer_2", [_frame()])
    # and through the transport: the connection never comes up, after bounded retries
    rogue = GrpcTransport(
        roster,
        {"trainer_1": "127.0.0.1:0", "trainer_2": t.addresses["trainer_2"]},
        tls={"trainer_1": other},
        options=FAST,
    )
    closing.append(rogue)
    rogue.register("trainer_1", None)
    t0 = time.perf_counter()
    with pytest.raises(TransportError, match="could not connect to trainer_2 .* after 2 attempts"):
        rogue.send(_fwd("trainer_1", "trainer_2", 1, torch.ones(2)))
    assert time.perf_counter() - t0 < 8
    assert got == []


def test_valid_certificate_not_in_roster_is_refused(pki, trainer2):
    t, got = trainer2
    mallory = _same_ca_cert(JOB, "mallory")
    with pytest.raises(grpc.RpcError) as e:
        raw_exchange(mallory, mallory.ca_cert, t.addresses["trainer_2"], "trainer_2", [_frame("mallory")])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'mallory' is not in the roster" in e.value.details()
    assert got == []


def test_certificate_for_another_job_is_refused(pki, trainer2):
    t, got = trainer2
    other_job = _same_ca_cert("otherjob", "trainer_1")
    with pytest.raises(grpc.RpcError) as e:
        raw_exchange(other_job, other_job.ca_cert, t.addresses["trainer_2"], "trainer_2", [_frame()])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certified for job 'otherjob'" in e.value.details()
    assert got == []


def test_valid_certificate_at_the_wrong_position_is_refused(roster, pki, closing):
    got: list = []
    t3 = endpoint(roster, pki, "trainer_3", got.append, {})
    closing.append(t3)
    addr = t3.addresses["trainer_3"]
    # trainer_1 is in the roster but is not trainer_3's neighbour
    with pytest.raises(grpc.RpcError) as e:
        raw_exchange(
            pki["trainer_1"], pki["trainer_1"].ca_cert, addr, "trainer_3", [_frame("trainer_1", "trainer_3")]
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "trainer_1 has no link to trainer_3" in e.value.details()
    # trainer_2 is trainer_3's predecessor: a Forward is accepted ...
    t2 = pki["trainer_2"]
    acks = raw_exchange(t2, t2.ca_cert, addr, "trainer_3", [_frame("trainer_2", "trainer_3", 1)])
    assert acks == [b"\x00"]
    # ... but a Backward (the successor's message) from it is not, nor a Forward claiming another sender
    # or a replay of the same sequence number
    bwd = bytes(encode(_fwd("trainer_2", "trainer_3", 2, torch.ones(2, 3), kind=Backward)))
    spoof = _frame("data_owner", "trainer_3", 3)
    replay = _frame("trainer_2", "trainer_3", 1)
    acks = [raw_exchange(t2, t2.ca_cert, addr, "trainer_3", [f])[0] for f in (bwd, spoof, replay)]
    assert [a[:1] for a in acks] == [b"\x01"] * 3
    assert b"trainer_2 may not send backward messages to trainer_3" in acks[0]
    assert b"trainer_2 sent a forward claiming to be from 'data_owner'" in acks[1]
    assert b"seq 1 <= 1 (replayed or reordered)" in acks[2]
    # after a refusal the rest of its stream is refused, valid or not: nothing arrives past a gap
    acks = raw_exchange(t2, t2.ca_cert, addr, "trainer_3", [bwd, _frame("trainer_2", "trainer_3", 9)])
    assert acks[1] == b"\x01an earlier frame on this stream was refused"
    time.sleep(0.1)
    assert len(got) == 1 and got[0].header.sender == "trainer_2"


def test_server_identity_is_checked_by_the_client(roster, pki, closing):
    """An address book pointing trainer_1's traffic at trainer_3's server: the client refuses it,
    because trainer_3's certificate does not name trainer_2."""
    got: list = []
    t3 = endpoint(roster, pki, "trainer_3", got.append, {})
    t1 = endpoint(roster, pki, "trainer_1", None, {"trainer_2": t3.addresses["trainer_3"]})
    closing.extend([t3, t1])
    with pytest.raises(TransportError, match="could not connect to trainer_2"):
        t1.send(_fwd("trainer_1", "trainer_2", 1, torch.ones(2)))
    assert got == []


# -- plaintext, limits, retries, aborts -------------------------------------------------------
def test_plaintext_only_behind_the_flag_with_a_warning(roster, caplog, closing):
    with caplog.at_level(logging.WARNING, logger="clicooper.transport.grpc"):
        t2 = GrpcTransport(roster, {"trainer_2": "127.0.0.1:0"}, insecure=True, options=FAST)
    assert "PLAINTEXT" in caplog.text
    got: list = []
    t2.register("trainer_2", got.append)
    t1 = GrpcTransport(roster, {"trainer_1": "127.0.0.1:0", **t2.addresses}, insecure=True, options=FAST)
    t1.register("trainer_1", None)
    closing.extend([t1, t2])
    t1.send(_fwd("trainer_1", "trainer_2", 1, torch.ones(2)))
    t1.send(_fwd("trainer_1", "trainer_2", 2, torch.ones(2)))
    with pytest.raises(TransportError, match="may not send backward messages to 'trainer_2'"):
        t1.send(_fwd("trainer_1", "trainer_2", 3, torch.ones(2), kind=Backward))
    time.sleep(0.1)
    assert [m.header.seq for m in got] == [1, 2]


def test_oversize_messages_are_refused_cleanly(roster, pki, closing):
    small = GrpcOptions(**{**FAST.__dict__, "max_message_bytes": 1 << 20})
    got: list = []
    t2 = endpoint(roster, pki, "trainer_2", got.append, {}, options=small)
    # the sender's own limit: refused before anything is sent
    t1s = endpoint(roster, pki, "trainer_1", None, dict(t2.addresses), options=small)
    big = torch.zeros(600_000)  # 2.4 MB
    with pytest.raises(TransportError, match=r"exceeds the 1048576-byte message limit"):
        t1s.send(_fwd("trainer_1", "trainer_2", 1, big))
    t1s.close()
    # a sender with a larger limit: the receiver's gRPC limit refuses the frame
    t1 = endpoint(roster, pki, "trainer_1", None, dict(t2.addresses))
    closing.extend([t2, t1])
    with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED.*receiver's message limit"):
        t1.send(_fwd("trainer_1", "trainer_2", 2, big))
    # the link re-opens and the receiver keeps serving
    t1.send(_fwd("trainer_1", "trainer_2", 3, torch.ones(4)))
    _wait_for(lambda: got)
    assert [m.header.seq for m in got] == [3]


def test_connect_retries_are_bounded(roster, pki, closing):
    import socket

    with socket.socket() as s:  # a free port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t1 = endpoint(roster, pki, "trainer_1", None, {"trainer_2": f"127.0.0.1:{port}"})
    closing.append(t1)
    t0 = time.perf_counter()
    with pytest.raises(TransportError, match="after 2 attempts"):
        t1.send(_fwd("trainer_1", "trainer_2", 1, torch.ones(2)))
    assert 1.0 < time.perf_counter() - t0 < 6


def test_a_failing_party_aborts_the_data_owner(roster, pki, closing):
    """A trainer's exception travels as an Abort message and surfaces in the data owner's receive."""

    def broken(msg):
        raise ValueError("segment exploded")

    book: dict[str, str] = {}
    t3 = endpoint(roster, pki, "trainer_3", broken, book)
    do = endpoint(roster, pki, "data_owner", None, book)
    t3.addresses.update(book)
    closing.extend([t3, do])
    labels = torch.zeros(4, dtype=torch.int64)
    do.send(Targets(header=Header(JOB, "data_owner", "trainer_3", 0, 0, 1), labels=labels))
    with pytest.raises(
        RemoteAbort,
        match=r"trainer_3 aborted: trainer_3 failed on targets from data_owner: "
        r"ValueError: segment exploded",
    ):
        do.receive("data_owner", timeout=10)
    assert t3.handler_errors
    # the data owner can tell everyone it reaches to stop
    assert do.abort_all("data_owner", "stopping") == ["trainer_3"]
    time.sleep(0.2)
    assert [a.reason for a in t3.aborts] == ["stopping"]


def test_abort_message_round_trips():
    msg = Abort(header=Header(JOB, "trainer_2", "data_owner", 1, 5, 0), reason="shape (3,) != (4,)")
    assert decode(encode(msg)) == msg


def test_concurrent_senders_share_nothing(roster, pki, closing):
    """Two local parties of one transport send at once on different links; all frames arrive."""
    got: list = []
    t2 = endpoint(roster, pki, "trainer_2", got.append, {})
    book = dict(t2.addresses)
    both = GrpcTransport(
        roster,
        {**book, "trainer_1": "127.0.0.1:0", "trainer_3": "127.0.0.1:0"},
        tls={"trainer_1": pki["trainer_1"], "trainer_3": pki["trainer_3"]},
        options=FAST,
    )
    both.register("trainer_1", None)
    both.register("trainer_3", None)
    closing.extend([t2, both])

    def burst(sender, kind):
        for i in range(20):
            both.send(_fwd(sender, "trainer_2", i + 1, torch.ones(3), step=i, kind=kind))

    ths = [threading.Thread(target=burst, args=a) for a in (("trainer_1", Forward), ("trainer_3", Backward))]
    for th in ths:
        th.start()
    for th in ths:
        th.join(10)
    time.sleep(0.2)
    assert len(got) == 40
    for s in ("trainer_1", "trainer_3"):
        assert [m.header.seq for m in got if m.header.sender == s] == list(range(1, 21))


def test_acknowledgement_deadline(roster, pki, closing, monkeypatch):
    """A receiver that stalls: the sender gives up after send_timeout with a clear error."""
    t2 = endpoint(roster, pki, "trainer_2", lambda m: None, {})
    accept = t2._accept

    def stall(me, peer, frame):
        time.sleep(2.5)
        return accept(me, peer, frame)

    monkeypatch.setattr(t2, "_accept", stall)
    impatient = GrpcOptions(**{**FAST.__dict__, "send_timeout": 0.5})
    t1 = endpoint(roster, pki, "trainer_1", None, dict(t2.addresses), options=impatient)
    closing.extend([t1, t2])
    t0 = time.perf_counter()
    with pytest.raises(TransportError, match=r"trainer_2 did not acknowledge forward .* within 0.5s"):
        t1.send(_fwd("trainer_1", "trainer_2", 1, torch.ones(2)))
    assert time.perf_counter() - t0 < 2.0


def test_roster_links_follow_the_protocol():
    r = Roster.chain("j", 3, verifier=True)
    assert r.kinds("data_owner", "trainer_1") == {"forward", "round_end", "rewind", "abort"}
    assert r.kinds("data_owner", "trainer_3") == {"targets", "round_end", "rewind", "abort"}
    assert r.kinds("trainer_2", "trainer_3") == {"forward"}
    assert r.kinds("trainer_3", "trainer_2") == {"backward"}
    assert r.kinds("trainer_1", "data_owner") == {"backward", "round_sealed", "abort"}
    assert r.kinds("verifier", "trainer_2") == {"nonce"}
    assert r.kinds("trainer_2", "verifier") == {"register", "stage_sealed", "final_segment"}
    assert "no link" in r.check_link("trainer_1", "trainer_3")
    assert "not in the roster" in r.check_link("mallory", "trainer_1")
    assert r.check_link("trainer_2", "trainer_1") is None
    u = Roster.chain("j", 2, u_shaped=True)
    assert "backward" in u.kinds("data_owner", "trainer_2") and "targets" not in u.kinds(
        "data_owner", "trainer_2"
    )
    with pytest.raises(ValueError, match="duplicate"):
        Roster("j", ("data_owner",))


def test_a_flooding_neighbour_is_refused_once_the_backlog_is_full(roster, pki, closing):
    release = threading.Event()
    got: list = []

    def slow(msg):
        release.wait(10)
        got.append(msg)

    few = GrpcOptions(**{**FAST.__dict__, "max_pending": 3})
    t2 = endpoint(roster, pki, "trainer_2", slow, {}, options=few)
    t1 = endpoint(roster, pki, "trainer_1", None, dict(t2.addresses))
    closing.extend([t2, t1])
    sent, refused = 0, None
    for i in range(10):
        try:
            t1.send(_fwd("trainer_1", "trainer_2", i + 1, torch.ones(2)))
            sent += 1
        except TransportError as e:
            refused = str(e)
            break
    assert sent in (3, 4)  # three pending, and one in the handler unless it had not started yet
    assert "3 messages already pending" in refused
    release.set()
    _wait_for(lambda: len(got) >= sent)
    t1.send(_fwd("trainer_1", "trainer_2", 20, torch.ones(2)))  # served again once drained


def test_a_taken_port_is_a_clear_error(roster, pki, closing):
    t2 = endpoint(roster, pki, "trainer_2", None, {})
    closing.append(t2)
    clash = GrpcTransport(roster, {"trainer_1": t2.addresses["trainer_2"]}, tls=pki, options=FAST)
    closing.append(clash)
    with pytest.raises(TransportError, match="trainer_1: cannot listen on 127.0.0.1:"):
        clash.register("trainer_1", None)


WINDOWED = GrpcOptions(**{**FAST.__dict__, "ack_window": 4})


def test_an_acknowledgement_window_below_one_is_refused():
    with pytest.raises(ValueError, match="ack_window must be at least 1"):
        GrpcOptions(ack_window=0)


def _slow_accept(monkeypatch, t: GrpcTransport, delay: float, log_to: list | None = None, refuse=None):
    """Make `t` take `delay` seconds to accept each frame (and optionally refuse some), recording
    when each message was queued."""
    accept = t._accept

    def slow(me, peer, frame):
        time.sleep(delay)
        msg = decode(frame)
        if refuse is not None and refuse(msg):
            return f"{me}: refused on purpose"
        err = accept(me, peer, frame)
        if err is None and log_to is not None:
            log_to.append((time.monotonic(), me, msg.header.seq))
        return err

    monkeypatch.setattr(t, "_accept", slow)


def test_a_windowed_link_streams_frames_and_keeps_their_order(roster, pki, closing, monkeypatch):
    """With ack_window 4 the first sends return before their acknowledgements (the receiver takes
    0.5 s a frame), the next waits for the window; flush waits for all; order is kept."""
    got: list = []
    t2 = endpoint(roster, pki, "trainer_2", got.append, {})
    _slow_accept(monkeypatch, t2, 0.5)
    t1 = endpoint(roster, pki, "trainer_1", None, dict(t2.addresses), options=WINDOWED)
    closing.extend([t1, t2])
    t1.send(_fwd("trainer_1", "trainer_2", 1, torch.ones(2)))  # dials and waits for nothing
    t0 = time.monotonic()
    for seq in (2, 3):
        t1.send(_fwd("trainer_1", "trainer_2", seq, torch.full((2,), float(seq))))
    assert time.monotonic() - t0 < 0.4  # three frames in flight, none acknowledged yet
    t1.send(_fwd("trainer_1", "trainer_2", 4, torch.ones(2)))  # a fourth: waits for the first's ack
    link = t1._links[("trainer_1", "trainer_2")]
    assert len(link.unacked) <= 3
    assert link.flush(10) and not link.unacked
    _wait_for(lambda: len(got) == 4)
    assert [m.header.seq for m in got] == [1, 2, 3, 4]
    assert torch.equal(got[2].activation, torch.full((2,), 3.0))


def test_a_refusal_on_a_windowed_link_reaches_the_data_owner_and_leaves_no_gap(
    roster, pki, closing, monkeypatch
):
    """Frame 2 of 1..3 from the data owner is refused after its send returned: the data owner's
    receive raises it, naming step 2's frame; frame 3, sent before the sender knew, is refused too
    (no gap); the link's next send dials a new stream and arrives. A trainer's refused frame reaches
    the data owner as that trainer's Abort."""
    got: list = []
    book: dict[str, str] = {}
    t1 = endpoint(roster, pki, "trainer_1", got.append, book)
    _slow_accept(monkeypatch, t1, 0.05, refuse=lambda m: m.header.seq == 2)
    do = endpoint(roster, pki, "data_owner", None, book, options=WINDOWED)
    closing.extend([do, t1])
    for seq in (1, 2, 3):
        do.send(_fwd("data_owner", "trainer_1", seq, torch.ones(2), step=seq))
    time.sleep(0.5)  # the receiver sees all three frames before the sender acts on the refusal
    with pytest.raises(
        TransportError, match=r"trainer_1 refused forward \(round 0 step 2.*refused on purpose"
    ):
        do.receive("data_owner", timeout=5)
    do.send(_fwd("data_owner", "trainer_1", 4, torch.ones(2), step=4))
    assert do._links[("data_owner", "trainer_1")].flush(10)
    _wait_for(lambda: len(got) == 2)
    assert [m.header.seq for m in got] == [1, 4]
    assert len(t1.refused) == 1 and "refused on purpose" in t1.refused[0]  # frame 3's echo is not logged
    # a trainer's windowed link: its refusal travels to the data owner as an Abort
    t3 = endpoint(roster, pki, "trainer_3", lambda m: None, book)
    _slow_accept(monkeypatch, t3, 0.0, refuse=lambda m: True)
    t2 = endpoint(roster, pki, "trainer_2", None, dict(book), options=WINDOWED)
    closing.extend([t2, t3])
    t2.send(_fwd("trainer_2", "trainer_3", 1, torch.ones(2)))
    with pytest.raises(
        RemoteAbort, match="trainer_2 aborted: trainer_3 refused forward .*refused on purpose"
    ):
        do.receive("data_owner", timeout=5)


def test_a_party_switching_links_waits_for_the_last_one(roster, pki, closing, monkeypatch):
    """Causal order over windowed links: the data owner sends Targets to trainer_3 (slow to accept),
    then a Forward to trainer_1; trainer_1 forwards to trainer_2, trainer_2 to trainer_3. The
    Targets are queued at trainer_3 before the Forward that follows them, and before anything
    trainer_1 does about that Forward."""
    queued: list = []
    ts: dict[str, GrpcTransport] = {}
    book: dict[str, str] = {}

    def relay(me, nxt):
        def handle(msg):
            if nxt is not None:
                ts[me].send(_fwd(me, nxt, msg.header.seq, msg.activation))

        return handle

    for me, nxt in (("trainer_3", None), ("trainer_2", "trainer_3"), ("trainer_1", "trainer_2")):
        ts[me] = endpoint(roster, pki, me, relay(me, nxt), book, options=WINDOWED)
        _slow_accept(monkeypatch, ts[me], 0.3 if me == "trainer_3" else 0.0, queued)
    do = endpoint(roster, pki, "data_owner", None, book, options=WINDOWED)
    for t in ts.values():
        t.addresses.update(book)
    closing.extend([do, *ts.values()])
    targets = Targets(header=Header(JOB, "data_owner", "trainer_3", 0, 0, 1), labels=torch.tensor([1, 2]))
    do.send(targets)
    do.send(_fwd("data_owner", "trainer_1", 1, torch.ones(2)))
    _wait_for(lambda: sum(1 for _, me, _ in queued if me == "trainer_3") == 2)
    order = [(me, seq) for _, me, seq in sorted(queued)]
    assert order.index(("trainer_3", 1)) < order.index(("trainer_1", 1))
    assert [me for me, _ in order if me == "trainer_3"] == ["trainer_3", "trainer_3"]


def test_a_gradient_sent_upstream_does_not_wait_for_the_activations_downstream(
    roster, pki, closing, monkeypatch
):
    """A Backward is unordered (roster.UNORDERED_KINDS): trainer_2, with two Forwards still on their
    way to a slow trainer_3, sends a gradient to trainer_1 at once; its next Forward waits for
    nothing either (the last ordered link is still trainer_3's)."""
    book: dict[str, str] = {}
    t3 = endpoint(roster, pki, "trainer_3", lambda m: None, book)
    _slow_accept(monkeypatch, t3, 0.5)
    t1 = endpoint(roster, pki, "trainer_1", lambda m: None, book)
    t2 = endpoint(roster, pki, "trainer_2", None, dict(book), options=WINDOWED)
    closing.extend([t1, t2, t3])
    t2.send(_fwd("trainer_2", "trainer_3", 1, torch.ones(2)))
    t2.send(_fwd("trainer_2", "trainer_1", 1, torch.ones(2), kind=Backward))  # dials trainer_1
    t0 = time.monotonic()
    t2.send(_fwd("trainer_2", "trainer_3", 2, torch.ones(2)))
    t2.send(_fwd("trainer_2", "trainer_1", 2, torch.ones(2), kind=Backward))
    t2.send(_fwd("trainer_2", "trainer_3", 3, torch.ones(2)))
    assert time.monotonic() - t0 < 0.4  # trainer_3 has acknowledged at most one frame by now
    assert t2._links[("trainer_2", "trainer_3")].flush(10)


def test_closing_a_windowed_transport_delivers_what_it_sent(roster, pki, closing, monkeypatch):
    got: list = []
    t2 = endpoint(roster, pki, "trainer_2", got.append, {})
    _slow_accept(monkeypatch, t2, 0.1)
    t1 = endpoint(roster, pki, "trainer_1", None, dict(t2.addresses), options=WINDOWED)
    closing.append(t2)
    for seq in (1, 2, 3):
        t1.send(_fwd("trainer_1", "trainer_2", seq, torch.ones(2)))
    t1.close()
    _wait_for(lambda: len(got) == 3)
    assert [m.header.seq for m in got] == [1, 2, 3]
