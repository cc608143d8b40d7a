"""Activation DP mechanism: per-sample L2 clipping, then Gaussian noise.

Pure functions. Clipping bounds each sample's released activation to norm C, so replacing
one sample moves the release by at most 2C (L2); noise of std sigma*C per coordinate then
makes each release a Gaussian mechanism with noise multiplier sigma/2 w.r.t. that sensitivity.
"""

from __future__ import annotations

import torch


def clip_per_sample(a: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each sample (dim 0, flattened) to L2 norm <= clip; differentiable, zero-safe."""
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    flat = a.reshape(a.shape[0], -1)
    norms = flat.norm(dim=1, keepdim=True)
    scale = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
    return (flat * scale).reshape(a.shape)


def gaussian_noise_like(
    a: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    return torch.randn(a.shape, generator=generator, dtype=a.dtype) * std


def clip_and_noise(
    a: torch.Tensor, clip: float, noise_multiplier: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Clip to `clip`, add N(0, (noise_multiplier*clip)^2 I); gradients flow through the clipping."""
    clipped = clip_per_sample(a, clip)
    if noise_multiplier == 0:
        return clipped
    return clipped + gaussian_noise_like(clipped, noise_multiplier * clip, generator)
