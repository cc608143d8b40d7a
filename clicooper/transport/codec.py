"""Wire codec: messages <-> bytes, without pickle.

Layout, every integer little-endian:

1. a fixed part, one `struct` layout per message kind (`_Layout`): the header length `n` (u32),
   the wire format version (u8) and the kind's id (u8, its place in `MESSAGE_TYPES`); the
   header's round, step and seq (i64) and the byte lengths of its job id, sender and receiver
   (u32); the message's scalar fields in declaration order (int: i64, float: f64, bool: u8 0 or 1,
   str: its byte length, u32); for each tensor field its dtype id (u8), number of dimensions (u8)
   and MAX_DIMS dimension slots (u64, the unused ones 0);
2. the UTF-8 bytes of the strings, in the order of their lengths;
3. zero bytes up to offset 4 + n, the first 64-byte boundary after the strings;
4. the raw little-endian bytes of each tensor in field order, each zero-padded to a 64-byte
   boundary (zero-copy views must be aligned: misaligned tensors make convolution and activation
   kernels several times slower).

The header is binary because a JSON one cost 25-45 us a message to build, parse and check: more
than copying a 1 MB tensor (BENCHMARKS.md). The encoding is canonical: a message has one byte
string, and decoding refuses any other (slack or non-zero padding, a bool other than 0 or 1).
Decoding validates everything a peer controls: the version, the kind, UTF-8, non-negative
counters, finite floats, dtypes from a whitelist, shapes against byte lengths, the total size,
finite tensors. `decode` raises `CodecError` and nothing else, whatever the bytes.

Two implementations share this format. The Python one in this file is the reference: it decides
what is valid and words every error. The native one (`_wire.c`, built at install where a C
compiler is found) takes the common case, exactly typed fields and contiguous tensors, with the
per-message work in C (decoded messages and headers are built there too) and the finiteness check
read from the bits, fused with the copy where there is one. It writes the same bytes and accepts
exactly the bytes the reference accepts (the tests check both on valid, mutated and random
messages); whenever it declines, or refuses a message, the reference runs on the same input, so
that a refusal always carries the reference's error. `CLICOOPER_CODEC=python` turns the native
path off (for comparisons).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import os
import struct
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import torch

from clicooper.allocator import byte_buffer
from clicooper.finite import sum_finite
from clicooper.transport.messages import MESSAGE_TYPES, Header, Message

log = logging.getLogger("clicooper.codec")

WIRE_VERSION = 2  # 1 was a JSON header; a peer on another version is refused by name
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_DIMS = 8
ALIGN = 64
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
T, R = TypeVar("T"), TypeVar("R")

# A dtype's wire id is its place in this tuple, counted from 1 (0 is never valid): append only.
_WIRE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
)
_DTYPE_IDS = {t: i for i, t in enumerate(_WIRE_DTYPES, start=1)}
# numpy has no bfloat16: its bytes travel through numpy as int16 and are viewed back in torch
_CARRIERS: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}


def _numpy_dtype(t: torch.dtype) -> np.dtype:
    """The numpy dtype that holds the bytes of a `t` tensor, in this machine's byte order."""
    return np.dtype(str(_CARRIERS.get(t, t)).removeprefix("torch."))


@dataclasses.dataclass(frozen=True)
class _WireDtype:
    torch: torch.dtype
    wire: np.dtype  # the numpy view of the bytes as they travel (little-endian)
    native: np.dtype  # the same in this machine's byte order
    carrier: torch.dtype  # the torch dtype whose tensors numpy can view (bfloat16's is int16)


