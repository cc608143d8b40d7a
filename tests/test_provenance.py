"""Provenance: watermark embedding/detection, signed record lattice, chain verification, certificates.

A tiny 2-position x 2-round split-learning job is run entirely in this file (two nn.Linear
segments trained through a real relay with transcripts), then tampered with in every way the
threat model lists; each tampering must be rejected with the stage and reason named.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom
from torch import nn

from clicooper.provenance import (
    Certificate,
    ChainVerdict,
    Identity,
    PublicIdentity,
    RegisteredTrainer,
    SignedRecord,
    TranscriptAttestation,
    TranscriptHasher,
    WatermarkEmbedder,
    WatermarkSpec,
    attest_transcript,
    build_stage_record,
    derive_watermark_bits,
    detect,
    detection_threshold,
    final_claims,
    issue_certificate,
    link_direction,
    load_certificate,
    load_records,
    ownership_query,
    prev_link_slots,
    projection_matrix,
    save_certificate,
    save_records,
    segment_digest,
    sign_record,
    verify_certificate,
    verify_chain,
    verify_record,
    verify_segment_watermark,
    verify_signature,
)
from clicooper.provenance.watermark import completion_delta, new_watermark_key

SPEC = WatermarkSpec(n_bits=128, strength=0.2, fp_bound=1e-6)
N_POS, N_ROUNDS, STEPS = 2, 2, 120


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- a tiny real job


@dataclass
class Job:
    job_id: str
    identities: dict[int, Identity]
    wm_keys: dict[int, bytes]
    registry: dict[str, RegisteredTrainer]
    nonces: dict[int, bytes]
    records: list[SignedRecord]
    attestations: list[TranscriptAttestation]
    finals: dict[int, dict[str, torch.Tensor]]
    verifier: Identity = field(default_factory=lambda: Identity.from_seed("verifier", b"v" * 32))

    def record(self, position: int, rnd: int) -> SignedRecord:
        return next(r for r in self.records if (r.record.position, r.record.round) == (position, rnd))

    def verify(self, **overrides: object) -> ChainVerdict:
        args: dict[str, object] = dict(
            registry=self.registry,
            nonces=self.nonces,
            final_segments=self.finals,
            attestations=self.attestations,
            n_positions=N_POS,
            n_rounds=N_ROUNDS,
            wm_spec=SPEC,
        )
        args.update(overrides)
        records = args.pop("records", self.records)
        return verify_chain(self.job_id, records, **args)  # type: ignore[arg-type]


def run_job(job_id: str, seed: int = 0) -> Job:
    """Train seg1 -> seg2 on a toy task through a relay; every trainer embeds its round's mark."""
    identities = {p: Identity.from_seed(f"trainer{p}", bytes([p]) * 32) for p in (1, 2)}
    wm_keys = {p: hashlib.sha256(b"wm" + bytes([p])).digest() for p in (1, 2)}
    registry = {
        identities[p].fingerprint(): RegisteredTrainer(
            identity=identities[p].public(), position=p, wm_key=wm_keys[p]
        )
        for p in (1, 2)
    }
    nonces = {r: hashlib.sha256(f"{job_id}/nonce/{r}".encode()).digest()[:16] for r in range(N_ROUNDS)}
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    segs = {
        1: nn.Sequential(nn.Linear(16, 32), nn.Tanh()),
        2: nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 4)),
    }
    opts = {p: torch.optim.SGD(segs[p].parameters(), lr=0.05, momentum=0.9) for p in (1, 2)}
    data = torch.randn(256, 16, generator=g)
    labels = (data[:, 0] > 0).long() + 2 * (data[:, 1] > 0).long()
    records: list[SignedRecord] = []
    attestations: list[TranscriptAttestation] = []
    sealed: dict[tuple[int, int], str] = {}
    for r in range(N_ROUNDS):
        prev = {p: [sealed[s] for s in prev_link_slots(p, r)] for p in (1, 2)}
        emb = {
            p: WatermarkEmbedder.for_round(
                SPEC,
                wm_keys[p],
                nonce=nonces[r],
                identity_fp=identities[p].fingerprint(),
                prev_digests=prev[p],
                segment=segs[p],
            )
            for p in (1, 2)
        }
        links = {(1, "prev"): TranscriptHasher(), (1, "next"): TranscriptHasher()}
        links |= {(2, "prev"): TranscriptHasher(), (2, "next"): TranscriptHasher()}
        for step in range(STEPS):
            idx = torch.randint(0, 256, (16,), generator=g)
            x, y = data[idx], labels[idx]
            links[(1, "prev")].update_tensor(link_direction("prev", "in"), r, step, x)
            a1 = segs[1](x)
            links[(1, "next")].update_tensor(link_direction("next", "out"), r, step, a1)
            a1_in = a1.detach().requires_grad_(True)
            links[(2, "prev")].update_tensor(link_direction("prev", "in"), r, step, a1_in)
            loss2 = F.cross_entropy(segs[2](a1_in), y) + emb[2].regulariser(segs[2])
            opts[2].zero_grad()
            loss2.backward()
            opts[2].step()
            links[(2, "prev")].update_tensor(link_direction("prev", "out"), r, step, a1_in.grad)
            links[(1, "next")].update_tensor(link_direction("next", "in"), r, step, a1_in.grad)
            opts[1].zero_grad()
            torch.autograd.backward([a1, emb[1].regulariser(segs[1])], [a1_in.grad, None])
            opts[1].step()
        for p in (1, 2):
            rec = build_stage_record(
                job_id=job_id,
                rnd=r,
                position=p,
                identity=identities[p],
                wm_key=wm_keys[p],
                nonce=nonces[r],
                bits=emb[p].bits,
                state_dict=segs[p].state_dict(),
                steps=STEPS,
                samples=16 * STEPS,
                transcripts={"prev": links[(p, "prev")].digest(), "next": links[(p, "next")].digest()},
                prev_record_digests=prev[p],
            )
            signed = sign_record(identities[p], rec)
            records.append(signed)
            sealed[(p, r)] = signed.digest
        link = links[(1, "next")].digest()
        attestations += [
            attest_transcript(identities[2], job_id, r, 2, 1, link),
            attest_transcript(identities[1], job_id, r, 1, 2, link),
        ]
    finals = {p: {k: v.clone() for k, v in segs[p].state_dict().items()} for p in (1, 2)}
    return Job(job_id, identities, wm_keys, registry, nonces, records, attestations, finals)


