"""Signed stage records, transcript digests and their neighbour attestations.

A stage is one trainer (position) in one round. At round end the trainer signs a
`StageRecord` that pins its segment weights, the messages it exchanged with each
neighbour, its watermark commitment, and the digests of the records its stage
depends on (its own previous round and its predecessor's previous round). The
records therefore form a hash-linked lattice over (position, round).

Everything is canonical JSON or framed bytes; nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clicooper.background import Backlog, submit
from clicooper.checkpoint import atomic_write_bytes
from clicooper.provenance.identity import Identity, fingerprint_of, verify_signature
from clicooper.provenance.watermark import commitment_salt, watermark_commitment

_HEX64 = r"^[0-9a-f]{64}$"
_RECORD_DOMAIN = b"clicooper/stage-record/v1\0"
_ATTEST_DOMAIN = b"clicooper/transcript-attestation/v1\0"
_SEGMENT_DOMAIN = b"clicooper/segment/v1"
_TRANSCRIPT_DOMAIN = b"clicooper/transcript/v1"

Direction = Literal["forward", "backward"]


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: the byte string that digests and signatures cover."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _frame(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def _tensor_parts(t: torch.Tensor) -> tuple[bytes, memoryview]:
    """`tensor_payload` as (framed dtype, shape and raw length; a view of the raw bytes), no copy."""
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("canonical tensor bytes assume a little-endian host")
    t = t.detach().cpu().contiguous()
    raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    head = _frame(str(t.dtype).encode(), json.dumps(list(t.shape)).encode()) + struct.pack(">Q", raw.nbytes)
    return head, raw


def tensor_payload(t: torch.Tensor) -> bytes:
    """Canonical bytes of a tensor: dtype, shape and raw little-endian contiguous data."""
    head, raw = _tensor_parts(t)
    return head + raw.tobytes()


def _update_framed_tensor(h: Any, prefix: bytes, t: torch.Tensor) -> None:
    """Feed `_frame(prefix + tensor_payload(t))` into the hash `h` without copying the tensor: large
    activations are hashed once, straight from their memory."""
    head, raw = _tensor_parts(t)
    h.update(struct.pack(">Q", len(prefix) + len(head) + raw.nbytes) + prefix + head)
    h.update(raw)


def segment_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the state dict's entries sorted by name (name, dtype, shape, raw bytes).

    Independent of dict order, device and memory layout, so trainer and verifier agree
    on the same weights and any changed value changes the digest.
    """
    h = hashlib.sha256(_SEGMENT_DOMAIN)
    for name in sorted(state_dict):
        h.update(_frame(name.encode()))
        _update_framed_tensor(h, b"", state_dict[name])
    return h.hexdigest()


# ---------------------------------------------------------------- transcripts


def link_direction(side: Literal["prev", "next"], flow: Literal["in", "out"]) -> Direction:
    """Name a message by the link's direction, so both ends of a link hash it under the same label.

    From prev, or out to next, is an activation (forward); the rest are gradients (backward).
    """
    return "forward" if (side, flow) in (("prev", "in"), ("next", "out")) else "backward"


