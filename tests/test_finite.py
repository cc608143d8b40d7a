"""`all_finite`: the check a party runs on its gradients before every optimiser step, through the
native kernel where it can read the tensor's memory and through one `sum` otherwise."""

from __future__ import annotations

import pytest
import torch

from clicooper import finite
from clicooper.finite import all_finite
from clicooper.transport import codec

native = finite._native()
needs_native = pytest.mark.skipif(native is None, reason="the native codec is not built on this machine")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(params=["native", "sum"])
def path(request, monkeypatch):
    """Each test on both paths: the native kernel (where built) and the `sum` it falls back to."""
    if request.param == "native" and native is None:
        pytest.skip("the native codec is not built on this machine")
    if request.param == "sum":
        monkeypatch.setattr(finite, "_native", lambda: None)
    return request.param


def test_native_dtype_ids_are_the_codecs():
    for dtype, dtype_id in finite._NATIVE_IDS.items():
        assert codec._DTYPE_IDS[dtype] == dtype_id


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_value_anywhere_in_any_tensor_is_found(path, dtype, bad):
    for n in (1, 33, 70_000):  # the last is over 64 KB in every dtype here: the kernel releases the GIL
        for at in (0, n // 2, n - 1):
            t = torch.randn(n).to(dtype)
            assert all_finite([None, torch.arange(3), t])
            t[at] = bad
            assert not all_finite([torch.ones(2), None, t]), (n, at)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t(),  # not contiguous
        lambda t: t[:, ::2],  # strided
        lambda t: t.requires_grad_(),  # numpy() refuses it
        lambda t: t._neg_view(),  # a negative bit: numpy() refuses it
        lambda t: t[0, :1].expand(4, 4),  # one element seen many times
    ],
    ids=["transposed", "strided", "requires-grad", "neg-bit", "expanded"],
)
def test_tensors_the_kernel_cannot_read_are_still_checked(path, make):
    t = torch.ones(4, 4)
    assert all_finite([make(t.clone())])
    t[0, 0] = float("nan")
    assert not all_finite([make(t.clone())])


def test_views_slices_scalars_and_parameters_are_read_as_what_they_hold(path):
    base = torch.zeros(10)
    base[0] = float("nan")
    assert all_finite([base[1:]]) and not all_finite([base[:3]])  # a storage offset; NaN outside, inside
    assert not all_finite([torch.tensor(float("nan"))]) and all_finite([torch.tensor(1.0)])  # 0-dim
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    assert all_finite([frozen])
    with torch.no_grad():
        frozen[1] = float("inf")
    assert not all_finite([frozen])


def test_the_codecs_reference_check_does_not_use_the_kernel(monkeypatch):
    """The reference decoder's finiteness check stays independent of the native kernel that the
    differential tests compare it with."""
    monkeypatch.setattr(finite, "_native", lambda: pytest.fail("the kernel was used"))
    with pytest.raises(codec.CodecError, match="NaN or infinity"):
        codec._check_finite(torch.tensor([1.0, float("nan")]), "x")
    codec._check_finite(torch.ones(3), "x")


def test_a_float16_sum_that_overflows_is_not_a_non_finite_value(path):
    t = torch.full((64,), 60000.0, dtype=torch.float16)
    assert all_finite([t]) and all_finite([t.to(torch.bfloat16) * 1e33])


def test_integer_empty_and_missing_tensors_are_finite(path):
    assert all_finite([None, torch.arange(5), torch.empty(0), torch.empty(0, 3, dtype=torch.float16)])


@needs_native
def test_contiguous_float_tensors_take_the_kernel(monkeypatch):
    """A party's gradients (contiguous float32 on the CPU) are read by the kernel, not summed: a
    change that sent them back through torch would lose the speed-up silently."""
    read = []

    class Spy:
        @staticmethod
        def finite(buf, dtype_id):
            read.append(dtype_id)
            return native.finite(buf, dtype_id)

    monkeypatch.setattr(finite, "_native", lambda: Spy)
    monkeypatch.setattr(torch.Tensor, "sum", lambda *a, **k: pytest.fail("summed"))
    grads = [torch.randn(16, 8), torch.randn(16, dtype=torch.float64), torch.randn(3).half()]
    assert all_finite(grads)
    assert read == [1, 2, 3]


def test_the_kernel_is_off_with_the_python_codec(monkeypatch):
    """`CLICOOPER_CODEC=python` turns the codec's native module off, and with it the kernel."""
    monkeypatch.setenv("CLICOOPER_CODEC", "python")
    assert codec._load_native() is None
    monkeypatch.setattr(codec, "_native", codec._load_native())
    assert finite._native() is None
    assert not all_finite([torch.tensor([float("nan")])])  # summed instead
    monkeypatch.undo()
    assert finite._native() is native
