"""Gaussian noise from the operating system's CSPRNG, for every DP mechanism.

DP noise is a secret of the data owner: if a trainer could regenerate it (for instance from
the job seed, which is public in `config.json`), it could subtract it and the printed epsilon
would mean nothing. So noise is never drawn from a seeded PRNG: each call reads fresh bytes
from `os.urandom` (the kernel CSPRNG, the same source `secrets` uses) and turns them into
standard normals with the Box-Muller transform, in float64. Nothing about the draw is stored.

This follows the intent of Opacus's `secure_mode` (a cryptographically secure generator, no
seed). Like Opacus we do not claim protection against floating-point side channels of the
Gaussian sampler (Mironov, CCS 2012); the noise is computed in float64 and then cast.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)


def _uniform_open(n: int) -> np.ndarray:
    """n uniforms in (0, 1], each from 53 fresh random bits of the OS CSPRNG."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) + 1.0) * _INV_2_53


def secure_standard_normal(n: int) -> np.ndarray:
    """n independent N(0, 1) draws (float64) by Box-Muller from OS entropy."""
    if n < 0:
        raise ValueError(f"sample count must be >= 0, got {n}")
    pairs = (n + 1) // 2
    u1, u2 = _uniform_open(pairs), _uniform_open(pairs)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(_TWO_PI * u2), r * np.sin(_TWO_PI * u2)])
    return z[:n]


def secure_normal_like(a: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) noise of `a`'s shape, dtype and device, from OS entropy (unreproducible)."""
    if not std >= 0 or math.isinf(std):
        raise ValueError(f"noise std must be >= 0 and finite, got {std}")
    z = torch.from_numpy(secure_standard_normal(a.numel()) * std)
    return z.reshape(a.shape).to(dtype=a.dtype, device=a.device)