# indexed by wire id; None at 0 so that a zero id reads as "not allowed"
_DTYPE_BY_ID: tuple[_WireDtype | None, ...] = (None,) + tuple(
    _WireDtype(t, _numpy_dtype(t).newbyteorder("<"), _numpy_dtype(t), _CARRIERS.get(t, t))
    for t in _WIRE_DTYPES
)
_SCALAR_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_SCALAR_FORMATS = {int: "q", float: "d", bool: "B", str: "I"}
_HEADER_TYPES = {f.name: _SCALAR_TYPES[f.type] for f in dataclasses.fields(Header)}
_HEADER_CHECKS = {k: (t, f"header.{k}") for k, t in _HEADER_TYPES.items()}
_HEADER_TEXTS, _HEADER_INTS = ("job_id", "sender", "receiver"), ("round", "step", "seq")
assert set(_HEADER_TYPES) == {*_HEADER_TEXTS, *_HEADER_INTS}, "the wire layout must cover Header"
_PREFIX = struct.Struct("<IBB")  # read before the kind is known
_PREFIX_SLOTS = ("header_length", "version", "kind")
# where a kind's scalar fields start among its fixed part's values: after the prefix and the
# header's counters and string lengths
_FIRST_SCALAR = len(_PREFIX_SLOTS) + len(_HEADER_INTS) + len(_HEADER_TEXTS)
_NO_DIMS = (0,) * MAX_DIMS
_LITTLE_ENDIAN = sys.byteorder == "little"  # the wire's byte order: tensors go as they are
_ZEROS = bytes(ALIGN)


class CodecError(ValueError):
    """A message could not be encoded or failed validation on decode."""


@functools.cache
def _tensor_fields(cls: type[Message]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.type in ("torch.Tensor", torch.Tensor)]


@functools.cache
def _scalar_fields(cls: type[Message]) -> dict[str, type]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.name != "header" and f.type in _SCALAR_TYPES:
            out[f.name] = _SCALAR_TYPES[f.type]
    return out


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One message kind's fixed part: its `struct` and what each of its values is."""

    cls: type[Message]
    kind_id: int
    fixed: struct.Struct
    slots: tuple[str, ...]  # a name for each value of `fixed`, for errors and tests
    scalars: tuple[tuple[str, type], ...]  # (name, type), in declaration order
    tensors: tuple[str, ...]
    text_slots: tuple[int, ...]  # where the strings' byte lengths are among the values
    scalar_names: tuple[str, ...]  # the names in `scalars`, for the native path


def _layout(kind_id: int, cls: type[Message]) -> _Layout:
    scalars = tuple(_scalar_fields(cls).items())
    tensors = tuple(_tensor_fields(cls))
    slots = [*_PREFIX_SLOTS, *_HEADER_INTS, *(f"{k}.len" for k in _HEADER_TEXTS)]
    slots += [f"{name}.len" if t is str else name for name, t in scalars]
    for name in tensors:
        slots += [f"{name}.dtype", f"{name}.ndim", *(f"{name}.shape[{i}]" for i in range(MAX_DIMS))]
    fmt = _PREFIX.format + "q" * len(_HEADER_INTS) + "I" * len(_HEADER_TEXTS)
    fmt += "".join(_SCALAR_FORMATS[t] for _, t in scalars) + ("BB" + "Q" * MAX_DIMS) * len(tensors)
    texts = tuple(i for i, s in enumerate(slots) if s.endswith(".len"))
    names = tuple(name for name, _ in scalars)
    return _Layout(cls, kind_id, struct.Struct(fmt), tuple(slots), scalars, tensors, texts, names)


# A kind's wire id is its place in MESSAGE_TYPES (messages.py appends only).
_LAYOUT_BY_ID = tuple(_layout(i, cls) for i, cls in enumerate(MESSAGE_TYPES.values()))
_LAYOUTS = {layout.cls: layout for layout in _LAYOUT_BY_ID}


