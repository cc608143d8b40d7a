"""The verifier's signed certificate: provenance, work receipts and ownership for one job.

Trainers are paid and credited on this document, so it is signed by the verifier and binds
itself to the record lattice through the digests of the final records; anyone with the
verifier's public key can check it offline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from clicooper.checkpoint import atomic_write_bytes
from clicooper.provenance.chain import ChainVerdict, RegisteredTrainer
from clicooper.provenance.identity import Identity, fingerprint_of, verify_signature
from clicooper.provenance.records import canonical_json
from clicooper.provenance.watermark import WatermarkVerdict

_CERT_DOMAIN = b"clicooper/certificate/v1\0"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProvenanceEntry(_Frozen):
    """Who trained which segment, in chain order, and the exact final weights (by digest)."""

    position: int
    trainer_name: str
    fingerprint: str
    segment_sha256: str
    final_record_digest: str


class WorkReceipt(_Frozen):
    fingerprint: str
    name: str
    position: int
    rounds: int
    steps: int
    samples: int


class OwnershipEntry(_Frozen):
    position: int
    fingerprint: str
    verdict: WatermarkVerdict


class ChainSummary(_Frozen):
    ok: bool
    n_positions: int
    n_rounds: int
    n_records: int
    failures: list[str]


class Certificate(_Frozen):
    version: Literal[1] = 1
    job_id: str
    issued_at: str
    verifier: str
    provenance: list[ProvenanceEntry]
    receipts: list[WorkReceipt]
    ownership: list[OwnershipEntry]
    chain: ChainSummary
    signature: str = ""

    def signed_bytes(self) -> bytes:
        return _CERT_DOMAIN + canonical_json(self.model_dump(mode="json", exclude={"signature"}))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def to_json(self) -> str:
        return canonical_json(self.model_dump(mode="json")).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Certificate:
        return cls.model_validate_json(text)


def issue_certificate(
    verifier: Identity,
    verdict: ChainVerdict,
    registry: Mapping[str, RegisteredTrainer],
    *,
    issued_at: str | None = None,
    allow_failed: bool = False,
) -> Certificate:
    """Summarise a verified chain and sign it. Refuses a rejected chain unless `allow_failed`
    (then the certificate states the failures and `chain.ok` is false)."""
    if not verdict.ok and not allow_failed:
        raise ValueError(f"chain of job {verdict.job_id} did not verify:\n{verdict.summary()}")
    last = verdict.n_rounds - 1
    finals = {sr.record.position: sr for sr in verdict.accepted_records if sr.record.round == last}
    provenance = [
        ProvenanceEntry(
            position=p,
            trainer_name=registry[sr.record.trainer].identity.name,
            fingerprint=sr.record.trainer,
            segment_sha256=sr.record.segment_sha256,
            final_record_digest=sr.digest,
        )
        for p, sr in sorted(finals.items())
    ]
    work: dict[str, list[int]] = {}
    for sr in verdict.accepted_records:
        acc = work.setdefault(sr.record.trainer, [sr.record.position, 0, 0, 0])
        acc[1:] = [acc[1] + 1, acc[2] + sr.record.steps, acc[3] + sr.record.samples]
    receipts = [
        WorkReceipt(
            fingerprint=fp,
            name=registry[fp].identity.name,
            position=a[0],
            rounds=a[1],
            steps=a[2],
            samples=a[3],
        )
        for fp, a in sorted(work.items(), key=lambda kv: kv[1][0])
    ]
    ownership = [
        OwnershipEntry(position=p, fingerprint=finals[p].record.trainer, verdict=v)
        for p, v in sorted(verdict.final_watermarks.items())
        if p in finals
    ]
    unsigned = Certificate(
        job_id=verdict.job_id,
        issued_at=issued_at or datetime.now(UTC).isoformat(timespec="seconds"),
        verifier=verifier.fingerprint(),
        provenance=provenance,
        receipts=receipts,
        ownership=ownership,
        chain=ChainSummary(
            ok=verdict.ok,
            n_positions=verdict.n_positions,
            n_rounds=verdict.n_rounds,
            n_records=len(verdict.accepted_records),
            failures=[str(f) for f in verdict.failures],
        ),
    )
    return unsigned.model_copy(update={"signature": verifier.sign(unsigned.signed_bytes()).hex()})


def verify_certificate(cert: Certificate, verifier_public_key: bytes) -> bool:
    """Signature valid and made by the verifier the certificate names."""
    if fingerprint_of(verifier_public_key) != cert.verifier:
        return False
    try:
        sig = bytes.fromhex(cert.signature)
    except ValueError:
        return False
    return verify_signature(verifier_public_key, sig, cert.signed_bytes())


def save_certificate(path: str | Path, cert: Certificate) -> None:
    atomic_write_bytes(Path(path), (cert.model_dump_json(indent=2) + "\n").encode())


def load_certificate(path: str | Path) -> Certificate:
    return Certificate.model_validate_json(Path(path).read_text())
