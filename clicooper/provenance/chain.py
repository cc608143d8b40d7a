"""The verifier's checks over a job's record lattice, and ownership queries on suspect segments.

`verify_chain` needs only public or escrowed material: signed records, the registry (public keys,
positions, escrowed watermark keys), the verifier's own nonces, attestations, and the final
segments the trainers deliver. It never needs the data owner's data or cooperation, so the data
owner cannot deny trainers their credit by withholding anything.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from clicooper.provenance.identity import PublicIdentity
from clicooper.provenance.records import (
    SignedRecord,
    TranscriptAttestation,
    prev_link_slots,
    segment_digest,
    verify_attestation,
    verify_record,
)
from clicooper.provenance.watermark import (
    Segment,
    WatermarkSpec,
    WatermarkVerdict,
    derive_watermark_bits,
    verify_segment_watermark,
    watermark_commitment,
)


class RegisteredTrainer(BaseModel):
    """A trainer as registered with the verifier before the job: identity, position, escrowed key."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="hex", val_json_bytes="hex")

    identity: PublicIdentity
    position: int = Field(ge=1)
    wm_key: bytes

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint


Registry = Mapping[str, RegisteredTrainer]


class Finding(BaseModel):
    """One check's outcome; a rejection names the stage (position, round) and why."""

    model_config = ConfigDict(frozen=True)

    position: int | None
    round: int | None
    ok: bool
    reason: str

    def __str__(self) -> str:
        where = f"position {self.position}" if self.position is not None else "job"
        if self.round is not None:
            where += f", round {self.round}"
        return f"[{'ok' if self.ok else 'REJECTED'}] {where}: {self.reason}"


class ChainVerdict(BaseModel):
    job_id: str
    n_positions: int
    n_rounds: int
    ok: bool
    findings: list[Finding]
    final_watermarks: dict[int, WatermarkVerdict] = Field(default_factory=dict)
    accepted_records: list[SignedRecord] = Field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def summary(self) -> str:
        head = f"job {self.job_id}: chain {'VERIFIED' if self.ok else 'REJECTED'}"
        return "\n".join([head, *(str(f) for f in self.failures)])


def _by_position(
    registry: Registry, n_positions: int, findings: list[Finding]
) -> dict[int, RegisteredTrainer]:
    out: dict[int, RegisteredTrainer] = {}
    for fp, reg in registry.items():
        if fp != reg.fingerprint:
            findings.append(
                Finding(
                    position=reg.position, round=None, ok=False, reason="registry key is not the fingerprint"
                )
            )
        elif reg.position in out:
            findings.append(
                Finding(position=reg.position, round=None, ok=False, reason="two trainers registered")
            )
        else:
            out[reg.position] = reg
    for p in range(1, n_positions + 1):
        if p not in out:
            findings.append(
                Finding(position=p, round=None, ok=False, reason="no trainer registered at this position")
            )
    return out


def _admit(
    sr: SignedRecord,
    *,
    job_id: str,
    registry: Registry,
    nonces: Mapping[int, bytes],
    n_positions: int,
    n_rounds: int,
) -> str | None:
    """Why a record cannot be placed in the lattice at all, or None if it can."""
    rec = sr.record
    reg = registry.get(rec.trainer)
    if reg is None:
        return f"signed by unregistered identity {rec.trainer[:16]}... (forged record)"
    if not verify_record(sr, reg.identity.public_key):
        return f"invalid signature for {reg.identity.name} (record altered or forged)"
    if rec.job_id != job_id:
        return f"record belongs to job {rec.job_id!r}, not {job_id!r} (replayed from another job)"
    if not (1 <= rec.position <= n_positions and 0 <= rec.round < n_rounds):
        return f"stage outside the job's {n_positions} positions x {n_rounds} rounds"
    if reg.position != rec.position:
        return (
            f"signed by {reg.identity.name}, who is registered at position {reg.position} "
            "(stages swapped or work claimed for another position)"
        )
    nonce = nonces.get(rec.round)
    if nonce is None:
        return "the verifier issued no nonce for this round"
    if rec.nonce != bytes(nonce).hex():
        return "nonce is not the verifier's nonce for this round (record replayed from another round or job)"
    return None