def _prefix(msg: Message) -> bytes:
    """The fixed part, the strings and the header's padding: everything before the tensors' bytes."""
    layout = _LAYOUTS.get(type(msg))
    if layout is None:
        raise CodecError(f"unknown message type {type(msg).__name__}")
    kind = layout.cls.KIND
    h = msg.header
    texts = [h.job_id.encode(), h.sender.encode(), h.receiver.encode()]
    values: list[Any] = [h.round, h.step, h.seq, len(texts[0]), len(texts[1]), len(texts[2])]
    for name, typ in layout.scalars:
        value = getattr(msg, name)
        if typ is str:
            texts.append(value.encode())
            value = len(texts[-1])
        values.append(value)
    for name in layout.tensors:
        t: torch.Tensor = getattr(msg, name)
        dtype_id = _DTYPE_IDS.get(t.dtype)
        if dtype_id is None:
            raise CodecError(f"{kind}.{name}: dtype {t.dtype} is not allowed on the wire")
        shape = t.shape
        if len(shape) > MAX_DIMS:
            raise CodecError(f"{kind}.{name}: shape {list(shape)} exceeds the message limits")
        values += (dtype_id, len(shape), *shape, *_NO_DIMS[len(shape) :])
    body = layout.fixed.size + sum(map(len, texts))
    n = _align(body) - 4  # the tensors that follow start on an ALIGN boundary
    return b"".join(
        (layout.fixed.pack(n, WIRE_VERSION, layout.kind_id, *values), *texts, _ZEROS[: 4 + n - body])
    )


def _with_memory(t: torch.Tensor, where: str) -> torch.Tensor:
    """`t`, unless it has no bytes to send (a sparse or meta tensor): refused by name, where torch
    would raise its own error from inside encoding."""
    if t.layout is not torch.strided or t.is_meta:
        raise CodecError(f"{where}: a {'meta' if t.is_meta else t.layout} tensor has no bytes to send")
    return t


def _wire_parts(msg: Message) -> list[bytes | memoryview]:
    """The encoded message as consecutive pieces: the prefix, then each tensor's little-endian bytes
    (a view of the tensor's own memory where it already is a contiguous CPU tensor) and its zero
    padding. Joining them is the one copy of the tensors that encoding makes."""
    parts: list[bytes | memoryview] = [_prefix(msg)]
    for name in _tensor_fields(type(msg)):
        t = _with_memory(getattr(msg, name), f"{msg.KIND}.{name}").detach().cpu().contiguous()
        # force: a negative bit's values resolved (a copy); a dtype view needs them resolved first
        arr = (t.resolve_neg().view(_CARRIERS[t.dtype]) if t.dtype in _CARRIERS else t).numpy(force=True)
        if not _LITTLE_ENDIAN:
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        parts.append(memoryview(arr).cast("B") if arr.size else b"")  # cast: flat bytes, no copy
        parts.append(_ZEROS[: _pad(arr.nbytes)])
    return parts


# what a malformed message (wrong field types, a str that is not UTF-8-encodable, an integer out
# of its wire range) raises inside encoding
_ENCODE_ERRORS = (struct.error, AttributeError, TypeError, UnicodeEncodeError)


def encode(msg: Message) -> memoryview:
    """Serialise a message into one writable, 64-byte-aligned buffer (tensors copied once): what
    `decode` views without copying, for delivery within one process."""
    if _native is not None and (out := _native_pack(msg, byte_buffer)) is not None:
        return out
    return _reference_encode(msg)


def _reference_encode(msg: Message) -> memoryview:
    parts = _only_codec_errors(_wire_parts, msg, _ENCODE_ERRORS)
    total = sum(len(p) for p in parts)
    out = memoryview(_aligned_bytes(total))
    offset = 0
    for p in parts:  # memoryview slice assignment: one memcpy a part, no numpy call
        end = offset + len(p)
        out[offset:end] = p
        offset = end
    return out


def encode_frame(msg: Message) -> bytes:
    """The same bytes as `encode`, as one immutable `bytes` object: what gRPC sends. The tensors
    are copied once, straight from their memory into the frame (`bytes(encode(msg))` would copy
    them twice)."""
    if _native is not None and (out := _native_pack(msg, None)) is not None:
        return out
    return _reference_frame(msg)


def _reference_frame(msg: Message) -> bytes:
    return b"".join(_only_codec_errors(_wire_parts, msg, _ENCODE_ERRORS))


def _aligned_bytes(nbytes: int) -> np.ndarray:
    """`nbytes` uninitialised bytes from `byte_buffer`, starting on an ALIGN boundary (tensors
    viewed in them must be aligned: see the layout above)."""
    raw = byte_buffer(nbytes + ALIGN)
    start = -raw.__array_interface__["data"][0] % ALIGN
    return raw[start : start + nbytes]


