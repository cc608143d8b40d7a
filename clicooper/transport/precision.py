"""The precision in which activations and gradients travel between parties (`training.wire_dtype`).

float32, the default, sends every tensor as computed. bfloat16 and float16 halve the bytes on every
link: worth it where the links, not the parties' compute, set the pace (a WAN; BENCHMARKS.md). Each
party still computes in float32; it casts what it sends with `to_wire` and what it receives with
`from_wire`. Trainers hash the tensors as sent, so both ends of a link record the same bytes and
the verifier's link check holds. Labels never change precision.

bfloat16 keeps (nearly) float32's range with 8 bits of mantissa: the choice for gradients. float16
keeps 11 bits but overflows above 65,504, which `to_wire` refuses with an error that names the fix
rather than sending infinities, and it has no loss scaling here: gradient values below about 6e-5
lose precision and below 6e-8 become zero (half of the first trainer's gradient values in a small
digits job are under 6e-5; its accuracy did not suffer, BENCHMARKS.md, but bfloat16 is safer).
"""

from __future__ import annotations

import math

import torch

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504


class WireRangeError(ValueError):
    """A tensor does not fit the wire precision (float16's range)."""


def to_wire(t: torch.Tensor, dtype: torch.dtype, *, where: str) -> torch.Tensor:
    """`t` (detached) in the wire precision `dtype`; the same tensor when it already is."""
    t = t.detach()
    if t.dtype == dtype:
        return t
    if dtype == torch.float16 and t.numel():
        low, high = torch.aminmax(t)  # one pass over float32 (isfinite on float16 is ~30x slower)
        biggest = max(-float(low), float(high))
        if math.isfinite(biggest) and biggest > FLOAT16_MAX:
            raise WireRangeError(
                f"{where}: a value of magnitude {biggest:.4g} exceeds float16's largest ({FLOAT16_MAX:g}); "
                "set training.wire_dtype = 'bfloat16' (float32's range) or 'float32'"
            )
        # NaN and infinities are not a matter of range: they travel and the receiver refuses them,
        # as it does in any precision (the model diverged, or a peer misbehaves)
    return t.to(dtype)


def from_wire(t: torch.Tensor) -> torch.Tensor:
    """A received tensor in float32 for computing with (a copy when it travelled in lower precision)."""
    return t if t.dtype == torch.float32 else t.float()
