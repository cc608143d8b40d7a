"""Dynamic secret-projection watermarks (Uchida et al. 2017, chained as in PoLO).

A trainer embeds `n_bits` bits into selected weights `w` of its segment with the
regulariser `strength * BCE(sigmoid(X w), b)`; anyone holding the watermark key
re-creates `X` and reads `b^ = 1[X w > 0]`. When the regulariser has not set the round's
bits by the end of the round (large weights and a decayed learning rate can leave it short:
a fresh mark every round must move `w` by a fixed amount, whatever the learning rate), the
trainer completes the mark with the smallest change of `w` that sets the missing bits
(`completion_delta`), before it seals the round.

The bits of round r are an HMAC of the trainer's watermark key over the
verifier's nonce for r, the trainer's identity and the digests of the records
that precede the stage, so a mark cannot be computed before its predecessors
exist, cannot be carried to another job or round, and changes every round.

`X` and the weight subset are expanded from HMAC seeds with SHAKE-256 and
Box-Muller rather than a framework RNG: an ownership claim must be checkable
years later, by any implementation, without depending on torch's generator.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

WM_KEY_BYTES = 32
_BITS_DOMAIN = b"clicooper/wm-bits/v1"
_PROJ_DOMAIN = b"clicooper/wm-projection/v1"
_SUBSET_DOMAIN = b"clicooper/wm-subset/v1"
_SALT_DOMAIN = b"clicooper/wm-salt/v1"

Segment = nn.Module | Mapping[str, torch.Tensor]


def new_watermark_key() -> bytes:
    """A fresh 32-byte watermark key; the trainer escrows it with the verifier at registration."""
    return secrets.token_bytes(WM_KEY_BYTES)


def _frame(*parts: bytes) -> bytes:
    """Unambiguous concatenation: each part prefixed with its 8-byte length."""
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(bytes(key), msg, hashlib.sha256).digest()


# ---------------------------------------------------------------- derivation


def derive_watermark_bits(
    wm_key: bytes, nonce: bytes, identity_fp: str, prev_digests: Sequence[str], n_bits: int
) -> torch.Tensor:
    """The trainer's bits for one round: HMAC-SHA256(wm_key, ...) in counter mode, as float {0,1}.

    `prev_digests` is ordered (own previous record, then the predecessor's), so
    swapping the two links gives different bits; round 0 passes an empty list.
    """
    if n_bits <= 0:
        raise ValueError(f"n_bits must be positive, got {n_bits}")
    if not wm_key:
        raise ValueError("empty watermark key")
    msg = _frame(
        _BITS_DOMAIN,
        bytes(nonce),
        identity_fp.encode(),
        struct.pack(">Q", len(prev_digests)),
        *(d.encode() for d in prev_digests),
        struct.pack(">Q", n_bits),
    )
    n_blocks = math.ceil(n_bits / 256)
    stream = b"".join(_hmac(wm_key, msg + struct.pack(">I", i)) for i in range(n_blocks))
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:n_bits]
    return torch.from_numpy(bits.astype(np.float32))


def commitment_salt(wm_key: bytes, nonce: bytes) -> bytes:
    """A 16-byte salt for the record's watermark commitment, derived (not random) so runs reproduce."""
    return _hmac(wm_key, _frame(_SALT_DOMAIN, bytes(nonce)))[:16]


def bits_to_bytes(bits: torch.Tensor) -> bytes:
    """Pack a {0,1} vector into bytes (big-endian bit order), prefixed by its length."""
    arr = (bits.detach().cpu().reshape(-1) > 0.5).numpy().astype(np.uint8)
    return struct.pack(">Q", arr.size) + np.packbits(arr).tobytes()


def watermark_commitment(bits: torch.Tensor, salt: bytes) -> str:
    """Hex SHA-256 of (bits || salt): binds a record to its bits without revealing them."""
    return hashlib.sha256(b"clicooper/wm-commit/v1" + bits_to_bytes(bits) + bytes(salt)).hexdigest()


def _normals(seed: bytes, count: int) -> np.ndarray:
    """`count` standard normals from SHAKE-256(seed) via Box-Muller: portable and reproducible."""
    n_pairs = (count + 1) // 2
    raw = np.frombuffer(hashlib.shake_256(seed).digest(16 * n_pairs), dtype="<u8").reshape(n_pairs, 2)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # uniform in (0, 1)
    r = np.sqrt(-2.0 * np.log(u[:, 0]))
    theta = 2.0 * np.pi * u[:, 1]
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1)[:count]