def _pad(n: int) -> int:
    """Zero bytes that take `n` to the next ALIGN boundary."""
    return -n % ALIGN


def _align(n: int) -> int:
    return n + _pad(n)


def _check_type(value: Any, expected: type, kind: str, name: str) -> Any:
    """`value` as `expected`; the error names `kind.name` (formatted only on error: this runs for
    every field of every message)."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise CodecError(f"{kind}.{name}: expected {expected.__name__}, got {type(value).__name__}")
    if expected is float and not math.isfinite(value):
        raise CodecError(f"{kind}.{name}: not finite")
    if expected is int and not INT_MIN <= value <= INT_MAX:
        raise CodecError(f"{kind}.{name}: integer out of the signed 64-bit range")
    return value


def _check_header_ints(hdr: Header, where: str) -> None:
    for k in ("round", "step", "seq"):
        if getattr(hdr, k) < 0:
            raise CodecError(f"{where}.header.{k}: must be >= 0")


def _check_finite(t: torch.Tensor, where: str) -> None:
    if not sum_finite(t):  # the reference's own check, independent of the native kernel
        raise CodecError(f"{where}: contains NaN or infinity")


def _decode_tensor(
    dtype_id: int,
    ndim: int,
    dims: tuple[int, ...],
    data: bytes | bytearray | memoryview,
    offset: int,
    where: str,
) -> tuple[torch.Tensor, int]:
    dtype = _DTYPE_BY_ID[dtype_id] if dtype_id < len(_DTYPE_BY_ID) else None
    if dtype is None:
        raise CodecError(f"{where}: dtype id {dtype_id} is not allowed")
    if ndim > MAX_DIMS or any(dims[ndim:]) or max(dims) > MAX_MESSAGE_BYTES:
        raise CodecError(f"{where}: bad shape (ndim {ndim}, dimensions {list(dims)})")
    shape = dims[:ndim]
    count = math.prod(shape)
    nbytes = count * dtype.wire.itemsize
    if nbytes > MAX_MESSAGE_BYTES or offset + _align(nbytes) > len(data):
        raise CodecError(f"{where}: shape {list(shape)} needs {nbytes} bytes, message is truncated")
    arr = np.frombuffer(data, dtype=dtype.wire, count=count, offset=offset).reshape(shape)
    # A writable buffer (in-process delivery) is owned by this message alone: view it without a copy.
    t = torch.from_numpy(arr.astype(dtype.native, copy=not arr.flags.writeable))
    if dtype.torch in _CARRIERS:
        t = t.view(dtype.torch)
    _check_finite(t, where)
    if nbytes % ALIGN and any(data[offset + nbytes : offset + _align(nbytes)]):
        raise CodecError(f"{where}: non-zero padding after the tensor (shape does not match the bytes)")
    return t, offset + _align(nbytes)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse and validate bytes from a peer into a typed message; raises only CodecError."""
    if _native is not None and (msg := _native_decode(data)) is not None:
        return msg
    return _reference_decode(data)


# what malformed input (or a buffer that is not flat bytes) raises inside decoding
_DECODE_ERRORS = (
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    RecursionError,
    OverflowError,
    BufferError,
    struct.error,
)


def _reference_decode(data: bytes | bytearray | memoryview) -> Message:
    return _only_codec_errors(_decode, data, _DECODE_ERRORS)


def _only_codec_errors(fn: Callable[[T], R], arg: T, stray: tuple[type[Exception], ...]) -> R:
    """`fn(arg)`, with the `stray` exceptions that malformed input can raise inside it reported as
    CodecError, so that callers handle one error type."""
    try:
        return fn(arg)
    except CodecError:
        raise
    except stray as e:
        raise CodecError(f"malformed message: {type(e).__name__}: {str(e)[:200]}") from None


