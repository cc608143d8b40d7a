"""Trainers that send the gradient for their upstream neighbour before computing their own weight
gradients (`job.upstream_grad_first`, on by default wherever parties run concurrently): the same
weights as back-propagating once, bit for bit; a watermarked job so trained is certified; a trainer
that fails after its upstream gradient left waits for the rewind. (Overflowing gradients in both
modes: `tests/test_neighbour_checks.py`.)"""

from __future__ import annotations

import pytest
import torch

from clicooper.job import ChainJob
from clicooper.parties import ProtocolError, verify_run
from clicooper.transport import Forward, Header
from clicooper.transport.grpc import GrpcTransport, Roster, make_local_pki
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(180)


def _chain_weights(job: ChainJob) -> list[torch.Tensor]:
    segs = [job.data_owner.head, *[t.segment for t in job.trainers]]
    return [v for s in segs for v in s.state_dict().values()]


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"training": {"micro_batches": 3}},  # accumulated over micro-batches
        {"training": {"optimizer": "adam", "lr": 0.003}, "model": {"n_trainers": 2}},
        {"privacy": {"gamma": 2, "secret_seed": 7}},  # label expansion
        {"privacy": {"u_shaped": True}},  # the data owner's tail sends the last gradient
    ],
)
def test_the_weights_are_those_of_one_backward_pass(digits, sections):
    cfg = tiny_config(**sections)
    ref = ChainJob(cfg.replace(job={"upstream_grad_first": False}), digits, None)
    ref.run()
    split = ChainJob(cfg.replace(job={"upstream_grad_first": True}), digits, None)
    assert all(t.upstream_grad_first for t in split.trainers)
    assert not any(t.upstream_grad_first for t in ref.trainers)
    split.run()
    for a, b in zip(_chain_weights(ref), _chain_weights(split), strict=True):
        assert torch.equal(a, b)


def test_on_by_default_only_where_parties_run_concurrently(digits):
    cfg = tiny_config(training={"epochs": 1})
    assert not any(t.upstream_grad_first for t in ChainJob(cfg, digits, None).trainers)
    roster = Roster.chain("ugf", 3)
    pki = make_local_pki(None, "ugf", roster.parties)
    with GrpcTransport(roster, {p: "127.0.0.1:0" for p in roster.parties}, tls=pki) as tr:
        job = ChainJob(cfg, digits, None, transport=tr, job_id="ugf")
        assert all(t.upstream_grad_first for t in job.trainers)
        job.run()
        assert not tr.refused and not tr.handler_errors
    ref = ChainJob(cfg, digits, None)
    ref.run()
    for a, b in zip(_chain_weights(ref), _chain_weights(job), strict=True):
        assert torch.equal(a, b)
    off = ChainJob(cfg.replace(job={"upstream_grad_first": False}), digits, None)
    assert not any(t.upstream_grad_first for t in off.trainers)


def test_a_watermarked_job_trained_upstream_gradient_first_is_certified(digits, tmp_path):
    cfg = tiny_config(job={"upstream_grad_first": True}, watermark={"enabled": True, "n_bits": 64})
    ChainJob(cfg, digits, tmp_path / "run").run()
    verdict, _ = verify_run(tmp_path / "run")
    assert verdict.ok, verdict.summary()


def test_a_trainer_failing_after_its_upstream_gradient_left_waits_for_the_rewind(digits, tmp_path):
    """In-process with the split forced on: trainer_2 fails after step (1, 3)'s upstream gradient
    left. It refuses training traffic until rewound; a resume on the same job (what the data owner
    program does) discards what the failed round left undelivered and ends with the weights of a
    run that never failed."""
    cfg = tiny_config(job={"upstream_grad_first": True})
    job = ChainJob(cfg, digits, tmp_path / "run")
    t2 = job.trainers[1]
    step_once, failed = t2._accumulate_and_step, []

    def flaky(acc, first, step, where):
        if step == (1, 3) and not failed:
            failed.append(step)
            raise ProtocolError(f"{where}: not finite (simulated)")
        step_once(acc, first, step, where)

    t2._accumulate_and_step = flaky
    with pytest.raises(ProtocolError, match="simulated"):
        job.run()
    assert t2.awaiting_rewind
    with pytest.raises(ProtocolError, match=r"step \(1, 3\) failed after its upstream gradient had left"):
        h = Header(job.job_id, "trainer_1", "trainer_2", 1, 4, 2**50)
        t2.handle(Forward(header=h, activation=torch.zeros(2, *t2.input_shape)))
    job.run(resume=True)
    assert not t2.awaiting_rewind
    ref = ChainJob(cfg, digits, tmp_path / "ref")
    ref.run()
    for a, b in zip(_chain_weights(ref), _chain_weights(job), strict=True):
        assert torch.equal(a, b)
