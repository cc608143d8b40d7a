"""Activation DP mechanism, accounting against dp-accounting called directly, label codebook, secrets."""

from __future__ import annotations

import json
import math
import os
import stat

import dp_accounting as dpa
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from clicooper.privacy import (
    ActivationAccountant,
    BudgetExceeded,
    LabelCodebook,
    calibrate_noise_multiplier,
    check_budget,
    clip_and_noise,
    clip_per_sample,
    compute_epsilon,
    gaussian_noise_like,
    generate_secret,
    load_secret,
    save_secret_encrypted,
)

DELTA = 1e-5

# -- mechanism -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(60, 7), (60, 3, 4, 4), (60, 1), (60, 2, 5)])
def test_clipping_bound_holds_for_every_sample(shape):
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    a = torch.randn(shape, generator=gen) * scales
    a[::7] = 0.0  # zero vectors
    c = clip_per_sample(a, 1.5)
    assert c.shape == a.shape
    norms_in, norms_out = a.flatten(1).norm(dim=1), c.flatten(1).norm(dim=1)
    assert bool((norms_out <= 1.5 * (1 + 1e-6)).all())
    small = norms_in <= 1.5
    assert small.any() and (~small).any()
    assert torch.equal(c[small], a[small])  # under the bound: untouched, bit for bit
    big = ~small
    assert torch.allclose(norms_out[big], torch.full_like(norms_out[big], 1.5), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(c[big].flatten(1), a[big].flatten(1), dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # scaled, not rotated


def test_gradient_flows_through_clipping_to_the_input():
    x = torch.cat([torch.randn(4, 10) * 10, torch.zeros(1, 10), torch.randn(3, 10) * 0.01])
    x.requires_grad_(True)
    out = clip_and_noise(x, 1.0, 0.5, torch.Generator().manual_seed(1))
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert torch.equal(x.grad[4:], torch.ones(4, 10))  # unclipped rows (and the zero row): identity
    assert bool((x.grad[:4].abs() < 1).all())  # clipped rows: scaled-down projection


def test_bad_mechanism_parameters_are_rejected():
    with pytest.raises(ValueError, match="clip"):
        clip_per_sample(torch.ones(2, 2), 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        clip_and_noise(torch.ones(2, 2), 1.0, -1.0)


def test_noise_has_the_configured_scale():
    a = torch.zeros(400, 500)  # 200k draws
    out = clip_and_noise(a, 2.0, 1.5, torch.Generator().manual_seed(0))
    n, std = out.numel(), 3.0
    # sum of squares / std^2 ~ chi2(n): within 5 standard deviations (sqrt(2n)) of n
    chi2 = float((out.double() ** 2).sum()) / std**2
    assert abs(chi2 - n) < 5 * math.sqrt(2 * n)
    assert abs(float(out.double().mean())) < 5 * std / math.sqrt(n)
    # per sample, the noise is isotropic and independent of the input (same seed, different input)
    b = torch.randn(400, 500) * 100
    nb = clip_and_noise(b, 2.0, 1.5, torch.Generator().manual_seed(0)) - clip_per_sample(b, 2.0)
    assert torch.allclose(nb, out, atol=1e-4)
    assert torch.equal(clip_and_noise(b, 2.0, 0.0), clip_per_sample(b, 2.0))  # multiplier 0: clip only
    g = gaussian_noise_like(torch.zeros(3, 2, dtype=torch.float64), 1.0, torch.Generator().manual_seed(0))
    assert g.dtype == torch.float64


# -- accounting ----------------------------------------------------------------------------


def _direct(accountant, z: float, count: int, relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE):
    acc = accountant(neighboring_relation=relation)
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), count))
    return acc.get_epsilon(DELTA)