def _decode(data: bytes | bytearray | memoryview) -> Message:
    size = len(data)
    if size > MAX_MESSAGE_BYTES:
        raise CodecError(f"message of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    if size < _PREFIX.size:
        raise CodecError("truncated message: no header")
    n, version, kind_id = _PREFIX.unpack_from(data)
    if version == ord("{"):  # version 1 started its JSON header here
        raise CodecError(f"a JSON header (wire format version 1), expected version {WIRE_VERSION}")
    if version != WIRE_VERSION:
        raise CodecError(
            f"wire format version {version}, expected {WIRE_VERSION} (a peer on another release?)"
        )
    if kind_id >= len(_LAYOUT_BY_ID):
        raise CodecError(f"unknown message kind id {kind_id}")
    layout = _LAYOUT_BY_ID[kind_id]
    kind, end = layout.cls.KIND, 4 + n
    if n > MAX_HEADER_BYTES or end > size or end % ALIGN or end < layout.fixed.size:
        raise CodecError(f"bad header length {n} for a {kind} message of {size} bytes")
    values = layout.fixed.unpack_from(data)
    texts, p = [], layout.fixed.size
    try:
        for i in layout.text_slots:
            q = p + values[i]
            if q > end:
                raise CodecError(f"{kind}.{layout.slots[i]}: the strings run past the header")
            texts.append(str(data[p:q], "utf-8"))
            p = q
    except UnicodeDecodeError:
        raise CodecError(f"{kind}: a string is not valid UTF-8") from None
    if _align(p) != end or any(data[p:end]):
        raise CodecError(f"{kind}: the header is not padded with the fewest zero bytes")
    counters = values[3:6]  # round, step, seq
    hdr = Header(*texts[:3], *counters)
    if min(counters) < 0:  # the check names which
        _check_header_ints(hdr, kind)
    kwargs: dict[str, Any] = {}
    k, next_text = _FIRST_SCALAR, 3
    for name, typ in layout.scalars:
        value = values[k]
        k += 1
        if typ is str:
            value, next_text = texts[next_text], next_text + 1
        elif typ is bool:
            if value > 1:
                raise CodecError(f"{kind}.{name}: expected bool (0 or 1), got {value}")
            value = value == 1
        elif typ is float and not math.isfinite(value):
            raise CodecError(f"{kind}.{name}: not finite")
        kwargs[name] = value
    offset = end
    for name in layout.tensors:
        dims = values[k + 2 : k + 2 + MAX_DIMS]
        kwargs[name], offset = _decode_tensor(values[k], values[k + 1], dims, data, offset, f"{kind}.{name}")
        k += 2 + MAX_DIMS
    if offset != size:
        raise CodecError(f"{kind}: {size - offset} trailing bytes")
    return layout.cls(header=hdr, **kwargs)


def copy_message(msg: Message) -> tuple[Message, int]:
    """What `decode(encode(msg))` returns, without the bytes: delivery between parties in one process;
    with `len(encode(msg))`, what the hop is charged.

    Runs the checks decoding applies to a peer's message (a registered kind; header and field
    types, finite floats, non-negative counters, the header's size; whitelisted dtypes, at most
    MAX_DIMS dimensions, MAX_MESSAGE_BYTES in all; finite tensors) and copies each tensor once, so that
    the receiver never shares memory with the sender. Raises only CodecError, as `decode` does.

    With the native codec this is its encode, each tensor checked as it is copied, and its decode
    without a second read of the tensors, for the messages it takes whole (their decoded tensors
    view a buffer of their own): faster than the copy below, which takes the rest and words every
    refusal (BENCHMARKS.md, "A native codec" and "Delivery checked as it copies"). In Python alone the
    copy is the faster: it skips the byte buffer, about half a millisecond a message."""
    if _native is not None and (copied := _native_copy(msg)) is not None:
        return copied
    stray = (TypeError, ValueError, AttributeError, RuntimeError, OverflowError)
    return _only_codec_errors(_copy_message, msg, stray)


def _copy_message(msg: Message) -> tuple[Message, int]:
    cls = type(msg)
    if MESSAGE_TYPES.get(cls.KIND) is not cls:
        raise CodecError(f"unknown message type {cls.__name__}")
    h = msg.header
    hdr = Header(
        **{k: _check_type(getattr(h, k), t, cls.KIND, where) for k, (t, where) in _HEADER_CHECKS.items()}
    )
    _check_header_ints(hdr, cls.KIND)
    kwargs: dict[str, Any] = {
        k: _check_type(getattr(msg, k), t, cls.KIND, k) for k, t in _scalar_fields(cls).items()
    }
    prefix = _prefix(msg)  # also refuses dtypes off the whitelist, as encoding does
    if len(prefix) - 4 > MAX_HEADER_BYTES:  # what decoding refuses as "bad header length"
        raise CodecError(f"{cls.KIND}: header exceeds the {MAX_HEADER_BYTES}-byte limit")
    size, total = len(prefix), 0
    for name in _tensor_fields(cls):
        where = f"{cls.KIND}.{name}"
        t = _with_memory(getattr(msg, name), where)
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if t.dim() > MAX_DIMS or total > MAX_MESSAGE_BYTES:
            raise CodecError(f"{where}: shape {list(t.shape)} exceeds the message limits")
        copy = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())
        _check_finite(copy, where)
        kwargs[name] = copy
        size += _align(nbytes)
    return cls(header=hdr, **kwargs), size