def projection_matrix(
    wm_key: bytes, n_bits: int, n_weights: int, *, round_nonce: bytes | None = None
) -> torch.Tensor:
    """The secret projection X ~ N(0, 1), shape (n_bits, n_weights), determined by key (and round)."""
    if n_bits <= 0 or n_weights <= 0:
        raise ValueError(f"projection needs positive sizes, got {n_bits} x {n_weights}")
    seed = _hmac(
        wm_key,
        _frame(
            _PROJ_DOMAIN, struct.pack(">QQ", n_bits, n_weights), b"" if round_nonce is None else round_nonce
        ),
    )
    return torch.from_numpy(_normals(seed, n_bits * n_weights).astype(np.float32)).reshape(n_bits, n_weights)


def subset_indices(wm_key: bytes, n_total: int, max_weights: int | None) -> torch.Tensor | None:
    """A key-chosen sorted subset of `max_weights` of `n_total` positions (None: use all).

    Caps X's size for large segments while keeping which weights carry the mark secret.
    """
    if max_weights is None or n_total <= max_weights:
        return None
    seed = _hmac(wm_key, _frame(_SUBSET_DOMAIN, struct.pack(">Q", n_total)))
    keys = np.frombuffer(hashlib.shake_256(seed).digest(8 * n_total), dtype="<u8")
    idx = np.sort(np.argpartition(keys, max_weights - 1)[:max_weights])  # the max_weights smallest keys
    return torch.from_numpy(idx.astype(np.int64))


# ---------------------------------------------------------------- weight selection


def _default_pick(name: str, t: torch.Tensor) -> bool:
    """Conv/linear/embedding kernels: floating tensors named *weight with dim >= 2 (no biases, no BN)."""
    return t.is_floating_point() and t.dim() >= 2 and name.endswith("weight")


def _pick(named: Sequence[tuple[str, torch.Tensor]], layer_names: Sequence[str] | None) -> list[int]:
    if layer_names is None:
        return [i for i, (n, t) in enumerate(named) if _default_pick(n, t)]
    chosen: list[int] = []
    for want in layer_names:
        hits = [
            i
            for i, (n, t) in enumerate(named)
            if n == want or (n.startswith(want + ".") and _default_pick(n, t))
        ]
        if not hits:
            raise ValueError(f"watermark layer {want!r} selects no weight tensor of the segment")
        chosen.extend(i for i in hits if i not in chosen)
    return chosen


