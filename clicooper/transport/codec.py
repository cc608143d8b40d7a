"""Wire codec: messages <-> bytes, without pickle.

Layout: 4-byte big-endian header length, a UTF-8 JSON header padded with spaces,
then the raw little-endian bytes of each tensor field in header order, each
starting at a 64-byte boundary (zero-copy views must be aligned: misaligned
tensors make convolution and activation kernels several times slower). Decoding validates
everything a peer controls: the message kind, field names and types, dtypes from
a whitelist, shapes against byte lengths, total size, integer ranges (signed 64-bit), and
finiteness. `decode` raises `CodecError` and nothing else, whatever the bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from clicooper.transport.messages import MESSAGE_TYPES, Header, Message

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_DIMS = 8
MAX_JSON_DEPTH = 16
ALIGN = 64
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
T, R = TypeVar("T"), TypeVar("R")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# numpy has no bfloat16: its bytes travel through numpy as int16 and are viewed back in torch
_CARRIERS: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}


def _numpy_dtype(t: torch.dtype) -> np.dtype:
    """The numpy dtype that holds the bytes of a `t` tensor, in this machine's byte order."""
    return np.dtype(str(_CARRIERS.get(t, t)).removeprefix("torch."))


# each wire dtype's numpy view of the bytes: (little-endian as on the wire, this machine's order)
_NUMPY = {name: (_numpy_dtype(t).newbyteorder("<"), _numpy_dtype(t)) for name, t in _DTYPES.items()}
_SCALAR_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_HEADER_TYPES = {f.name: _SCALAR_TYPES[f.type] for f in dataclasses.fields(Header)}
_HEADER_CHECKS = {k: (t, f"header.{k}") for k, t in _HEADER_TYPES.items()}
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once: dumps() builds one per call
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


def _prefix(msg: Message) -> bytes:
    """The header length and the padded JSON header: everything before the tensors' bytes."""
    cls = type(msg)
    if MESSAGE_TYPES.get(cls.KIND) is not cls:
        raise CodecError(f"unknown message type {cls.__name__}")
    tensors_meta = []
    for name in _tensor_fields(cls):
        t: torch.Tensor = getattr(msg, name)
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise CodecError(f"{cls.KIND}.{name}: dtype {t.dtype} is not allowed on the wire")
        tensors_meta.append({"name": name, "dtype": dtype, "shape": list(t.shape)})
    h = msg.header
    header = {
        "kind": cls.KIND,
        "header": {k: getattr(h, k) for k in _HEADER_TYPES},
        "fields": {name: getattr(msg, name) for name in _scalar_fields(cls)},
        "tensors": tensors_meta,
    }
    head = _JSON.encode(header).encode()
    head += b" " * _pad(4 + len(head))  # the tensors that follow start on an ALIGN boundary
    return struct.pack(">I", len(head)) + head


def _wire_parts(msg: Message) -> list[bytes | memoryview]:
    """The encoded message as consecutive pieces: the prefix, then each tensor's little-endian bytes
    (a view of the tensor's own memory where it already is a contiguous CPU tensor) and its zero
    padding. Joining them is the one copy of the tensors that encoding makes."""
    parts: list[bytes | memoryview] = [_prefix(msg)]
    for name in _tensor_fields(type(msg)):
        t = getattr(msg, name).detach().cpu().contiguous()
        arr = (t.view(_CARRIERS[t.dtype]) if t.dtype in _CARRIERS else t).numpy()
        if not _LITTLE_ENDIAN:
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        parts.append(memoryview(arr.reshape(-1).view(np.uint8)))
        parts.append(_ZEROS[: _pad(arr.nbytes)])
    return parts


def encode(msg: Message) -> memoryview:
    """Serialise a message into one writable, 64-byte-aligned buffer (tensors copied once): what
    `decode` views without copying, for delivery within one process."""
    parts = _wire_parts(msg)
    total = sum(len(p) for p in parts)
    raw = np.empty(total + ALIGN, dtype=np.uint8)
    start = (-raw.__array_interface__["data"][0]) % ALIGN
    out = raw[start : start + total]
    offset = 0
    for p in parts:
        out[offset : offset + len(p)] = np.frombuffer(p, dtype=np.uint8)
        offset += len(p)
    return memoryview(out)


def encode_frame(msg: Message) -> bytes:
    """The same bytes as `encode`, as one immutable `bytes` object: what gRPC sends. The tensors
    are copied once, straight from their memory into the frame (`bytes(encode(msg))` would copy
    them twice)."""
    return b"".join(_wire_parts(msg))


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


