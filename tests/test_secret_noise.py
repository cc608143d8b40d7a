"""DP noise is a secret of the data owner: a trainer that knows the config and the job seed cannot
regenerate it, a resume resends the saved one-shot release instead of drawing new noise, and a
lost release that has to be redrawn is counted."""

from __future__ import annotations

import math

import torch

from clicooper.job import ChainJob
from clicooper.privacy.activation_dp import clip_per_sample
from clicooper.privacy.release_store import RELEASE_FILE
from clicooper.seeding import generator
from tests.conftest import tiny_config


def _one_shot(**privacy):
    return tiny_config(
        privacy={"dp": True, "epsilon": 2.0, "release": "one-shot", "secret_seed": 1, **privacy},
        training={"epochs": 1},
    )


def _first_releases(job: ChainJob) -> dict[int, torch.Tensor]:
    """Run one round and return what trainer_1 received in its first training step, by sample id."""
    sent: list = []
    original = job.transport.send
    job.transport.send = lambda m: (sent.append(m), original(m))[1]
    job.data_owner.train_round(0)
    fwd = next(m for m in sent if m.KIND == "forward" and m.header.receiver == "trainer_1" and m.train)
    return fwd.activation


def test_a_trainer_with_the_seed_cannot_subtract_the_noise(digits, tmp_path):
    cfg = _one_shot()
    job = ChainJob(cfg, digits, tmp_path / "a")
    released = job.data_owner._one_shot_release()
    with torch.no_grad():
        clean = clip_per_sample(job.data_owner.head(digits.train_x), cfg.privacy.clip)
    sigma_c = job.defence.noise_multiplier * cfg.privacy.clip
    noise = released - clean
    per_coord_std = float(noise.std())
    assert math.isclose(per_coord_std, sigma_c, rel_tol=0.05)
    # The trainer regenerates every stream it could derive from the public seed and subtracts it.
    for labels in (("dp", "one-shot"), ("dp", 0), ("dp-inference", "eval"), ("init",)):
        guess = torch.randn(released.shape, generator=generator(cfg.job.seed, *labels)) * sigma_c
        residual = released - guess - clean
        assert float(residual.std()) > 1.3 * sigma_c  # independent noise adds up; nothing cancels
    # The same config and seed, run again, release under different noise (nothing public fixes it).
    again = ChainJob(cfg, digits, tmp_path / "b").data_owner._one_shot_release()
    diff_std = float((again - released).std())
    assert math.isclose(diff_std, math.sqrt(2) * sigma_c, rel_tol=0.05)


def test_noise_is_nowhere_on_disk(digits, tmp_path):
    cfg = _one_shot()
    job = ChainJob(cfg, digits, tmp_path)
    job.run()
    released = job.data_owner._one_shot_release()
    noise = released - clip_per_sample(job.data_owner.head(digits.train_x).detach(), cfg.privacy.clip)
    probe = noise[0, :4].numpy().tobytes()  # 16 bytes of the secret noise
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.name != RELEASE_FILE:  # the release itself (noise + signal) is private too
            assert probe not in f.read_bytes(), f
    assert (tmp_path / "data_owner" / RELEASE_FILE).stat().st_mode & 0o077 == 0


def test_resume_resends_the_saved_release_and_a_lost_one_is_counted(digits, tmp_path):
    cfg = _one_shot().replace(training={"epochs": 2})
    first = ChainJob(cfg, digits, tmp_path)
    r0 = first.data_owner._one_shot_release().clone()
    first.data_owner.train_round(0)
    resumed = ChainJob(cfg, digits, tmp_path)
    resumed.resume()
    assert torch.equal(resumed.data_owner._one_shot_release(), r0)
    assert resumed.defence.accountant.releases == 1
    (tmp_path / "data_owner" / RELEASE_FILE).unlink()
    lost = ChainJob(cfg, digits, tmp_path)
    lost.resume()
    redrawn = lost.data_owner._one_shot_release()
    assert not torch.equal(redrawn, r0)
    assert lost.defence.accountant.releases == 2  # the second draw is paid for
    assert lost.defence.epsilon() > resumed.defence.epsilon()


def test_the_secure_sampler_is_standard_normal_and_never_repeats():
    """The keystream sampler's draws: mean 0, variance 1 and kurtosis 3 within 6 standard errors,
    a Kolmogorov-Smirnov test against N(0, 1) far from rejection, no value of the first block again
    in the later ones (they continue one keystream), and two calls that share nothing (a fresh key
    per call). Each bound fails for a correct sampler with probability below 1e-8."""
    from scipy import stats

    from clicooper.privacy.secure_noise import secure_normal_like, secure_standard_normal

    n = 400_001  # odd: the last Box-Muller pair is cut
    z = secure_standard_normal(n)
    assert z.shape == (n,) and z.dtype == torch.float64 and bool(torch.isfinite(z).all())
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 6 * se
    assert abs(float(z.var()) - 1) < 6 * math.sqrt(2) * se
    assert abs(float((z**4).mean()) - 3) < 6 * math.sqrt(96) * se
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-8
    w = secure_standard_normal(n)
    assert abs(float(torch.corrcoef(torch.stack([z, w]))[0, 1])) < 6 * se
    assert not bool(torch.isin(z[:1000], w).any())
    assert not bool(torch.isin(z[:100], z[100:]).any())  # its blocks continue one keystream
    scaled = secure_standard_normal(n, 3.0, torch.float32)
    assert scaled.dtype == torch.float32 and abs(float(scaled.std()) - 3.0) < 6 * 3.0 * math.sqrt(2) * se
    noise = secure_normal_like(torch.zeros(4, 3, dtype=torch.float16), 2.0)
    assert noise.shape == (4, 3) and noise.dtype == torch.float16
    assert secure_standard_normal(0).shape == (0,)


def test_the_reserve_hands_out_fresh_standard_normals_once():
    """Drawn ahead on the background thread: each take is its own draw (nothing handed out twice,
    across equal, smaller and larger requests) and standard normal."""
    from clicooper.privacy.secure_noise import NormalReserve

    reserve = NormalReserve()
    takes = [reserve.take(n) for n in (50_000, 50_000, 20_000, 80_000, 80_000)]
    assert [t.numel() for t in takes] == [50_000, 50_000, 20_000, 80_000, 80_000]
    z = torch.cat(takes)
    assert z.dtype == torch.float64
    scaled = [reserve.take(40_000, 3.0, torch.float32) for _ in range(2)]  # another kind: a fresh draw
    assert all(t.dtype == torch.float32 for t in scaled)
    assert abs(float(torch.cat(scaled).std()) - 3.0) < 0.05
    assert z.unique().numel() == z.numel()  # no value repeats: no draw was reused
    se = 1 / math.sqrt(z.numel())
    assert abs(float(z.mean())) < 6 * se and abs(float(z.var()) - 1) < 6 * math.sqrt(2) * se


def test_per_step_releases_take_their_noise_from_the_reserve(digits):
    cfg = tiny_config(
        privacy={"dp": True, "noise_multiplier": 1.0, "release": "per-step"}, training={"epochs": 1}
    )
    job = ChainJob(cfg, digits, None)
    taken: list[int] = []
    original = job.defence._noise.take
    job.defence._noise.take = lambda n, *a: (taken.append(n), original(n, *a))[1]
    job.data_owner.train_round(0)
    steps = math.ceil(len(digits.train_x) / cfg.training.batch_size)
    assert len(taken) == steps and all(n > 0 for n in taken)
