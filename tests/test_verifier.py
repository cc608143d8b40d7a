"""The verifier over real (tiny) jobs: honest runs verify; each kind of tampering is rejected,
naming the stage and the reason."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from clicooper.job import ChainJob
from clicooper.parties import verify_run
from clicooper.parties.base import ProtocolError
from clicooper.parties.verifier import LOG_FILE
from clicooper.provenance import Identity, SignedRecord, sign_record, verify_certificate
from clicooper.provenance.certificate import load_certificate
from clicooper.provenance.records import attest_transcript, segment_digest
from clicooper.provenance.statelog import StateLog, read_log
from clicooper.transport.messages import RoundOpen, RoundOpened
from tests.conftest import tiny_config

WM = {"enabled": True, "n_bits": 64}


@pytest.fixture(scope="module")
def jobs(digits, tmp_path_factory):
    """Two independent watermarked jobs (3 trainers, 2 rounds each)."""
    root = tmp_path_factory.mktemp("wm")
    out = []
    for name in ("job_a", "job_b"):
        d = root / name
        ChainJob(tiny_config(watermark=WM), digits, d).run()
        out.append(d)
    return out


@pytest.fixture
def run(jobs, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(jobs[0], d)
    return d


def _state(run):
    """The records of a run's verifier log (a list of signed-record JSON strings) and the log itself."""
    entries = read_log(run / "verifier" / LOG_FILE)
    return {"entries": entries, "records": [e["body"]["record"] for e in entries if e["type"] == "record"]}


def _write_state(run, st):
    """Rewrite the log with these records, re-signed with the verifier's own key: what a verifier
    fooled into accepting the records would hold, so the chain checks (not the log's) must reject."""
    entries = st["entries"]
    atts = [a for e in entries if e["type"] == "record" for a in e["body"]["attestations"]]
    log = StateLog(Identity.load(run / "verifier" / "identity.pem"))
    for e in entries:
        if e["type"] != "record":
            log.append(e["type"], e["body"])
    for i, rec in enumerate(st["records"]):
        log.append("record", {"record": rec, "attestations": atts if i == 0 else []})
    log.save(run / "verifier" / LOG_FILE)


def _failures(run) -> str:
    verdict, cert = verify_run(run)
    assert not verdict.ok and cert is None
    return "\n".join(str(f) for f in verdict.failures)


def test_honest_job_verifies_with_certificate(run):
    verdict, cert = verify_run(run)
    assert verdict.ok, verdict.summary()
    assert sorted(verdict.final_watermarks) == [1, 2, 3]
    for wv in verdict.final_watermarks.values():
        assert wv.matched and wv.p_value < 1e-6 and wv.fp_bound == 1e-6
    pub = Identity.load(run / "verifier" / "identity.pem").public_key_bytes()
    loaded = load_certificate(run / "verifier" / "certificate.json")
    assert verify_certificate(loaded, pub)
    assert [p.position for p in loaded.provenance] == [1, 2, 3]
    assert all(r.steps > 0 and r.samples > 0 for r in loaded.receipts)


def _record(st, pos, rnd):
    for i, r in enumerate(st["records"]):
        sr = SignedRecord.from_json(r)
        if (sr.record.position, sr.record.round) == (pos, rnd):
            return i, sr
    raise KeyError((pos, rnd))


def test_changed_weight_is_rejected(run):
    f = run / "verifier" / "segments" / "trainer_2.safetensors"  # as delivered to the verifier
    t = load_file(str(f))
    key = next(k for k in t if k.endswith("weight"))
    t[key].view(-1)[0] += 1e-3
    save_file(t, str(f))
    assert "position 2, round 1" in _failures(run)


def test_swapped_stages_are_rejected(run):
    seg = run / "verifier" / "segments"
    for a, b in (("trainer_2", "tmp"), ("trainer_3", "trainer_2"), ("tmp", "trainer_3")):
        (seg / f"{a}.safetensors").rename(seg / f"{b}.safetensors")
    text = _failures(run)
    assert "position 2" in text and "position 3" in text


