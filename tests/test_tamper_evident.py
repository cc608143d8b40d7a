"""Issue 10, findings 0, 1 and 6 (verify): a watermarked, DP job resumes; the verifier's signed log
makes a removed trainer, round or record, or a replaced verifier key, a REJECTED verdict with the
reason; certificates are written only on VERIFIED, never overwritten, and checkable offline from
the command line; garbage evidence never gives a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from clicooper.cli import EXIT_BAD_CERTIFICATE, EXIT_NO_MATCH, EXIT_REJECTED, EXIT_USAGE, app
from clicooper.job import ChainJob
from clicooper.parties import verify_run
from clicooper.parties.verifier import LOG_FILE
from clicooper.provenance import Identity
from clicooper.provenance.statelog import StateLog, read_log
from tests.conftest import copy_run, tiny_config

WM = {"enabled": True, "n_bits": 64}
DP = {"dp": True, "epsilon": 4.0, "release": "one-shot", "gamma": 2, "secret_seed": 3, "accountant": "rdp"}
runner = CliRunner()


def _cfg(**training):
    return tiny_config(watermark=WM, privacy=DP, training={"epochs": 2, **training})


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("tamper") / "run"
    ChainJob(_cfg(), digits, d).run()
    return d


@pytest.fixture
def run(finished, tmp_path):
    return copy_run(finished, tmp_path)


def _entries(run):
    return read_log(run / "verifier" / LOG_FILE)


def _write_lines(run, entries):
    (run / "verifier" / LOG_FILE).write_text("".join(json.dumps(e) + "\n" for e in entries))


def _reason(run) -> str:
    verdict, cert = verify_run(run)
    assert not verdict.ok and cert is None
    return "\n".join(str(f) for f in verdict.failures)


def test_finding0_watermarked_dp_job_resumes_and_verifies(digits, tmp_path):
    d = tmp_path / "run"
    ChainJob(_cfg(epochs=1), digits, d).run()
    resumed = ChainJob(_cfg(epochs=2), digits, d)  # more epochs: an allowed change
    summary = resumed.run(resume=True)
    assert summary.epsilon == pytest.approx(4.0, rel=1e-2)
    assert [c["field"] for c in resumed.config_changes] == ["training.epochs"]
    verdict, cert = verify_run(d)
    assert verdict.ok, verdict.summary()
    assert cert is not None and cert.chain.n_rounds == 2


def test_finding1_case_a_removed_trainer_is_rejected(run):
    entries = _entries(run)
    third = [e for e in entries if e["type"] == "register" and e["body"]["position"] == 3]
    _write_lines(run, [e for e in entries if e not in third])
    shutil.rmtree(run / "trainer_3")
    assert "entries removed" in _reason(run)


def test_finding1_case_b_dropped_round_is_rejected(run):
    entries = _entries(run)
    nonce_1 = next(i for i, e in enumerate(entries) if e["type"] == "nonce" and e["body"]["round"] == 1)
    _write_lines(run, entries[:nonce_1])  # round 1's nonce and records gone: a valid prefix
    for t in ("trainer_1", "trainer_2", "trainer_3", "data_owner"):
        for f in (run / t).glob("round_0001.*"):
            f.unlink()
    assert "plans 2 round(s)" in _reason(run)


def test_finding1_removed_record_is_rejected(run):
    entries = _entries(run)
    _write_lines(run, [e for e in entries if e is not next(x for x in entries if x["type"] == "record")])
    assert "verifier log entry" in _reason(run)


def test_finding1_replaced_verifier_key_is_rejected(run):
    Identity.generate("verifier").save(run / "verifier" / "identity.pem")
    assert "verifier key replaced" in _reason(run)


def test_finding1_log_resigned_with_another_key_is_rejected(run):
    """Whoever re-signs the whole log with a new key cannot reproduce the nonces trainers signed."""
    mallory = Identity.generate("verifier")
    log = StateLog(mallory)
    for e in _entries(run):
        body = e["body"]
        if e["type"] == "genesis":
            body = {**body, "verifier_public_key": mallory.public_key_bytes().hex()}
        log.append(e["type"], body)
    log.save(run / "verifier" / LOG_FILE)
    mallory.save(run / "verifier" / "identity.pem")
    assert "nonce is not the verifier's" in _reason(run)


def test_finding1_pinned_key_rejects_a_run_signed_by_another(run, tmp_path):
    other = Identity.generate("verifier")
    (tmp_path / "v.pub.json").write_text(other.public().model_dump_json())
    r = runner.invoke(app, ["verify", "job", str(run), "--verifier-key", str(tmp_path / "v.pub.json")])
    assert r.exit_code == EXIT_REJECTED and "verifier key replaced" in r.output


def test_finding1_certificates(run, tmp_path):
    vdir = run / "verifier"
    r = runner.invoke(app, ["verify", "job", str(run)])
    assert r.exit_code == 0, r.output
    first = (vdir / "certificate.json").read_text()
    assert runner.invoke(app, ["verify", "job", str(run)]).exit_code == 0
    assert (vdir / "certificate.json").read_text() == first  # same verdict: never rewritten
    ok = runner.invoke(app, ["verify", "certificate", str(vdir / "certificate.json"), "--run", str(run)])
    assert ok.exit_code == 0 and "VALID" in ok.output
    cert = json.loads(first)
    cert["receipts"] = cert["receipts"][:2]  # deny trainer 3 its credit
    (tmp_path / "forged.json").write_text(json.dumps(cert))
    bad = runner.invoke(app, ["verify", "certificate", str(tmp_path / "forged.json"), "--run", str(run)])
    assert bad.exit_code == EXIT_BAD_CERTIFICATE and "INVALID" in bad.output
    (tmp_path / "junk.json").write_bytes(b"\x00\xff" * 10)
    junk = runner.invoke(app, ["verify", "certificate", str(tmp_path / "junk.json"), "--run", str(run)])
    assert junk.exit_code == EXIT_USAGE and "error:" in junk.output
    # a REJECTED verdict leaves no current certificate (the old one is kept aside as evidence)
    Identity.generate("verifier").save(vdir / "identity.pem")
    assert runner.invoke(app, ["verify", "job", str(run)]).exit_code == EXIT_REJECTED
    assert not (vdir / "certificate.json").exists()
    assert len(list(vdir.glob("certificate.superseded-*.json"))) == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: (r / "verifier" / LOG_FILE).write_text("not json\n"),
        lambda r: (r / "verifier" / LOG_FILE).write_bytes(b"\xff\xfe" * 50),
        lambda r: (r / "verifier" / LOG_FILE).write_text(""),
        lambda r: (r / "verifier" / LOG_FILE).write_text("[" * 100000 + "\n"),
        lambda r: (r / "verifier" / LOG_FILE).write_text("9" * 5000 + "\n"),
        lambda r: (r / "verifier" / "segments" / "trainer_2.safetensors").write_text('{"a": ' + "9" * 5000),
        lambda r: (r / "verifier" / "identity.pem").write_text("garbage"),
        lambda r: (r / "verifier" / "segments" / "trainer_2.safetensors").write_bytes(b""),
        lambda r: (r / "verifier" / "segments" / "trainer_2.safetensors").write_text("{"),
    ],
)
def test_finding6_verify_job_on_garbage_is_a_verdict_not_a_traceback(run, damage):
    damage(run)
    r = runner.invoke(app, ["verify", "job", str(run)])
    assert r.exit_code in (EXIT_REJECTED, EXIT_USAGE), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


def test_finding6_verify_ownership_exit_codes(run, tmp_path):
    seg = run / "trainer_1" / "round_0001.safetensors"
    assert runner.invoke(app, ["verify", "ownership", str(seg), "--run", str(run)]).exit_code == 0
    blank = {k: torch.randn_like(v) for k, v in load_file(str(seg)).items()}  # same shapes, no mark
    save_file(blank, str(tmp_path / "blank.safetensors"))
    r = runner.invoke(app, ["verify", "ownership", str(tmp_path / "blank.safetensors"), "--run", str(run)])
    assert r.exit_code == EXIT_NO_MATCH, r.output
    for content in (b"", b"\x00" * 100, b"garbage that is not safetensors"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(content)
        r = runner.invoke(app, ["verify", "ownership", str(bad), "--run", str(run)])
        assert r.exit_code == EXIT_USAGE and "error:" in r.output, r.output
    (run / "verifier" / LOG_FILE).write_text("garbage\n")
    r = runner.invoke(app, ["verify", "ownership", str(seg), "--run", str(run)])
    assert r.exit_code == EXIT_USAGE and "does not verify" in r.output


def test_verify_job_on_a_keys_folder_is_an_error_and_writes_nothing(tmp_path):
    keys = tmp_path / "keys"
    (keys / "verifier").mkdir(parents=True)
    Identity.generate("verifier").save(keys / "verifier" / "identity.pem")
    r = runner.invoke(app, ["verify", "job", str(keys)])
    assert r.exit_code == EXIT_USAGE and "not a run folder" in r.output, r.output
    assert sorted(p.name for p in (keys / "verifier").iterdir()) == ["identity.pem"]
