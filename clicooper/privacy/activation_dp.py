"""Activation DP mechanism: per-sample L2 clipping, then Gaussian noise.

Pure functions, no state: accounting lives in accounting.py. Clipping bounds each sample's
released activation to norm C, so replacing one sample moves its release by at most 2C (L2);
noise of std sigma*C per coordinate then makes each release a Gaussian mechanism with noise
multiplier sigma/2 relative to that distance.
"""

from __future__ import annotations

import math

import torch

from clicooper.privacy.secure_noise import NormalReserve, secure_normal_like


def _check_clip(clip: float) -> None:
    if not clip > 0 or math.isinf(clip):
        raise ValueError(f"clip norm must be positive and finite, got {clip}")


def clip_per_sample(a: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each sample (dim 0, flattened) by min(1, clip/norm) so its L2 norm is <= clip.

    Differentiable, so the head is trained through the clipping (the returned gradient is that
    of the released, clipped activation); zero vectors pass through unchanged.
    """
    _check_clip(clip)
    if a.dim() == 0:
        raise ValueError("activations need a batch dimension (dim 0)")
    flat = a.reshape(a.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    scale = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
    return (flat * scale).reshape(a.shape)


def gaussian_noise_like(
    a: torch.Tensor,
    std: float,
    generator: torch.Generator | None = None,
    reserve: NormalReserve | None = None,
) -> torch.Tensor:
    """N(0, std^2) noise of `a`'s shape, dtype and device.

    Without `generator` (what every party uses) the noise comes from the OS CSPRNG and can be
    reproduced by nobody (drawn ahead by `reserve` when given); a seeded `generator` is for unit
    tests of the mechanism only.
    """
    if generator is None:
        return secure_normal_like(a, std, reserve)
    if not std >= 0 or math.isinf(std):
        raise ValueError(f"noise std must be >= 0 and finite, got {std}")
    return torch.randn(a.shape, generator=generator, dtype=a.dtype, device=a.device) * std


def clip_and_noise(
    a: torch.Tensor,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    reserve: NormalReserve | None = None,
) -> torch.Tensor:
    """Clip each sample to `clip`, add N(0, (noise_multiplier*clip)^2 I); multiplier 0 = clip only.

    The noise is additive and independent of `a`, so gradients flow through the clipping to
    the head exactly as for the clipped activation. Leave `generator` unset outside unit tests:
    the noise then comes from the OS CSPRNG (see secure_noise.py).
    """
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")
    clipped = clip_per_sample(a, clip)
    if noise_multiplier == 0:
        return clipped
    return clipped + gaussian_noise_like(clipped, noise_multiplier * clip, generator, reserve)