@pytest.fixture(scope="module")
def job() -> Job:
    return run_job("job-A")


def resign(
    job: Job, position: int, rnd: int, identity: Identity | None = None, /, **changes: object
) -> list[SignedRecord]:
    """The job's records with one stage's record changed and re-signed (by its trainer by default)."""
    old = job.record(position, rnd)
    new = sign_record(identity or job.identities[position], old.record.model_copy(update=changes))
    return [new if r is old else r for r in job.records]


def rejected(verdict: ChainVerdict, position: int | None, rnd: int | None, fragment: str) -> bool:
    return any(
        not f.ok and f.position == position and f.round == rnd and fragment in f.reason
        for f in verdict.findings
    )


# ---------------------------------------------------------------- chain verification


def test_honest_chain_verifies(job: Job) -> None:
    v = job.verify()
    assert v.ok, v.summary()
    assert len(v.accepted_records) == N_POS * N_ROUNDS
    assert all(m.bit_errors == 0 and m.matched for m in v.final_watermarks.values())
    assert all(
        r.record.transcripts["next"] == job.record(2, r.record.round).record.transcripts["prev"]
        for r in job.records
        if r.record.position == 1
    )


def test_changed_weight_rejected(job: Job) -> None:
    finals = {p: dict(sd) for p, sd in job.finals.items()}
    w = finals[2]["2.weight"].clone()
    w[0, 0] += 1e-4
    finals[2]["2.weight"] = w
    v = job.verify(final_segments=finals)
    assert not v.ok
    assert rejected(v, 2, 1, "differ from the signed digest")
    assert not rejected(v, 1, 1, "differ from the signed digest")