def test_epsilon_matches_dp_accounting_directly():
    acc = ActivationAccountant(4.0, DELTA)
    assert acc.epsilon() == 0.0 and acc.releases == 0
    acc.record_release(3)  # three full passes; sigma=4 is multiplier 2 w.r.t. the 2C distance
    eps = acc.epsilon()
    assert eps == pytest.approx(_direct(PLDAccountant, 2.0, 3), rel=1e-12)
    # the same number by two independent routes, so the factor 2 is applied exactly once:
    # dp-accounting's own REPLACE_ONE convention (per-record bound C, doubled internally) ...
    assert eps == pytest.approx(_direct(PLDAccountant, 4.0, 3, dpa.NeighboringRelation.REPLACE_ONE), rel=1e-9)
    # ... and the exact analytic Gaussian (3-fold composition = one with multiplier 2/sqrt(3))
    assert eps == pytest.approx(dpa.get_epsilon_gaussian(2.0 / math.sqrt(3), DELTA), rel=1e-6)
    r = ActivationAccountant(4.0, DELTA, accountant="rdp")
    r.record_release(3)
    assert r.epsilon() == pytest.approx(_direct(RdpAccountant, 2.0, 3), rel=1e-12)
    assert eps < r.epsilon() < 1.2 * eps  # RDP is a looser bound on the same mechanism
    assert acc.epsilon(delta=1e-3) < eps  # another delta on request


def test_epsilon_grows_with_releases_and_is_infinite_without_noise():
    acc = ActivationAccountant(3.0, DELTA)
    seen = [acc.epsilon()]
    for _ in range(4):
        nxt = acc.epsilon_after(1)
        acc.record_release()
        assert acc.epsilon() == nxt  # epsilon_after predicts exactly
        seen.append(nxt)
    assert seen[0] == 0.0 and all(a < b for a, b in zip(seen, seen[1:], strict=False))
    assert ActivationAccountant(0.0, DELTA).epsilon() == 0.0
    assert ActivationAccountant(0.0, DELTA).epsilon_after(1) == math.inf
    with pytest.raises(ValueError):
        acc.record_release(-1)
    with pytest.raises(AttributeError):
        acc.releases = 0  # read-only: only recorded releases move it


def test_poisson_row_releases_get_no_sum_model_amplification():
    q, steps = 0.05, 60  # 3 expected releases per sample
    p = ActivationAccountant(4.0, DELTA, sampling_rate=q)
    p.record_release(steps)
    eps = p.epsilon()
    sum_model = PLDAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    sum_model.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(4.0)), steps))
    assert eps > 3 * sum_model.get_epsilon(DELTA)  # the noisy-sum analysis would badly under-count
    assert eps > compute_epsilon(4.0, DELTA, 3)  # a random release count costs at least its mean
    # q = 1: every step releases every sample, so it is exactly the full-pass accounting
    assert compute_epsilon(4.0, DELTA, 3, sampling_rate=1.0) == pytest.approx(
        compute_epsilon(4.0, DELTA, 3), rel=1e-5
    )
    assert compute_epsilon(4.0, DELTA, 10, sampling_rate=0.0) == 0.0
    with pytest.raises(ValueError, match="pld"):
        ActivationAccountant(4.0, DELTA, accountant="rdp", sampling_rate=q)


def test_calibration_is_tight():
    for releases, kind in ((1, "pld"), (3, "pld"), (3, "rdp")):
        s = calibrate_noise_multiplier(2.0, DELTA, releases, accountant=kind)
        assert compute_epsilon(s, DELTA, releases, accountant=kind) <= 2.0
        assert compute_epsilon(s - 0.01, DELTA, releases, accountant=kind) > 2.0
    # full passes: the exact Gaussian answer, 2 * sigma_Gauss(eps, delta) * sqrt(releases)
    assert calibrate_noise_multiplier(2.0, DELTA, 3) == pytest.approx(
        2 * dpa.get_sigma_gaussian(2.0, DELTA) * math.sqrt(3), abs=2e-3
    )
    s = calibrate_noise_multiplier(4.0, DELTA, 100, sampling_rate=0.05)
    assert compute_epsilon(s, DELTA, 100, sampling_rate=0.05) <= 4.0
    assert compute_epsilon(s - 0.01, DELTA, 100, sampling_rate=0.05) > 4.0
    assert calibrate_noise_multiplier(math.inf, DELTA, 5) == 0.0
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(0.0, DELTA, 5)


