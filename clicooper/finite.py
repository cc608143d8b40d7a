"""Finiteness of tensors, one reduction each: shared by the codec (a peer's tensors) and the parties
(gradients before an optimiser step)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every element of every floating-point tensor is finite (None and integer tensors are).

    One `sum` per tensor is finite iff every element is (NaN and inf propagate) and needs no boolean
    mask. A sum can overflow on large finite values (float16 activations, a neighbour's 1e38): then
    the tensor is re-checked element-wise."""
    for t in tensors:
        if t is None or not t.is_floating_point() or not t.numel():
            continue
        if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True
