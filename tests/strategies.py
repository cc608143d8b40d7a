"""Hypothesis strategies shared by the fuzzing tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from clicooper.transport import codec

WIRE_DTYPES = list(codec._WIRE_DTYPES)
SPECIAL_VALUES = [float("nan"), float("inf"), float("-inf"), 1e38, -0.0]


@st.composite
def tensors(draw, max_dim: int = 6, awkward: bool = False) -> torch.Tensor:
    """A tensor of a wire dtype, now and then with a special value (NaN, infinities, huge, -0).
    `awkward` adds what a party's own tensors can be: transposed (not contiguous) or autograd."""
    dtype = draw(st.sampled_from(WIRE_DTYPES))
    shape = draw(st.lists(st.integers(0, max_dim), min_size=0, max_size=4))
    t = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 5, shape, dtype=dtype)
    if dtype.is_floating_point and t.numel() and draw(st.booleans()):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL_VALUES))
    if awkward and t.dim() >= 2 and draw(st.integers(0, 4)) == 0:
        t = t.transpose(0, 1)
    if awkward and dtype.is_floating_point and draw(st.integers(0, 9)) == 0:
        t = t.detach().requires_grad_(True) * 1
    return t