def select_weights(
    module: nn.Module, layer_names: Sequence[str] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The parameters that carry the mark, sorted by name.

    Default: every conv/linear kernel (dim >= 2, named *weight). `layer_names` entries are
    parameter names (taken as given) or module names (their kernels). Sorting by name makes
    the order the same for a live module and for a state dict loaded from disk.
    """
    named = sorted(module.named_parameters(remove_duplicate=False), key=lambda kv: kv[0])
    return [named[i] for i in sorted(_pick(named, layer_names))]


def select_state_weights(
    state_dict: Mapping[str, torch.Tensor], layer_names: Sequence[str] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """`select_weights` for a state dict (what the verifier receives), same rule and order."""
    named = sorted(state_dict.items(), key=lambda kv: kv[0])
    return [named[i] for i in sorted(_pick(named, layer_names))]


def flat_weights(params: Sequence[torch.Tensor] | Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Concatenate the selected tensors into one float32 vector (differentiable for live parameters)."""
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    if not tensors:
        raise ValueError("no weights selected for the watermark")
    return torch.cat([t.reshape(-1).float() for t in tensors])


def selected_flat(segment: Segment, layer_names: Sequence[str] | None) -> torch.Tensor:
    """All selected kernels of a segment (module or state dict) as one vector, before subsetting."""
    if isinstance(segment, nn.Module):
        named: Sequence[tuple[str, torch.Tensor]] = select_weights(segment, layer_names)
    else:
        named = select_state_weights(segment, layer_names)
    return flat_weights(named)


def segment_vector(
    segment: Segment, wm_key: bytes, layer_names: Sequence[str] | None, max_weights: int | None
) -> torch.Tensor:
    """The watermark carrier w of a segment (module or state dict): selected kernels, key subset."""
    w = selected_flat(segment, layer_names)
    idx = subset_indices(wm_key, w.numel(), max_weights)
    return w if idx is None else w.index_select(0, idx.to(w.device))


# ---------------------------------------------------------------- embedding and extraction


def watermark_loss(weights_flat: torch.Tensor, X: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits of the projections X w against the target bits."""
    logits = X.to(weights_flat.device) @ weights_flat
    return F.binary_cross_entropy_with_logits(logits, bits.to(logits.device, logits.dtype))


def embed_regulariser(
    weights_flat: torch.Tensor, X: torch.Tensor, bits: torch.Tensor, strength: float
) -> torch.Tensor:
    """`strength * watermark_loss`: the term a trainer adds to its local loss every step."""
    return strength * watermark_loss(weights_flat, X, bits)


def extract_bits(weights_flat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """b^ = 1[X w > 0] as float {0,1}."""
    with torch.no_grad():
        return (X.to(weights_flat.device) @ weights_flat.detach().float() > 0).float().cpu()


def completion_delta(w: torch.Tensor, X: torch.Tensor, bits: torch.Tensor, tolerate: int = 0) -> torch.Tensor:
    """The smallest change of `w` (in L2 norm) after which at most `tolerate` projections disagree
    with their bits.

    The wrong bits closest to their side are set (the cheapest), the `tolerate` farthest are left
    free. A set bit's projection is moved to the bit's side, as far from zero as the median of the
    projections that were already right (so a completed bit is as robust as an embedded one);
    right bits keep their projections exactly. With these equality constraints on `X dw` the
    least-norm solution is `X_c^T (X_c X_c^T)^+ delta_c` over the constrained rows, in float64.
    Zero when no more than `tolerate` bits are wrong.
    """
    X64, w64 = X.double(), w.detach().double()
    logits = X64 @ w64
    sign = bits.to(logits).reshape(-1) * 2 - 1
    right = sign * logits > 0
    wrong = torch.nonzero(~right).flatten()
    if len(wrong) <= tolerate:
        return torch.zeros_like(w)
    pool = (sign * logits)[right] if bool(right.any()) else logits.abs()
    margin = float(pool.median()) if pool.numel() else 1.0
    cheapest = wrong[torch.argsort(logits[wrong].abs())][: len(wrong) - max(tolerate, 0)]
    fixed = right.clone()
    fixed[cheapest] = True  # constrained rows: right bits (kept) and the bits to set
    delta = torch.where(right, torch.zeros_like(logits), sign * margin - logits)[fixed]
    Xc = X64[fixed]
    dw = Xc.T @ (torch.linalg.pinv(Xc @ Xc.T, hermitian=True) @ delta)
    return dw.to(w.dtype)


# ---------------------------------------------------------------- detection


def detection_threshold(n_bits: int, fp_bound: float = 1e-6) -> int:
    """Largest error count t with P[Binomial(n, 1/2) <= t] <= fp_bound; -1 if even 0 errors exceeds it.

    An unrelated model's extracted bits are fair coins against the expected bits, so declaring
    a match at <= t errors has false-positive probability at most `fp_bound` per key tested.
    """
    if n_bits <= 0:
        raise ValueError(f"n_bits must be positive, got {n_bits}")
    if not 0 < fp_bound < 1:
        raise ValueError(f"fp_bound must be in (0, 1), got {fp_bound}")
    from scipy.stats import binom  # imported when needed: 2 s at start-up

    cdf = binom.cdf(np.arange(n_bits + 1), n_bits, 0.5)
    ok = np.nonzero(cdf <= fp_bound)[0]
    return int(ok[-1]) if ok.size else -1


class WatermarkVerdict(BaseModel):
    """Outcome of comparing extracted to expected bits; p_value = P[chance gives <= bit_errors errors]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_bits: int
    bit_errors: int
    ber: float
    threshold: int
    p_value: float
    matched: bool
    fp_bound: float


def detect(extracted: torch.Tensor, expected: torch.Tensor, fp_bound: float = 1e-6) -> WatermarkVerdict:
    """Match when the bit errors are within `detection_threshold` (equivalently p_value <= fp_bound)."""
    if extracted.numel() != expected.numel():
        raise ValueError(f"extracted {extracted.numel()} bits but expected {expected.numel()}")
    from scipy.stats import binom

    n = int(expected.numel())
    errors = int(((extracted.reshape(-1) > 0.5) != (expected.reshape(-1).to(extracted.device) > 0.5)).sum())
    threshold = detection_threshold(n, fp_bound)
    return WatermarkVerdict(
        n_bits=n,
        bit_errors=errors,
        ber=errors / n,
        threshold=threshold,
        p_value=float(binom.cdf(errors, n, 0.5)),
        matched=errors <= threshold,
        fp_bound=fp_bound,
    )


def verify_segment_watermark(
    segment: Segment,
    spec: WatermarkSpec,
    wm_key: bytes,
    bits: torch.Tensor,
    round_nonce: bytes | None,
) -> WatermarkVerdict:
    """Extract with the key's (round's) projection from a module or state dict and compare to `bits`."""
    w = segment_vector(segment, wm_key, spec.layers, spec.max_weights)
    X = projection_matrix(wm_key, spec.n_bits, w.numel(), round_nonce=round_nonce)
    return detect(extract_bits(w, X), bits, spec.fp_bound)


# ---------------------------------------------------------------- per-round state


class WatermarkSpec(BaseModel):
    """Watermark parameters shared by trainers and verifier.

    Field names match the job config's `[watermark]` section (`strength` is the paper's
    lambda), so `WatermarkSpec(**cfg.watermark.model_dump(exclude={"enabled"}))` works.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_bits: int = Field(128, ge=16, le=4096)
    strength: float = Field(0.05, ge=0)
    layers: tuple[str, ...] | None = None
    fp_bound: float = Field(1e-6, gt=0, lt=1)
    max_weights: int | None = Field(8192, gt=0)

    @model_validator(mode="after")
    def _detectable(self) -> WatermarkSpec:
        if detection_threshold(self.n_bits, self.fp_bound) < 0:
            raise ValueError(
                f"{self.n_bits} bits cannot reach a false-positive bound of {self.fp_bound}: use more bits"
            )
        if self.max_weights is not None and self.max_weights < self.n_bits:
            raise ValueError(f"max_weights ({self.max_weights}) must be at least n_bits ({self.n_bits})")
        return self

    @property
    def threshold(self) -> int:
        return detection_threshold(self.n_bits, self.fp_bound)


class WatermarkEmbedder:
    """One trainer's mark for one round on one segment: holds X and the target bits.

    Built at round start (after the nonce and the preceding records are known); `regulariser`
    is added to every local training step of the round; `verdict` checks the mark.
    """

    def __init__(
        self,
        spec: WatermarkSpec,
        wm_key: bytes,
        bits: torch.Tensor,
        segment: Segment,
        *,
        round_nonce: bytes | None,
    ) -> None:
        if bits.numel() != spec.n_bits:
            raise ValueError(f"{bits.numel()} target bits but the spec has n_bits = {spec.n_bits}")
        self.spec = spec
        self.wm_key = bytes(wm_key)
        self.bits = bits.detach().float().cpu().reshape(-1)
        self.n_total = selected_flat(segment, spec.layers).numel()
        # the key's subset, computed once: it costs a pass over every selected weight
        self._idx = subset_indices(self.wm_key, self.n_total, spec.max_weights)
        self._split: list[tuple[int, torch.Tensor]] | None = None  # _idx by kernel, built on first use
        n_weights = self.n_total if self._idx is None else self._idx.numel()
        if n_weights < spec.n_bits:
            raise ValueError(
                f"the segment has only {n_weights} watermarkable weights, fewer than n_bits = {spec.n_bits}; "
                "choose fewer bits or more layers"
            )
        self.n_weights = n_weights
        self.X = projection_matrix(self.wm_key, spec.n_bits, n_weights, round_nonce=round_nonce)

    @classmethod
    def for_round(
        cls,
        spec: WatermarkSpec,
        wm_key: bytes,
        *,
        nonce: bytes,
        identity_fp: str,
        prev_digests: Sequence[str],
        segment: Segment,
    ) -> WatermarkEmbedder:
        """Derive the round's bits and build the embedder; X is per round (keyed by the nonce)."""
        bits = derive_watermark_bits(wm_key, nonce, identity_fp, prev_digests, spec.n_bits)
        return cls(spec, wm_key, bits, segment, round_nonce=nonce)

    def _w(self, segment: Segment) -> torch.Tensor:
        """The carrier: `segment_vector`'s values, gathered from each kernel directly. Concatenating
        every kernel first and then subsetting cost a full pass over a large segment forward and three
        backward (trainer 3 of the default job: 402,688 weights for an 8,192-weight carrier), on
        every training step."""
        return self._gather(self.kernels(segment))

    def kernels(self, segment: Segment) -> list[torch.Tensor]:
        """The selected kernels, in carrier order."""
        if isinstance(segment, nn.Module):
            named: Sequence[tuple[str, torch.Tensor]] = select_weights(segment, self.spec.layers)
        else:
            named = select_state_weights(segment, self.spec.layers)
        return [t for _, t in named]

    def _gather(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        n = sum(t.numel() for t in tensors)
        if n != self.n_total:
            raise ValueError(f"segment has {n} selectable weights, the mark was set on {self.n_total}")
        if self._idx is None:
            w = flat_weights(tensors)
        else:
            w = torch.cat(
                [
                    tensors[i].reshape(-1).index_select(0, local.to(tensors[i].device)).float()
                    for i, local in self._per_tensor([t.numel() for t in tensors])
                ]
            )
        if self.X.device != w.device:
            self.X = self.X.to(w.device)
        return w

    def _per_tensor(self, sizes: list[int]) -> list[tuple[int, torch.Tensor]]:
        """The sorted subset split by kernel: (kernel number, indices within it), cached."""
        if self._split is None:
            bounds = torch.tensor([0, *sizes]).cumsum(0)
            groups = [
                self._idx[(self._idx >= lo) & (self._idx < hi)] - lo
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            self._split = [(i, local) for i, local in enumerate(groups) if local.numel()]
        return self._split

    def loss(self, segment: nn.Module) -> torch.Tensor:
        """Unscaled BCE of the projections against the bits (differentiable)."""
        return watermark_loss(self._w(segment), self.X, self.bits)

    def regulariser(self, segment: nn.Module) -> torch.Tensor:
        """`strength * loss`: add to the trainer's local loss each step."""
        return self.spec.strength * self.loss(segment)

    def regulariser_grad(self, kernels: list[torch.Tensor]) -> torch.Tensor:
        """The gradient of `regulariser` with respect to the carrier held in `kernels` (a segment's
        `kernels`), flat, in carrier order: `strength * X^T (sigmoid(X w) - b) / n_bits`, computed
        directly. Autograd took about half as long again (gathering the carrier, a graph, and a
        zero-filled gradient of every selected kernel to scatter into); this reads X twice and
        touches only the carrier's weights."""
        with torch.no_grad():
            w = self._gather(kernels)
            g = (torch.sigmoid(self.X @ w) - self.bits.to(w.device)) @ self.X
            return g.mul_(self.spec.strength / self.spec.n_bits)

    def add_regulariser_grad(self, segment: nn.Module, grad: torch.Tensor | None = None) -> None:
        """Add what back-propagating `regulariser` would add to the carrier kernels' `.grad`: `grad`
        when given (`regulariser_grad` of these very weights, computed ahead), else computed now."""
        params = self.kernels(segment)
        g = self.regulariser_grad(params) if grad is None else grad
        if g.shape != (self.n_weights,):
            raise ValueError(
                f"regulariser gradient of shape {tuple(g.shape)}, the carrier has {self.n_weights}"
            )
        with torch.no_grad():
            if self._idx is None:
                parts = [(i, None) for i in range(len(params))]
            else:
                parts = list(self._per_tensor([t.numel() for t in params]))
            offset = 0
            for i, local in parts:
                p = params[i]
                if p.grad is None:
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
                elif not p.grad.is_contiguous():  # the carrier's order is the row-major one
                    p.grad = p.grad.contiguous()
                flat = p.grad.view(-1)
                n = flat.numel() if local is None else local.numel()
                part = g[offset : offset + n].to(flat.dtype)
                if local is None:
                    flat.add_(part)
                else:
                    flat.index_add_(0, local.to(flat.device), part)
                offset += n

    def extract(self, segment: Segment) -> torch.Tensor:
        return extract_bits(self._w(segment), self.X)

    def complete(self, segment: nn.Module) -> int:
        """If more than half the detection threshold of bits are wrong, apply `completion_delta`
        to the segment's weights in place, setting the cheapest wrong bits until half the threshold
        are left; return how many bits it set (0: the regulariser did). At or below that level the
        mark is detected with margin, so nothing is changed.

        Why not every bit: each round's mark is fresh, so once the learning rate has decayed about
        half the bits start wrong, and setting them all moves a small segment's weights by a
        quarter of their norm every round, a random perturbation the model's accuracy pays for
        (EXPERIMENTS.md, section 16). The cheapest ones cost far less."""
        w = self._w(segment)
        wrong = int((extract_bits(w, self.X) != self.bits).sum())
        keep = self.spec.threshold // 2
        if wrong <= keep:
            return 0
        dw = completion_delta(w, self.X, self.bits, tolerate=keep)
        if self._idx is not None:
            dw = torch.zeros(self.n_total, dtype=dw.dtype).index_copy_(0, self._idx, dw.cpu())
        offset = 0
        with torch.no_grad():
            for _, p in select_weights(segment, self.spec.layers):
                p.add_(dw[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype))
                offset += p.numel()
        return wrong - keep

    def verdict(self, segment: Segment) -> WatermarkVerdict:
        return detect(self.extract(segment), self.bits, self.spec.fp_bound)
