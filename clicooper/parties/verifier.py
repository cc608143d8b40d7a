"""The verifier: a neutral party that registers trainers, issues round nonces, collects
signed stage records, and afterwards verifies the job and certifies provenance,
work and ownership. It never sees data, labels or activations.

Its state (registry with escrowed watermark keys, nonces, records, attestations) is
written atomically to its own folder after every change, so `verify_run` can check a
finished job from the run folder alone.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from safetensors.torch import load_file

from clicooper.checkpoint import atomic_write_json, latest_round, round_prefix
from clicooper.parties.base import Party, ProtocolError
from clicooper.provenance import (
    Certificate,
    ChainVerdict,
    Identity,
    PublicIdentity,
    RegisteredTrainer,
    SignedRecord,
    TranscriptAttestation,
    WatermarkSpec,
    issue_certificate,
    save_certificate,
    verify_chain,
)
from clicooper.provenance.records import prev_link_slots
from clicooper.transport.base import Transport
from clicooper.transport.messages import Message, Nonce, Register, RoundOpen, RoundOpened, StageSealed

STATE_FILE = "state.json"
IDENTITY_FILE = "identity.pem"


class Verifier(Party):
    def __init__(
        self,
        *,
        job_id: str,
        transport: Transport,
        trainers: list[str],
        spec: WatermarkSpec,
        identity: Identity,
        state_dir: Path | None = None,
        data_owner: str = "data_owner",
        name: str = "verifier",
    ) -> None:
        super().__init__(name, job_id, transport)
        self.trainers, self.spec, self.identity, self.state_dir = trainers, spec, identity, state_dir
        self.position_of = {t: i + 1 for i, t in enumerate(trainers)}
        self.registry: dict[str, RegisteredTrainer] = {}
        self.nonces: dict[int, bytes] = {}
        self.records: dict[tuple[int, int], SignedRecord] = {}
        self.attestations: list[TranscriptAttestation] = []
        self._allowed = {Register: tuple(trainers), RoundOpen: (data_owner,), StageSealed: tuple(trainers)}
        self.data_owner = data_owner
        transport.register(name, self.handle)
        if state_dir is not None:
            identity.save(state_dir / IDENTITY_FILE)

    def handle(self, msg: Message) -> None:
        self.check_incoming(msg, self._allowed)
        if isinstance(msg, Register):
            self._on_register(msg)
        elif isinstance(msg, RoundOpen):
            self._on_round_open(msg)
        elif isinstance(msg, StageSealed):
            self._on_stage_sealed(msg)
        self.save()

    def _on_register(self, msg: Register) -> None:
        sender = msg.header.sender
        if self.nonces:
            raise ProtocolError(f"{self.name}: {sender} tried to register after training started")
        if msg.position != self.position_of[sender]:
            raise ProtocolError(
                f"{self.name}: {sender} claims position {msg.position}, expected {self.position_of[sender]}"
            )
        try:
            entry = RegisteredTrainer(
                identity=PublicIdentity.from_key(sender, bytes.fromhex(msg.public_key)),
                position=msg.position,
                wm_key=bytes.fromhex(msg.wm_key),
            )
        except (ValueError, ValidationError) as e:
            raise ProtocolError(f"{self.name}: bad registration from {sender}: {e}") from None
        if len(entry.wm_key) < 16:
            raise ProtocolError(f"{self.name}: {sender}'s watermark key is shorter than 16 bytes")
        if any(r.position == entry.position for r in self.registry.values()):
            raise ProtocolError(f"{self.name}: position {entry.position} is already registered")
        self.registry[entry.fingerprint] = entry

    def _on_round_open(self, msg: RoundOpen) -> None:
        rnd = msg.header.round
        if len(self.registry) != len(self.trainers):
            raise ProtocolError(f"{self.name}: round {rnd} opened before every trainer registered")
        if rnd in self.nonces or (rnd > 0 and rnd - 1 not in self.nonces):
            raise ProtocolError(
                f"{self.name}: round {rnd} cannot be opened now (open: {sorted(self.nonces)})"
            )
        self.nonces[rnd] = secrets.token_bytes(16)
        for t in self.trainers:
            pos = self.position_of[t]
            links = []
            for slot in prev_link_slots(pos, rnd):
                if slot not in self.records:
                    raise ProtocolError(f"{self.name}: stage {slot} (position, round) has no record yet")
                links.append(self.records[slot].digest)
            self.send(Nonce, t, rnd, 0, nonce=self.nonces[rnd].hex(), links=json.dumps(links))
        self.send(RoundOpened, msg.header.sender, rnd, 0)

    def _on_stage_sealed(self, msg: StageSealed) -> None:
        sender, rnd = msg.header.sender, msg.header.round
        try:
            signed = SignedRecord.from_json(msg.record)
            atts = [TranscriptAttestation.model_validate(a) for a in json.loads(msg.attestations)]
        except (ValueError, ValidationError) as e:
            raise ProtocolError(f"{self.name}: malformed stage record from {sender}: {e}") from None
        slot = (signed.record.position, signed.record.round)
        if slot != (self.position_of[sender], rnd):
            raise ProtocolError(
                f"{self.name}: {sender} sent a record for stage {slot}, "
                f"expected ({self.position_of[sender]}, {rnd})"
            )
        if slot in self.records:
            raise ProtocolError(f"{self.name}: a record for stage {slot} was already received")
        self.records[slot] = signed
        self.attestations.extend(atts)

    # -- persistence ------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "trainers": self.trainers,
            "spec": self.spec.model_dump(mode="json"),
            "verifier_public_key": self.identity.public_key_bytes().hex(),
            "registry": [r.model_dump(mode="json") for r in self.registry.values()],
            "nonces": {str(k): v.hex() for k, v in self.nonces.items()},
            "records": [r.to_json() for r in self.records.values()],
            "attestations": [a.model_dump(mode="json") for a in self.attestations],
        }

    def save(self) -> None:
        if self.state_dir is not None:  # escrowed keys inside: private to the verifier
            atomic_write_json(self.state_dir / STATE_FILE, self.state_dict(), mode=0o600)

    def load_state_dict(self, st: dict) -> None:
        if st["job_id"] != self.job_id or st["trainers"] != self.trainers:
            raise ValueError(f"verifier state is for job {st['job_id']!r} with trainers {st['trainers']}")
        self.registry = {
            r.fingerprint: r for r in (RegisteredTrainer.model_validate(x) for x in st["registry"])
        }
        self.nonces = {int(k): bytes.fromhex(v) for k, v in st["nonces"].items()}
        recs = [SignedRecord.from_json(r) for r in st["records"]]
        self.records = {(r.record.position, r.record.round): r for r in recs}
        self.attestations = [TranscriptAttestation.model_validate(a) for a in st["attestations"]]

    def truncate(self, from_round: int) -> None:
        """Forget rounds >= from_round (a resumed job re-runs them under fresh nonces)."""
        self.nonces = {r: n for r, n in self.nonces.items() if r < from_round}
        self.records = {k: v for k, v in self.records.items() if k[1] < from_round}
        self.attestations = [a for a in self.attestations if a.round < from_round]
        self.save()


@dataclass
class JobEvidence:
    """What the verifier holds about a finished job, loaded from its folder."""

    job_id: str
    registry: dict[str, RegisteredTrainer]
    nonces: dict[int, bytes]
    records: list[SignedRecord]
    attestations: list[TranscriptAttestation]
    spec: WatermarkSpec
    n_positions: int


def load_evidence(verifier_dir: Path) -> JobEvidence:
    path = verifier_dir / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: was the job run with watermarking enabled?")
    st = json.loads(path.read_text())
    registry = {r.fingerprint: r for r in (RegisteredTrainer.model_validate(x) for x in st["registry"])}
    return JobEvidence(
        job_id=st["job_id"],
        registry=registry,
        nonces={int(k): bytes.fromhex(v) for k, v in st["nonces"].items()},
        records=[SignedRecord.from_json(r) for r in st["records"]],
        attestations=[TranscriptAttestation.model_validate(a) for a in st["attestations"]],
        spec=WatermarkSpec.model_validate(st["spec"]),
        n_positions=len(st["trainers"]),
    )


def delivered_segment(trainer_dir: Path) -> dict:
    """A trainer's delivered final segment: the weights of its newest checkpoint."""
    rnd = latest_round(trainer_dir)
    if rnd is None:
        raise FileNotFoundError(f"no delivered segment in {trainer_dir}")
    tensors = load_file(str(round_prefix(trainer_dir, rnd).with_suffix(".safetensors")))
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def verify_run(run_dir: Path, *, issue: bool = True) -> tuple[ChainVerdict, Certificate | None]:
    """Verify a finished job from its run folder; on success issue and save a signed certificate."""
    vdir = run_dir / "verifier"
    ev = load_evidence(vdir)
    segments = {}
    for i in range(1, ev.n_positions + 1):
        tdir = run_dir / f"trainer_{i}"
        if tdir.exists() and latest_round(tdir) is not None:
            segments[i] = delivered_segment(tdir)
    verdict = verify_chain(
        ev.job_id,
        ev.records,
        registry=ev.registry,
        nonces=ev.nonces,
        final_segments=segments,
        attestations=ev.attestations,
        n_positions=ev.n_positions,
        n_rounds=len(ev.nonces),
        wm_spec=ev.spec,
    )
    atomic_write_json(vdir / "verdict.json", json.loads(verdict.model_dump_json()))
    cert = None
    if issue and verdict.ok:
        identity = Identity.load(vdir / IDENTITY_FILE, name="verifier")
        cert = issue_certificate(identity, verdict, ev.registry)
        save_certificate(vdir / "certificate.json", cert)
    return verdict, cert