def test_record_from_another_job_is_rejected(run, jobs):
    st, other = _state(run), _state(jobs[1])
    i, _ = _record(st, 1, 0)
    j, _ = _record(other, 1, 0)
    st["records"][i] = other["records"][j]
    _write_state(run, st)
    assert "position 1, round 0" in _failures(run)


def test_record_replayed_from_another_round_is_rejected(run):
    st = _state(run)
    i, _ = _record(st, 2, 1)
    j, _ = _record(st, 2, 0)
    st["records"][i] = st["records"][j]
    _write_state(run, st)
    assert "position 2, round 1" in _failures(run)


def test_missing_stage_is_rejected(run):
    st = _state(run)
    i, _ = _record(st, 3, 0)
    del st["records"][i]
    _write_state(run, st)
    assert "position 3, round 0" in _failures(run)


def test_forged_record_is_rejected(run):
    st = _state(run)
    i, sr = _record(st, 1, 1)
    forger = Identity.generate("mallory")
    forged = sr.record.model_copy(update={"samples": sr.record.samples * 2, "trainer": forger.fingerprint()})
    st["records"][i] = sign_record(forger, forged).to_json()
    _write_state(run, st)
    assert "position 1, round 1" in _failures(run)


def test_watermark_does_not_match_unwatermarked_segment(run, digits):
    """Trainer 1 delivers another (unwatermarked) segment and re-signs its record over the new weights:
    signature, digest and links all check out, so only watermark extraction can catch it."""
    plain = ChainJob(tiny_config(), digits, None)
    plain.run()
    f = run / "verifier" / "segments" / "trainer_1.safetensors"  # what it delivered to the verifier
    swapped = {k: v.clone() for k, v in plain.trainers[0].segment.state_dict().items()}
    save_file(swapped, str(f))
    st = _state(run)
    i, sr = _record(st, 1, 1)  # the last round's record: no later record links to its digest
    me = Identity.load(run / "trainer_1" / "identity.pem", name="trainer_1")
    st["records"][i] = sign_record(
        me, sr.record.model_copy(update={"segment_sha256": segment_digest(swapped)})
    ).to_json()
    _write_state(run, st)
    verdict, cert = verify_run(run)
    assert not verdict.ok and cert is None
    bad = [f for f in verdict.failures if f.position == 1]
    assert len(bad) == 1 and "watermark NOT detected" in bad[0].reason, verdict.failures
    assert not any("digest" in f.reason or "signature" in f.reason for f in verdict.failures)


def test_watermarked_chain_still_learns(digits):
    """Accuracy parity is measured on the default data by `clicooper eval watermark`; here: it learns
    (chance is 0.1). The marks' keys come from the OS, so the figure varies from run to run: 24 runs
    gave 0.72-0.91, one full-suite run 0.435."""
    wm = ChainJob(tiny_config(training={"epochs": 4}, watermark=WM), digits, None).run()
    assert wm.test_accuracy > 0.3


def _with_bogus_attestation(job, *, sign_as_position: int = 2):
    """trainer_1's seal also carries an attestation for the link 2 -> 3, under trainer_1's own key."""
    hooks = job.trainers[0].hooks
    seal = hooks.seal

    def seal_with_bogus(segment, rnd, steps, samples):
        record, atts = seal(segment, rnd, steps, samples)
        bogus = attest_transcript(hooks.identity, job.job_id, rnd, sign_as_position, 3, "00" * 32)
        return record, json.dumps([*json.loads(atts), bogus.model_dump(mode="json")])

    hooks.seal = seal_with_bogus


def test_an_attestation_in_a_neighbours_name_is_refused_at_receipt(digits, tmp_path):
    job = ChainJob(tiny_config(watermark=WM, training={"epochs": 1}), digits, tmp_path / "run")
    _with_bogus_attestation(job)
    with pytest.raises(ProtocolError, match=r"trainer_1 \(position 1\) sent an attestation it cannot make"):
        job.run()
    assert not job.verifier.attestations  # nothing of it was logged