def test_accountant_state_round_trips_through_json():
    a = ActivationAccountant(5.0, DELTA, sampling_rate=0.1)
    a.record_release(7)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["releases"] == 7 and state["sensitivity_factor"] == 2.0 and state["accountant"] == "pld"
    b = ActivationAccountant(5.0, DELTA, sampling_rate=0.1)
    b.load_state_dict(state)
    assert b.releases == 7 and b.epsilon() == a.epsilon()
    for other in (
        ActivationAccountant(5.5, DELTA, sampling_rate=0.1),
        ActivationAccountant(5.0, 1e-6, sampling_rate=0.1),
        ActivationAccountant(5.0, DELTA),
        ActivationAccountant(5.0, DELTA, sampling_rate=0.1, sensitivity_factor=1.0),
    ):
        with pytest.raises(ValueError, match="different mechanism"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="release count"):
        b.load_state_dict({**state, "releases": -1})


def test_budget_check_raises_before_exceeding():
    a = ActivationAccountant(4.0, DELTA)
    a.record_release(1)
    check_budget(a, None)
    check_budget(a, 100.0)
    spent = a.epsilon()
    with pytest.raises(BudgetExceeded, match="stopped before releasing") as e:
        check_budget(a, a.epsilon_after(1) - 1e-6)
    assert f"{spent:.4f}" in str(e.value) and "delta=1e-05" in str(e.value)
    assert a.releases == 1  # nothing recorded by the failed check
    check_budget(a, a.epsilon_after(2), extra_releases=2)  # exactly at the budget is allowed


# -- label codebook ------------------------------------------------------------------------


def test_codebook_is_a_secret_deterministic_partition():
    cb = LabelCodebook.from_secret(b"s" * 32, 10, 3)
    assert cb.num_pseudo == 30
    assert torch.equal(LabelCodebook.from_secret(b"s" * 32, 10, 3).groups(), cb.groups())
    assert not torch.equal(LabelCodebook.from_secret(b"t" * 32, 10, 3).groups(), cb.groups())
    g = cb.groups()
    assert g.shape == (10, 3) and g.dtype == torch.int64
    assert sorted(g.flatten().tolist()) == list(range(30))
    assert not torch.equal(g.flatten(), torch.arange(30))  # not the identity layout
    for c in range(10):
        assert torch.equal(cb.decode_labels(g[c]), torch.full((3,), c))
    with pytest.raises(ValueError):
        LabelCodebook.from_secret(b"short", 10, 2)


def test_codebook_choices_are_the_documented_prf():
    """Each sample's choice is HMAC-SHA256(secret, JSON of ("choice", policy, epoch, index)) mod gamma, for
    any index width, as built once per batch."""
    from clicooper.privacy.labels import _prf

    cb = LabelCodebook(os.urandom(32), 10, 3)
    ids = torch.tensor([0, 7, 99, 12345, 10**6])
    for policy, epoch in (("fixed", 0), ("per-epoch", 11)):
        expect = [
            int.from_bytes(_prf(cb._secret, "choice", policy, epoch, int(i))[:8], "big") % 3 for i in ids
        ]
        assert cb._choices(ids, policy, epoch).tolist() == expect


def test_encode_decode_and_label_policies():
    cb = LabelCodebook.from_secret(generate_secret(), 10, 2)
    n = 400
    y, ids = torch.arange(n) % 10, torch.randperm(n)
    fixed0 = cb.encode(y, ids, policy="fixed", epoch=0)
    assert fixed0.dtype == torch.int64
    assert torch.equal(cb.decode_labels(fixed0), y)
    assert torch.equal(fixed0, cb.encode(y, ids, policy="fixed", epoch=5))  # stable across epochs
    assert set(fixed0.tolist()) == set(range(20))  # every pseudo-label of every class is used
    # per sample, not per batch: the same sample gets the same label in any batch composition
    assert torch.equal(cb.encode(y[:7], ids[:7]), fixed0[:7])
    e0, e1 = (cb.encode(y, ids, policy="per-epoch", epoch=e) for e in (0, 1))
    assert torch.equal(cb.decode_labels(e0), y) and torch.equal(cb.decode_labels(e1), y)  # in group
    changed = float((e0 != e1).float().mean())
    assert 0.3 < changed < 0.7  # gamma=2: about half are redrawn to the other group member
    assert torch.equal(e0, cb.encode(y, ids, policy="per-epoch", epoch=0))  # reproducible
    with pytest.raises(ValueError, match="labels"):
        cb.encode(torch.tensor([10]), torch.tensor([0]))
    with pytest.raises(ValueError, match="policy"):
        cb.encode(y, ids, policy="sometimes")  # type: ignore[arg-type]
    one = LabelCodebook.from_secret(b"x" * 32, 5, 1)  # gamma=1: a pure secret permutation
    enc = one.encode(torch.arange(5), torch.arange(5))
    assert torch.equal(enc, one.groups().flatten()) and torch.equal(one.decode_labels(enc), torch.arange(5))