def test_swapped_stages_rejected(job: Job) -> None:
    """Trainers 1 and 2 present their round-1 stages in each other's positions."""
    other = {1: 2, 2: 1}
    records = [
        sign_record(
            job.identities[r.record.position],
            r.record.model_copy(update={"position": other[r.record.position]}),
        )
        if r.record.round == 1
        else r
        for r in job.records
    ]
    v = job.verify(records=records)
    assert not v.ok
    assert rejected(v, 2, 1, "registered at position 1")
    assert rejected(v, 1, 1, "registered at position 2")
    swapped = job.verify(final_segments={1: job.finals[2], 2: job.finals[1]})
    assert rejected(swapped, 1, 1, "differ from the signed digest")
    assert rejected(swapped, 2, 1, "differ from the signed digest")


def test_swapped_links_rejected(job: Job) -> None:
    """Position 2 lists its links in the wrong order: hash links and the derived mark both break."""
    links = job.record(2, 1).record.prev_record_digests
    v = job.verify(records=resign(job, 2, 1, prev_record_digests=tuple(reversed(links))))
    assert rejected(v, 2, 1, "hash links do not point")
    assert rejected(v, 2, 1, "watermark commitment")


def test_record_from_another_job_rejected(job: Job) -> None:
    other = run_job("job-B", seed=1)
    records = [
        other.record(1, 0) if (r.record.position, r.record.round) == (1, 0) else r for r in job.records
    ]
    v = job.verify(records=records)
    assert rejected(v, 1, 0, "replayed from another job")
    assert rejected(v, 1, 0, "stage missing")


def test_record_from_another_round_rejected(job: Job) -> None:
    # the round-0 record resubmitted for round 1: the slot for round 1 is empty
    replayed = [job.record(1, 0) if (r.record.position, r.record.round) == (1, 1) else r for r in job.records]
    v = job.verify(records=replayed)
    assert rejected(v, 1, 1, "stage missing")
    # the trainer re-labels its round-0 stage as round 1 (old nonce, old mark)
    v = job.verify(records=resign(job, 1, 1, nonce=job.record(1, 0).record.nonce))
    assert rejected(v, 1, 1, "replayed from another round")


def test_dropped_stage_rejected(job: Job) -> None:
    v = job.verify(records=[r for r in job.records if (r.record.position, r.record.round) != (1, 0)])
    assert rejected(v, 1, 0, "stage missing")
    assert rejected(v, 1, 1, "cannot check hash links")  # its successors lose their anchor
    assert rejected(v, 2, 1, "cannot check hash links")


def test_duplicate_conflicting_records_rejected(job: Job) -> None:
    extra = resign(job, 2, 0, steps=STEPS + 1)
    v = job.verify(records=[*job.records, next(r for r in extra if r not in job.records)])
    assert rejected(v, 2, 0, "conflicting records")
    assert job.verify(records=[*job.records, job.record(2, 0)]).ok  # an identical copy is harmless


def test_forged_records_rejected(job: Job) -> None:
    mallory = Identity.from_seed("mallory", b"m" * 32)
    forged = resign(job, 2, 1, mallory, trainer=mallory.fingerprint())
    assert rejected(job.verify(records=forged), 2, 1, "unregistered identity")
    # a record naming the honest trainer but signed by someone else
    old = job.record(2, 1)
    fake = SignedRecord(record=old.record, signature=mallory.sign(b"anything").hex())
    v = job.verify(records=[fake if r is old else r for r in job.records])
    assert rejected(v, 2, 1, "invalid signature")
    # a correctly signed record with a fabricated watermark commitment
    v = job.verify(records=resign(job, 1, 1, watermark_commitment="ab" * 32))
    assert rejected(v, 1, 1, "watermark commitment")


def test_unwatermarked_final_segment_rejected(job: Job) -> None:
    """A trainer that delivers (and signs) weights without its mark is caught by detection."""
    torch.manual_seed(5)
    plain = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 4)).state_dict()
    records = resign(job, 2, 1, segment_sha256=segment_digest(plain))
    v = job.verify(records=records, final_segments={**job.finals, 2: plain})
    assert rejected(v, 2, 1, "final watermark NOT detected")


