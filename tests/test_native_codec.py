"""The native codec (`_wire.c`) against the Python reference in codec.py.

The two must write the same bytes for every message the native side takes, and accept exactly the
same bytes from a peer (the native side then returns the same message). Hypothesis draws messages
of every kind with hostile fields, and frames: valid encodings, encodings with bytes changed, with
hostile values in their fixed part, cut short or extended, and random bytes. tests/test_codec.py
runs its own cases against both.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clicooper.transport import CodecError, Forward, Header, codec, copy_message, decode, encode, encode_frame
from clicooper.transport.messages import MESSAGE_TYPES, Backward, Message
from tests.strategies import WIRE_DTYPES, tensors

native = codec._native
needs_native = pytest.mark.skipif(native is None, reason="the native codec is not built on this machine")
FUZZ = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)

INT64 = st.integers(-(2**63), 2**63 - 1)


def test_the_native_codec_is_built_where_a_compiler_is():
    """setup.sh builds it with the package; a machine with a C compiler and Python's headers must
    have it (the build is optional only so that an install without a compiler still works)."""
    if os.environ.get("CLICOOPER_CODEC", "").lower() == "python":
        pytest.skip("CLICOOPER_CODEC=python turns the native codec off")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not shutil.which(compiler) or not headers.exists():
        pytest.skip("no C compiler or no Python headers here: the Python reference runs alone")
    assert native is not None, "the native codec was not built: run `pip install -e .` again"


@needs_native
def test_a_stale_native_build_of_another_format_is_not_used(monkeypatch):
    monkeypatch.setattr(native, "WIRE_VERSION", codec.WIRE_VERSION + 1)
    assert codec._load_native() is None
    monkeypatch.setattr(native, "WIRE_VERSION", codec.WIRE_VERSION)
    assert codec._load_native() is native
    monkeypatch.delattr(native, "NATIVE_API")  # a build from before parse built messages
    assert codec._load_native() is None
    monkeypatch.setattr(native, "NATIVE_API", codec._NATIVE_API, raising=False)
    assert codec._load_native() is native
    monkeypatch.setattr(native, "register", lambda *args: 0)  # a build that reads another layout
    assert codec._load_native() is None


@needs_native
def test_a_message_kind_the_native_side_cannot_build_turns_it_off(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Checked(Forward):
        def __post_init__(self) -> None:
            pass

    monkeypatch.setitem(codec.MESSAGE_TYPES, "checked", Checked)
    assert codec._load_native() is None


# -- strategies --------------------------------------------------------------------------------
def _value(draw, typ: type):
    """A value for a field of type `typ`, now and then of the wrong type or out of range."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from([None, 1.5, "x", 2**64, -(2**63) - 1, True, 2]))
    if typ is str:
        return draw(st.text(max_size=12))  # surrogates included: not UTF-8-encodable
    if typ is int:
        return draw(st.one_of(st.integers(-3, 1000), INT64))
    if typ is float:
        return draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)))
    if typ is bool:
        return draw(st.booleans())
    return draw(tensors(max_dim=5, awkward=True))


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "torch.Tensor": torch.Tensor}


@st.composite
def messages(draw) -> Message:
    cls = draw(st.sampled_from(list(MESSAGE_TYPES.values())))
    header = Header(**{f.name: _value(draw, _TYPES[f.type]) for f in dataclasses.fields(Header)})
    fields = {f.name: _value(draw, _TYPES[f.type]) for f in dataclasses.fields(cls) if f.name != "header"}
    return cls(header=header, **fields)


def _reference_frame(msg: Message) -> bytes | None:
    try:
        return codec._reference_frame(msg)
    except CodecError:
        return None