class TranscriptHasher:
    """Running digest of the messages on one link (this trainer <-> one neighbour) in one round.

    Forward and backward messages go into separate hash chains: each direction is delivered in
    order, but how the two interleave can differ between the ends of a link. State is two
    32-byte chain values and counts, so it checkpoints as JSON.
    """

    def __init__(self, *, background: bool = False) -> None:
        """`background`: hash tensors on the process's background thread (clicooper.background),
        overlapping the training step. The digests are the same; every read waits for the backlog.
        A tensor handed to `update_tensor` must then not be modified in place afterwards (relayed
        tensors never are: they are fresh outputs, gradients or decoded messages)."""
        self._chain = {
            "forward": hashlib.sha256(b"forward").digest(),
            "backward": hashlib.sha256(b"backward").digest(),
        }
        self._count = {"forward": 0, "backward": 0}
        self._backlog = Backlog() if background else None

    def _settle(self) -> None:
        if self._backlog is not None:
            self._backlog.settle()

    @staticmethod
    def _check(direction: str) -> None:
        if direction not in ("forward", "backward"):
            raise ValueError(f"transcript direction must be 'forward' or 'backward', got {direction!r}")

    def update(self, direction: Direction, payload: bytes) -> None:
        self._check(direction)
        self._settle()
        self._chain[direction] = hashlib.sha256(self._chain[direction] + _frame(bytes(payload))).digest()
        self._count[direction] += 1

    def update_tensor(self, direction: Direction, rnd: int, step: int, tensor: torch.Tensor) -> None:
        """Hash one relayed tensor together with the (round, step) it belongs to; the same digest as
        `update(direction, pack(rnd, step) + tensor_payload(tensor))`, without copying the tensor."""
        self._check(direction)
        if self._backlog is None:
            self._absorb(direction, rnd, step, tensor)
        else:
            self._backlog.add(submit(self._absorb, direction, rnd, step, tensor.detach()))

    def _absorb(self, direction: Direction, rnd: int, step: int, tensor: torch.Tensor) -> None:
        h = hashlib.sha256(self._chain[direction])
        _update_framed_tensor(h, struct.pack(">QQ", rnd, step), tensor)
        self._chain[direction] = h.digest()
        self._count[direction] += 1

    def digest(self) -> str:
        self._settle()
        return hashlib.sha256(
            _TRANSCRIPT_DOMAIN
            + self._chain["forward"]
            + self._chain["backward"]
            + struct.pack(">QQ", self._count["forward"], self._count["backward"])
        ).hexdigest()

    @property
    def messages(self) -> int:
        self._settle()
        return sum(self._count.values())

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {"chain": {k: v.hex() for k, v in self._chain.items()}, "count": dict(self._count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._settle()
        self._chain = {k: bytes.fromhex(state["chain"][k]) for k in ("forward", "backward")}
        self._count = {k: int(state["count"][k]) for k in ("forward", "backward")}


class TranscriptAttestation(BaseModel):
    """The trainer at `from_position` vouches that the link transcript with `to_position` had `digest`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    round: int = Field(ge=0)
    from_position: int = Field(ge=1)
    to_position: int = Field(ge=1)
    digest: str = Field(pattern=_HEX64)
    signer: str = Field(pattern=_HEX64)
    signature: str = ""

    def signed_bytes(self) -> bytes:
        return _ATTEST_DOMAIN + canonical_json(self.model_dump(mode="json", exclude={"signature"}))


def attest_transcript(
    identity: Identity, job_id: str, rnd: int, from_position: int, to_position: int, digest: str
) -> TranscriptAttestation:
    unsigned = TranscriptAttestation(
        job_id=job_id,
        round=rnd,
        from_position=from_position,
        to_position=to_position,
        digest=digest,
        signer=identity.fingerprint(),
    )
    return unsigned.model_copy(update={"signature": identity.sign(unsigned.signed_bytes()).hex()})


def verify_attestation(att: TranscriptAttestation, public_key: bytes) -> bool:
    """Signature valid and made by the key the attestation names as signer."""
    if fingerprint_of(public_key) != att.signer:
        return False
    try:
        sig = bytes.fromhex(att.signature)
    except ValueError:
        return False
    return verify_signature(public_key, sig, att.signed_bytes())


# ---------------------------------------------------------------- stage records


class StageRecord(BaseModel):
    """What a trainer signs at the end of a round (see module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    job_id: str
    round: int = Field(ge=0)
    position: int = Field(ge=1)
    trainer: str = Field(pattern=_HEX64, description="identity fingerprint")
    segment_sha256: str = Field(pattern=_HEX64)
    steps: int = Field(ge=0)
    samples: int = Field(ge=0)
    transcripts: dict[Literal["prev", "next"], str] = Field(default_factory=dict)
    watermark_commitment: str = Field(pattern=_HEX64)
    watermark_salt: str = Field(pattern=r"^[0-9a-f]*$")
    prev_record_digests: tuple[str, ...] = ()
    nonce: str = Field(pattern=r"^[0-9a-f]+$")
    created_at: str | None = None

    @field_validator("transcripts", "prev_record_digests")
    @classmethod
    def _hex_digests(cls, v: Any) -> Any:
        values = v.values() if isinstance(v, Mapping) else v
        for d in values:
            if not (len(d) == 64 and all(c in "0123456789abcdef" for c in d)):
                raise ValueError(f"{d!r} is not a lowercase hex SHA-256 digest")
        return v


def record_digest(record: StageRecord) -> str:
    """Hex SHA-256 of the record's canonical JSON: what later records and certificates link to."""
    return hashlib.sha256(canonical_json(record.model_dump(mode="json"))).hexdigest()


def prev_link_slots(position: int, rnd: int) -> list[tuple[int, int]]:
    """The (position, round) stages a stage links to, in order: own previous round, predecessor's.

    Position 1's predecessor is the data owner, which signs no records; round 0 links to nothing
    (the verifier's fresh nonce anchors it to the job).
    """
    if rnd == 0:
        return []
    slots = [(position, rnd - 1)]
    if position > 1:
        slots.append((position - 1, rnd - 1))
    return slots


class SignedRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    record: StageRecord
    signature: str

    @property
    def digest(self) -> str:
        return record_digest(self.record)

    def to_json(self) -> str:
        return canonical_json(self.model_dump(mode="json")).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedRecord:
        return cls.model_validate_json(text)


def build_stage_record(
    *,
    job_id: str,
    rnd: int,
    position: int,
    identity: Identity,
    wm_key: bytes,
    nonce: bytes,
    bits: torch.Tensor,
    state_dict: Mapping[str, torch.Tensor],
    steps: int,
    samples: int,
    transcripts: Mapping[str, str],
    prev_record_digests: Sequence[str],
    created_at: str | None = None,
) -> StageRecord:
    """Assemble a round's record: digest the weights and commit to the bits with a key-derived salt."""
    salt = commitment_salt(wm_key, nonce)
    return StageRecord(
        job_id=job_id,
        round=rnd,
        position=position,
        trainer=identity.fingerprint(),
        segment_sha256=segment_digest(state_dict),
        steps=steps,
        samples=samples,
        transcripts=dict(transcripts),
        watermark_commitment=watermark_commitment(bits, salt),
        watermark_salt=salt.hex(),
        prev_record_digests=tuple(prev_record_digests),
        nonce=bytes(nonce).hex(),
        created_at=created_at,
    )


def sign_record(identity: Identity, record: StageRecord) -> SignedRecord:
    if record.trainer != identity.fingerprint():
        raise ValueError(f"record names trainer {record.trainer[:16]}..., not the signer {identity.name!r}")
    sig = identity.sign(_RECORD_DOMAIN + canonical_json(record.model_dump(mode="json")))
    return SignedRecord(record=record, signature=sig.hex())


def verify_record(signed: SignedRecord, public_key: bytes) -> bool:
    """Signature valid under `public_key`, and that key is the trainer the record names."""
    if fingerprint_of(public_key) != signed.record.trainer:
        return False
    try:
        sig = bytes.fromhex(signed.signature)
    except ValueError:
        return False
    return verify_signature(
        public_key, sig, _RECORD_DOMAIN + canonical_json(signed.record.model_dump(mode="json"))
    )


def save_records(path: str | Path, records: Sequence[SignedRecord]) -> None:
    """Write records as a JSON list, atomically."""
    data = json.dumps([r.model_dump(mode="json") for r in records], indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(Path(path), data.encode())


def load_records(path: str | Path) -> list[SignedRecord]:
    path = Path(path)
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path} must hold a JSON list of signed records")
    return [SignedRecord.model_validate(item) for item in items]
