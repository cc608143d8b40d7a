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


def epoch_batches(
    seed: int, epoch: int, n: int, batch_size: int, *, poisson: bool = False
) -> list[torch.Tensor]:
    """The sample indices of each step of one epoch.

    Shuffle: a random partition into batches of `batch_size` (every sample exactly once).
    Poisson: n // batch_size steps, each sample joining each step independently with
    probability batch_size / n; this is what DP amplification by subsampling assumes.
    """
    if not poisson:
        order = epoch_order(seed, epoch, n)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    gen = generator(seed, "poisson", epoch)
    q = batch_size / n
    return [torch.nonzero(torch.rand(n, generator=gen) < q).flatten() for _ in range(max(n // batch_size, 1))]
