"""End-to-end DP: DP-SGD head (per-sample clipping, secure noise) composed with the release, checked
against dp-accounting called directly."""

from __future__ import annotations

import json

import dp_accounting as dpa
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import PLDAccountant
from torch import nn

from clicooper.config import ConfigError
from clicooper.job import ChainJob
from clicooper.privacy.accounting import (
    calibrate_end_to_end,
    compute_epsilon,
    end_to_end_event,
    event_epsilon,
    release_event,
)
from clicooper.privacy.defence import GUARANTEES, DataOwnerDefences
from clicooper.privacy.dp_sgd import (
    DpSgdPlan,
    clip_grads,
    dp_sgd_train,
    noisy_clipped_sum,
    per_sample_grads,
    secure_generator,
)
from tests.conftest import tiny_config

DELTA = 1e-5
REPLACE_ONE = dpa.NeighboringRelation.REPLACE_ONE


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def _tiny_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g) * torch.logspace(-2, 2, n).unsqueeze(1)
    return x, torch.randint(0, 3, (n,), generator=g)


# -- mechanism -----------------------------------------------------------------------------


def test_per_sample_grads_match_one_sample_autograd():
    model, (x, y) = _tiny_model(), _tiny_data(5)
    grads = per_sample_grads(model, F.cross_entropy, x, y)
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-5, rtol=1e-4)


def test_per_sample_clipping_bounds_each_samples_contribution():
    model, (x, y) = _tiny_model(), _tiny_data(40)
    clip = 1.5
    clipped, norms = clip_grads(per_sample_grads(model, F.cross_entropy, x, y), clip)
    flat = torch.cat([g.flatten(1) for g in clipped.values()], dim=1)
    assert bool((flat.norm(dim=1) <= clip * (1 + 1e-5)).all())
    assert bool((norms > clip).any()) and bool((norms < clip).any())  # both regimes exercised
    # Without noise, removing any one sample changes the summed update by at most C (so replacing
    # one by another moves it by at most 2C), whatever that sample's raw gradient norm.
    gen = secure_generator()
    full = noisy_clipped_sum(model, F.cross_entropy, x, y, clip=clip, noise_multiplier=0, generator=gen)
    for i in (0, 17, 39):
        keep = torch.arange(40) != i
        part = noisy_clipped_sum(
            model, F.cross_entropy, x[keep], y[keep], clip=clip, noise_multiplier=0, generator=gen, chunk=7
        )
        diff = torch.cat([(full[k] - part[k]).flatten() for k in full])
        assert float(diff.norm()) <= clip * (1 + 1e-4)


def test_batchnorm_is_rejected():
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    x, y = _tiny_data(8)
    with pytest.raises(ValueError, match="GroupNorm"):
        dp_sgd_train(
            model, F.cross_entropy, x, y, DpSgdPlan(1.0, 1.0, 0.5, 1), torch.optim.SGD(model.parameters())
        )


def test_dp_sgd_noise_does_not_depend_on_the_job_seed():
    x, y = _tiny_data(40)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the "job seed": everything seeded the same way in both runs
        model = _tiny_model()
        plan = DpSgdPlan(noise_multiplier=1.0, clip=1.0, sampling_rate=0.5, steps=3)
        dp_sgd_train(model, F.cross_entropy, x, y, plan, torch.optim.SGD(model.parameters(), lr=0.1))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(runs[0], runs[1])
    # And the noise itself: two secure generators under the same global seed draw different noise.
    torch.manual_seed(0)
    a = torch.randn(100, generator=secure_generator())
    torch.manual_seed(0)
    b = torch.randn(100, generator=secure_generator())
    assert not torch.equal(a, b)


def test_noise_scale_of_the_noisy_sum():
    model = _tiny_model()
    x, y = _tiny_data(0)
    total = noisy_clipped_sum(
        model, F.cross_entropy, x, y, clip=0.5, noise_multiplier=2.0, generator=secure_generator()
    )
    flat = torch.cat([v.flatten() for v in total.values()])  # empty batch: pure noise
    assert abs(float(flat.std()) - 1.0) < 0.35  # std = sigma * C = 1, on ~75 coordinates


