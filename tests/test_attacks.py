"""The attacks must be real: each one succeeds against an undefended setting, and fails where it should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from clicooper.attacks import (
    blackbox_inversion,
    chance_advantage,
    clip_per_sample,
    clustering_label_attack,
    clustering_label_attacks,
    complete_model,
    default_decoder,
    label_free_output_attack,
    psnr_batch,
    scratch_baseline,
    ssim_batch,
    train_inverse_decoder,
    whitebox_inversion,
)
from clicooper.attacks.metrics import PSNR_CAP_DB
from clicooper.privacy.label_accounting import binomial_margin, success_bound
from clicooper.privacy.label_dp import rr_with_prior


@pytest.fixture(scope="module")
def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 sklearn digits as (N, 1, 8, 8) images in [0, 1], shuffled with a fixed seed."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def _conv_head() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())


# --------------------------------------------------------------------------- metrics
def test_chance_advantage_edge_cases() -> None:
    assert chance_advantage(0.1, 10) == 0.0
    assert chance_advantage(0.05, 10) == 0.0  # below chance is no advantage, never negative
    assert chance_advantage(1.0, 10) == 1.0
    assert chance_advantage(0.55, 10) == pytest.approx(0.5)
    assert chance_advantage(0.75, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_classes"):
        chance_advantage(0.5, 1)
    with pytest.raises(ValueError, match="accuracy"):
        chance_advantage(1.5, 10)


def test_ssim_and_psnr_of_identical_images(digit_images) -> None:
    x = digit_images[0][:8]
    assert ssim_batch(x, x) == pytest.approx(1.0)
    assert psnr_batch(x, x) == PSNR_CAP_DB
    rgb = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # small colour images
    assert ssim_batch(rgb, rgb) == pytest.approx(1.0)
    assert ssim_batch(rgb, 1 - rgb) < 0.5
    assert 0 < psnr_batch(rgb, 1 - rgb) < 20
    with pytest.raises(ValueError, match="shape"):
        ssim_batch(x, x[:4])
    assert math.isnan(ssim_batch(x, x, gaussian=True))  # 8x8 is below the 11x11 Gaussian window


def test_ssim_variants_agree_on_order() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(4, 1, 28, 28, generator=g)
    near, far = (img + 0.05 * torch.randn(img.shape, generator=g)), torch.rand(4, 1, 28, 28, generator=g)
    for gaussian in (False, True):
        assert ssim_batch(img, img, gaussian=gaussian) == pytest.approx(1.0)
        assert ssim_batch(near, img, gaussian=gaussian) > ssim_batch(far, img, gaussian=gaussian) + 0.5


# --------------------------------------------------------------------------- clustering
def _gaussian_classes(n: int = 2000, k: int = 10, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.arange(n) % k
    return centers[y] + torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("k", [None, 20])
def test_clustering_recovers_labels_of_separated_classes(k: int | None) -> None:
    x, y = _gaussian_classes()
    res = clustering_label_attack(x, y, 10, k=k, known_per_class=5, seed=0)
    assert res.success > 0.9, res
    assert (res.k, res.n_samples, res.n_known) == (k or 10, 2000, 50)


@pytest.mark.parametrize("k", [None, 20])
def test_clustering_on_noise_is_chance(k: int | None) -> None:
    _, y = _gaussian_classes()
    noise = torch.randn(2000, 4, 4, 2, generator=torch.Generator().manual_seed(1))  # any (N, ...) shape
    res = clustering_label_attack(noise, y, 10, k=k, seed=0)
    assert res.success < 0.1, res


def test_clustering_on_randomized_labels_stays_within_the_label_dp_bound() -> None:
    """Pseudo-labels under K-ary randomized response: the attack recovers at most what the release keeps."""
    n, k, eps = 3000, 10, 2.0
    y = torch.arange(n) % k
    noisy = rr_with_prior(y, k, eps, torch.from_numpy(np.random.default_rng(0).random((n, 2))))
    one_hot = nn.functional.one_hot(noisy, k).float()
    clean, one, five = clustering_label_attacks(
        nn.functional.one_hot(y, k).float(), y, k, known_per_class=(5,), seed=0
    ) + clustering_label_attacks(one_hot, y, k, known_per_class=(1, 5), seed=0)
    assert clean.success == 1.0 and (one.n_known, five.n_known) == (10, 50)
    bound = success_bound(eps, k)
    assert five.success <= bound + binomial_margin(0.45, n) / 0.9, (five, bound)
    assert five.success > bound - 0.1  # 5 labels per class name the clusters: the bound is nearly met


def test_clustering_rejects_misaligned_labels() -> None:
    x, y = _gaussian_classes(200)
    with pytest.raises(ValueError, match="true_labels"):
        clustering_label_attack(x, y[:-1], 10)


# --------------------------------------------------------------------------- inversion
def test_whitebox_inversion_reconstructs_clean_but_not_noised(digit_images) -> None:
    head = _conv_head()
    private = digit_images[0][:16]
    with torch.no_grad():
        act = head(private)
    clean = ssim_batch(whitebox_inversion(head, act, (1, 8, 8), steps=300, seed=0), private)
    assert clean > 0.6, clean

    clip, sigma = 1.0, 1.0  # the defence: per-sample clipping then N(0, (sigma*C)^2)
    noised = clip_per_sample(act, clip) + sigma * clip * torch.randn(
        act.shape, generator=torch.Generator().manual_seed(1)
    )
    defended = ssim_batch(whitebox_inversion(head, noised, (1, 8, 8), clip=clip, seed=0), private)
    assert defended < 0.2 and defended < clean - 0.5, (clean, defended)
    assert head.training and all(p.requires_grad for p in head.parameters())  # the head is left as found


def test_blackbox_decoder_beats_baselines(digit_images) -> None:
    images = digit_images[0]
    head = _conv_head()
    private, aux = images[:16], images[200:1200]  # auxiliary data disjoint from the private samples
    with torch.no_grad():
        act = head(private)
    decoder = train_inverse_decoder(head, aux, epochs=20, batch_size=64, seed=0)
    attack = ssim_batch(blackbox_inversion(decoder, act), private)
    mean_image = ssim_batch(aux.mean(0, keepdim=True).expand_as(private), private)
    untrained = ssim_batch(blackbox_inversion(default_decoder(act.shape[1:], (1, 8, 8)), act), private)
    assert attack > max(mean_image, untrained) + 0.2, (attack, mean_image, untrained)


@pytest.mark.parametrize(
    ("act_shape", "img_shape"),
    [((8, 8, 8), (1, 8, 8)), ((16, 4, 4), (1, 8, 8)), ((4, 3, 3), (3, 10, 10)), ((32,), (1, 8, 8))],
)
def test_default_decoder_fits_any_activation_shape(act_shape, img_shape) -> None:
    out = default_decoder(act_shape, img_shape)(torch.randn(2, *act_shape))
    assert out.shape == (2, *img_shape) and out.min() >= 0 and out.max() <= 1


# --------------------------------------------------------------------------- extraction
def _mlp_parts() -> tuple[nn.Module, nn.Module, nn.Module]:
    return (
        nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU()),
        nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
        nn.Linear(64, 10),
    )


@pytest.fixture(scope="module")
def trained_split(digit_images):
    """The protected model (undefended, true labels): head | segment (T1) | output layer (T2)."""
    x, y = digit_images
    torch.manual_seed(1234)
    head, seg, rest = _mlp_parts()
    model = nn.Sequential(head, seg, rest)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        for idx in torch.randperm(1000, generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, (x[1000:1100], y[1000:1100]), (x[1300:], y[1300:])


def test_extraction_coalition_with_aux_labels_beats_chance(trained_split) -> None:
    model, (ax, ay), (tx, ty) = trained_split
    _, seg, rest = model
    make_head = lambda: _mlp_parts()[0]  # noqa: E731
    coalition = complete_model([seg, rest], make_head, None, 10, 10, ax, ay, tx, ty, attacker="T1+T2")
    assert coalition.mode == "trained" and coalition.n_aux_labels == 100
    assert coalition.accuracy > 0.6, coalition

    single = complete_model(
        [seg], make_head, lambda: nn.Linear(64, 10), 10, 10, ax, ay, tx, ty, attacker="T1"
    )
    assert single.accuracy > 0.4, single

    scratch = scratch_baseline(
        lambda: nn.Sequential(*_mlp_parts()), ax, ay, tx, ty, epochs=100, lr=3e-3, batch_size=32, seed=0
    )
    assert scratch > 0.6, scratch
    assert all(p.requires_grad for p in seg.parameters())  # the attacker worked on copies


def test_extraction_without_aux_labels_is_chance(trained_split) -> None:
    model, _, (tx, ty) = trained_split
    _, seg, rest = model
    none = complete_model([seg, rest], lambda: _mlp_parts()[0], None, 10, 10, tx[:0], ty[:0], tx, ty)
    assert none.mode == "direct" and none.n_aux_labels == 0
    assert none.accuracy < none.chance + 0.15, none  # measured 0.17: random head, guessed mapping


def test_label_free_output_attack_needs_the_mapping(trained_split) -> None:
    model, _, (tx, ty) = trained_split
    with torch.no_grad():
        logits = model(tx)
    model_acc = float((logits.argmax(1) == ty).float().mean())
    # undefended chain: the last trainer sees true labels, so gamma=1 and the mapping is the identity
    assert label_free_output_attack(logits, ty, 10, 1, known_mapping=torch.arange(10)) == pytest.approx(
        model_acc
    )

    # secret expansion (gamma=2): a perfect pseudo-label model, decoded with and without the codebook
    gen = torch.Generator().manual_seed(3)
    codebook = torch.randperm(20, generator=gen).view(10, 2)  # class c owns pseudo-labels codebook[c]
    pseudo = codebook[ty, torch.randint(0, 2, ty.shape, generator=gen)]
    pseudo_logits = 10 * nn.functional.one_hot(pseudo, 20).float()
    mapping = torch.empty(20, dtype=torch.long)
    mapping[codebook.flatten()] = torch.arange(10).repeat_interleave(2)
    assert label_free_output_attack(pseudo_logits, ty, 10, 2, known_mapping=mapping) == 1.0
    assert label_free_output_attack(pseudo_logits, ty, 10, 2) < 0.3
