"""Who computes what: each party's parameters and share of the training multiply-adds.

The promise of split learning to a resource-constrained data owner is that the trainers do
most of the work, so every run summary says how the work was actually divided. Counts come
from `block_costs` (multiply-adds of conv and linear layers per sample, elementwise ops as one
each). A training pass over one sample costs its forward count F plus about 2F backward
(gradients w.r.t. weights and inputs); a frozen segment that only releases activations costs F.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

FORWARD_BACKWARD = 3.0  # forward F + backward ~2F per sample


@dataclass(frozen=True)
class SegmentWork:
    """One segment's part in a run: who holds it, its size, and how many sample passes it makes."""

    party: str
    params: int
    forward_macs: float  # per sample
    train_passes: float = 0.0  # samples pushed forward and backward
    forward_passes: float = 0.0  # samples pushed forward only (a frozen head's release)


@dataclass(frozen=True)
class PartyCompute:
    party: str
    params: int
    train_macs: float
    share: float

    def to_json(self) -> dict:
        return asdict(self)


def party_compute(segments: Sequence[SegmentWork]) -> list[PartyCompute]:
    """Sum each party's parameters and training multiply-adds; the shares add up to 1."""
    params: dict[str, int] = {}
    macs: dict[str, float] = {}
    for s in segments:
        work = s.forward_macs * (FORWARD_BACKWARD * s.train_passes + s.forward_passes)
        params[s.party] = params.get(s.party, 0) + s.params
        macs[s.party] = macs.get(s.party, 0.0) + work
    total = sum(macs.values()) or 1.0
    return [PartyCompute(p, params[p], macs[p], macs[p] / total) for p in params]
