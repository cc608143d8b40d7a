"""A neighbour's messages that decode and type-check but would break a party: micro-batch indices past
the announced count, empty training batches, and finite gradients that overflow once
back-propagated. Each is refused with a ProtocolError naming the step, and nothing is updated."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from clicooper.build import make_optimizer
from clicooper.config import parse_config
from clicooper.parties.base import ProtocolError, clear_grads
from clicooper.parties.trainer import Trainer
from clicooper.transport.inproc import InProcTransport
from clicooper.transport.messages import Backward, Forward, Header, Targets

JOB = "job"
_seq = itertools.count(1)


def _trainer(*, last: bool = False, upstream_grad_first: bool = False) -> Trainer:
    """trainer_2 of three, its neighbours' mailboxes collecting what it sends."""
    transport = InProcTransport()
    for party in ("data_owner", "trainer_1", "trainer_3"):
        transport.register(party, None)
    torch.manual_seed(0)
    segment = nn.Sequential(nn.Linear(4, 3))
    return Trainer(
        name="trainer_2",
        position=2,
        job_id=JOB,
        transport=transport,
        segment=segment,
        optimizer=torch.optim.SGD(segment.parameters(), lr=0.1, momentum=0.9),
        prev="trainer_1",
        next=None if last else "trainer_3",
        data_owner="data_owner",
        input_shape=(4,),
        num_outputs=3 if last else None,
        upstream_grad_first=upstream_grad_first,
    )


def _header(sender: str, step: int = 0) -> Header:
    return Header(JOB, sender, "trainer_2", 0, step, next(_seq))


def _forward(rows: int = 2, *, micro: int = 0, micros: int = 1, step: int = 0, value: float = 1.0) -> Forward:
    x = torch.full((rows, 4), value)
    return Forward(header=_header("trainer_1", step), activation=x, micro=micro, micros=micros)


def _backward(grad: torch.Tensor, *, micro: int = 0, step: int = 0) -> Backward:
    return Backward(header=_header("trainer_3", step), grad=grad, micro=micro)


def _weights(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.segment.parameters()]


def test_a_micro_batch_past_the_announced_count_is_refused_by_a_relaying_trainer():
    t = _trainer()
    t.handle(_forward(micro=0, micros=2))
    t.handle(_forward(micro=1, micros=2))
    with pytest.raises(ProtocolError, match="micro-batch 2 of 2 after 2 of 2"):
        t.handle(_forward(micro=2, micros=2))


@pytest.mark.parametrize("upstream_grad_first", [False, True])
def test_an_overflowing_gradient_is_refused_and_the_weights_are_unchanged(upstream_grad_first):
    t = _trainer(upstream_grad_first=upstream_grad_first)
    t.handle(_forward(value=2.0))
    before = _weights(t)
    # finite, so it passes the codec; the weight gradient sums 2 rows of 2 x 1e38 and overflows
    with pytest.raises(ProtocolError, match=r"trainer_2: step \(0, 0\): weight gradients from trainer_3's"):
        t.handle(_backward(torch.full((2, 3), 1e38)))
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(t), strict=True))
    t.transport.pump()
    if upstream_grad_first:  # the upstream gradient, finite, left before the weights were known
        (sent,) = t.transport._inboxes["trainer_1"]
        assert torch.isfinite(sent.grad).all()
    else:
        assert not t.transport._inboxes["trainer_1"]  # no gradient was sent upstream


@pytest.mark.parametrize("upstream_grad_first", [False, True])
def test_a_gradient_that_overflows_only_on_its_way_upstream_is_refused(upstream_grad_first):
    t = _trainer(upstream_grad_first=upstream_grad_first)
    with torch.no_grad():
        t.segment[0].weight.fill_(2.0)  # the gradient for trainer_1 sums 3 outputs x 2 x 1e38: inf
    t.handle(_forward(value=1e-3))  # the weight gradients stay finite (2 x 1e38 x 1e-3)
    before = _weights(t)
    upstream = "the gradient for trainer_1, from trainer_3's gradient: not finite"
    with pytest.raises(ProtocolError, match=upstream):
        t.handle(_backward(torch.full((2, 3), 1e38)))
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(t), strict=True))
    t.transport.pump()
    assert not t.transport._inboxes["trainer_1"]  # never sent