def test_transcript_mismatch_rejected(job: Job) -> None:
    bad = dict(job.record(2, 1).record.transcripts, prev="00" * 32)
    v = job.verify(records=resign(job, 2, 1, transcripts=bad))
    assert rejected(v, 1, 1, "transcript digest for the link to position 2 disagrees")
    assert rejected(v, 2, 1, "counter-signed a different transcript digest")


def test_attestations_required_and_checked(job: Job) -> None:
    missing = [a for a in job.attestations if not (a.round == 0 and a.from_position == 2)]
    assert rejected(job.verify(attestations=missing), 1, 0, "no counter-signature from position 2")
    forged = job.attestations[0].model_copy(update={"digest": "11" * 32})
    assert rejected(
        job.verify(attestations=[forged, *job.attestations[1:]]), 2, 0, "invalid attestation signature"
    )
    assert job.verify(attestations=None).ok


def test_steps_claim_must_agree_with_neighbour(job: Job) -> None:
    v = job.verify(records=resign(job, 2, 1, steps=10 * STEPS, samples=160 * STEPS))
    assert rejected(v, 1, 1, "position 2 claims")


# ---------------------------------------------------------------- ownership and certificate


def test_ownership_query(job: Job) -> None:
    claims = final_claims(job.records, job.registry, job.nonces, SPEC)
    matches = ownership_query(job.finals[2], job.registry, claims, SPEC)
    assert matches[0].matched and matches[0].position == 2 and matches[0].verdict.p_value < 1e-20
    assert not matches[1].matched  # trainer 1's key does not fit a segment it did not train
    torch.manual_seed(9)
    unrelated = ownership_query(
        nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 4)), job.registry, claims, SPEC
    )
    assert not any(m.matched for m in unrelated)


def test_certificate_round_trip_and_tamper(job: Job, tmp_path) -> None:
    cert = issue_certificate(job.verifier, job.verify(), job.registry, issued_at="2026-01-01T00:00:00+00:00")
    pk = job.verifier.public_key_bytes()
    assert verify_certificate(cert, pk)
    assert [e.position for e in cert.provenance] == [1, 2]
    assert cert.provenance[1].segment_sha256 == segment_digest(job.finals[2])
    assert {(w.position, w.rounds, w.steps) for w in cert.receipts} == {(1, 2, 2 * STEPS), (2, 2, 2 * STEPS)}
    assert all(o.verdict.matched for o in cert.ownership)
    save_certificate(tmp_path / "cert.json", cert)
    loaded = load_certificate(tmp_path / "cert.json")
    assert loaded == cert and verify_certificate(loaded, pk)
    assert verify_certificate(Certificate.from_json(cert.to_json()), pk)
    receipts = [cert.receipts[0].model_copy(update={"steps": 10**6}), *cert.receipts[1:]]
    assert not verify_certificate(cert.model_copy(update={"receipts": receipts}), pk)
    assert not verify_certificate(cert, Identity.from_seed("x", b"x" * 32).public_key_bytes())


def test_certificate_refused_for_rejected_chain(job: Job) -> None:
    bad = job.verify(records=job.records[1:])
    with pytest.raises(ValueError, match="did not verify"):
        issue_certificate(job.verifier, bad, job.registry)
    cert = issue_certificate(job.verifier, bad, job.registry, allow_failed=True)
    assert not cert.chain.ok and cert.chain.failures


# ---------------------------------------------------------------- watermark


