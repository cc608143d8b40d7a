"""The verifier: a neutral party that registers trainers, issues round nonces, collects
signed stage records, and afterwards verifies the job and certifies provenance,
work and ownership. It never sees data, labels or activations.

Its state (roster, registry with escrowed watermark keys, nonces, records, attestations,
planned rounds) is a signed append-only log (provenance/statelog.py), written atomically to
its own folder after every change, so `verify_run` can check a finished job from the run
folder alone and notice when anyone without the verifier's key has rewritten it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import ValidationError

from clicooper.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    latest_round,
    load_state,
    round_prefix,
)
from clicooper.parties.base import Party, ProtocolError
from clicooper.provenance import (
    Certificate,
    ChainVerdict,
    Finding,
    Identity,
    PublicIdentity,
    RegisteredTrainer,
    SignedRecord,
    TranscriptAttestation,
    WatermarkSpec,
    issue_certificate,
    load_certificate,
    save_certificate,
    verify_chain,
)
from clicooper.provenance.chain import attestation_fault
from clicooper.provenance.records import prev_link_slots, verify_record
from clicooper.provenance.statelog import LogError, StateLog, check_nonce, read_log, signed_nonce
from clicooper.transport.base import Transport
from clicooper.transport.messages import (
    FinalSegment,
    Message,
    Nonce,
    Register,
    Rewind,
    RoundOpen,
    RoundOpened,
    StageSealed,
)

LOG_FILE = "state.log"
IDENTITY_FILE = "identity.pem"
CERTIFICATE_FILE = "certificate.json"
SEGMENTS_DIR = "segments"  # final segments delivered by message: <trainer>.safetensors + .json
SEQ_FILE = "seq.json"


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
        rounds: int = 0,
        expected_keys: dict[str, bytes] | None = None,
    ) -> None:
        super().__init__(name, job_id, transport)
        # The job manifest's public keys: a registration under any other key is refused.
        self.expected_keys = dict(expected_keys) if expected_keys is not None else None
        self.trainers, self.spec, self.identity, self.state_dir = trainers, spec, identity, state_dir
        self.position_of = {t: i + 1 for i, t in enumerate(trainers)}
        self.registry: dict[str, RegisteredTrainer] = {}
        self.nonces: dict[int, bytes] = {}
        self.records: dict[tuple[int, int], SignedRecord] = {}
        self.attestations: list[TranscriptAttestation] = []
        self.rounds = rounds
        self._new_plan: int | None = None  # a resumed job's new number of rounds, not yet logged
        self._allowed = {
            Register: tuple(trainers),
            RoundOpen: (data_owner,),
            StageSealed: tuple(trainers),
            FinalSegment: tuple(trainers),
            Rewind: (data_owner,),
        }
        self.data_owner = data_owner
        self.start_incarnation(state_dir)
        if state_dir is not None and (state_dir / SEQ_FILE).is_file():
            try:
                self.load_seq_state(json.loads((state_dir / SEQ_FILE).read_text()))
            except (OSError, ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{state_dir / SEQ_FILE} is unreadable: {e}") from None
        transport.register(name, self.handle)
        log_path = state_dir / LOG_FILE if state_dir is not None else None
        if log_path is not None and log_path.exists():  # a resumed job: continue the signed log
            self.log = StateLog(identity, read_log(log_path, identity.public_key_bytes()))
            self._replay()
            # A changed plan (more epochs) is logged when the next round opens, not here: a resume
            # that fails before training (a damaged checkpoint elsewhere) must leave the log as it was.
            self._new_plan = rounds if rounds and rounds != self.rounds else None
        else:
            self.log = StateLog(identity)
            self.log.append(
                "genesis",
                {
                    "job_id": job_id,
                    "trainers": list(trainers),
                    "spec": spec.model_dump(mode="json"),
                    "rounds": rounds,
                    "verifier_public_key": identity.public_key_bytes().hex(),
                },
            )
        if state_dir is not None:
            identity.save(state_dir / IDENTITY_FILE)
        self.save()

    def _replay(self) -> None:
        ev = evidence_from_log(self.log.entries)
        if ev.job_id != self.job_id or ev.trainers != self.trainers:
            raise ValueError(f"verifier log is for job {ev.job_id!r} with trainers {ev.trainers}")
        self.registry, self.nonces, self.rounds = dict(ev.registry), dict(ev.nonces), ev.rounds
        self.records = {(r.record.position, r.record.round): r for r in ev.records}
        self.attestations = list(ev.attestations)

    def handle(self, msg: Message) -> None:
        self.check_incoming(msg, self._allowed)
        if isinstance(msg, Register):
            self._on_register(msg)
        elif isinstance(msg, RoundOpen):
            self._on_round_open(msg)
        elif isinstance(msg, StageSealed):
            self._on_stage_sealed(msg)
        elif isinstance(msg, FinalSegment):
            self._on_final_segment(msg)
        elif isinstance(msg, Rewind):
            self.truncate(msg.header.round)
        self.save()

    def _on_register(self, msg: Register) -> None:
        sender = msg.header.sender
        try:
            entry = RegisteredTrainer(
                identity=PublicIdentity.from_key(sender, bytes.fromhex(msg.public_key)),
                position=msg.position,
                wm_key=bytes.fromhex(msg.wm_key),
            )
        except (ValueError, ValidationError) as e:
            raise ProtocolError(f"{self.name}: bad registration from {sender}: {e}") from None
        if self.expected_keys is not None and self.expected_keys.get(sender) != entry.identity.public_key:
            raise ProtocolError(
                f"{self.name}: {sender} registered a public key that is not the one in the job manifest"
            )
        if self.registry.get(entry.fingerprint) == entry:
            return  # a resumed trainer re-announcing the registration already in the log
        if self.nonces:
            raise ProtocolError(f"{self.name}: {sender} tried to register after training started")
        if msg.position != self.position_of[sender]:
            raise ProtocolError(
                f"{self.name}: {sender} claims position {msg.position}, expected {self.position_of[sender]}"
            )
        if len(entry.wm_key) < 16:
            raise ProtocolError(f"{self.name}: {sender}'s watermark key is shorter than 16 bytes")
        if any(r.position == entry.position for r in self.registry.values()):
            raise ProtocolError(f"{self.name}: position {entry.position} is already registered")
        self.registry[entry.fingerprint] = entry
        self.log.append("register", entry.model_dump(mode="json"))

    def _on_round_open(self, msg: RoundOpen) -> None:
        rnd = msg.header.round
        if len(self.registry) != len(self.trainers):
            raise ProtocolError(f"{self.name}: round {rnd} opened before every trainer registered")
        if rnd in self.nonces or (rnd > 0 and rnd - 1 not in self.nonces):
            raise ProtocolError(
                f"{self.name}: round {rnd} cannot be opened now (open: {sorted(self.nonces)})"
            )
        links: dict[str, list[str]] = {}  # every trainer's links first: a refused round logs nothing
        for t in self.trainers:
            links[t] = []
            for slot in prev_link_slots(self.position_of[t], rnd):
                if slot not in self.records:
                    raise ProtocolError(f"{self.name}: stage {slot} (position, round) has no record yet")
                links[t].append(self.records[slot].digest)
        rounds = max(rnd + 1, self._new_plan or self.rounds)
        if rounds != self.rounds:
            self.rounds = rounds
            self.log.append("plan", {"rounds": self.rounds})
        self._new_plan = None
        body = signed_nonce(self.identity, self.job_id, rnd)
        self.nonces[rnd] = bytes.fromhex(body["nonce"])
        self.log.append("nonce", body)
        for t in self.trainers:
            self.send(Nonce, t, rnd, 0, nonce=self.nonces[rnd].hex(), links=json.dumps(links[t]))
        self.send(RoundOpened, msg.header.sender, rnd, 0)

    def _on_stage_sealed(self, msg: StageSealed) -> None:
        sender, rnd = msg.header.sender, msg.header.round
        try:
            signed = SignedRecord.from_json(msg.record)
            raw_atts = json.loads(msg.attestations)
            atts = [TranscriptAttestation.model_validate(a) for a in raw_atts]
        except (ValueError, ValidationError, RecursionError, TypeError) as e:
            raise ProtocolError(f"{self.name}: malformed stage record from {sender}: {e}") from None
        slot = (signed.record.position, signed.record.round)
        if slot != (self.position_of[sender], rnd):
            raise ProtocolError(
                f"{self.name}: {sender} sent a record for stage {slot}, "
                f"expected ({self.position_of[sender]}, {rnd})"
            )
        if slot in self.records:
            raise ProtocolError(f"{self.name}: a record for stage {slot} was already received")
        reg = self.registry.get(signed.record.trainer)
        if reg is None or reg.identity.name != sender or not verify_record(signed, reg.identity.public_key):
            raise ProtocolError(
                f"{self.name}: the stage record from {sender} is not signed by {sender}'s registered key"
            )
        self._check_attestations(sender, rnd, reg, atts)
        self.records[slot] = signed
        self.attestations.extend(atts)
        self.log.append(
            "record", {"record": signed.to_json(), "attestations": [a.model_dump(mode="json") for a in atts]}
        )

    def _check_attestations(
        self, sender: str, rnd: int, reg: RegisteredTrainer, atts: list[TranscriptAttestation]
    ) -> None:
        """A trainer vouches only for its own links, this round, once per neighbour, under its own key:
        anything else in its StageSealed (an attestation in a neighbour's name, for a later round)
        would be logged and later count against the position it names."""
        pos = self.position_of[sender]
        neighbours = {p for p in (pos - 1, pos + 1) if 1 <= p <= len(self.trainers)}
        targets = [a.to_position for a in atts]
        for a in atts:
            if a.round != rnd or a.from_position != pos or a.to_position not in neighbours:
                fault = f"round {a.round}, position {a.from_position} -> {a.to_position}"
            else:
                fault = attestation_fault(a, reg, self.job_id, rnd + 1)
            if fault is not None:
                raise ProtocolError(
                    f"{self.name}: {sender} (position {pos}) sent an attestation it cannot make: {fault}"
                )
        if len(set(targets)) != len(targets):
            raise ProtocolError(f"{self.name}: {sender} attested a link twice in round {rnd}")

    def _on_final_segment(self, msg: FinalSegment) -> None:
        """Keep a trainer's delivered segment if it is the one its signed record for that round names."""
        from safetensors.torch import load as load_safetensors

        from clicooper.provenance.records import segment_digest

        sender, rnd = msg.header.sender, msg.header.round
        signed = self.records.get((self.position_of[sender], rnd))
        if signed is None:
            raise ProtocolError(f"{self.name}: {sender} delivered a round-{rnd} segment without its record")
        blob = msg.weights.numpy().tobytes() if msg.weights.dtype == torch.uint8 else b""
        try:
            weights = load_safetensors(blob)
            digest = segment_digest(weights)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own (Rust) error types
            raise ProtocolError(f"{self.name}: {sender}'s segment is not a safetensors file: {e}") from None
        if digest != signed.record.segment_sha256:
            raise ProtocolError(
                f"{self.name}: {sender}'s delivered segment is not the one its round-{rnd} record signs"
            )
        if self.state_dir is not None:
            d = self.state_dir / SEGMENTS_DIR
            atomic_write_bytes(d / f"{sender}.safetensors", blob)
            atomic_write_json(d / f"{sender}.json", {"round": rnd, "position": self.position_of[sender]})

    # -- persistence ------------------------------------------------------
    def save(self) -> None:
        if self.state_dir is not None:
            self.log.save(self.state_dir / LOG_FILE)
            atomic_write_json(self.state_dir / SEQ_FILE, self.seq_state())

    def truncate(self, from_round: int) -> None:
        """Forget rounds >= from_round (a resumed job re-runs them under fresh nonces); logged, signed."""
        if any(r >= from_round for r in self.nonces):
            self.nonces = {r: n for r, n in self.nonces.items() if r < from_round}
            self.records = {k: v for k, v in self.records.items() if k[1] < from_round}
            self.attestations = [a for a in self.attestations if a.round < from_round]
            self.log.append("rewind", {"from_round": from_round})
        self.save()


@dataclass
class JobEvidence:
    """What the verifier holds about a job, replayed from its signed log."""

    job_id: str
    registry: dict[str, RegisteredTrainer]
    nonces: dict[int, bytes]
    records: list[SignedRecord]
    attestations: list[TranscriptAttestation]
    spec: WatermarkSpec
    n_positions: int
    trainers: list[str] = field(default_factory=list)
    rounds: int = 0
    verifier_public_key: bytes = b""


class EvidenceError(ValueError):
    """The verifier's evidence is missing or does not verify; the message says why."""


def evidence_from_log(entries: list[dict]) -> JobEvidence:
    """Replay a checked log (see `read_log`) into the verifier's state."""
    try:
        g = entries[0]["body"]
        key = bytes.fromhex(g["verifier_public_key"])
        ev = JobEvidence(
            job_id=str(g["job_id"]),
            registry={},
            nonces={},
            records=[],
            attestations=[],
            spec=WatermarkSpec.model_validate(g["spec"]),
            n_positions=len(g["trainers"]),
            trainers=[str(t) for t in g["trainers"]],
            rounds=int(g["rounds"]),
            verifier_public_key=key,
        )
        for i, e in enumerate(entries[1:], start=1):
            body, kind = e["body"], e["type"]
            if kind == "register":
                if ev.nonces:
                    raise EvidenceError(f"verifier log entry {i}: a registration after training started")
                reg = RegisteredTrainer.model_validate(body)
                ev.registry[reg.fingerprint] = reg
            elif kind == "nonce":
                if not check_nonce(key, ev.job_id, body):
                    raise EvidenceError(f"verifier log entry {i}: the round nonce is not the verifier's")
                ev.nonces[int(body["round"])] = bytes.fromhex(body["nonce"])
            elif kind == "record":
                ev.records.append(SignedRecord.from_json(body["record"]))
                ev.attestations.extend(TranscriptAttestation.model_validate(a) for a in body["attestations"])
            elif kind == "plan":
                ev.rounds = int(body["rounds"])
            elif kind == "rewind":
                r = int(body["from_round"])
                ev.nonces = {k: v for k, v in ev.nonces.items() if k < r}
                ev.records = [x for x in ev.records if x.record.round < r]
                ev.attestations = [a for a in ev.attestations if a.round < r]
    except EvidenceError:
        raise
    except (KeyError, TypeError, ValueError, ValidationError, IndexError, RecursionError) as e:
        raise EvidenceError(f"the verifier log holds a malformed entry: {type(e).__name__}: {e}") from None
    return ev


def load_evidence(verifier_dir: Path, public_key: bytes | None = None) -> JobEvidence:
    """Read and check the verifier's signed log; the key defaults to the one in the verifier's folder.

    Raises EvidenceError (missing, unreadable or altered log, or a verifier key that did not sign it)."""
    if public_key is None:
        try:
            public_key = Identity.load(verifier_dir / IDENTITY_FILE, name="verifier").public_key_bytes()
        except FileNotFoundError:
            raise EvidenceError(
                f"{verifier_dir / IDENTITY_FILE} not found: was the job run with watermarking enabled?"
            ) from None
        except (OSError, ValueError) as e:
            raise EvidenceError(f"the verifier key cannot be read: {e}") from None
    try:
        return evidence_from_log(read_log(verifier_dir / LOG_FILE, public_key))
    except LogError as e:
        raise EvidenceError(str(e)) from None


def delivered_segment(trainer_dir: Path) -> dict:
    """A trainer's final segment from its own folder (runs made before segments were delivered by
    message): the weights of its newest intact checkpoint."""
    rnd = latest_round(trainer_dir)
    if rnd is None:
        raise FileNotFoundError(f"no delivered segment in {trainer_dir}")
    tensors, _ = load_state(round_prefix(trainer_dir, rnd), verify=False)  # the signed digest decides
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def _load_delivered(path: Path) -> dict:
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        raise ValueError(f"{path} is not a safetensors file: {e}") from None


def _rejected(job_id: str, reason: str) -> ChainVerdict:
    return ChainVerdict(
        job_id=job_id,
        n_positions=0,
        n_rounds=0,
        ok=False,
        findings=[Finding(position=None, round=None, ok=False, reason=reason)],
    )


def _save_certificate_once(vdir: Path, cert: Certificate) -> Path:
    """Write the certificate; an existing one is never overwritten by a different one: an equal one
    (same content but for issue time and signature) is kept, a different one is kept beside."""
    path = vdir / CERTIFICATE_FILE
    if path.exists():
        try:
            old = load_certificate(path)
            same = old.model_dump(exclude={"issued_at", "signature"}) == cert.model_dump(
                exclude={"issued_at", "signature"}
            )
        except (OSError, ValueError):
            same = False
        if same:
            return path
        n = 2
        while (vdir / f"certificate-{n}.json").exists():
            n += 1
        path = vdir / f"certificate-{n}.json"
    save_certificate(path, cert)
    return path


def _retire_certificate(vdir: Path) -> None:
    """A rejected run keeps no current certificate: an earlier one is renamed (kept as evidence)."""
    path = vdir / CERTIFICATE_FILE
    if path.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        path.rename(vdir / f"certificate.superseded-{stamp}.json")


def verify_run(
    run_dir: Path, *, issue: bool = True, public_key: bytes | None = None
) -> tuple[ChainVerdict, Certificate | None]:
    """Verify a job from its run folder; on success issue and save a signed certificate.

    The verifier's signed log is checked first (against `public_key`, or the key in the verifier's
    folder); an altered, truncated or re-signed log, a missing trainer or round, or a checkpoint
    that does not load is a REJECTED verdict with the reason, never an exception."""
    vdir = run_dir / "verifier"
    if not vdir.is_dir():
        raise FileNotFoundError(f"{vdir} not found: was the job run with watermarking enabled?")
    try:
        ev = load_evidence(vdir, public_key)
    except EvidenceError as e:
        verdict = _rejected(run_dir.name, str(e))
    else:
        verdict = _verify_evidence(run_dir, ev)
    if vdir.is_dir():
        atomic_write_json(vdir / "verdict.json", json.loads(verdict.model_dump_json()))
    cert = None
    if verdict.ok and issue:
        identity = Identity.load(vdir / IDENTITY_FILE, name="verifier")
        cert = issue_certificate(identity, verdict, ev.registry)
        _save_certificate_once(vdir, cert)
    elif not verdict.ok:
        _retire_certificate(vdir)
    return verdict, cert


def _verify_evidence(run_dir: Path, ev: JobEvidence) -> ChainVerdict:
    pre: list[Finding] = []
    segments = {}
    sdir = run_dir / "verifier" / SEGMENTS_DIR
    for i, name in enumerate(ev.trainers, start=1):
        tdir = run_dir / name
        try:
            if sdir.is_dir():  # delivered to the verifier by message: the only source then
                if (sdir / f"{name}.safetensors").is_file():
                    segments[i] = _load_delivered(sdir / f"{name}.safetensors")
            elif tdir.exists() and latest_round(tdir) is not None:
                segments[i] = delivered_segment(tdir)
        except (CheckpointError, OSError, ValueError) as e:
            pre.append(Finding(position=i, round=None, ok=False, reason=f"delivered segment unreadable: {e}"))
    if sorted(ev.nonces) != list(range(ev.rounds)):
        pre.append(
            Finding(
                position=None,
                round=None,
                ok=False,
                reason=f"the signed log plans {ev.rounds} round(s) but holds nonces for "
                f"{sorted(ev.nonces)} (rounds removed or job unfinished)",
            )
        )
    verdict = verify_chain(
        ev.job_id,
        ev.records,
        registry=ev.registry,
        nonces=ev.nonces,
        final_segments=segments,
        attestations=ev.attestations,
        n_positions=ev.n_positions,
        n_rounds=ev.rounds,
        wm_spec=ev.spec,
    )
    if pre:
        verdict = verdict.model_copy(update={"ok": False, "findings": [*pre, *verdict.findings]})
    return verdict