def _json_depth_ok(text: str) -> bool:
    """Nesting depth of a JSON text at most MAX_JSON_DEPTH (checked before parsing: no recursion)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return True  # depth never exceeds the number of openers: no need to walk the text
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _parse_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise CodecError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    if len(data) < 4:
        raise CodecError("truncated message: no header length")
    (n,) = struct.unpack(">I", data[:4])
    if n > MAX_HEADER_BYTES or 4 + n > len(data):
        raise CodecError(f"bad header length {n}")
    try:
        text = bytes(data[4 : 4 + n]).decode()
        if not _json_depth_ok(text):
            raise CodecError(f"header JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, huge integers
        if isinstance(e, CodecError):
            raise
        raise CodecError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CodecError("header is not a JSON object")
    if (4 + n) % ALIGN:
        raise CodecError(f"header length {n} does not keep tensors {ALIGN}-byte aligned")
    return header | {"_offset": 4 + n}


def _check_finite(t: torch.Tensor, where: str) -> None:
    # One reduction is finite iff every element is (NaN and inf propagate; a float32 overflow,
    # which only absurd activations reach, is rejected too), and it needs no boolean mask.
    # A sum that overflows is re-checked element-wise, so large finite values (float16) still pass.
    overflow = t.is_floating_point() and t.numel() and not math.isfinite(float(t.sum()))
    if overflow and not bool(torch.isfinite(t).all()):
        raise CodecError(f"{where}: contains NaN or infinity")


def _decode_tensor(
    meta: Any, data: bytes | bytearray | memoryview, offset: int, where: str
) -> tuple[torch.Tensor, int]:
    if not isinstance(meta, dict) or set(meta) != {"name", "dtype", "shape"}:
        raise CodecError(f"{where}: malformed tensor descriptor")
    dtype = _DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    if dtype is None:
        raise CodecError(f"{where}: dtype {str(meta['dtype'])[:40]!r} is not allowed")
    shape = meta["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d <= MAX_MESSAGE_BYTES for d in shape)
    ):
        raise CodecError(f"{where}: bad shape {str(shape)[:80]}")
    wire_np, native_np = _NUMPY[meta["dtype"]]
    count = math.prod(shape)
    nbytes = count * wire_np.itemsize
    if nbytes > MAX_MESSAGE_BYTES or offset + _align(nbytes) > len(data):
        raise CodecError(f"{where}: shape {shape} needs {nbytes} bytes, message is truncated")
    arr = np.frombuffer(data, dtype=wire_np, count=count, offset=offset).reshape(shape)
    # A writable buffer (in-process delivery) is owned by this message alone: view it without a copy.
    t = torch.from_numpy(arr.astype(native_np, copy=not arr.flags.writeable))
    if dtype in _CARRIERS:
        t = t.view(dtype)
    _check_finite(t, where)
    if any(data[offset + nbytes : offset + _align(nbytes)]):
        raise CodecError(f"{where}: non-zero padding after the tensor (shape does not match the bytes)")
    return t, offset + _align(nbytes)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse and validate bytes from a peer into a typed message; raises only CodecError."""
    stray = (TypeError, ValueError, KeyError, AttributeError, RecursionError, OverflowError, struct.error)
    return _only_codec_errors(_decode, data, stray)


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
    header = _parse_header(data)
    offset = header.pop("_offset")
    kind = header.get("kind")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CodecError(f"unknown message kind {str(kind)[:40]!r}")
    if set(header) != {"kind", "header", "fields", "tensors"}:
        raise CodecError(f"{cls.KIND}: unexpected header keys {sorted(header)}")
    h = header["header"]
    if not isinstance(h, dict) or set(h) != set(_HEADER_TYPES):
        raise CodecError(f"{cls.KIND}: malformed header fields")
    hdr = Header(**{k: _check_type(h[k], t, cls.KIND, where) for k, (t, where) in _HEADER_CHECKS.items()})
    _check_header_ints(hdr, cls.KIND)
    scalars = _scalar_fields(cls)
    fields = header["fields"]
    if not isinstance(fields, dict) or set(fields) != set(scalars):
        got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise CodecError(f"{cls.KIND}: expected fields {sorted(scalars)}, got {str(got)[:200]}")
    kwargs: dict[str, Any] = {k: _check_type(fields[k], t, cls.KIND, k) for k, t in scalars.items()}
    expected = _tensor_fields(cls)
    metas = header["tensors"]
    if (
        not isinstance(metas, list)
        or [m.get("name") if isinstance(m, dict) else None for m in metas] != expected
    ):
        raise CodecError(f"{cls.KIND}: expected tensors {expected}")
    for meta in metas:
        kwargs[meta["name"]], offset = _decode_tensor(meta, data, offset, f"{cls.KIND}.{meta['name']}")
    if offset != len(data):
        raise CodecError(f"{cls.KIND}: {len(data) - offset} trailing bytes")
    return cls(header=hdr, **kwargs)


def copy_message(msg: Message) -> tuple[Message, int]:
    """What `decode(encode(msg))` returns, without the bytes: delivery between parties in one process;
    with `len(encode(msg))`, what the hop is charged.

    Runs the checks decoding applies to a peer's message (a registered kind; header and field
    types, finite floats, non-negative counters, the header's size; whitelisted dtypes, at most
    MAX_DIMS dimensions, MAX_MESSAGE_BYTES in all; finite tensors) and copies each tensor once, so that
    the receiver never shares memory with the sender. Raises only CodecError, as `decode` does.
    Skipping the byte buffer saves about half a millisecond a message (BENCHMARKS.md, relay)."""
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
        t = getattr(msg, name)
        where = f"{cls.KIND}.{name}"
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if t.dim() > MAX_DIMS or total > MAX_MESSAGE_BYTES:
            raise CodecError(f"{where}: shape {list(t.shape)} exceeds the message limits")
        copy = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())
        _check_finite(copy, where)
        kwargs[name] = copy
        size += _align(nbytes)
    return cls(header=hdr, **kwargs), size
