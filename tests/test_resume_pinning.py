"""Issue 10, findings 2 and 3: a resume cannot weaken privacy (pinned configuration, a DP ledger
keyed by the mechanism, a missing secret stops the run) and never trains on a damaged checkpoint
(SHA-256 per checkpoint, fallback to the newest intact round)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from clicooper.checkpoint import CheckpointError, load_state, round_prefix, save_state
from clicooper.cli import EXIT_USAGE, app
from clicooper.config import ResumeError, resume_changes
from clicooper.job import ChainJob
from clicooper.parties import verify_run
from clicooper.parties.verifier import LOG_FILE
from clicooper.privacy.defence import LEDGER
from clicooper.privacy.release_store import RELEASE_FILE, ReleaseStoreError
from tests.conftest import copy_run, tiny_config

DP = {"dp": True, "epsilon": 4.0, "release": "one-shot", "gamma": 2, "secret_seed": 3, "accountant": "rdp"}
WM = {"enabled": True, "n_bits": 64}
runner = CliRunner()


def _cfg(privacy=None, **sections):
    return tiny_config(privacy={**DP, **(privacy or {})}, **sections)


@pytest.fixture(scope="module")
def two_rounds(digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume") / "run"
    ChainJob(_cfg(watermark=WM), digits, d).run()
    return d


@pytest.fixture
def run(two_rounds, tmp_path):
    return copy_run(two_rounds, tmp_path)


@pytest.mark.parametrize(
    ("section", "change", "field"),
    [
        ("privacy", {"clip": 100.0}, "privacy.clip"),
        ("job", {"seed": 5}, "job.seed"),
        ("data", {"train_subset": 500}, "data.train_subset"),
        ("training", {"lr": 0.5}, "training.lr"),
        ("training", {"optimizer": "adam"}, "training.optimizer"),
        ("privacy", {"dp": False, "epsilon": None}, "privacy.dp"),
        ("model", {"arch": "small-cnn-dp"}, "model.arch"),
        ("privacy", {"gamma": 3}, "privacy.gamma"),
        ("training", {"wire_dtype": "bfloat16"}, "training.wire_dtype"),  # receivers check it
    ],
)
def test_finding2_resume_refuses_pinned_changes_naming_the_field(digits, run, section, change, field):
    cfg = _cfg(watermark=WM).replace(**{section: change})
    with pytest.raises(ResumeError, match=field.replace(".", r"\.")):
        ChainJob(cfg, digits, run)


def test_finding2_allowed_changes_are_recorded(run, digits):
    cfg = _cfg(watermark=WM).replace(training={"epochs": 3, "eval_batch_size": 50})
    job = ChainJob(cfg, digits, run)
    job.run(resume=True)
    assert {c["field"] for c in job.config_changes} == {"training.epochs", "training.eval_batch_size"}
    log = [json.loads(x) for x in (run / "resume_log.jsonl").read_text().splitlines()]
    assert log[-1]["from_round"] == 2 and len(log[-1]["changes"]) == 2
    assert verify_run(run)[0].ok


def test_finding2_edited_config_json_is_refused_by_the_cli(run):
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else None
    if cfg is None:  # the fixture ran through the API: write what the CLI would have
        cfg = json.loads(_cfg(watermark=WM).model_dump_json())
    cfg["privacy"]["clip"] = 100.0
    (run / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["run", "--resume", str(run)])
    assert r.exit_code == EXIT_USAGE and "privacy.clip" in r.output, r.output


def test_finding2_ledger_refuses_an_uncounted_release(digits, run):
    """Even past the configuration pin (a deleted job_config.json), the ledger is keyed by the
    mechanism: a release with another clip would be uncounted, so it never happens."""
    (run / "data_owner" / "job_config.json").unlink()
    with pytest.raises(ResumeError, match="clip"):
        ChainJob(_cfg(privacy={"clip": 100.0}, watermark=WM), digits, run)
    ledger = json.loads((run / "data_owner" / LEDGER).read_text())
    assert ledger["releases"] == 1 and ledger["mechanism"]["clip"] == 1.0


def test_finding2_ledger_knows_the_data(digits, run):
    (run / "data_owner" / "job_config.json").unlink()
    fewer = digits.subset(600, None, seed=0)
    with pytest.raises(ResumeError, match="data_sha256"):
        ChainJob(_cfg(watermark=WM), fewer, run)


def test_finding2_missing_secret_stops_the_run(digits, run):
    (run / "data_owner" / "secret.json").unlink()
    with pytest.raises(ResumeError, match="secret.json is missing"):
        ChainJob(_cfg(watermark=WM), digits, run)


def test_resume_changes_lists_allowed_fields():
    a = tiny_config()
    assert resume_changes(a, a.replace(training={"epochs": 9})) == [
        {"field": "training.epochs", "from": 2, "to": 9}
    ]
    with pytest.raises(ResumeError, match="lowered"):
        resume_changes(a, a.replace(training={"epochs": 1}))
    per_step = tiny_config(privacy={"dp": True, "epsilon": 4.0, "accountant": "rdp"})
    with pytest.raises(ResumeError, match="sets the noise"):
        resume_changes(per_step, per_step.replace(training={"epochs": 3}))


# ------------------------------------------------------------------ finding 3: checkpoints


def test_checkpoint_records_and_checks_its_sha256(tmp_path):
    prefix = tmp_path / "round_0000"
    save_state(prefix, {"w": torch.arange(6.0)}, {"k": 1})
    assert "tensors_sha256" in json.loads(prefix.with_suffix(".json").read_text())
    tensors, meta = load_state(prefix)
    assert meta == {"k": 1} and torch.equal(tensors["w"], torch.arange(6.0))
    raw = bytearray(prefix.with_suffix(".safetensors").read_bytes())
    raw[-3] ^= 0x01  # one flipped bit in a tensor value
    prefix.with_suffix(".safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_state(prefix)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.with_suffix(".safetensors").write_bytes(
            bytes(b ^ (i == 200) for i, b in enumerate(p.with_suffix(".safetensors").read_bytes()))
        ),
        lambda p: p.with_suffix(".safetensors").write_bytes(p.with_suffix(".safetensors").read_bytes()[:50]),
        lambda p: p.with_suffix(".json").write_text("{garbage"),
        lambda p: p.with_suffix(".json").write_text(json.dumps({"tensors_sha256": "0" * 64})),
        lambda p: p.with_suffix(".json").write_text("[]"),
        lambda p: p.with_suffix(".json").write_text(
            json.dumps({**json.loads(p.with_suffix(".json").read_text()), "last_train_step": "ab"})
        ),
    ],
    ids=["flipped-byte", "truncated", "garbage-json", "json-without-fields", "json-list", "bad-bookkeeping"],
)
def test_finding3_damaged_checkpoint_falls_back_to_intact_round(digits, run, damage):
    damage(round_prefix(run / "trainer_2", 1))
    notes: list[str] = []
    job = ChainJob(_cfg(watermark=WM), digits, run)
    start = job.resume(on_note=notes.append)
    assert start == 1  # round 2 (index 1) is damaged for trainer 2: resume after round 1
    assert any("damaged" in n and "trainer_2" in n for n in notes), notes
    expected, _ = load_state(round_prefix(run / "trainer_2", 0))
    got = job.trainers[1].segment.state_dict()
    assert all(torch.equal(got[k[len("model.") :]], v) for k, v in expected.items() if k.startswith("model."))
    job.run(resume=True)
    assert verify_run(run)[0].ok


CLI_TOML = """
[job]
name = "tiny"
run_root = "{root}"
[data]
dataset = "digits"
train_subset = 400
test_subset = 100
[model]
arch = "small-cnn"
n_trainers = 3
[training]
epochs = 2
batch_size = 32
[privacy]
dp = true
epsilon = 4.0
accountant = "rdp"
release = "one-shot"
gamma = 2
[watermark]
enabled = true
n_bits = 64
"""


def test_finding3_cli_says_so(tmp_path):
    (tmp_path / "job.toml").write_text(CLI_TOML.format(root=tmp_path / "runs"))
    assert runner.invoke(app, ["run", str(tmp_path / "job.toml")]).exit_code == 0
    (run,) = (tmp_path / "runs").iterdir()
    p = round_prefix(run / "trainer_2", 1).with_suffix(".safetensors")
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF
    p.write_bytes(bytes(raw))
    r = runner.invoke(app, ["run", "--resume", str(run)])
    assert r.exit_code == 0, r.output
    assert "damaged" in r.output and "VERIFIED" in r.output


def test_a_resume_that_fails_before_training_leaves_the_verifiers_log_as_it_was(digits, run):
    """Every checkpoint of trainer 2 damaged: the resume stops, and the finished job still verifies
    (the longer plan is logged only when a new round opens)."""
    for rnd in (0, 1):
        p = round_prefix(run / "trainer_2", rnd).with_suffix(".safetensors")
        p.write_bytes(p.read_bytes()[:50])
    log = run / "verifier" / LOG_FILE
    before = log.read_bytes()
    with pytest.raises(ResumeError, match="every saved round is damaged"):
        ChainJob(_cfg(watermark=WM, training={"epochs": 3}), digits, run).run(resume=True)
    assert log.read_bytes() == before
    assert verify_run(run)[0].ok


def test_a_damaged_saved_release_stops_the_resume_before_the_round_opens(digits, run):
    release = run / "data_owner" / RELEASE_FILE
    release.write_bytes(release.read_bytes()[:1000])
    log = run / "verifier" / LOG_FILE
    before = log.read_bytes()
    with pytest.raises(ReleaseStoreError, match="unusable"):
        ChainJob(_cfg(watermark=WM, training={"epochs": 3}), digits, run).run(resume=True)
    assert log.read_bytes() == before  # no plan, no nonce for a round that never ran


def test_a_damaged_saved_release_is_an_error_line_in_the_cli(tmp_path):
    (tmp_path / "job.toml").write_text(CLI_TOML.format(root=tmp_path / "runs"))
    assert runner.invoke(app, ["run", str(tmp_path / "job.toml")]).exit_code == 0
    (run,) = (tmp_path / "runs").iterdir()
    (run / "data_owner" / RELEASE_FILE).with_suffix(".json").unlink()
    longer = tmp_path / "job3.toml"
    longer.write_text(CLI_TOML.format(root=tmp_path / "runs").replace("epochs = 2", "epochs = 3"))
    r = runner.invoke(app, ["run", str(longer), "--resume", str(run)])
    assert r.exit_code == EXIT_USAGE and "error: saved release" in r.output, r.output


def test_epochs_raised_by_one_resume_cannot_be_lowered_by_the_next(digits, run):
    ChainJob(_cfg(watermark=WM, training={"epochs": 3}), digits, run).run(resume=True)
    log = (run / "verifier" / LOG_FILE).read_bytes()
    with pytest.raises(ResumeError, match=r"training\.epochs lowered \(3 -> 2\)"):
        ChainJob(_cfg(watermark=WM), digits, run)
    (run / "data_owner" / "job_config.json").unlink()  # a folder without the pin: the rounds say so
    with pytest.raises(ResumeError, match="3 rounds are already trained"):
        ChainJob(_cfg(watermark=WM), digits, run).run(resume=True)
    assert (run / "verifier" / LOG_FILE).read_bytes() == log
    assert verify_run(run)[0].ok


def test_a_metrics_line_lost_with_the_process_is_written_on_resume(digits, run):
    """Stopped after saving round 2 but before writing its metrics line (during the evaluation):
    the resume evaluates the restored model and writes the line, then trains on."""
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:20])  # cut off while being written
    ChainJob(_cfg(watermark=WM, training={"epochs": 3}), digits, run).run(resume=True)
    text = metrics.read_text().splitlines()
    assert text[1] == lines[1][:20]  # kept as it was, the new line after it
    rows = [json.loads(x) for x in text[:1] + text[2:]]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["written_on_resume"] and rows[1]["test_accuracy"] == json.loads(lines[1])["test_accuracy"]
    assert "written_on_resume" not in rows[2]


def test_a_round_that_fails_to_open_costs_no_budget_and_pins_nothing(digits, tmp_path):
    """Per-step DP: a resume to 3 epochs whose round cannot open (the verifier unreachable) counts
    no release and leaves the pinned epochs as they were; the next resume trains and verifies."""
    from clicooper.parties.base import ProtocolError

    per_step = {"dp": True, "noise_multiplier": 5.0, "release": "per-step", "accountant": "rdp"}
    run = tmp_path / "run"
    ChainJob(tiny_config(privacy=per_step, watermark=WM), digits, run).run()
    ledger = run / "data_owner" / LEDGER
    releases = json.loads(ledger.read_text())["releases"]
    longer = tiny_config(privacy=per_step, watermark=WM, training={"epochs": 3})
    job = ChainJob(longer, digits, run)

    def unreachable(msg):
        raise ProtocolError("verifier unreachable (simulated)")

    job.verifier._on_round_open = unreachable
    with pytest.raises(ProtocolError, match="unreachable"):
        job.run(resume=True)
    assert json.loads(ledger.read_text())["releases"] == releases
    ChainJob(tiny_config(privacy=per_step, watermark=WM), digits, run)  # 2 epochs: still the pin
    ChainJob(longer, digits, run).run(resume=True)
    assert json.loads(ledger.read_text())["releases"] == releases * 3 // 2
    assert verify_run(run)[0].ok


def test_a_job_recovered_in_the_same_process_reports_all_its_epochs(digits, tmp_path):
    """The data owner program's recovery calls `run(resume=True)` on the same job after a failure:
    the summary's epoch times and wall time cover every attempt, not only the last."""
    from clicooper.parties.base import ProtocolError

    job = ChainJob(tiny_config(), digits, tmp_path / "run")
    train_round = job.data_owner.train_round
    failed = []

    def flaky(rnd, on_step=None):
        if rnd == 1 and not failed:
            failed.append(rnd)
            raise ProtocolError("trainer_2 was restarted (simulated)")
        return train_round(rnd, on_step)

    job.data_owner.train_round = flaky
    with pytest.raises(ProtocolError):
        job.run()
    summary = job.run(resume=True)
    assert len(summary.epoch_times_s) == 2 and summary.wall_time_s >= sum(summary.epoch_times_s)
