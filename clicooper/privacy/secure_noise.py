"""Gaussian noise from a cryptographically secure source, for every DP mechanism.

DP noise is a secret of the data owner: if a trainer could regenerate it (for instance from
the job seed, which is public in `config.json`), it could subtract it and the printed epsilon
would mean nothing. So noise is never drawn from a seeded PRNG. Each call keys a fresh ChaCha20
keystream (RFC 8439, from the `cryptography` package) with 32 bytes of key and 16 bytes of
nonce read from `os.urandom` (the kernel CSPRNG, the source `secrets` uses); the key lives only
for that call. The keystream gives 53-bit uniforms, and the Box-Muller transform turns them
into standard normals in float64. Nothing about the draw is stored.

Why a keystream instead of reading every byte from `os.urandom`: the same security (a CSPRNG
keyed from OS entropy, as in Opacus's `secure_mode`, which uses torchcsprng's AES-CTR), at about
a tenth of the cost per byte; with the transform in torch instead of numpy the noise of one batch
of the default job's activations (401,408 values) went from 40 ms to 12 ms on one core
(BENCHMARKS.md, "Cost of each protection"), and drawing it in cache-sized blocks of one keystream
halved that again when other work runs between draws (17.3 -> 9.0 ms, median of 60 interleaved
draws). Like Opacus we do not claim protection against
floating-point side channels of the Gaussian sampler (Mironov, CCS 2012); the noise is computed
in float64 and then cast.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

from clicooper.background import submit

_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)
_MASK_53 = (1 << 53) - 1


_CHUNK = 1 << 16  # values per block: the float64 temporaries of one block stay in cache


def _keystream() -> CipherContext:
    """A ChaCha20 encryptor keyed by fresh OS entropy, for one call only."""
    return Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()


def _random_words(stream: CipherContext, n: int) -> torch.Tensor:
    """The next n uniformly random 64-bit words of `stream`."""
    buf = bytearray(8 * n)
    stream.update_into(buf, buf)  # keystream XOR zeros, in place: the keystream itself
    return torch.frombuffer(buf, dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)


def _uniform_open(stream: CipherContext, n: int) -> torch.Tensor:
    """n uniforms in (0, 1] (float64), each from 53 random bits (torch has no unsigned 64-bit
    shift, so the sign-extended bits of the arithmetic shift are masked off)."""
    top53 = (_random_words(stream, n) >> 11) & _MASK_53
    return (top53.to(torch.float64) + 1.0) * _INV_2_53


def _box_muller(stream: CipherContext, n: int) -> torch.Tensor:
    """n standard normals (float64) from the next uniforms of `stream`."""
    pairs = (n + 1) // 2
    u = _uniform_open(stream, 2 * pairs)
    r = torch.sqrt(-2.0 * torch.log(u[:pairs]))
    theta = _TWO_PI * u[pairs:]
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:n]


def secure_standard_normal(n: int, std: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n independent N(0, std^2) draws by Box-Muller from one securely keyed stream, computed in
    float64 and cast to `dtype`. Drawn in blocks of `_CHUNK` values from the same keystream: one
    pass over a batch's worth allocates a dozen temporaries of the whole size, and in a training
    step, where other work keeps claiming and freeing memory, took twice as long."""
    if n < 0:
        raise ValueError(f"sample count must be >= 0, got {n}")
    stream = _keystream()
    out = torch.empty(n, dtype=dtype)
    for i in range(0, n, _CHUNK):
        m = min(_CHUNK, n - i)
        out[i : i + m] = _box_muller(stream, m).mul_(std)
    return out


class NormalReserve:
    """Secure Gaussian noise drawn one request ahead, on the process's background thread.

    A per-step release needs the same amount of noise every step, and none of it depends on the
    data; drawing (and scaling and casting) the next step's while this step trains takes the
    sampler, about 4 ms a step on the default job, off the step's critical path. Each drawn value
    is handed out at most once: a request that the waiting draw cannot serve (more values, another
    std or dtype) gets a fresh draw and the waiting one is dropped; a smaller one (the last batch
    of an epoch) gets a prefix. Secrecy is unchanged: the draws are the same OS-keyed keystream,
    held only in this process's memory until used.
    """

    def __init__(self) -> None:
        self._ahead: tuple[tuple[float, torch.dtype], int, Future[torch.Tensor]] | None = None

    def take(self, n: int, std: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n independent N(0, std^2) draws as `dtype` (computed in float64); starts drawing the
        next n of the same kind in the background."""
        ahead, self._ahead, kind = self._ahead, None, (std, dtype)
        if ahead is not None and ahead[0] == kind and ahead[1] >= n:
            z = ahead[2].result()[:n]
        else:
            z = secure_standard_normal(n, std, dtype)
        self._ahead = (kind, n, submit(secure_standard_normal, n, std, dtype))
        return z


def secure_normal_like(a: torch.Tensor, std: float, reserve: NormalReserve | None = None) -> torch.Tensor:
    """N(0, std^2) noise of `a`'s shape, dtype and device, from OS entropy (unreproducible);
    from `reserve` when given (drawn ahead, same distribution and source)."""
    if not std >= 0 or math.isinf(std):
        raise ValueError(f"noise std must be >= 0 and finite, got {std}")
    if reserve is not None:
        return reserve.take(a.numel(), std, a.dtype).reshape(a.shape).to(device=a.device)
    return secure_standard_normal(a.numel(), std, a.dtype).reshape(a.shape).to(device=a.device)