def _toy_training(strength: float, key: bytes, steps: int = 250) -> tuple[nn.Module, WatermarkEmbedder]:
    g = torch.Generator().manual_seed(0)
    data = torch.randn(512, 20, generator=g)
    labels = (data[:, 0] + data[:, 1] > 0).long() + 2 * (data[:, 2] > 0).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    spec = WatermarkSpec(n_bits=128, strength=strength, max_weights=1024)  # 1,536 kernels: key subset
    emb = WatermarkEmbedder.for_round(
        spec, key, nonce=b"n0", identity_fp="a" * 64, prev_digests=[], segment=model
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, 512, (32,), generator=g)
        loss = F.cross_entropy(model(data[idx]), labels[idx])
        if strength:
            loss = loss + emb.regulariser(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = float((model(data).argmax(1) == labels).float().mean())
    assert acc > 0.9  # the mark does not stop the task from being learnt
    return model, emb


def test_embedding_reaches_zero_errors_and_others_fail() -> None:
    key, wrong = b"k" * 32, b"j" * 32
    marked, emb = _toy_training(0.05, key)
    v = emb.verdict(marked)
    assert v.bit_errors == 0 and v.matched and v.p_value == pytest.approx(2.0**-128)
    plain, emb_plain = _toy_training(0.0, key)
    v_plain = emb_plain.verdict(plain)
    assert not v_plain.matched and 40 <= v_plain.bit_errors <= 88  # about n/2: chance
    other = WatermarkEmbedder.for_round(
        emb.spec, wrong, nonce=b"n0", identity_fp="a" * 64, prev_digests=[], segment=marked
    )
    assert not other.verdict(marked).matched
    # the verifier's path (state dict, fresh projection and subset) reads the same bits
    assert torch.equal(emb.extract(marked.state_dict()), emb.bits)
    assert verify_segment_watermark(marked.state_dict(), emb.spec, key, emb.bits, b"n0").bit_errors == 0


def test_detection_threshold_meets_fp_bound() -> None:
    for n, fp in [(64, 1e-6), (128, 1e-6), (256, 1e-9), (128, 1e-3)]:
        t = detection_threshold(n, fp)
        tail = sum(math.comb(n, k) for k in range(t + 1)) / 2**n
        tail_next = sum(math.comb(n, k) for k in range(t + 2)) / 2**n
        assert tail <= fp < tail_next
        assert binom.cdf(t, n, 0.5) == pytest.approx(tail, rel=1e-9)
    assert detection_threshold(16, 1e-6) == -1  # 2^-16 > 1e-6: no error count is safe
    with pytest.raises(ValueError):
        WatermarkSpec(n_bits=16, fp_bound=1e-6)
    bits = derive_watermark_bits(b"k" * 32, b"n", "a" * 64, [], 128)
    flipped = bits.clone()
    flipped[:36] = 1 - flipped[:36]
    v = detect(flipped, bits)
    assert v.bit_errors == 36 and v.threshold == 36 and v.matched and v.p_value <= 1e-6
    flipped[36] = 1 - flipped[36]
    assert not detect(flipped, bits).matched


def test_derivation_depends_on_every_input() -> None:
    base = dict(
        wm_key=b"k" * 32, nonce=b"nonce", identity_fp="a" * 64, prev_digests=["b" * 64, "c" * 64], n_bits=256
    )
    ref = derive_watermark_bits(**base)
    assert ref.shape == (256,) and set(ref.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(ref, derive_watermark_bits(**base))
    for change in [
        {"wm_key": b"K" * 32},
        {"nonce": b"nonce2"},
        {"identity_fp": "d" * 64},
        {"prev_digests": ["c" * 64, "b" * 64]},
        {"prev_digests": ["b" * 64]},
        {"prev_digests": []},
    ]:
        other = derive_watermark_bits(**{**base, **change})
        assert (other != ref).sum() > 64, change
    assert (derive_watermark_bits(**{**base, "n_bits": 100}) != ref[:100]).sum() > 20  # length is bound too


def test_projection_deterministic_and_keyed() -> None:
    X = projection_matrix(b"k" * 32, 64, 500, round_nonce=b"r0")
    assert torch.equal(X, projection_matrix(b"k" * 32, 64, 500, round_nonce=b"r0"))
    assert not torch.equal(X, projection_matrix(b"k" * 32, 64, 500, round_nonce=b"r1"))
    assert not torch.equal(X, projection_matrix(b"K" * 32, 64, 500, round_nonce=b"r0"))
    assert abs(float(X.mean())) < 0.02 and abs(float(X.std()) - 1) < 0.02


# ---------------------------------------------------------------- records, identities, transcripts


def test_segment_digest_canonical() -> None:
    sd = nn.Linear(3, 2).state_dict()
    d = segment_digest(sd)
    assert d == segment_digest(dict(reversed(list(sd.items()))))
    assert d == segment_digest({k: v.clone().t().contiguous().t() for k, v in sd.items()})
    assert d != segment_digest({**sd, "bias": sd["bias"] + 1e-7})
    assert d != segment_digest({k: v.double() for k, v in sd.items()})


def test_records_json_round_trip(job: Job, tmp_path) -> None:
    save_records(tmp_path / "records.json", job.records)
    loaded = load_records(tmp_path / "records.json")
    assert loaded == job.records
    pk = {p: i.public_key_bytes() for p, i in job.identities.items()}
    assert all(verify_record(r, pk[r.record.position]) for r in loaded)
    assert not verify_record(loaded[0], pk[2])
    assert SignedRecord.from_json(loaded[0].to_json()).digest == loaded[0].digest


def test_identity_save_load_and_sign(tmp_path) -> None:
    alice = Identity.generate("alice")
    path = tmp_path / "keys" / "alice.pem"
    alice.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.name == "alice" and loaded.fingerprint() == alice.fingerprint()
    sig = loaded.sign(b"data")
    assert verify_signature(alice.public_key_bytes(), sig, b"data")
    assert not verify_signature(alice.public_key_bytes(), sig, b"data!")
    assert not verify_signature(b"short", sig, b"data")
    pub = PublicIdentity.model_validate_json(alice.public().model_dump_json())
    assert pub == alice.public() and pub.verify(sig, b"data")
    with pytest.raises(ValueError, match="fingerprint"):
        PublicIdentity(name="alice", public_key=alice.public_key_bytes(), fingerprint="0" * 64)
    reg = RegisteredTrainer(identity=pub, position=1, wm_key=b"\x01" * 32)
    assert RegisteredTrainer.model_validate_json(reg.model_dump_json()) == reg


def test_transcript_hasher_both_ends_agree() -> None:
    t = [torch.randn(4, 3) for _ in range(4)]
    sender, receiver = TranscriptHasher(), TranscriptHasher()
    sender.update_tensor("forward", 0, 0, t[0])
    sender.update_tensor("forward", 0, 1, t[1])
    sender.update_tensor("backward", 0, 0, t[2])
    receiver.update_tensor("forward", 0, 0, t[0])
    receiver.update_tensor("backward", 0, 0, t[2])  # directions interleave differently at the other end
    receiver.update_tensor("forward", 0, 1, t[1])
    assert sender.digest() == receiver.digest()
    resumed = TranscriptHasher()
    resumed.load_state_dict(sender.state_dict())
    assert resumed.digest() == sender.digest() and resumed.messages == 3
    sender.update_tensor("backward", 0, 1, t[3])
    receiver.update_tensor("backward", 0, 1, t[3] + 1e-6)
    assert sender.digest() != receiver.digest()
    assert link_direction("prev", "in") == link_direction("next", "out") == "forward"
    assert link_direction("next", "in") == link_direction("prev", "out") == "backward"


@pytest.mark.parametrize("max_weights", [None, 1500])
def test_completion_sets_a_missing_mark_with_the_least_change(max_weights):
    """A segment whose weights never saw the regulariser (large, unrelated weights) carries a
    random mark (about half the bits wrong). `complete` sets the cheapest wrong bits until half the
    detection threshold are left (the farthest from their side), leaves the projections of the bits
    that were right as they were, and changes the weights by the least-norm amount (no change
    orthogonal to the projections' row space); a second call changes nothing."""
    torch.manual_seed(3)
    seg = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for p in seg.parameters():
            p.mul_(20)
    spec = WatermarkSpec(n_bits=128, strength=0.05, max_weights=max_weights)
    emb = WatermarkEmbedder(spec, new_watermark_key(), (torch.rand(128) > 0.5).float(), seg, round_nonce=b"r")
    before = emb._w(seg).detach().clone()
    biases = {n: p.detach().clone() for n, p in seg.named_parameters() if n.endswith("bias")}
    wrong = int((emb.extract(seg) != emb.bits).sum())
    assert wrong > spec.threshold  # not detected as trained
    keep = spec.threshold // 2
    assert emb.complete(seg) == wrong - keep
    after = emb._w(seg).detach()
    assert emb.verdict(seg).bit_errors <= keep and emb.verdict(seg).matched
    right = (emb.X @ before > 0).float() == emb.bits
    # the bits left wrong are the ones farthest from their side: every set bit was closer
    margin = (emb.X @ before) * (emb.bits * 2 - 1)
    still = ((emb.X @ after > 0).float() != emb.bits) & ~right
    assert float(margin[still].max()) <= float(margin[~right & ~still].min())
    torch.testing.assert_close((emb.X @ after)[right], (emb.X @ before)[right], rtol=1e-4, atol=1e-2)
    dw = (after - before).double()
    X = emb.X.double()
    in_row_space = X.T @ torch.linalg.lstsq(X.T, dw.unsqueeze(1)).solution.squeeze(1)
    assert float((dw - in_row_space).norm()) < 1e-3 * float(dw.norm())
    assert all(torch.equal(p, biases[n]) for n, p in seg.named_parameters() if n in biases)  # kernels only
    assert emb.complete(seg) == 0
    assert torch.equal(emb._w(seg), after)


def test_completion_leaves_a_detected_mark_alone():
    assert completion_delta(torch.ones(4), torch.eye(4), torch.ones(4)).abs().sum() == 0
    # one wrong bit tolerated: nothing to change; none tolerated: only that bit's row moves
    assert completion_delta(torch.tensor([1.0, -1, 1, 1]), torch.eye(4), torch.ones(4), 1).abs().sum() == 0
    dw = completion_delta(torch.tensor([1.0, -1, 1, 1]), torch.eye(4), torch.ones(4))
    assert dw[1] > 1 and dw[[0, 2, 3]].abs().sum() == 0
    seg = nn.Linear(64, 64)
    spec = WatermarkSpec(n_bits=32, strength=0.05)
    emb = WatermarkEmbedder(spec, new_watermark_key(), torch.zeros(32), seg, round_nonce=b"r")
    emb.bits = emb.extract(seg).clone()  # the mark as it stands: nothing to complete
    w = emb._w(seg).clone()
    assert emb.complete(seg) == 0 and torch.equal(emb._w(seg), w)


def test_the_embedders_carrier_is_the_verifiers_on_a_subset():
    """The embedder gathers its key's subset kernel by kernel; the verifier (`segment_vector`, on a
    state dict) concatenates and subsets. Same values, same order, and the gradient reaches exactly
    the subset's weights."""
    from clicooper.provenance.watermark import WatermarkEmbedder, WatermarkSpec, segment_vector

    seg = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 50), nn.Conv2d(3, 4, 3))
    spec = WatermarkSpec(n_bits=64, strength=0.05, fp_bound=1e-6, max_weights=5000)
    key = new_watermark_key()
    emb = WatermarkEmbedder.for_round(
        spec, key, nonce=os.urandom(16), identity_fp="0" * 64, prev_digests=[], segment=seg
    )
    reference = segment_vector(seg.state_dict(), key, None, 5000)
    assert torch.equal(emb._w(seg), reference) and torch.equal(emb._w(seg.state_dict()), reference)
    emb.regulariser(seg).backward()
    touched = sum(int((p.grad != 0).sum()) for n, p in seg.named_parameters() if n.endswith("weight"))
    assert 0 < touched <= 5000 and all(
        p.grad is None for n, p in seg.named_parameters() if n.endswith("bias")
    )


