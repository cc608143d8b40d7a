"""The data owner's defences inside a running job: nothing secret reaches a trainer, epsilon survives
a resume (and a crash after a release), the budget stops a run before it is exceeded, and in
U-shaped mode labels never leave the data owner."""

from __future__ import annotations

import json

import pytest
import torch

from clicooper.job import ChainJob
from clicooper.privacy import BudgetExceeded
from clicooper.transport import Forward, Output, Targets
from tests.conftest import tiny_config


def _defended(**privacy):
    return tiny_config(privacy={"dp": True, "epsilon": 4.0, "gamma": 2, "secret_seed": 7, **privacy})


def _tap(job: ChainJob) -> list:
    sent: list = []
    original = job.transport.send
    job.transport.send = lambda m: (sent.append(m), original(m))[1]
    return sent


def test_no_true_label_or_codebook_reaches_a_trainer(digits, tmp_path):
    job = ChainJob(_defended(), digits, tmp_path)
    sent = _tap(job)
    job.run()
    seen = [m for m in sent if m.header.receiver.startswith("trainer_")]
    secret = json.loads((tmp_path / "data_owner" / "secret.json").read_text())["secret"]
    for m in seen:  # no message to a trainer carries the secret in any field
        assert secret not in repr(m.__dict__)
    targets = [m for m in seen if isinstance(m, Targets)]
    assert targets and all(int(m.labels.max()) < 20 for m in targets)
    cb = job.defence.codebook
    assert not all(int(g[0]) == 2 * c for c, g in enumerate(cb.groups()))  # a secret, not the identity map
    # activations reaching trainer_1 are clipped to C and noised (norms far above C)
    fwd = [m for m in seen if isinstance(m, Forward) and m.header.receiver == "trainer_1" and m.train]
    assert fwd and all(float(m.activation.flatten(1).norm(dim=1).max()) > 1.0 for m in fwd[:3])
    assert not any(isinstance(m, Output) for m in seen)
    perm_text = json.dumps(cb.perm.tolist())
    for tdir in (tmp_path / f"trainer_{i}" for i in (1, 2, 3)):
        for f in tdir.iterdir():
            blob = f.read_bytes()
            assert secret.encode() not in blob and perm_text.encode() not in blob
    do_meta = (tmp_path / "data_owner" / "round_0001.json").read_text()
    assert '"accountant"' in do_meta and secret not in do_meta  # the checkpoint holds the accountant only


def test_resume_keeps_epsilon_and_the_ledger_counts_a_crashed_round(digits, tmp_path):
    s_full = ChainJob(_defended(), digits, None).run()
    part = tmp_path / "p"
    ChainJob(_defended(), digits, part).data_owner.train_round(0)  # interrupted after round 0
    s_res = ChainJob(_defended(), digits, part).run(resume=True)
    assert s_res.epsilon == pytest.approx(s_full.epsilon) and s_res.epsilon > 0
    crashed = ChainJob(_defended(), digits, part)
    crashed.resume()
    crashed.defence.begin_round(2)  # a release recorded and ledgered, then a crash before the checkpoint
    again = ChainJob(_defended(), digits, part)
    again.resume()
    assert again.defence.accountant.releases == crashed.defence.accountant.releases


def test_budget_stop_in_a_job(digits, tmp_path):
    # A target epsilon above the budget is refused at parse time; a fixed noise multiplier is not.
    cfg = _defended(epsilon=None, noise_multiplier=3.06, budget_epsilon=3.0).replace(training={"epochs": 3})
    job = ChainJob(cfg, digits, tmp_path)
    with pytest.raises(BudgetExceeded):
        job.run()
    assert job.defence.epsilon() <= 3.0  # the release that would exceed was never made


def test_one_shot_pays_once(digits):
    job = ChainJob(_defended(release="one-shot"), digits, None)
    job.run()
    assert job.defence.accountant.releases == 1
    assert not any(p.requires_grad for p in job.data_owner.head.parameters())


def test_u_shaped_keeps_labels_home(digits):
    job = ChainJob(tiny_config(privacy={"u_shaped": True}, training={"epochs": 3, "lr": 0.1}), digits, None)
    sent = _tap(job)
    s = job.run()
    assert not any(isinstance(m, Targets) for m in sent)
    assert any(isinstance(m, Output) and m.train for m in sent)
    assert s.test_accuracy > 0.3


@pytest.mark.parametrize(
    "training",
    [{"micro_batches": 1}, {"sampling": "poisson", "micro_batches": 2}],
    ids=["shuffle", "poisson"],
)
def test_targets_encoded_per_round_equal_per_batch_encoding(digits, tmp_path, training):
    """The data owner encodes a round's targets in one call (label DP and expansion, per-epoch
    choices); every batch must get what encoding that batch alone gives, with the same secrets."""
    from clicooper.job import build_defence
    from clicooper.seeding import epoch_batches

    cfg = tiny_config(
        privacy={"label_epsilon": 1.0, "gamma": 3, "label_policy": "per-epoch"},
        training={**training, "epochs": 2},
        data={"train_subset": 300},
    )
    job = ChainJob(cfg, digits, tmp_path)
    data = job.data_owner.data
    tapped = _tap(job)
    job.run()
    sent = [m for m in tapped if isinstance(m, Targets) and m.header.receiver == "trainer_3"]
    alone = build_defence(cfg, data, tmp_path)  # the same codebook secret and label-DP key, fresh caches
    poisson = training.get("sampling") == "poisson"
    parts = [
        (rnd, part)
        for rnd in range(2)
        for ids in epoch_batches(
            cfg.job.seed, rnd, len(data.train_y), cfg.training.batch_size, poisson=poisson
        )
        for part in torch.tensor_split(ids, min(training["micro_batches"], len(ids)))
        if len(part)
    ]
    got = [m.labels for m in sent]
    assert len(got) == len(parts) > 10
    for labels, (rnd, part) in zip(got, parts, strict=True):
        assert torch.equal(labels, alone.encode_labels(data.train_y[part], part, rnd))
    # the round matters (per-epoch choices): the second round's targets are not the first round's draws
    later = [(labels, part) for labels, (rnd, part) in zip(got, parts, strict=True) if rnd == 1]
    assert any(not torch.equal(y, alone.encode_labels(data.train_y[p], p, 0)) for y, p in later)