@st.composite
def frames(draw) -> bytes:
    how = draw(st.sampled_from(["valid", "valid", "changed", "fixed part", "cut", "extended", "random"]))
    if how == "random":
        return draw(st.binary(max_size=400))
    data = None
    while data is None:
        data = _reference_frame(draw(messages()))
    data = bytearray(data)
    if how == "changed":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif how == "fixed part":  # a hostile value in one slot of the binary header
        layout = codec._LAYOUT_BY_ID[data[5]]
        values = list(layout.fixed.unpack_from(data))
        i = draw(st.integers(0, len(values) - 1))
        fmt = layout.fixed.format.removeprefix("<")[i]
        hostile = {"B": [0, 1, 2, 255], "I": [0, 1, 63, 2**20 + 1, 2**32 - 1], "q": [-(2**63), -1, 2**62]}
        hostile |= {"Q": [0, 1, 2**29 + 1, 2**40, 2**64 - 1], "d": [float("nan"), float("-inf"), 1e308]}
        values[i] = draw(st.sampled_from(hostile[fmt]))
        data[: layout.fixed.size] = layout.fixed.pack(*values)
    elif how == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif how == "extended":
        data += draw(st.binary(min_size=1, max_size=70))
    return bytes(data)


# -- comparisons -------------------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.detach().reshape(-1).view(torch.uint8).numpy())


def _same_parse(a: tuple, b: tuple) -> bool:
    """Two results of the native `parse` (or `copy`'s second part) alike: the kind, the fields set on
    the message it built (its header and scalars: codec.py sets the tensors) and the tensor specs."""
    (kind_a, msg_a, *rest_a), (kind_b, msg_b, *rest_b) = a, b
    return kind_a == kind_b and type(msg_a) is type(msg_b) and vars(msg_a) == vars(msg_b) and rest_a == rest_b


def _same_message(a: Message, b: Message) -> bool:
    if type(a) is not type(b) or a.header != b.header:
        return False
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not x.is_contiguous() or not y.is_contiguous():
                return False
            if x.numel() and _bytes(x) != _bytes(y):
                return False
        elif f.name != "header" and (type(x) is not type(y) or x != y):
            return False
    return True


def _reference_decode(data: bytes | bytearray) -> Message | None:
    try:
        return codec._reference_decode(data)
    except CodecError:
        return None


@needs_native
@FUZZ
@given(messages())
def test_native_encoding_writes_the_reference_bytes(msg):
    ref = _reference_frame(msg)
    fast = codec._native_pack(msg, None)
    if fast is not None:
        assert ref is not None and fast == ref
    aligned = codec._native_pack(msg, codec.byte_buffer)
    if aligned is not None:
        assert ref is not None and bytes(aligned) == ref
        assert np.frombuffer(aligned, dtype=np.uint8).ctypes.data % codec.ALIGN == 0
    # the public functions: the same bytes, or the reference's refusal
    for fn in (encode, encode_frame):
        try:
            out = bytes(fn(msg))
        except CodecError:
            assert ref is None
        else:
            assert out == ref


@needs_native
def test_the_native_path_takes_every_well_typed_message():
    """The fast path must not pass the tests above by declining: every kind, each wire dtype,
    0-d, empty, non-ASCII strings."""
    h = Header("jöb", "trainer_1", "trainer_2", 3, 4, 5)
    for cls in MESSAGE_TYPES.values():
        for dtype in WIRE_DTYPES:
            fields = {}
            for f in dataclasses.fields(cls):
                typ = _TYPES.get(f.type)
                if f.name != "header":
                    fields[f.name] = {str: "é✓", int: 7, float: 0.5, bool: True}.get(typ)
                    if typ is torch.Tensor:
                        fields[f.name] = torch.arange(6).to(dtype).reshape(2, 3)
            msg = cls(header=h, **fields)
            for alloc in (None, codec.byte_buffer):
                out = codec._native_pack(msg, alloc)
                assert out is not None, (cls.KIND, dtype)
                back = codec._native_decode(bytearray(out) if alloc else out)
                assert back is not None and _same_message(back, msg), (cls.KIND, dtype)
    for t in (torch.tensor(1.5), torch.empty(0, 3), torch.randn(1, 2, 1, 1, 1, 1, 1, 1)):
        msg = Forward(header=h, activation=t)
        assert _same_message(codec._native_decode(codec._native_pack(msg, None)), msg)