def test_decode_logits_on_a_hand_made_example():
    cb = LabelCodebook.from_secret(b"k" * 32, 3, 2)
    g = cb.groups()
    logits = torch.zeros(2, 6)
    logits[0, g[1, 0]], logits[0, g[1, 1]] = math.log(2.0), math.log(3.0)  # class 1: 2 + 3
    logits[0, g[2, 0]] = math.log(4.0)  # class 2: 4 + 1; class 0: 1 + 1
    logits[1, g[0, 1]] = 5.0
    lse = cb.decode_logits(logits)
    assert lse.shape == (2, 3)
    assert torch.allclose(lse[0], torch.log(torch.tensor([2.0, 5.0, 5.0])))
    probs = cb.decode_logits(logits, method="sum-prob").exp()
    assert torch.allclose(probs[0], torch.tensor([2.0, 5.0, 5.0]) / 12)
    assert torch.allclose(probs.sum(1), torch.ones(2))
    assert cb.decode_logits(logits).argmax(1)[1] == 0 == probs.argmax(1)[1]


def test_codebook_state_carries_no_secret():
    secret = b"q" * 32
    cb = LabelCodebook.from_secret(secret, 10, 2)
    cb.encode(torch.arange(10), torch.arange(10))
    state = json.loads(json.dumps(cb.state_dict()))
    text = json.dumps(state)
    assert secret.hex() not in text and json.dumps(cb.perm.tolist()) not in text and "perm" not in text
    assert "q" * 8 not in repr(cb)
    LabelCodebook.from_secret(secret, 10, 2).load_state_dict(state)
    for other in (LabelCodebook.from_secret(b"r" * 32, 10, 2), LabelCodebook.from_secret(secret, 10, 3)):
        with pytest.raises(ValueError, match="does not match"):
            other.load_state_dict(state)


# -- the data owner's secret on disk -------------------------------------------------------


def test_secret_file_encrypted_and_plain(tmp_path):
    secret = generate_secret()
    assert len(secret) == 32 and secret != generate_secret()
    p = tmp_path / "owner" / "secret.json"
    save_secret_encrypted(p, secret, b"correct horse")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert secret.hex() not in p.read_text()
    assert load_secret(p, b"correct horse") == secret
    with pytest.raises(ValueError, match="wrong passphrase"):
        load_secret(p, b"battery staple")
    with pytest.raises(ValueError, match="passphrase is needed"):
        load_secret(p, None)
    doc = json.loads(p.read_text())
    ct = bytearray.fromhex(doc["ciphertext"])
    ct[0] ^= 1
    p.write_text(json.dumps({**doc, "ciphertext": ct.hex()}))
    with pytest.raises(ValueError, match="tampered"):
        load_secret(p, b"correct horse")
    plain = tmp_path / "plain.json"
    save_secret_encrypted(plain, secret, None)
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o600 and load_secret(plain) == secret
    save_secret_encrypted(plain, b"n" * 32, None)  # overwrite: atomic, no temporary left behind
    assert load_secret(plain) == b"n" * 32 and sorted(f.name for f in tmp_path.iterdir()) == [
        "owner",
        "plain.json",
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid secret file"):
        load_secret(bad)