# -- accounting ----------------------------------------------------------------------------


def _expected_epsilon(sgd_sigma, q, steps, rel_sigma, releases):
    """Built independently of the package: dp-accounting's PLD, REPLACE_ONE, one composed event."""
    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sgd_sigma)), steps)]
    if releases:
        events.append(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(rel_sigma), releases))
    event = dpa.ComposedDpEvent(events)
    acc = PLDAccountant(neighboring_relation=REPLACE_ONE)
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def test_release_event_is_the_activation_accountants_mechanism():
    for sigma, k in [(3.0, 1), (5.0, 3)]:
        assert event_epsilon(release_event(sigma, k), DELTA) == pytest.approx(
            compute_epsilon(sigma, DELTA, k), rel=1e-3
        )


def test_end_to_end_epsilon_is_dp_accountings_composition(digits):
    cfg = tiny_config(
        model={"arch": "small-cnn-dp"},
        training={"epochs": 2},
        privacy={
            "dp": True,
            "epsilon": 3.0,
            "release": "one-shot",
            "guarantee": "end-to-end",
            "head_dp_epochs": 2,
            "head_dp_batch_size": 200,
        },
    )
    job = ChainJob(cfg, digits, None)
    d = job.defence
    assert isinstance(d, DataOwnerDefences) and d.head_plan is not None
    p = d.head_plan
    assert p.sampling_rate == pytest.approx(200 / 1200) and p.steps == 12 and d.head_steps == 12
    assert d.epsilon() == pytest.approx(
        _expected_epsilon(p.noise_multiplier, p.sampling_rate, 12, d.noise_multiplier, 0)
    )
    s = job.run()
    expected = _expected_epsilon(p.noise_multiplier, p.sampling_rate, 12, d.noise_multiplier, 1)
    assert s.epsilon == pytest.approx(expected, rel=1e-9)
    assert 2.9 <= s.epsilon <= 3.0  # calibrated to the total target
    # The data owner's release noise comes from the OS CSPRNG: two draws on the same input differ.
    a = torch.ones(5, 4)
    r1 = d.release(a, train=True)
    r2 = d.release(a, train=True)
    assert not torch.equal(r1, r2)
    assert s.guarantee == "end-to-end" and "guarantee: end-to-end" in s.defences
    assert 0 <= s.extra["dp_sgd_head_probe_accuracy"] <= 1


def test_activation_guarantee_is_named(digits):
    cfg = tiny_config(training={"epochs": 1}, privacy={"dp": True, "epsilon": 4.0})
    s = ChainJob(cfg, digits, None).run()
    assert s.guarantee == GUARANTEES["activation"] == "activation-level (given the head)"
    assert ChainJob(tiny_config(training={"epochs": 1}), digits, None).run().guarantee is None


def test_calibration_meets_the_total_and_follows_the_split():
    q, steps = 0.01, 300
    prev = None
    for frac in (0.3, 0.7):
        s_sgd, s_rel = calibrate_end_to_end(2.0, DELTA, sampling_rate=q, steps=steps, head_fraction=frac)
        eps = _expected_epsilon(s_sgd, q, steps, s_rel, 1)
        assert 1.97 <= eps <= 2.0
        if prev is not None:  # more budget to the head: less DP-SGD noise, more release noise
            assert s_sgd < prev[0] and s_rel > prev[1]
        prev = (s_sgd, s_rel)
    assert end_to_end_event(1.0, q, steps, 2.0) == dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(1.0)), steps),
            dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(2.0), 1),
        ]
    )