@needs_native
@FUZZ
@given(frames())
def test_native_decoding_accepts_exactly_what_the_reference_accepts(frame):
    ref = _reference_decode(frame)
    for data in (frame, bytearray(frame)):  # read-only (network) and writable (in-process) buffers
        fast = codec._native_decode(data)
        assert (fast is None) == (ref is None), (ref, fast)
        if ref is not None:
            assert _same_message(fast, ref)
            assert _same_message(decode(data), ref)
        else:
            with pytest.raises(CodecError):
                decode(data)


@needs_native
def test_native_decoding_refuses_what_the_reference_refuses_in_every_slot():
    """Each check, one at a time, on a valid message (the fuzzing above samples these)."""
    msg = Forward(header=Header("j", "a", "b", 1, 2, 3), activation=torch.randn(2, 3), micros=4)
    good = codec._reference_frame(msg)
    layout = codec._LAYOUT_BY_ID[good[5]]
    assert codec._native_decode(good) is not None
    spoiled = []
    for i, slot in enumerate(layout.slots):
        fmt = layout.fixed.format.removeprefix("<")[i]
        for v in {"B": [2, 255], "I": [0, 2**32 - 1], "q": [-1], "Q": [2**29 + 1, 2**64 - 1], "d": []}[fmt]:
            values = list(layout.fixed.unpack_from(good))
            values[i] = v
            spoiled.append((slot, layout.fixed.pack(*values) + good[layout.fixed.size :]))
    end = 4 + struct.unpack_from("<I", good)[0]
    spoiled += [("header padding", good[: end - 1] + b"\x01" + good[end:])]
    spoiled += [("tensor padding", good[:-1] + b"\x01"), ("trailing", good + bytes(64))]
    spoiled += [("cut", good[:-64]), ("utf-8", good.replace(b"jab", b"\xff\xfeb"))]
    nan = bytearray(good)
    nan[end : end + 4] = struct.pack("<f", float("nan"))
    spoiled += [("nan", bytes(nan))]
    refused = 0
    for slot, data in spoiled:
        ref = _reference_decode(data)
        assert (codec._native_decode(data) is None) == (ref is None), slot
        refused += ref is None
    assert refused >= len(spoiled) - 12  # most spoiled values are refusals (not a vacuous test)


# -- finiteness --------------------------------------------------------------------------------
_BITS = {  # (dtype, its same-width integer dtype, non-finite bit patterns, finite edge patterns)
    torch.float32: (
        torch.int32,
        [0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFFFFFFF],
        [0x7F7FFFFF, 1, 0x80000000],
    ),
    torch.float64: (
        torch.int64,
        [0x7FF0000000000000, -0x10000000000000, 0x7FF8000000000000, 0x7FF0000000000001],
        [0x7FEFFFFFFFFFFFFF, 1, -0x8000000000000000],
    ),
    torch.float16: (torch.int16, [0x7C00, -0x400, 0x7C01, 0x7E00, -1], [0x7BFF, 1, -0x8000]),
    torch.bfloat16: (torch.int16, [0x7F80, -0x80, 0x7F81, 0x7FC0, -1], [0x7F7F, 1, -0x8000]),
}


def _with_bits(dtype: torch.dtype, n: int, at: int | None, bits: int) -> torch.Tensor:
    as_int, _, _ = _BITS[dtype]
    width = torch.iinfo(as_int).bits
    t = torch.randn(n).to(dtype)
    if at is not None:
        t.view(as_int)[at] = bits if bits < 2 ** (width - 1) else bits - 2**width  # as a signed integer
    return t