def _place(
    signed_records: Sequence[SignedRecord],
    n_positions: int,
    n_rounds: int,
    admit: Callable[[SignedRecord], str | None],
    findings: list[Finding],
) -> dict[tuple[int, int], SignedRecord]:
    """Admit records into (position, round) slots; exactly one distinct record per slot survives."""
    slots: dict[tuple[int, int], dict[str, SignedRecord]] = defaultdict(dict)
    for sr in signed_records:
        why = admit(sr)
        if why is not None:
            findings.append(Finding(position=sr.record.position, round=sr.record.round, ok=False, reason=why))
        else:
            slots[(sr.record.position, sr.record.round)][sr.digest] = sr  # identical copies collapse
    chosen: dict[tuple[int, int], SignedRecord] = {}
    for r in range(n_rounds):
        for p in range(1, n_positions + 1):
            found = slots.get((p, r), {})
            if not found:
                findings.append(
                    Finding(position=p, round=r, ok=False, reason="no valid stage record (stage missing)")
                )
            elif len(found) > 1:
                findings.append(
                    Finding(
                        position=p,
                        round=r,
                        ok=False,
                        reason=f"{len(found)} conflicting records for one stage",
                    )
                )
            else:
                chosen[(p, r)] = next(iter(found.values()))
    return chosen


def _check_stage(
    sr: SignedRecord,
    chosen: Mapping[tuple[int, int], SignedRecord],
    reg: RegisteredTrainer,
    nonce: bytes,
    spec: WatermarkSpec,
) -> list[str]:
    """Work claimed, hash links, watermark commitment: the reasons this admitted stage fails."""
    rec, reasons = sr.record, []
    if rec.steps < 1 or rec.samples < 1:
        reasons.append(f"claims no training work ({rec.steps} steps, {rec.samples} samples)")
    slots = prev_link_slots(rec.position, rec.round)
    missing = [s for s in slots if s not in chosen]
    if missing:
        reasons.append(
            f"cannot check hash links: linked stage(s) {missing} (position, round) have no valid record"
        )
    elif rec.prev_record_digests != tuple(chosen[s].digest for s in slots):
        reasons.append(f"hash links do not point to the records of stages {slots} (position, round)")
    bits = derive_watermark_bits(reg.wm_key, nonce, rec.trainer, rec.prev_record_digests, spec.n_bits)
    try:
        salt = bytes.fromhex(rec.watermark_salt)
    except ValueError:
        salt = b""
    if watermark_commitment(bits, salt) != rec.watermark_commitment:
        reasons.append(
            "watermark commitment does not match the bits derived from the escrowed key (forged mark)"
        )
    return reasons


def _check_links(
    chosen: Mapping[tuple[int, int], SignedRecord], n_positions: int, n_rounds: int
) -> list[Finding]:
    """Neighbours must report the same link transcript and the same work in every round."""
    out: list[Finding] = []
    for r in range(n_rounds):
        for p in range(1, n_positions):
            a, b = chosen.get((p, r)), chosen.get((p + 1, r))
            if a is None or b is None:
                continue
            mine, theirs = a.record.transcripts.get("next"), b.record.transcripts.get("prev")
            if mine is None or theirs is None or mine != theirs:
                out.append(
                    Finding(
                        position=p,
                        round=r,
                        ok=False,
                        reason=f"transcript digest for the link to position {p + 1} disagrees with that "
                        f"trainer's record ({(mine or 'missing')[:16]} vs {(theirs or 'missing')[:16]})",
                    )
                )
            if (a.record.steps, a.record.samples) != (b.record.steps, b.record.samples):
                out.append(
                    Finding(
                        position=p,
                        round=r,
                        ok=False,
                        reason=f"claims {a.record.steps} steps / {a.record.samples} samples but "
                        f"position {p + 1} claims {b.record.steps} / {b.record.samples} over the same relay",
                    )
                )
    return out


def attestation_fault(
    att: TranscriptAttestation, reg: RegisteredTrainer | None, job_id: str, n_rounds: int
) -> str | None:
    """What is wrong with an attestation whose position is registered as `reg` (None: nothing is),
    or None: the verifier's checks when it receives one, and the offline check of a job."""
    if att.job_id != job_id:
        return f"attestation belongs to job {att.job_id!r} (replayed)"
    if reg is None or reg.fingerprint != att.signer:
        return f"attestation for position {att.from_position} signed by a trainer not registered there"
    if abs(att.from_position - att.to_position) != 1 or not 0 <= att.round < n_rounds:
        return "attestation is not about a neighbouring link of this job"
    if not verify_attestation(att, reg.identity.public_key):
        return "invalid attestation signature"
    return None


