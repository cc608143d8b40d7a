"""Deterministic seeds derived from the job seed, one per purpose.

Deriving (seed, purpose, epoch) -> generator instead of sharing one running RNG
makes every epoch reproducible on its own, so a resumed run draws exactly what an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *labels: object) -> int:
    data = ":".join([str(seed), *map(str, labels)]).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, *labels: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *labels))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled sample order of one epoch (a partition into batches, not Poisson sampling)."""
    return torch.randperm(n, generator=generator(seed, "order", epoch))