@needs_native
@pytest.mark.parametrize("dtype", list(_BITS))
def test_native_finiteness_agrees_with_torch_at_every_position(dtype):
    """Every non-finite pattern (infinities, quiet and signalling NaNs, NaN payloads) and the
    finite extremes, at the first, middle and last position of tensors whose lengths cover the
    vector loops' tails: checked in place by `parse` (a writable buffer), as copied by
    `copy_finite` (bytes from a network), as packed by `copy` (delivery in one process) and in the
    tensor's own memory by `finite` (a party's gradients, finite.py)."""
    _, bad, edge = _BITS[dtype]
    wire_id = codec._DTYPE_IDS[dtype]
    carrier = codec._DTYPE_BY_ID[wire_id].carrier
    for n in (1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 4097):
        for at in sorted({0, n // 2, n - 1}):
            for bits in bad + edge:
                t = _with_bits(dtype, n, at, bits)
                expected = bool(torch.isfinite(t).all())
                assert expected == (bits in edge)
                msg = Forward(header=Header("j", "a", "b", 0, 0, 1), activation=t)
                frame = bytearray(codec._reference_frame(msg))
                parsed = native.parse(frame)
                assert (parsed is not None) == expected, (n, at, hex(bits))
                copied = native.copy(msg, *codec._native_args(msg), codec.byte_buffer)
                assert (copied is not None) == expected, (n, at, hex(bits))
                if copied is not None:  # the bytes `pack` writes, read as `parse` reads them
                    assert bytes(copied[0]) == bytes(frame) and _same_parse(copied[1], parsed)
                src = t.view(carrier).numpy()
                dst = np.empty_like(src)
                assert native.copy_finite(dst, src, 0, wire_id) == expected
                assert dst.tobytes() == src.tobytes()
                assert native.finite(src, wire_id) == expected


@needs_native
@pytest.mark.parametrize("dtype", list(_BITS))
def test_native_finiteness_sees_every_lane_and_every_copy_block(dtype):
    """An infinity at every position of two 128-byte blocks and a tail (every accumulator of the
    unrolled loop, in both blocks and the scalar tail), and at both sides of each 16 KB boundary of
    the copy-then-check blocks: refused by `parse`, `copy_finite`, `copy` and `finite` alike."""
    as_int, (inf, *_), _ = _BITS[dtype]
    itemsize = torch.iinfo(as_int).bits // 8
    lanes = 128 // itemsize
    per_chunk = 16 * 1024 // itemsize
    wire_id = codec._DTYPE_IDS[dtype]
    carrier = codec._DTYPE_BY_ID[wire_id].carrier
    cases = [(2 * lanes + 1, at) for at in range(2 * lanes + 1)]
    cases += [(2 * per_chunk + 3, at) for at in (per_chunk - 1, per_chunk, 2 * per_chunk - 1, 2 * per_chunk)]
    for n, at in cases:
        t = _with_bits(dtype, n, at, inf)
        msg = Forward(header=Header("j", "a", "b", 0, 0, 1), activation=t)
        assert native.parse(bytearray(codec._reference_frame(msg))) is None, (n, at)
        assert native.copy(msg, *codec._native_args(msg), codec.byte_buffer) is None, (n, at)
        src = t.view(carrier).numpy()
        assert not native.copy_finite(np.empty_like(src), src, 0, wire_id), (n, at)
        assert not native.finite(src, wire_id), (n, at)


@needs_native
def test_copy_finite_refuses_a_source_shorter_than_its_destination():
    with pytest.raises(ValueError, match="shorter"):
        native.copy_finite(np.empty(8, np.float32), np.zeros(8, np.float32), 4, 1)
    with pytest.raises(ValueError, match="dtype"):
        native.copy_finite(np.empty(8, np.float32), np.zeros(8, np.float32), 0, 0)


@needs_native
def test_finite_refuses_an_unknown_dtype_a_partial_value_and_a_strided_buffer():
    with pytest.raises(ValueError, match="dtype"):
        native.finite(np.zeros(8, np.float32), 8)
    with pytest.raises(ValueError, match="whole values"):
        native.finite(np.zeros(6, np.uint8), 1)
    with pytest.raises(ValueError, match="contiguous"):
        native.finite(np.zeros((4, 4), np.float32).T, 1)


# -- in-process copies -------------------------------------------------------------------------
@needs_native
@FUZZ
@given(messages())
def test_in_process_copies_agree_with_the_reference(msg):
    try:
        fast = copy_message(msg)
    except CodecError as e:
        fast = e
    saved = codec._native
    codec._native = None
    try:
        ref = copy_message(msg)
    except CodecError as e:
        ref = e
    finally:
        codec._native = saved
    if isinstance(ref, CodecError):
        assert isinstance(fast, CodecError) and str(fast) == str(ref)
    else:
        assert not isinstance(fast, CodecError) and fast[1] == ref[1] and _same_message(fast[0], ref[0])
        for f in dataclasses.fields(msg):  # a copy, never the sender's memory
            x = getattr(msg, f.name)
            if isinstance(x, torch.Tensor) and x.numel():
                assert getattr(fast[0], f.name).data_ptr() != x.data_ptr()


def test_forward_messages_from_the_native_path_are_usable_tensors():
    """Decoded tensors are ordinary, writable, 64-byte aligned tensors on both paths."""
    x = torch.randn(4, 3, 5, 5)
    for data in (encode(Forward(header=Header("j", "a", "b", 0, 0, 1), activation=x)),):
        for buf in (data, bytes(data)):
            out = decode(buf).activation
            assert torch.equal(out, x) and out.data_ptr() % codec.ALIGN == 0
            out += 1  # writable: the receiver owns it


@pytest.mark.parametrize("kind", list(MESSAGE_TYPES.values()))
def test_decoded_messages_are_the_dataclasses_their_constructor_builds(kind):
    """The native decoder builds messages and headers without their `__init__`: what it returns is
    still the frozen dataclass, every field set on the instance (none left to a class default) to
    what was sent, equal and hashing alike, whatever the path."""
    base = kind(header=Header("j", "a", "b", 0, 0, 0))
    others = {int: 7, float: 2.5, str: "sent"}
    values = {
        name: (not getattr(base, name)) if typ is bool else others[typ]
        for name, typ in codec._scalar_fields(kind).items()
    }
    values |= {name: torch.arange(6.0).reshape(2, 3) for name in codec._tensor_fields(kind)}
    msg = kind(header=Header("job", "from", "to", 1, 2, 3), **values)
    if native is not None:  # the paths under test are the native ones
        assert codec._native_decode(encode(msg)) is not None
        assert codec._native_decode(encode_frame(msg)) is not None
        assert codec._native_copy(msg) is not None
    names = {f.name for f in dataclasses.fields(kind)}
    for out in (decode(encode(msg)), decode(encode_frame(msg)), copy_message(msg)[0]):
        assert type(out) is kind and vars(out).keys() == names and _same_message(out, msg)
        assert type(out.header) is Header and vars(out.header) == vars(msg.header)
        assert out.header == msg.header and hash(out.header) == hash(msg.header)
        with pytest.raises(dataclasses.FrozenInstanceError):
            out.header.step = 9  # type: ignore[misc]
        moved = Header("j", "a", "b", 4, 5, 6)
        assert _same_message(dataclasses.replace(out, header=moved), dataclasses.replace(msg, header=moved))


def test_only_plain_wire_dataclasses_are_built_without_their_init():
    """`_fills_directly` (which every message kind must pass, or the native codec is not used) refuses
    what building without `__init__` would get wrong."""
    assert all(codec._fills_directly(c) for c in (Header, *MESSAGE_TYPES.values()))

    @dataclasses.dataclass(frozen=True)
    class Checked(Forward):
        def __post_init__(self) -> None:  # a check the native decoder would skip
            raise AssertionError

    @dataclasses.dataclass(frozen=True, slots=True)
    class Slotted(Forward):
        pass

    @dataclasses.dataclass(frozen=True)
    class OffTheWire(Forward):
        note: list = dataclasses.field(default_factory=list)  # no place on the wire: its default

    @dataclasses.dataclass(frozen=True)
    class Made(Forward):
        def __new__(cls, *args, **kwargs):  # a constructor of its own
            return super().__new__(cls)

    class Guarded:  # a data descriptor: `__init__` would call its setter, a `__dict__` write not
        def __set_name__(self, owner, name):
            self.name = name

        def __get__(self, obj, owner=None):
            return 0 if obj is None else obj.__dict__.get(self.name, 0)

        def __set__(self, obj, value):
            obj.__dict__[self.name] = value

    @dataclasses.dataclass(frozen=True)
    class Described(Forward):
        micro: int = Guarded()  # type: ignore[assignment]

    for cls in (Checked, Slotted, OffTheWire, Made, Described, object):
        assert not codec._fills_directly(cls), cls
    if native is not None:  # nor does the native side take a class with its own __new__
        with pytest.raises(ValueError, match="without __new__"):
            native.register(0, Made, (), "", 0)
        with pytest.raises(ValueError, match="without __new__"):
            native.header_class(Made)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_tensor_with_a_negative_bit_travels_as_its_values(dtype):
    """A negated view (its negative bit set) is encoded as the values it holds, on both paths (encoding
    once raised torch's RuntimeError for it: the native side declined it, the reference could not
    view it)."""
    x = torch.randn(4, 3).to(dtype)
    header = Header("j", "a", "b", 0, 0, 1)
    negated = Forward(header=header, activation=torch._neg_view(x))
    resolved = _reference_frame(Forward(header=header, activation=-x))
    assert _reference_frame(negated) == resolved and bytes(encode(negated)) == resolved
    if native is not None:
        assert codec._native_pack(negated, None) == resolved
    assert torch.equal(decode(encode_frame(negated)).activation, -x)
    assert torch.equal(copy_message(negated)[0].activation, -x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_tensor_on_another_device_travels_as_its_values():
    """The native side copies a CUDA tensor into host memory before packing it (`numpy(force=True)`):
    the bytes are the reference's, and what a receiver gets is a CPU tensor."""
    x = torch.randn(4, 3)
    msg = Forward(header=Header("j", "a", "b", 0, 0, 1), activation=x.cuda())
    ref = _reference_frame(Forward(header=msg.header, activation=x))
    assert codec._native_pack(msg, None) == ref and bytes(encode(msg)) == ref
    copied = copy_message(msg)[0].activation
    assert copied.device.type == "cpu" and torch.equal(copied, x)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(3).to_sparse(),
        lambda: torch.zeros(2, 3).to_sparse_csr(),
        lambda: torch.empty(3, device="meta"),
    ],
    ids=["sparse", "sparse-csr", "meta"],
)
def test_a_tensor_without_plain_memory_is_refused_with_a_codec_error(make):
    """A sparse or meta tensor has no bytes to send: every path refuses it with a CodecError that says
    so (encoding once let torch's RuntimeError through)."""
    msg = Forward(header=Header("j", "a", "b", 0, 0, 1), activation=make())
    for fn in (encode, encode_frame, copy_message):
        with pytest.raises(CodecError, match="forward.activation: a .* tensor has no bytes to send"):
            fn(msg)


# -- found in review: hostile shapes, odd buffers, a layout changed under a call ----------------
def _empty_with_huge_dimensions() -> bytes:
    """A valid empty activation whose other dimensions are as large as the limit allows: valid on
    the wire (no bytes follow), but numpy refuses to shape it."""
    layout = codec._LAYOUTS[Forward]
    frame = bytearray(
        codec._reference_frame(Forward(header=Header("j", "a", "b", 1, 2, 3), activation=torch.empty(0)))
    )
    values = list(layout.fixed.unpack_from(frame))
    k = layout.slots.index("activation.dtype")
    values[k + 1 : k + 2 + codec.MAX_DIMS] = [8, 0] + [2**29] * 7
    layout.fixed.pack_into(frame, 0, *values)
    return bytes(frame)


@pytest.mark.parametrize("native_on", [True, False])
def test_decoding_raises_only_codec_errors_where_numpy_refuses_a_shape(native_on, monkeypatch):
    if not native_on:
        monkeypatch.setattr(codec, "_native", None)
    frame = _empty_with_huge_dimensions()
    for data in (frame, bytearray(frame)):
        with pytest.raises(CodecError):
            decode(data)


def test_decoding_a_buffer_that_is_not_flat_bytes_raises_codec_errors():
    """The reference counts len(data) items: a float view or a 2-D view of a valid frame is refused
    (as a malformed frame), and the native parser declines it rather than reading its bytes."""
    good = encode_frame(Forward(header=Header("j", "a", "b", 1, 2, 3), activation=torch.randn(2, 3)))
    for odd in (
        memoryview(good).cast("f"),
        memoryview(good).cast("B", (len(good) // 64, 64)),
        memoryview(good + good)[::2],
    ):
        if native is not None:
            assert native.parse(odd) is None
        with pytest.raises(CodecError):
            decode(odd)


@needs_native
def test_a_registered_layout_never_changes():
    """`pack` and `parse` read a kind's layout while Python code runs (getters, the allocator): a
    registration that would change it under them is refused; the same one again is accepted."""
    layout = codec._LAYOUTS[Forward]
    codes = "".join(codec._NATIVE_CODES[t] for _, t in layout.scalars)
    assert native.register(layout.kind_id, Forward, layout.scalar_names, codes, 1) == layout.fixed.size
    with pytest.raises(ValueError, match="another layout"):
        native.register(layout.kind_id, Forward, layout.scalar_names, codes, 2)
    with pytest.raises(ValueError, match="another layout"):
        native.register(layout.kind_id, Forward, tuple(f"x{i}" for i in range(len(codes))), codes, 1)
    with pytest.raises(ValueError, match="another layout"):  # the same fields, another class
        native.register(layout.kind_id, Backward, layout.scalar_names, codes, 1)
    native.header_class(Header)  # the same header class again
    with pytest.raises(ValueError, match="the same one every time"):
        native.header_class(Forward)

    class Sneaky(Forward):
        @property
        def header(self):  # re-registers the kind mid-call
            native.register(layout.kind_id, Forward, (), "", 32)
            return Header("j", "a", "b", 0, 0, 1)

    msg = object.__new__(Sneaky)
    assert native.pack(msg, layout.kind_id, ((1, np.zeros(3, np.float32)),), None) is None
    assert codec._native_decode(encode_frame(Forward(header=Header("j", "a", "b", 0, 0, 1)))) is not None


@needs_native
def test_pack_refuses_an_inconsistent_call():
    msg = Forward(header=Header("j", "a", "b", 0, 0, 1), activation=torch.zeros(3))
    kind = codec._LAYOUTS[Forward].kind_id
    arr = np.zeros(3, np.float32)
    assert native.pack(msg, kind, ((2**32 + 1, arr),), None) is None  # a dtype id out of range
    assert native.pack(msg, kind, ((2, arr),), None) is None  # float64's id for 4-byte values
    with pytest.raises(ValueError, match="flat byte buffer"):
        native.pack(msg, kind, ((1, arr),), lambda n: np.empty(n, np.float64))
    with pytest.raises(ValueError, match="flat byte buffer"):
        native.pack(msg, kind, ((1, arr),), lambda n: bytearray(n - 65))  # one byte short, however aligned
    with pytest.raises(ValueError, match="alloc is required"):
        native.copy(msg, kind, ((1, arr),), None)
    assert native.copy(msg, kind, ((2, arr),), codec.byte_buffer) is None


@needs_native
def test_in_process_copies_of_well_typed_messages_take_the_native_path(monkeypatch):
    """copy_message is the native copy (encode, and decode without reading the tensors again) for
    what the native side takes; the Python copy is only for the rest (and for wording refusals)."""
    taken = []
    monkeypatch.setattr(codec, "_copy_message", lambda msg: taken.append(msg))
    x = torch.randn(4, 3)
    copy, nbytes = copy_message(Forward(header=Header("j", "a", "b", 0, 0, 1), activation=x))
    assert not taken and torch.equal(copy.activation, x) and copy.activation.data_ptr() != x.data_ptr()
    assert nbytes == len(encode_frame(Forward(header=Header("j", "a", "b", 0, 0, 1), activation=x)))
    copy_message(Forward(header=Header("j", "a", "b", 0, 0, 1), activation=x.T))  # not contiguous
    assert len(taken) == 1