@pytest.mark.parametrize("max_weights", [None, 5000])
def test_direct_regulariser_gradient_is_autograds(max_weights):
    """What trainers add each step (`add_regulariser_grad`, computed directly) is what back-propagating
    the regulariser adds, on the whole carrier and on a key subset, on top of gradients already there."""
    from clicooper.provenance.watermark import WatermarkEmbedder, WatermarkSpec

    torch.manual_seed(0)
    seg = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 50), nn.Conv2d(3, 4, 3))
    spec = WatermarkSpec(n_bits=64, strength=0.3, fp_bound=1e-6, max_weights=max_weights)
    emb = WatermarkEmbedder.for_round(
        spec, new_watermark_key(), nonce=os.urandom(16), identity_fp="0" * 64, prev_digests=[], segment=seg
    )
    x = torch.randn(8, 300)
    seg[:3](x).square().sum().backward()  # the step's own gradient (the conv gets none: grad None)
    base = {n: None if p.grad is None else p.grad.clone() for n, p in seg.named_parameters()}
    emb.regulariser(seg).backward()
    expected = {n: p.grad.clone() if p.grad is not None else None for n, p in seg.named_parameters()}
    for n, p in seg.named_parameters():
        p.grad = None if base[n] is None else base[n].clone()
    emb.add_regulariser_grad(seg)
    for n, p in seg.named_parameters():
        if expected[n] is None:
            assert p.grad is None, n
        else:
            assert torch.allclose(p.grad, expected[n], atol=1e-7, rtol=1e-5), n
    assert not torch.equal(expected["0.weight"], base["0.weight"])  # the regulariser did contribute
    # a gradient held in another memory layout is read and written in the carrier's (row-major) order
    for p in seg.parameters():
        p.grad = None
    seg[3].weight.grad = torch.zeros_like(seg[3].weight).to(memory_format=torch.channels_last)
    emb.add_regulariser_grad(seg)
    assert torch.allclose(seg[3].weight.grad, expected["3.weight"], atol=1e-7, rtol=1e-5)


