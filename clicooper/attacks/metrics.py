"""Attack metrics shared by every table (docs/attacks.md), so numbers mean the same thing everywhere.

- `chance_advantage`: label-inference success as advantage over the uniform guess,
  `max(0, (acc - 1/K) / (1 - 1/K))`.
- `ssim_batch` / `psnr_batch`: reconstruction quality of images in [0, 1] (skimage, data_range=1),
  averaged over the batch. Images are clamped to [0, 1] first: any attacker would clip its output to
  the valid pixel range, and it keeps the metric's data range honest.

SSIM as computed here (`SSIM_SETTINGS`): scikit-image's `structural_similarity` with data_range = 1
(pixels in [0, 1]), K1 = 0.01, K2 = 0.03, a 7x7 uniform window with sample covariance (skimage's
default; shrunk to the largest odd size that fits images smaller than 7x7), the SSIM map averaged over
the pixels at least 3 from the border, colour channels averaged; then averaged over the images.
`gaussian=True` gives the original setting of Wang et al. 2004 (11x11 Gaussian window, sigma 1.5,
population covariance; images of at least 11x11). He et al. 2019 report SSIM (and PSNR) of
reconstructions without stating the window or data range, so their figures and ours compare only
roughly; we therefore always print the trivial guesses (the mean image, the class-mean image) under
the same metric beside an attack, and its advantage over the mean image.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PSNR_CAP_DB = 100.0  # reported for a perfect reconstruction (skimage would return inf)


def chance_advantage(acc: float, num_classes: int) -> float:
    """Advantage over chance, `max(0, (acc - 1/K) / (1 - 1/K))`: 0 = no better than guessing, 1 = perfect."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"accuracy must lie in [0, 1], got {acc}")
    chance = 1.0 / num_classes
    return max(0.0, (acc - chance) / (1.0 - chance))


def _as_images(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of (N, C, H, W) batches and return them as float64 arrays clamped to [0, 1]."""
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty image batch")
    to_np = lambda t: t.detach().to(torch.float64).clamp(0.0, 1.0).cpu().numpy()  # noqa: E731
    return to_np(x), to_np(y)


def _win_size(h: int, w: int) -> int:
    """skimage's default 7x7 window, shrunk to the largest odd size that fits (e.g. 3 for 4x4 images)."""
    side = min(7, h, w)
    side = side if side % 2 == 1 else side - 1
    if side < 3:
        raise ValueError(f"images of {h}x{w} are too small for SSIM (need at least 3x3)")
    return side


SSIM_SETTINGS = {
    "implementation": "skimage.metrics.structural_similarity",
    "data_range": 1.0,
    "window": "7x7 uniform, sample covariance (skimage default)",
    "K1": 0.01,
    "K2": 0.03,
    "gaussian_variant": "11x11 Gaussian, sigma 1.5, population covariance (Wang et al. 2004)",
}


def ssim_batch(x: torch.Tensor, y: torch.Tensor, *, gaussian: bool = False) -> float:
    """Mean SSIM between two (N, C, H, W) batches of images in [0, 1] (module doc, `SSIM_SETTINGS`).

    `gaussian=True`: the 11x11 Gaussian-window variant; NaN for images smaller than 11x11.
    """
    a, b = _as_images(x, y)
    if gaussian:
        if min(a.shape[2], a.shape[3]) < 11:
            return float("nan")
        kw: dict = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    else:
        kw = {"win_size": _win_size(a.shape[2], a.shape[3])}
    scores = []
    for xi, yi in zip(a, b, strict=True):
        if xi.shape[0] == 1:
            scores.append(structural_similarity(xi[0], yi[0], data_range=1.0, **kw))
        else:
            scores.append(structural_similarity(xi, yi, data_range=1.0, channel_axis=0, **kw))
    return float(np.mean(scores))


def psnr_batch(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR (dB) between two (N, C, H, W) batches in [0, 1]; identical images count as `PSNR_CAP_DB`."""
    a, b = _as_images(x, y)
    scores = [
        PSNR_CAP_DB
        if np.array_equal(xi, yi)
        else min(PSNR_CAP_DB, peak_signal_noise_ratio(yi, xi, data_range=1.0))
        for xi, yi in zip(a, b, strict=True)
    ]
    return float(np.mean(scores))