def test_an_ordinary_gradient_still_steps():
    t = _trainer()
    t.handle(_forward())
    before = _weights(t)
    t.handle(_backward(torch.full((2, 3), 0.5)))
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(t), strict=True))
    t.transport.pump()
    (sent,) = t.transport._inboxes["trainer_1"]
    assert isinstance(sent, Backward) and torch.isfinite(sent.grad).all()


def test_each_step_starts_from_cleared_gradients():
    """A trainer clears its gradients at each step's first backward (`clear_grads`): its second step
    moves the weights by that step's gradient alone, as a fresh optimiser with the same momentum
    buffer would, not by the sum of both steps' gradients."""
    t = _trainer()
    for step, value in ((0, 1.0), (1, -3.0)):
        if step == 1:
            expected = copy.deepcopy(t.segment)
            reference = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9)
            reference.load_state_dict(copy.deepcopy(t.optimizer.state_dict()))  # its own buffers
            torch.autograd.backward(expected(torch.full((2, 4), value)), torch.full((2, 3), 0.5))
            reference.step()
        t.handle(_forward(step=step, value=value))
        t.handle(_backward(torch.full((2, 3), 0.5), step=step))
    pairs = zip(expected.parameters(), t.segment.parameters(), strict=True)
    assert all(torch.allclose(a, b) for a, b in pairs)


def test_clear_grads_sets_every_gradient_to_none_or_asks_an_optimiser_that_clears_itself():
    model = nn.Linear(3, 2)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    clear_grads(plain)
    assert [p.grad for p in model.parameters()] == [None, None]

    class ClearsItself(torch.optim.SGD):  # as an optimiser keeping per-sample gradients would
        calls: list[bool] = []

        def zero_grad(self, set_to_none: bool = True) -> None:
            self.calls.append(set_to_none)
            super().zero_grad(set_to_none)

    own = ClearsItself(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    clear_grads(own)
    assert ClearsItself.calls == [True] and [p.grad for p in model.parameters()] == [None, None]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_parties_optimisers_are_cleared_by_the_loop_not_by_torchs_zero_grad(optimizer):
    """The optimisers parties are built with (fused) have torch's own `zero_grad`, so `clear_grads`
    takes its loop: the speed-up that a change of optimiser would otherwise silently lose."""
    training = parse_config({"job": {"name": "t"}, "training": {"optimizer": optimizer}}).training
    opt = make_optimizer([nn.Parameter(torch.zeros(2))], training)
    assert opt.defaults["fused"] and type(opt).zero_grad is torch.optim.Optimizer.zero_grad


def test_an_empty_training_batch_is_refused_before_it_counts():
    t = _trainer()
    with pytest.raises(ProtocolError, match="empty training batch from trainer_1"):
        t.handle(_forward(rows=0))
    assert t.round_steps == 0


def test_empty_targets_are_refused():
    t = _trainer(last=True)
    labels = torch.empty(0, dtype=torch.int64)
    with pytest.raises(ProtocolError, match="empty targets"):
        t.handle(Targets(header=Header(JOB, "data_owner", "trainer_2", 0, 0, 1), labels=labels))


def test_the_data_owner_refuses_a_first_trainer_gradient_that_overflows_its_head(digits):
    from clicooper.job import ChainJob
    from tests.conftest import tiny_config

    job = ChainJob(tiny_config(), digits, None)
    t1 = job.trainers[0]
    honest_send = t1.send

    def send(kind, receiver, *args, **fields):
        if kind is Backward and receiver == "data_owner" and args[1] == 2:  # the third step's gradient
            fields["grad"] = torch.full_like(fields["grad"], 1e37)
        return honest_send(kind, receiver, *args, **fields)

    t1.send = send
    with pytest.raises(ProtocolError, match=r"data_owner: step \(0, 2\): head weight gradients .*not finite"):
        job.run()
    assert all(torch.isfinite(p).all() for p in job.data_owner.head.parameters())