def test_regulariser_gradient_computed_ahead_is_used_only_for_unchanged_weights():
    """Trainers start the next step's regulariser gradient on the background thread after each optimiser
    step; the gradient added must always be that of the weights at the time it is added."""
    from clicooper.provenance.identity import Identity
    from clicooper.provenance.stage import StageProvenance
    from clicooper.provenance.watermark import WatermarkSpec

    torch.manual_seed(0)
    seg = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 50))
    hooks = StageProvenance(
        identity=Identity.generate("trainer_1"),
        wm_key=new_watermark_key(),
        spec=WatermarkSpec(n_bits=64, strength=0.3, fp_bound=1e-6, max_weights=5000),
        job_id="j",
        position=1,
        prev="data_owner",
        next=None,
        n_positions=1,
    )
    hooks.open_round(0, os.urandom(16), [], seg)
    emb = hooks.embedder
    on_main: list[str] = []  # regulariser gradients computed on the trainer's own thread
    compute = emb.regulariser_grad

    def counted(kernels, tag="round 0"):
        if threading.current_thread() is threading.main_thread():
            on_main.append(tag)
        return compute(kernels)

    emb.regulariser_grad = counted

    def added() -> dict[str, torch.Tensor]:
        for p in seg.parameters():
            p.grad = None
        hooks.add_regulariser_grad(seg)
        return {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}

    def expected() -> dict[str, torch.Tensor]:
        for p in seg.parameters():
            p.grad = None
        emb.add_regulariser_grad(seg, compute(emb.kernels(seg)))
        return {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}

    hooks.prepare_regulariser_grad(seg)  # weights unchanged until the next step: the result is used
    got = added()
    assert on_main == [] and got.keys() == expected().keys()
    assert all(torch.equal(got[n], g) for n, g in expected().items())
    hooks.prepare_regulariser_grad(seg)
    with torch.no_grad():
        seg[2].weight.mul_(3.0)  # an in-place write after it was started (as a rewind or completion does)
    got = added()
    assert on_main == ["round 0"]  # stale: computed again from the weights as they are now
    assert all(torch.equal(got[n], g) for n, g in expected().items())
    assert added() and on_main == ["round 0"] * 2  # nothing prepared: computed now
    hooks.prepare_regulariser_grad(seg)
    hooks.open_round(1, os.urandom(16), [], seg)  # a new round's mark: the old one's gradient is dropped
    hooks.embedder.regulariser_grad = lambda kernels: counted(kernels, "round 1")
    added()
    assert on_main[-1] == "round 1"