# ---- the native fast path (_wire.c). Every function returns None where it declines, and where
# anything raised inside it (numpy refusing the shape of an empty tensor with huge dimensions, a
# getter raising): the reference then runs on the same input and raises the CodecError, so that
# `decode` and `encode` raise nothing else. Each catches for itself (a wrapper taking the function
# cost about 3 us a message once a 1 MB tensor had swept the caches: BENCHMARKS.md).


_NATIVE_CODES = {int: "q", float: "d", bool: "b", str: "s"}
_NATIVE_API = 2  # _wire.c's NATIVE_API: the signatures this file calls


def _load_native() -> ModuleType | None:
    """The compiled fast path with this file's layouts registered, or None: not built (no C
    compiler at install), a big-endian host, or `CLICOOPER_CODEC=python`."""
    if os.environ.get("CLICOOPER_CODEC", "").lower() == "python" or not _LITTLE_ENDIAN:
        return None
    try:
        from clicooper.transport import _wire
    except ImportError:
        return None
    if _wire.WIRE_VERSION != WIRE_VERSION or _wire.MAX_DIMS != MAX_DIMS or _wire.ALIGN != ALIGN:
        log.warning("a stale build of the native codec (another wire format): Python codec only")
        return None  # never mix the two
    if getattr(_wire, "NATIVE_API", 1) != _NATIVE_API:
        log.warning("a stale build of the native codec (another interface): Python codec only")
        return None
    if not all(map(_fills_directly, (Header, *MESSAGE_TYPES.values()))):
        log.warning("a message kind the native decoder cannot build without its __init__: Python codec only")
        return None
    try:
        _wire.header_class(Header)
    except ValueError:  # another Header registered by another copy of this module
        log.warning("the native codec holds another Header class: Python codec only")
        return None
    for layout in _LAYOUT_BY_ID:
        codes = "".join(_NATIVE_CODES[t] for _, t in layout.scalars)
        try:
            size = _wire.register(layout.kind_id, layout.cls, layout.scalar_names, codes, len(layout.tensors))
        except ValueError:  # outside the native limits, or registered otherwise by another copy
            size = -1
        if size != layout.fixed.size:
            log.warning("the native codec disagrees on the %s layout: Python codec only", layout.cls.KIND)
            return None
    return _wire


def _native_pack(msg: Message, alloc: Callable[[int], np.ndarray] | None) -> memoryview | bytes | None:
    """`encode` (with `alloc`) or `encode_frame` (without) in native code, for messages whose tensors
    numpy can view; the native side declines anything not exactly typed."""
    try:
        return _native.pack(msg, *_native_args(msg), alloc)
    except Exception:
        return None


