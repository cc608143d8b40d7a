"""The data owner sends a step's targets ahead, while the step before travels the chain: each
step's targets still leave before its first Forward (the last trainer needs them when that Forward
reaches it), every step's targets leave exactly once, and no targets are left over at a round's
end (the last trainer refuses to end a round holding any)."""

from __future__ import annotations

import pytest
import torch

from clicooper.job import ChainJob
from clicooper.parties import ProtocolError
from clicooper.parties import data_owner as data_owner_module
from clicooper.transport import Backward, Forward, Targets
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(120)


def _weights(job: ChainJob) -> list[torch.Tensor]:
    segs = [job.data_owner.head, *[t.segment for t in job.trainers]]
    return [v for s in segs for v in s.state_dict().values()]


def _record(job: ChainJob) -> list[tuple[str, int, int]]:
    """(event, round, step) for the data owner's sends of Targets and training Forwards and its
    receipt of each Backward, in the order it did them."""
    events: list[tuple[str, int, int]] = []
    send, receive = job.transport.send, job.transport.receive

    def tap_send(msg):
        training = isinstance(msg, Targets) or (isinstance(msg, Forward) and msg.train)  # not evaluation's
        if msg.header.sender == "data_owner" and training:
            events.append((msg.KIND, msg.header.round, msg.header.step))
        send(msg)

    def tap_receive(party, timeout=None):
        msg = receive(party, timeout)
        if party == "data_owner" and isinstance(msg, Backward):
            events.append(("got " + msg.KIND, msg.header.round, msg.header.step))
        return msg

    job.transport.send, job.transport.receive = tap_send, tap_receive
    return events


@pytest.mark.parametrize("micros", [1, 3])
def test_targets_go_ahead_and_still_precede_their_forward(digits, micros):
    cfg = tiny_config(training={"epochs": 2, "micro_batches": micros})
    job = ChainJob(cfg, digits, None)
    events = _record(job)
    job.run()
    for rnd in range(2):
        ev = [(kind, step) for kind, r, step in events if r == rnd]
        steps = sorted({step for kind, step in ev if kind == Forward.KIND})
        assert steps == list(range(-(-len(digits.train_x) // 32)))
        for s in steps:
            targets = [i for i, e in enumerate(ev) if e == (Targets.KIND, s)]
            forwards = [i for i, e in enumerate(ev) if e == (Forward.KIND, s)]
            assert len(targets) == len(forwards) == micros  # one per micro-batch, each sent once
            assert max(targets) < min(forwards)
            if s > 0:  # sent while step s - 1 was away: before its gradient came back
                assert min(targets) > max(i for i, e in enumerate(ev) if e == (Forward.KIND, s - 1))
                assert max(targets) < ev.index(("got " + Backward.KIND, s - 1))
        assert not [e for e in ev if e[0] == Targets.KIND and e[1] not in steps]


def test_an_empty_poisson_batch_is_skipped_by_the_targets_too(digits, monkeypatch):
    """Targets go ahead to the next step that has samples; the round ends with none left over."""
    real = data_owner_module.epoch_batches

    def with_an_empty_batch(*args, **kwargs):
        batches = real(*args, **kwargs)
        return [batches[0], torch.empty(0, dtype=batches[0].dtype), *batches[1:]]

    monkeypatch.setattr(data_owner_module, "epoch_batches", with_an_empty_batch)
    job = ChainJob(tiny_config(training={"epochs": 1}), digits, None)
    events = _record(job)
    job.run()  # trainer_3 would refuse the round's end with targets left over
    sent = [(kind, step) for kind, rnd, step in events if rnd == 0 and kind != "got " + Backward.KIND]
    assert sent[:6] == [
        (Targets.KIND, 0),
        (Forward.KIND, 0),
        (Targets.KIND, 2),  # step 1 is empty: nothing is released and no targets are sent
        (Forward.KIND, 2),
        (Targets.KIND, 3),
        (Forward.KIND, 3),
    ]
    assert not [e for e in sent if e[1] == 1]
    assert len(sent) == 2 * -(-len(digits.train_x) // 32)


def test_u_shaped_targets_never_leave(digits):
    cfg = tiny_config(training={"epochs": 1}, privacy={"u_shaped": True})
    job = ChainJob(cfg, digits, None)
    events = _record(job)
    job.run()
    assert events and not [e for e in events if e[0] == Targets.KIND]


def test_a_round_failed_with_targets_ahead_resumes_on_the_same_job(digits, tmp_path):
    """The data owner program recovers by `run(resume=True)` on the same job: a trainer hosted
    with it must not keep the failed round's targets (sent ahead) or steps in flight."""
    job = ChainJob(tiny_config(), digits, tmp_path / "run")
    forward, failed = job.trainers[1]._on_forward, []

    def flaky(msg):
        if (msg.header.round, msg.header.step) == (1, 3) and not failed:
            failed.append(msg)
            raise ProtocolError("trainer_2 failed (simulated)")
        forward(msg)

    job.trainers[1]._on_forward = flaky
    with pytest.raises(ProtocolError, match="simulated"):
        job.run()
    assert (1, 4, 0) in job.trainers[2]._targets  # step 4's targets went ahead before step 3 failed
    assert job.trainers[0]._inflight  # and trainer_1 still holds step 3
    job.run(resume=True)
    ref = ChainJob(tiny_config(), digits, tmp_path / "ref")
    ref.run()
    for a, b in zip(_weights(job), _weights(ref), strict=True):
        assert torch.equal(a, b)
