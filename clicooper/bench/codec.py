"""Codec throughput against message size, next to a raw memory copy of the same bytes.

A Forward carrying a float32 activation of the given size is encoded, then decoded twice: from a
writable buffer (in-process delivery, zero-copy views) and from read-only `bytes` (what a network
transport hands over, one copy). The network path is timed as well: `encode_frame` (the `bytes`
the gRPC transport sends) then decoding those bytes. The references are one memory copy into a
preallocated tensor (`copy_`) and `clone` (allocation + copy, as encoding allocates its buffer);
the target is encode + decode within 2x of one copy for 1 MB and more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from clicooper.bench.common import median
from clicooper.transport.codec import decode, encode, encode_frame
from clicooper.transport.messages import Forward, Header

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 1 << 20]


@dataclass
class CodecRow:
    nbytes: int
    copy_s: float
    alloc_copy_s: float
    encode_s: float
    decode_inproc_s: float
    decode_bytes_s: float
    frame_s: float

    @property
    def ratio(self) -> float:
        """(encode + in-process decode) / one memory copy."""
        return (self.encode_s + self.decode_inproc_s) / self.copy_s

    @property
    def network_ratio(self) -> float:
        """(encode_frame + decode from bytes) / one memory copy: the codec's share of a gRPC hop."""
        return (self.frame_s + self.decode_bytes_s) / self.copy_s


@dataclass
class CodecBench:
    sizes: list[CodecRow]
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
            ]
            for r in self.sizes
        ]

    def notes(self) -> list[str]:
        large = [r for r in self.sizes if r.nbytes >= 1 << 20]
        if not large:
            return []
        return [
            f"worst enc+dec / memcpy at >= 1 MB: {max(r.ratio for r in large):.2f} (target <= 2)",
            "each direction alone at >= 1 MB, worst: encode / memcpy "
            f"{max(r.encode_s / r.copy_s for r in large):.2f}, decode / memcpy "
            f"{max(r.decode_inproc_s / r.copy_s for r in large):.2f} (the target read per direction)",
            "worst frame+dec(bytes) / memcpy at >= 1 MB (the gRPC path): "
            f"{max(r.network_ratio for r in large):.2f}",
        ]


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def _time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return median(ts)


def bench_codec(sizes: list[int] | None = None, repeats: int = 9) -> CodecBench:
    rows = []
    for nbytes in sizes or SIZES:
        x = torch.randn(nbytes // 4)
        msg = Forward(header=Header("bench", "data_owner", "trainer_1", 0, 0, 1), activation=x)
        n = max(3, min(repeats * 10, (256 << 20) // nbytes)) if repeats > 1 else 1
        buf = encode(msg)
        frozen = bytes(buf)
        rows.append(
            CodecRow(
                nbytes,
                copy_s=_time(lambda d=torch.empty_like(x), s=x: d.copy_(s), n),
                alloc_copy_s=_time(x.clone, n),
                encode_s=_time(lambda m=msg: encode(m), n),
                decode_inproc_s=_time(lambda b=buf: decode(b), n),
                decode_bytes_s=_time(lambda f=frozen: decode(f), n),
                frame_s=_time(lambda m=msg: encode_frame(m), n),
            )
        )
    return CodecBench(rows)
