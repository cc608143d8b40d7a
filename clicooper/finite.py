"""Finiteness of tensors: shared by the codec (a peer's tensors) and the parties (gradients before an
optimiser step)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import ModuleType

import torch

# the codec's wire dtype ids (`codec._WIRE_DTYPES`), which the native kernel takes; bfloat16, which
# numpy cannot view, is summed instead
_NATIVE_IDS = {torch.float32: 1, torch.float64: 2, torch.float16: 3}


def _native() -> ModuleType | None:
    """The compiled module the codec uses (`codec._native`: None where it is not built, is stale or
    `CLICOOPER_CODEC=python` turns it off), if it has `finite`. Read at each call, from the codec
    (imported here because the codec imports this file), so that one decision serves both."""
    from clicooper.transport import codec

    kernel = codec._native
    return kernel if kernel is not None and hasattr(kernel, "finite") else None


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every element of every floating-point tensor is finite (None and integer tensors are).

    A contiguous CPU tensor of float32, float64 or float16 that does not require grad is read once
    by the codec's native kernel (the bits of its exponent; one Python call); any other by
    `sum_finite`. (The codec's Python reference calls `sum_finite` alone, so that it stays
    independent of the kernel it is compared with.)"""
    kernel = _native()
    for t in tensors:
        if t is None:
            continue
        dtype_id = _NATIVE_IDS.get(t.dtype)
        if kernel is not None and dtype_id is not None:
            try:  # numpy() refuses a tensor that requires grad, is not on the CPU or has a neg bit;
                # the kernel (ValueError) one that is not C-contiguous: rare among gradients
                if kernel.finite(t.numpy(), dtype_id):
                    continue
                return False
            except (RuntimeError, TypeError, ValueError):
                pass
        if not sum_finite(t):
            return False
    return True


def sum_finite(t: torch.Tensor) -> bool:
    """Whether a tensor is finite, from one `sum`: finite iff every element is (NaN and inf
    propagate), with no boolean mask; re-checked element-wise where a sum of large finite values
    overflows (float16 activations, a neighbour's 1e38). Integer and empty tensors are finite."""
    if not t.is_floating_point() or not t.numel():
        return True
    t = t.detach()  # a check, not a step of the graph
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())