def _log_with_attestation(run, att: dict) -> str:
    """Re-sign the run's log with `att` among round 0's first record's attestations (what a verifier
    of an older release, which did not check them at receipt, could hold); the verdict's failures."""
    entries = read_log(run / "verifier" / LOG_FILE)
    next(e for e in entries if e["type"] == "record")["body"]["attestations"].append(att)
    log = StateLog(Identity.load(run / "verifier" / "identity.pem"))
    for e in entries:
        log.append(e["type"], e["body"])
    log.save(run / "verifier" / LOG_FILE)
    return _failures(run)


def test_an_attestation_with_a_spoiled_signature_is_refused_at_receipt(digits, tmp_path):
    job = ChainJob(tiny_config(watermark=WM, training={"epochs": 1}), digits, tmp_path / "run")
    hooks = job.trainers[0].hooks
    seal = hooks.seal

    def seal_spoiled(segment, rnd, steps, samples):
        record, atts = seal(segment, rnd, steps, samples)
        spoiled = [{**a, "signature": "00" * 64} for a in json.loads(atts)]
        return record, json.dumps(spoiled)

    hooks.seal = seal_spoiled
    with pytest.raises(ProtocolError, match="attestation it cannot make: invalid attestation signature"):
        job.run()


def test_a_logged_attestation_in_a_neighbours_name_is_blamed_on_its_signer(run):
    """trainer_1 signed it, for this job, in position 2's name: trainer_1 is blamed, not position 2."""
    job_id = read_log(run / "verifier" / LOG_FILE)[0]["body"]["job_id"]
    ident = Identity.load(run / "trainer_1" / "identity.pem")
    bogus = attest_transcript(ident, job_id, 0, 2, 3, "00" * 32).model_dump(mode="json")
    failures = _log_with_attestation(run, bogus)
    assert "position 1, round 0" in failures and "signed by a trainer not registered there" in failures
    assert "position 2, round" not in failures, failures


def test_an_attestation_not_provably_signed_is_not_blamed_on_the_trainer_it_names_as_signer(run):
    """The same claim with a spoiled signature could have been made by anyone: trainer_1, named as
    its signer, is not blamed for it."""
    job_id = read_log(run / "verifier" / LOG_FILE)[0]["body"]["job_id"]
    ident = Identity.load(run / "trainer_1" / "identity.pem")
    bogus = attest_transcript(ident, job_id, 0, 2, 3, "00" * 32).model_dump(mode="json")
    bogus["signature"] = "00" * 64
    failures = _log_with_attestation(run, bogus)
    assert "position 1, round" not in failures, failures


def test_a_refused_round_open_logs_no_nonce(digits, tmp_path):
    job = ChainJob(tiny_config(watermark=WM), digits, tmp_path / "run")
    owner, verifier = job.data_owner, job.verifier
    owner.send(RoundOpen, "verifier", 0, 0)
    owner._receive(RoundOpened, 0, 0)
    logged = len(verifier.log.entries)
    owner.send(RoundOpen, "verifier", 1, 0)  # before any round-0 record
    with pytest.raises(ProtocolError, match="has no record yet"):
        job.transport.pump()
    assert sorted(verifier.nonces) == [0] and len(verifier.log.entries) == logged


def test_a_job_stopped_during_its_last_round_gets_no_verdict(digits, tmp_path):
    """A verifier program stopped mid-round says the job is unfinished (a resume can complete
    it), not REJECTED; a finished job still gets its verdict."""
    from clicooper.programs import _final_verdict

    d = tmp_path / "stopped"
    job = ChainJob(tiny_config(watermark=WM, training={"epochs": 1}), digits, d)
    job.data_owner.send(RoundOpen, "verifier", 0, 0)
    job.data_owner._receive(RoundOpened, 0, 0)  # the last (only) round opened; stopped before its records
    out = io.StringIO()
    _final_verdict(job.verifier, d, out)
    assert "VERDICT" not in out.getvalue() and not (d / "verifier" / "verdict.json").exists()


def test_a_finished_job_gets_its_verdict_from_the_verifier_program(digits, tmp_path):
    from clicooper.programs import _final_verdict

    job = ChainJob(tiny_config(watermark=WM, training={"epochs": 1}), digits, tmp_path / "done")
    job.run()
    out = io.StringIO()
    _final_verdict(job.verifier, tmp_path / "done", out)
    assert "VERDICT VERIFIED" in out.getvalue()