@pytest.mark.parametrize(
    "privacy,model,match",
    [
        ({"guarantee": "end-to-end"}, {}, "needs dp = true"),
        (
            {"dp": True, "epsilon": 2.0, "guarantee": "end-to-end", "release": "one-shot"},
            {"head_pretrain_epochs": 1},
            "head_pretrain_epochs",
        ),
        ({"dp": True, "epsilon": 2.0, "guarantee": "end-to-end"}, {}, "freeze_head"),
        (
            {"dp": True, "noise_multiplier": 2.0, "guarantee": "end-to-end", "release": "one-shot"},
            {},
            "head_dp_noise_multiplier",
        ),
        ({"dp": True, "epsilon": 2.0, "head_dp_noise_multiplier": 1.0}, {}, "only used with"),
    ],
)
def test_end_to_end_config_is_validated(privacy, model, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(privacy=privacy, model=model)


def test_eval_e2e_quick(tmp_path):
    from typer.testing import CliRunner

    from clicooper.cli import app

    result = CliRunner().invoke(app, ["eval", "e2e", "--quick", "--out", str(tmp_path), "--epsilon", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["guarantee"] == "end-to-end"
    assert 1.9 <= rows[0]["epsilon"] <= 2.0 and rows[0]["steps"] == 8
    assert 0.0 <= rows[0]["linear_accuracy"] <= 1.0 and (tmp_path / "e2e.md").exists()


def test_resumed_one_shot_end_to_end_release_is_accounted_again(digits):
    """A release drawn again after a resume (its saved copy lost) counts again, end to end too; a
    round of a one-shot job counts nothing by itself (tests/test_secret_noise.py: the saved release
    is resent at no cost)."""
    privacy = {"dp": True, "noise_multiplier": 6.0, "head_dp_noise_multiplier": 2.0}
    privacy |= {"release": "one-shot", "guarantee": "end-to-end"}
    cfg = tiny_config(privacy=privacy)

    def defence():
        return DataOwnerDefences(
            cfg.privacy,
            num_classes=10,
            epochs=2,
            n_train=1200,
            batch_size=32,
            poisson=False,
            secret=b"s" * 32,
        )

    first = defence()
    first.record_head_steps(first.head_plan.steps)
    first.record_one_shot_release()
    first.begin_round(0)
    first.begin_round(1)  # rounds of a one-shot job release nothing new
    assert first.accountant.releases == 1
    resumed = defence()
    resumed.load_state_dict(first.state_dict())
    assert resumed.head_steps == first.head_plan.steps and resumed.accountant.releases == 1
    resumed.begin_round(1)
    assert resumed.accountant.releases == 1
    resumed.record_one_shot_release()  # the saved release was lost: a fresh draw
    assert resumed.accountant.releases == 2 and resumed.epsilon() > first.epsilon()


def test_example_config_is_end_to_end():
    from pathlib import Path

    from clicooper.config import load_config

    examples = Path(__file__).parent.parent / "examples"
    cfg = load_config(examples / "end_to_end.toml")
    assert cfg.privacy.guarantee == "end-to-end" and cfg.model.head_pretrain_epochs == 0
    assert cfg.model.embed == 10 and cfg.watermark.enabled and cfg.training.lr_floor == 0.1
    settled = load_config(examples / "end_to_end_no_watermark.toml")
    # the same job but for the watermark, the rate's floor and the passes (its job name aside)
    back = {"watermark": {"enabled": True}, "training": {"lr_floor": 0.1, "epochs": 10}}
    assert settled.replace(**back, job={"name": "end-to-end"}) == cfg


def test_model_embed_sets_the_release_width(digits):
    """`model.embed` reaches the zoo factory (in-process and in every party that builds from the
    manifest's config) and is refused for models without an embedding."""
    from clicooper.config import parse_config
    from clicooper.job import build_model_and_plan

    cfg = tiny_config(model={"arch": "small-cnn-dp", "embed": 10, "n_trainers": 2})
    model, _ = build_model_and_plan(cfg, digits)
    with torch.no_grad():
        assert model[0](digits.train_x[:3]).shape == (3, 10)
    default, _ = build_model_and_plan(cfg.replace(model={"embed": None}), digits)
    with torch.no_grad():
        assert default[0](digits.train_x[:3]).shape == (3, 16)
    with pytest.raises(ConfigError, match="model.embed"):
        parse_config({"model": {"arch": "small-cnn", "embed": 10}})