def _check_attestations(
    attestations: Sequence[TranscriptAttestation],
    chosen: Mapping[tuple[int, int], SignedRecord],
    by_pos: Mapping[int, RegisteredTrainer],
    job_id: str,
    n_positions: int,
    n_rounds: int,
) -> list[Finding]:
    """Each neighbour must counter-sign the link digest the other end recorded."""
    out: list[Finding] = []
    valid: dict[tuple[int, int, int], set[str]] = defaultdict(set)
    for att in attestations:
        why = attestation_fault(att, by_pos.get(att.from_position), job_id, n_rounds)
        if why is not None:
            out.append(Finding(position=_culprit(att, by_pos, job_id), round=att.round, ok=False, reason=why))
        else:
            valid[(att.round, att.from_position, att.to_position)].add(att.digest)
    for r in range(n_rounds):
        for p in range(1, n_positions):
            for frm, to, side in ((p + 1, p, "next"), (p, p + 1, "prev")):
                rec = chosen.get((to, r))
                if rec is None:
                    continue
                want = rec.record.transcripts.get(side)
                got = valid.get((r, frm, to), set())
                if not got:
                    reason = f"no counter-signature from position {frm} on this stage's transcript"
                elif want not in got or len(got) > 1:
                    reason = f"position {frm} counter-signed a different transcript digest than this record's"
                else:
                    continue
                out.append(Finding(position=to, round=r, ok=False, reason=reason))
    return out


def _culprit(att: TranscriptAttestation, by_pos: Mapping[int, RegisteredTrainer], job_id: str) -> int:
    """Whom a bad attestation is blamed on: a registered trainer that provably signed it (its key,
    this job) in another position's name; otherwise, as nobody else is known to have made it, the
    position it names."""
    for pos, reg in by_pos.items():
        if (
            reg.fingerprint == att.signer
            and pos != att.from_position
            and att.job_id == job_id
            and verify_attestation(att, reg.identity.public_key)
        ):
            return pos
    return att.from_position


def _state_dict(segment: Segment) -> Mapping[str, torch.Tensor]:
    return segment.state_dict() if isinstance(segment, nn.Module) else segment


