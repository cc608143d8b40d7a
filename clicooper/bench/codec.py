"""Codec throughput against message size, next to a raw memory copy of the same bytes.

A Forward carrying a float32 activation of the given size is encoded, then decoded twice: from a
writable buffer (in-process delivery, zero-copy views) and from read-only `bytes` (what a network
transport hands over, one copy). The network path is timed as well: `encode_frame` (the `bytes`
the gRPC transport sends) then decoding those bytes. The references are one memory copy into a
preallocated tensor (`copy_`) and `clone` (allocation + copy, as encoding allocates its buffer);
the target is encode + decode within 2x of one copy for 1 MB and more. All are timed in turn,
round after round (`_row`).

Where the native codec is built (`_wire.c`), the Python reference's round trip is timed beside it
in the same rounds (`reference_*`): what the fast path buys, measured in one run.

The floor beside them is what any validating round trip must do to the data, with no per-message
cost: one copy (encoding) and one read of the same bytes (decoding's finiteness check, a `sum`
over the source just copied, as warm in cache as it will ever be). The codec's distance from the
floor is its per-message cost; the floor's distance from one copy is the validation's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TypeVar

import torch

from clicooper.bench.common import median
from clicooper.transport import codec
from clicooper.transport.codec import decode, encode, encode_frame
from clicooper.transport.messages import Forward, Header

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 1 << 20]
T = TypeVar("T")


@dataclass
class CodecRow:
    nbytes: int
    copy_s: float
    alloc_copy_s: float
    encode_s: float
    decode_inproc_s: float
    decode_bytes_s: float
    frame_s: float
    read_s: float  # one `sum` over the tensor: the read a decoder's finiteness check makes
    reference_encode_s: float  # the Python reference alone (equal to encode_s where it is all there is)
    reference_decode_s: float

    @property
    def floor_ratio(self) -> float:
        """(one copy + one read) / one copy: the least any validating round trip needs."""
        return (self.copy_s + self.read_s) / self.copy_s

    @property
    def ratio(self) -> float:
        """(encode + in-process decode) / one memory copy."""
        return (self.encode_s + self.decode_inproc_s) / self.copy_s

    @property
    def reference_ratio(self) -> float:
        """The Python reference's (encode + in-process decode) / one memory copy."""
        return (self.reference_encode_s + self.reference_decode_s) / self.copy_s

    @property
    def network_ratio(self) -> float:
        """(encode_frame + decode from bytes) / one memory copy: the codec's share of a gRPC hop."""
        return (self.frame_s + self.decode_bytes_s) / self.copy_s


@dataclass
class CodecBench:
    sizes: list[CodecRow]
    native: bool  # whether encode and decode ran the native fast path
    name: str = field(default="codec")

    def title(self) -> str:
        return "codec: Forward(float32 activation), median seconds per call"

    def columns(self) -> list[str]:
        return [
            "size",
            "memcpy GB/s",
            "clone GB/s",
            "encode GB/s",
            "decode GB/s",
            "decode(bytes) GB/s",
            "frame GB/s",
            "enc+dec / memcpy",
            "frame+dec(bytes) / memcpy",
            "floor (copy+read) / memcpy",
            "reference enc+dec / memcpy",
        ]

    def rows(self) -> list[list[str]]:
        def gbs(n: int, s: float) -> str:
            return f"{n / s / 1e9:.2f}"

        return [
            [
                _size(r.nbytes),
                gbs(r.nbytes, r.copy_s),
                gbs(r.nbytes, r.alloc_copy_s),
                gbs(r.nbytes, r.encode_s),
                gbs(r.nbytes, r.decode_inproc_s),
                gbs(r.nbytes, r.decode_bytes_s),
                gbs(r.nbytes, r.frame_s),
                f"{r.ratio:.2f}",
                f"{r.network_ratio:.2f}",
                f"{r.floor_ratio:.2f}",
                f"{r.reference_ratio:.2f}",
            ]
            for r in self.sizes
        ]

    def notes(self) -> list[str]:
        large = [r for r in self.sizes if r.nbytes >= 1 << 20]
        if not large:
            return []
        path = "native fast path" if self.native else "Python reference only (native codec not built)"
        return [
            f"codec: {path}",
            f"worst enc+dec / memcpy at >= 1 MB: {max(r.ratio for r in large):.2f} (target <= 2)",
            "each direction alone at >= 1 MB, worst: encode / memcpy "
            f"{max(r.encode_s / r.copy_s for r in large):.2f}, decode / memcpy "
            f"{max(r.decode_inproc_s / r.copy_s for r in large):.2f} (the target read per direction)",
            "worst frame+dec(bytes) / memcpy at >= 1 MB (the gRPC path): "
            f"{max(r.network_ratio for r in large):.2f}",
            "floor (one copy + one read, no per-message cost) / memcpy at >= 1 MB: "
            + ", ".join(f"{_size(r.nbytes)} {r.floor_ratio:.2f}" for r in large),
            "the Python reference's enc+dec / memcpy at >= 1 MB, same rounds: "
            + ", ".join(f"{_size(r.nbytes)} {r.reference_ratio:.2f}" for r in large),
        ]


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def _clock(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _row(nbytes: int, rounds: int) -> CodecRow:
    """Medians over `rounds` rounds, each timing the two references and then a round trip as it
    happens: encode, decode what was just encoded, and the same through `bytes`. Timing them in
    turn means that a slow spell of a shared machine slows the copy and the codec alike, and each
    decode reads a buffer as fresh in cache as a receiver's would be."""
    x = torch.randn(nbytes // 4)
    msg = Forward(header=Header("bench", "data_owner", "trainer_1", 0, 0, 1), activation=x)
    dst = torch.empty_like(x)
    times: dict[str, list[float]] = {f.name: [] for f in fields(CodecRow) if f.name != "nbytes"}
    for _ in range(rounds):
        times["copy_s"].append(_clock(dst.copy_, x)[1])
        times["alloc_copy_s"].append(_clock(x.clone)[1])
        times["read_s"].append(_clock(torch.sum, x)[1])
        buf, t = _clock(encode, msg)
        times["encode_s"].append(t)
        times["decode_inproc_s"].append(_clock(decode, buf)[1])
        frame, t = _clock(encode_frame, msg)
        times["frame_s"].append(t)
        times["decode_bytes_s"].append(_clock(decode, frame)[1])
        del buf, frame  # what a sender lets go of after a message
        buf, t = _clock(codec._reference_encode, msg)
        times["reference_encode_s"].append(t)
        times["reference_decode_s"].append(_clock(codec._reference_decode, buf)[1])
        del buf
    return CodecRow(nbytes, **{k: median(ts) for k, ts in times.items()})


def bench_codec(sizes: list[int] | None = None, repeats: int = 9) -> CodecBench:
    rows = []
    for nbytes in sizes or SIZES:
        rounds = max(9, min(repeats * 20, (512 << 20) // nbytes)) if repeats > 1 else 1
        rows.append(_row(nbytes, rounds))
    return CodecBench(rows, native=codec._native is not None)
