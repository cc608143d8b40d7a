"""The chain: exact equivalence with centralized training, resume, and rejection of bad messages."""

from __future__ import annotations

import hashlib

import pytest
import torch

from clicooper.checkpoint import latest_round
from clicooper.config import ConfigError, parse_config
from clicooper.job import ChainJob, train_centralized
from clicooper.parties import ProtocolError
from clicooper.schedule import round_lr
from clicooper.transport import Backward, Forward, Header, InProcTransport, Targets
from tests.conftest import tiny_config


def _chain_params(job: ChainJob) -> list[torch.Tensor]:
    segs = [job.data_owner.head, *[t.segment for t in job.trainers]]
    return [p.detach() for s in segs for p in s.parameters()]


@pytest.mark.parametrize("n_trainers", [1, 3])
def test_relay_equals_centralized(digits, n_trainers):
    cfg = tiny_config(model={"n_trainers": n_trainers}, training={"epochs": 4, "lr": 0.1})
    job = ChainJob(cfg, digits, None)
    summary = job.run()
    central, model = train_centralized(cfg, digits)
    for a, b in zip(_chain_params(job), model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert summary.test_accuracy == pytest.approx(central.test_accuracy, abs=1e-3)
    assert summary.test_accuracy > 0.5  # it really learns: five times chance on 10 classes
    assert summary.bytes_per_step["data_owner->trainer_1"] > 0


def test_cosine_schedule_and_its_floor_reach_every_party(digits):
    """`training.lr_floor` sets where cosine decay ends, in every party alike: the chain still equals
    centralized training, and the last round runs at the floor's rate, not the default's."""
    cfg = tiny_config(training={"epochs": 3, "lr": 0.1, "lr_schedule": "cosine", "lr_floor": 0.0})
    job = ChainJob(cfg, digits, None)
    job.run()
    _, model = train_centralized(cfg, digits)
    for a, b in zip(_chain_params(job), model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    last = round_lr(0.1, 2, 3, "cosine", 0.0)
    assert last < round_lr(0.1, 2, 3, "cosine") and round_lr(0.1, 0, 3, "cosine", 0.0) < 0.1
    assert [g["lr"] for t in job.trainers for g in t.optimizer.param_groups] == [last] * len(job.trainers)
    assert round_lr(0.1, 999, 1000, "cosine", 0.0) < 1e-6 < round_lr(0.1, 999, 1000, "cosine")
    with pytest.raises(ConfigError, match="lr_floor"):
        parse_config({"training": {"lr_floor": 1.5}})


def test_in_process_delivery_without_bytes_equals_the_wire(digits):
    """The in-process transport's default delivery (validated copies, no bytes) trains exactly as
    encoding every message and decoding it does, and charges each hop the same bytes."""
    cfg = tiny_config(model={"n_trainers": 2}, training={"epochs": 2, "lr": 0.1})
    direct, wire = (
        ChainJob(cfg, digits, None),
        ChainJob(cfg, digits, None, transport=InProcTransport(wire=True)),
    )
    a, b = direct.run(), wire.run()
    for x, y in zip(_chain_params(direct), _chain_params(wire), strict=True):
        assert torch.equal(x, y)
    assert a.test_accuracy == b.test_accuracy
    assert direct.transport.bytes_sent == wire.transport.bytes_sent
    assert not direct.transport.wire and wire.transport.wire


def test_relay_with_adam_mlp_and_capacities(digits):
    cfg = tiny_config(
        model={"arch": "mlp", "n_trainers": 2, "capacities": [1, 2]},
        training={"optimizer": "adam", "lr": 0.003, "epochs": 1},
    )
    job = ChainJob(cfg, digits, None)
    job.run()
    _, model = train_centralized(cfg, digits)
    for a, b in zip(_chain_params(job), model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_resume_reaches_same_weights(digits, tmp_path):
    full = ChainJob(tiny_config(training={"epochs": 3}), digits, tmp_path / "full")
    full.run()
    part_dir = tmp_path / "part"
    ChainJob(tiny_config(training={"epochs": 1}), digits, part_dir).run()
    assert latest_round(part_dir / "trainer_2") == 0
    resumed = ChainJob(tiny_config(training={"epochs": 3}), digits, part_dir)
    resumed.run(resume=True)
    for a, b in zip(_chain_params(full), _chain_params(resumed), strict=True):
        assert torch.equal(a, b)
    lines = (part_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # epoch 1 from the first run, epochs 2-3 from the resumed one


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("round_*"))}


def test_bad_gradient_fails_clearly_and_keeps_checkpoints(digits, tmp_path):
    cfg = tiny_config(training={"epochs": 2})
    job = ChainJob(cfg, digits, tmp_path)
    job.data_owner.train_round(0)
    before = _digest(tmp_path)
    assert before
    t2 = job.trainers[1]
    original = t2.send

    def corrupt(cls, receiver, rnd, step, **fields):
        if cls is Backward:
            fields["grad"] = fields["grad"][:, :1]  # wrong shape
        return original(cls, receiver, rnd, step, **fields)

    t2.send = corrupt
    with pytest.raises(ProtocolError, match=r"trainer_1: gradient from trainer_2: shape"):
        job.data_owner.train_round(1)
    assert _digest(tmp_path) == before
    fresh = ChainJob(cfg, digits, tmp_path)
    assert fresh.resume() == 1


def _inject(job: ChainJob, msg) -> None:
    job.transport.send(msg)
    job.transport.pump()


def test_wrong_dtype_shape_step_sender_job_are_rejected(digits):
    job = ChainJob(tiny_config(), digits, None)
    shape = job.trainers[0].input_shape
    good = torch.randn(4, *shape)

    def fwd(seq, *, act=good, sender="data_owner", job_id=job.job_id, rnd=0, step=0):
        return Forward(header=Header(job_id, sender, "trainer_1", rnd, step, seq), activation=act)

    with pytest.raises(ProtocolError, match="dtype"):
        _inject(job, fwd(1, act=good.double()))
    with pytest.raises(ProtocolError, match="shape"):
        _inject(job, fwd(2, act=torch.randn(4, 3)))
    with pytest.raises(ProtocolError, match="unexpected sender"):
        _inject(job, fwd(3, sender="trainer_3"))
    with pytest.raises(ProtocolError, match="for job"):
        _inject(job, fwd(4, job_id="other-job"))
    with pytest.raises(ProtocolError, match="replayed or reordered"):
        _inject(job, fwd(2))
    with pytest.raises(ProtocolError, match=r"trainer_3: no targets from data_owner for step \(0, 5\)"):
        _inject(job, fwd(10, step=5))  # relayed down the chain, refused by the last trainer
    with pytest.raises(ProtocolError, match=r"step \(0, 3\) arrived after \(0, 5\)"):
        _inject(job, fwd(11, step=3))
    last = job.trainers[-1]
    with pytest.raises(ProtocolError, match="outside"):
        _inject(
            job,
            Targets(
                header=Header(job.job_id, "data_owner", last.name, 0, 0, 50), labels=torch.tensor([0, 99])
            ),
        )
    with pytest.raises(ProtocolError, match="unknown step"):
        _inject(
            job, Backward(header=Header(job.job_id, "trainer_2", "trainer_1", 0, 77, 99), grad=torch.zeros(1))
        )


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.lr"):
        parse_config({"training": {"lr": 0}})
    with pytest.raises(ConfigError, match=r"model\.n_trainer"):
        parse_config({"model": {"n_trainer": 2}})
    with pytest.raises(ConfigError, match="exactly one of epsilon"):
        parse_config({"privacy": {"dp": True}})


def test_inconsistent_cut_points_in_config(digits):
    with pytest.raises(ValueError, match="n_trainers"):
        ChainJob(tiny_config(model={"cut_points": [1, 2], "n_trainers": 3}), digits, None)
    with pytest.raises(ValueError, match="cut.points"):
        ChainJob(tiny_config(model={"cut_points": [1, 1, 2]}), digits, None)


def test_trainers_train_and_evaluate_their_segments_in_the_right_mode(digits):
    """A trainer sets its segment's mode only when it changes; every submodule is still in training
    mode for each training forward and in evaluation mode for each evaluation, round after round,
    and after anything else switched a segment to evaluation between rounds."""
    cfg = tiny_config(training={"epochs": 2})
    job = ChainJob(cfg, digits, None)
    seen: list[tuple[bool, bool]] = []
    for trainer in job.trainers:
        for module in trainer.segment.modules():
            module.register_forward_pre_hook(lambda m, _: seen.append((m.training, torch.is_grad_enabled())))
    job.run()
    assert {grad for _, grad in seen} == {True, False}  # both trained and evaluated
    assert all(training == grad for training, grad in seen)
    for trainer in job.trainers:
        trainer.segment.eval()
    seen.clear()
    job.data_owner.train_round(2)
    assert seen and all(training and grad for training, grad in seen)


def test_optimisers_are_fused_and_step_as_torch_unfused_ones():
    from clicooper.build import make_optimizer

    torch.manual_seed(0)
    for name in ("sgd", "adam"):
        cfg = tiny_config(training={"optimizer": name, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3})
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        fused = make_optimizer(params, cfg.training)
        kwargs = {k: v for k, v in fused.defaults.items() if k not in ("fused", "foreach")}
        plain = type(fused)(twins, **kwargs, foreach=False)
        assert fused.defaults["fused"] is True
        for _ in range(3):
            for p, q in zip(params, twins, strict=True):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            fused.step()
            plain.step()
        for p, q in zip(params, twins, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_written_unfused_loads_into_a_fused_optimiser_as_fused():
    """Checkpoints keep what an optimiser computes (its state and rates), not how: one written by an
    unfused optimiser (before fusing, or by a torch without the kernels) leaves this one fused."""
    from clicooper.build import make_optimizer
    from clicooper.checkpoint import load_module_optimizer_state, module_optimizer_state

    cfg = tiny_config(training={"optimizer": "sgd", "lr": 0.1, "momentum": 0.9})
    old = torch.nn.Linear(3, 2)
    old_opt = torch.optim.SGD(old.parameters(), lr=0.1, momentum=0.9)
    for p in old.parameters():
        p.grad = torch.ones_like(p)
    old_opt.step()
    tensors, meta = module_optimizer_state(old, old_opt)
    new = torch.nn.Linear(3, 2)
    new_opt = make_optimizer(new.parameters(), cfg.training)
    load_module_optimizer_state(new, new_opt, tensors, meta)
    assert new_opt.param_groups[0]["fused"] is True and old_opt.param_groups[0]["fused"] is None
    for p, q in zip(new.parameters(), old.parameters(), strict=True):
        assert torch.equal(new_opt.state[p]["momentum_buffer"], old_opt.state[q]["momentum_buffer"])