def verify_chain(
    job_id: str,
    signed_records: Sequence[SignedRecord],
    *,
    registry: Registry,
    nonces: Mapping[int, bytes],
    final_segments: Mapping[int, Segment],
    attestations: Sequence[TranscriptAttestation] | None,
    n_positions: int,
    n_rounds: int,
    wm_spec: WatermarkSpec,
) -> ChainVerdict:
    """Check a whole job: signatures, job id, nonces, one record per stage, registered order, hash links,
    watermark commitments, neighbour transcripts (and attestations, unless None), final weights
    against the last records, and the final watermark of every segment. Never raises on bad input."""
    findings: list[Finding] = []
    by_pos = _by_position(registry, n_positions, findings)

    def admit(sr: SignedRecord) -> str | None:
        return _admit(
            sr, job_id=job_id, registry=registry, nonces=nonces, n_positions=n_positions, n_rounds=n_rounds
        )

    chosen = _place(signed_records, n_positions, n_rounds, admit, findings)
    for (p, r), sr in sorted(chosen.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        reasons = _check_stage(sr, chosen, registry[sr.record.trainer], nonces[r], wm_spec)
        findings.extend(Finding(position=p, round=r, ok=False, reason=why) for why in reasons)
        if not reasons:
            findings.append(
                Finding(position=p, round=r, ok=True, reason="record, links and commitment verified")
            )
    findings.extend(_check_links(chosen, n_positions, n_rounds))
    if attestations is not None:
        findings.extend(_check_attestations(attestations, chosen, by_pos, job_id, n_positions, n_rounds))

    final_marks: dict[int, WatermarkVerdict] = {}
    last = n_rounds - 1
    for p in range(1, n_positions + 1):
        sr, seg, reg = chosen.get((p, last)), final_segments.get(p), by_pos.get(p)
        if seg is None:
            findings.append(Finding(position=p, round=last, ok=False, reason="final segment not delivered"))
            continue
        if sr is None or reg is None:
            continue  # already rejected: no record or no registered trainer to check against
        if segment_digest(_state_dict(seg)) != sr.record.segment_sha256:
            findings.append(
                Finding(
                    position=p,
                    round=last,
                    ok=False,
                    reason="delivered segment weights differ from the signed digest",
                )
            )
        bits = derive_watermark_bits(
            reg.wm_key, nonces[last], reg.fingerprint, sr.record.prev_record_digests, wm_spec.n_bits
        )
        try:
            v = verify_segment_watermark(seg, wm_spec, reg.wm_key, bits, nonces[last])
        except ValueError as e:
            findings.append(
                Finding(position=p, round=last, ok=False, reason=f"cannot extract watermark: {e}")
            )
            continue
        final_marks[p] = v
        desc = f"{v.bit_errors}/{v.n_bits} bit errors (threshold {v.threshold}, p = {v.p_value:.2e})"
        findings.append(
            Finding(
                position=p,
                round=last,
                ok=v.matched,
                reason=f"final watermark {'matched' if v.matched else 'NOT detected'}: {desc}",
            )
        )

    return ChainVerdict(
        job_id=job_id,
        n_positions=n_positions,
        n_rounds=n_rounds,
        ok=all(f.ok for f in findings),
        findings=findings,
        final_watermarks=final_marks,
        accepted_records=[chosen[k] for k in sorted(chosen, key=lambda k: (k[1], k[0]))],
    )


# ---------------------------------------------------------------- ownership


@dataclass(frozen=True)
class WatermarkClaim:
    """What a registered trainer's final mark should read: its bits and the round nonce keying X."""

    bits: torch.Tensor
    round_nonce: bytes | None


class OwnershipMatch(BaseModel):
    trainer: str
    name: str
    position: int
    verdict: WatermarkVerdict | None
    error: str | None = None

    @property
    def matched(self) -> bool:
        return self.verdict is not None and self.verdict.matched


def final_claims(
    signed_records: Sequence[SignedRecord],
    registry: Registry,
    nonces: Mapping[int, bytes],
    spec: WatermarkSpec,
) -> dict[str, WatermarkClaim]:
    """Each registered trainer's last validly signed record -> the bits its final segment carries."""
    latest: dict[str, SignedRecord] = {}
    for sr in signed_records:
        reg = registry.get(sr.record.trainer)
        if reg is None or not verify_record(sr, reg.identity.public_key):
            continue
        if sr.record.nonce != bytes(nonces.get(sr.record.round, b"")).hex():
            continue
        cur = latest.get(sr.record.trainer)
        if cur is None or sr.record.round > cur.record.round:
            latest[sr.record.trainer] = sr
    out: dict[str, WatermarkClaim] = {}
    for fp, sr in latest.items():
        nonce = nonces[sr.record.round]
        bits = derive_watermark_bits(
            registry[fp].wm_key, nonce, fp, sr.record.prev_record_digests, spec.n_bits
        )
        out[fp] = WatermarkClaim(bits=bits, round_nonce=nonce)
    return out


def ownership_query(
    segment: Segment, registry: Registry, claims: Mapping[str, WatermarkClaim], spec: WatermarkSpec
) -> list[OwnershipMatch]:
    """Extract with every claimed key's projection from a suspect segment; matches first, by p-value.

    Each test has false-positive probability <= spec.fp_bound, so over K keys the chance of any
    spurious match is <= K * fp_bound (union bound).
    """
    out: list[OwnershipMatch] = []
    for fp, claim in claims.items():
        reg = registry.get(fp)
        if reg is None:
            continue
        try:
            v = verify_segment_watermark(segment, spec, reg.wm_key, claim.bits, claim.round_nonce)
            out.append(OwnershipMatch(trainer=fp, name=reg.identity.name, position=reg.position, verdict=v))
        except ValueError as e:
            out.append(
                OwnershipMatch(
                    trainer=fp, name=reg.identity.name, position=reg.position, verdict=None, error=str(e)
                )
            )
    return sorted(out, key=lambda m: (not m.matched, m.verdict.p_value if m.verdict else 1.0))