def _native_copy(msg: Message) -> tuple[Message, int] | None:
    """`copy_message` in native code: `_native_decode(_native_pack(msg, byte_buffer))` with each tensor
    checked for finiteness while it is copied rather than read again afterwards."""
    try:
        copied = _native.copy(msg, *_native_args(msg), byte_buffer)
        if copied is None:
            return None
        data, parsed = copied
        out = _from_parsed(parsed, data)
    except Exception:
        return None
    return None if out is None else (out, len(data))


def _native_args(msg: Message) -> tuple[int, tuple[tuple[int, np.ndarray], ...]]:
    """What `pack` and `copy` take for `msg`: its kind id and the (wire dtype id, numpy view) of each
    tensor field. Raises (KeyError, TypeError) for a kind or a field the native side cannot take.

    `numpy(force=True)` views a CPU tensor's memory whether or not it requires grad (what
    `detach().numpy()` did in two calls); a tensor that is not plain CPU memory (another device, a
    negative bit) it copies into one, with its values."""
    layout = _LAYOUTS[type(msg)]
    specs = []
    for name in layout.tensors:
        t = getattr(msg, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is not a tensor")
        dtype_id = _DTYPE_IDS[t.dtype]
        carrier = _DTYPE_BY_ID[dtype_id].carrier  # type: ignore[union-attr]
        specs.append(
            (dtype_id, (t if carrier is t.dtype else t.resolve_neg().view(carrier)).numpy(force=True))
        )
    return layout.kind_id, tuple(specs)


def _native_decode(data: bytes | bytearray | memoryview) -> Message | None:
    """`decode` in native code, or None when the native side refuses the bytes (then the reference
    decodes them and says why)."""
    try:
        parsed = _native.parse(data)
        return None if parsed is None else _from_parsed(parsed, data)
    except Exception:
        return None


def _from_parsed(parsed: tuple, data: bytes | bytearray | memoryview) -> Message | None:
    """The message `_native.parse` read from `data`, its tensor fields set here: tensors of a writable
    buffer view it (checked already); those of a read-only one (bytes from a network) are copied and
    checked here. The native side built the message without its `__init__` (`_fills_directly`), so
    its fields are set in its `__dict__` as well."""
    kind_id, msg, specs, readonly = parsed
    layout = _LAYOUT_BY_ID[kind_id]
    fields = msg.__dict__
    for name, (dtype_id, shape, offset, count) in zip(layout.tensors, specs, strict=True):
        dtype: _WireDtype = _DTYPE_BY_ID[dtype_id]  # type: ignore[assignment]
        if readonly:  # bytes from a network: copied once, checked as copied
            arr = _aligned_bytes(count * dtype.native.itemsize)
            if not _native.copy_finite(arr, data, offset, dtype_id):
                return None
            arr = arr.view(dtype.native)
        else:  # a buffer this message alone owns: viewed without a copy (checked by parse or copy)
            arr = np.frombuffer(data, dtype.native, count, offset)
        t = torch.from_numpy(arr.reshape(shape))
        fields[name] = t.view(dtype.torch) if dtype.torch is not dtype.carrier else t
    return msg


def _fills_directly(cls: type) -> bool:
    """Whether an instance of `cls` made by `object.__new__` with every field set in its `__dict__`
    (as the native decoder builds messages and their headers, skipping the dataclass's `__init__`,
    which costs about 5 us a message once a megabyte-sized tensor has swept the caches) equals
    `cls(**fields)`: a dataclass without `__post_init__`, `__slots__` or a `__new__` of its own whose
    fields all have a place on the wire and none behind a data descriptor. (A hand-written `__init__`
    in a dataclass is not detected: messages.py declares fields only.)"""
    if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
        return False
    if cls.__new__ is not object.__new__:
        return False
    if any(hasattr(inspect.getattr_static(cls, f.name, None), "__set__") for f in dataclasses.fields(cls)):
        return False  # a field behind a data descriptor: `__init__` would call its setter
    wire = set(_HEADER_TYPES) if cls is Header else {"header", *_scalar_fields(cls), *_tensor_fields(cls)}
    return {f.name for f in dataclasses.fields(cls)} == wire


_native: ModuleType | None = _load_native()
