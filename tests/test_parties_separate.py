"""Every party its own program: `launch local` runs the verifier, three trainers and the data owner as
separate OS processes over loopback mutual TLS, each reading only the public manifest and its own
identity folder. The same manifest and identity folders run in one process (`ChainJob`) reach the
same weights; the verifier certifies a watermarked, DP-defended run; and nothing the data owner
holds lets it sign as a trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from clicooper.build import build_verifier
from clicooper.checkpoint import load_state, round_prefix
from clicooper.config import parse_config
from clicooper.job import ChainJob, prepare_data
from clicooper.launch import LaunchError, launch_local
from clicooper.manifest import JobManifest, ManifestError, PartyKeys, make_job
from clicooper.parties import ProtocolError, verify_run
from clicooper.parties.verifier import LOG_FILE
from clicooper.provenance import Identity, SignedRecord, sign_record
from clicooper.provenance.statelog import StateLog, read_log
from clicooper.transport import Header, InProcTransport, encode
from clicooper.transport.grpc import GrpcTransport
from clicooper.transport.messages import Register, StageSealed
from tests.grpc_helpers import FAST, RawLink

pytestmark = pytest.mark.timeout(300)
# A multi-process run takes 1-2 minutes alone, up to 4 on a loaded 2-core machine (one CI run hit 240 s).
JOB_TIMEOUT = 480


def _cfg(**sections: dict):
    base = {
        "job": {"name": "sep", "seed": 0},
        "data": {"dataset": "digits", "train_subset": 400, "test_subset": 200},
        "model": {"arch": "small-cnn", "n_trainers": 3},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.05, "eval_batch_size": 200},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return parse_config(base)


def _make(cfg, out):
    data = prepare_data(cfg)
    return make_job(cfg, out, input_shape=data.input_shape, num_classes=data.num_classes), data


def _all_keys(manifest, keys_dir):
    return {p.name: PartyKeys.load(keys_dir / p.name, manifest) for p in manifest.parties}


def test_separate_processes_reach_the_in_process_weights(tmp_path):
    """DP noise and the codebook secret come from OS entropy and round nonces from the verifier, so
    the bit-for-bit comparison is on the plain chain; the identity folders are the same."""
    cfg = _cfg()
    manifest, data = _make(cfg, tmp_path / "keys")
    r = launch_local(tmp_path / "keys" / "manifest.json", run_dir=tmp_path / "run")
    assert r.ok, (r, (r.run_dir / "logs" / "data_owner.log").read_text()[-3000:])
    ref = ChainJob(
        cfg, data, tmp_path / "ref", manifest=manifest, keys=_all_keys(manifest, tmp_path / "keys")
    )
    ref_summary = ref.run()
    last = cfg.training.epochs - 1
    head, _ = load_state(round_prefix(r.run_dir / "data_owner", last))
    for k, v in ref.data_owner.head.state_dict().items():
        torch.testing.assert_close(head[f"head.model.{k}"], v)
    for t in ref.trainers:
        got, meta = load_state(round_prefix(r.run_dir / t.name, last))
        assert meta["seq"]["out"] > 0 and meta["seq"]["in"]  # sequence counters are checkpointed
        for k, v in t.segment.state_dict().items():
            torch.testing.assert_close(got[f"model.{k}"], v)
    assert r.summary["test_accuracy"] == pytest.approx(ref_summary.test_accuracy, abs=1e-6)
    # every party wrote only its own folder; the logs are per party
    assert sorted(p.name for p in (r.run_dir / "logs").iterdir()) == [
        "data_owner.log",
        "trainer_1.log",
        "trainer_2.log",
        "trainer_3.log",
    ]


@pytest.fixture(scope="module")
def defended(tmp_path_factory):
    """A default-like job (activation DP released once, gamma = 2, chained watermarks) launched
    with --quick as separate processes."""
    root = tmp_path_factory.mktemp("defended")
    cfg = _cfg(
        model={"arch": "small-cnn", "n_trainers": 3, "freeze_head": True},
        privacy={"dp": True, "epsilon": 2.0, "delta": 1e-5, "release": "one-shot", "gamma": 2},
        watermark={"enabled": True, "n_bits": 64},
        training={"epochs": 3},
    )
    manifest, _ = _make(cfg, root / "keys")
    r = launch_local(root / "keys" / "manifest.json", quick=True, run_dir=root / "run")
    return manifest, root / "keys", r


def test_launch_local_quick_of_a_defended_job_is_certified(defended):
    manifest, _, r = defended
    assert r.ok, r
    assert r.verdict["ok"] and r.summary["epochs"] == 2 and r.summary["epsilon"] > 0  # --quick: 2 of 3
    assert (r.run_dir / "verifier" / "certificate.json").exists()
    # final segments reached the verifier as messages, and verification needs only its folder
    assert sorted(p.name for p in (r.run_dir / "verifier" / "segments").glob("*.safetensors")) == [
        "trainer_1.safetensors",
        "trainer_2.safetensors",
        "trainer_3.safetensors",
    ]
    alone = r.run_dir.parent / "verifier_only"
    alone.mkdir()
    (alone / "verifier").symlink_to(r.run_dir / "verifier")
    assert verify_run(alone, issue=False)[0].ok


def _exchange(creds, addr: str, frame: bytes) -> bytes:
    """One frame to the verifier on a raw stream; the connection is retried as GrpcTransport does
    (a first TLS handshake on a busy machine can fail transiently)."""
    import grpc

    for attempt in range(5):
        link = RawLink(creds, addr, "verifier")
        try:
            grpc.channel_ready_future(link.channel).result(timeout=10)
            return link.exchange(frame)
        except (grpc.RpcError, grpc.FutureTimeoutError):
            if attempt == 4:
                raise
            time.sleep(0.5)
        finally:
            link.close()
    raise AssertionError("unreachable")


def test_the_data_owner_cannot_sign_as_a_trainer(defended, tmp_path):
    """Everything the data owner holds: its identity folder (TLS key and certificate, no Ed25519 key),
    the manifest, and any key it makes itself. A record signed with any of it is rejected."""
    manifest, keys_dir, r = defended
    own = PartyKeys.load(keys_dir / "data_owner", manifest)
    assert own.identity is None and own.wm_key is None  # no signing key of any trainer
    files = sorted(
        p.relative_to(keys_dir / "data_owner").as_posix() for p in (keys_dir / "data_owner").rglob("*")
    )
    assert files == ["party.json", "tls", "tls/ca.pem", "tls/cert.pem", "tls/key.pem"]
    mallory = Identity.generate("trainer_1")  # the best the data owner can do: a key of its own
    with pytest.raises(ManifestError, match="not the one the manifest names"):
        PartyKeys("trainer_1", "trainer", mallory, b"k" * 32).check(manifest)

    # 1. in the finished run's evidence: a forged record in trainer_1's place is rejected
    entries = read_log(r.run_dir / "verifier" / LOG_FILE)
    forged = None
    log = StateLog(Identity.load(r.run_dir / "verifier" / "identity.pem"))  # a fooled verifier re-signs
    for e in entries:
        body = e["body"]
        if e["type"] == "record":
            sr = SignedRecord.from_json(body["record"])
            if sr.record.position == 1:
                forged = sr.record.model_copy(update={"trainer": mallory.fingerprint()})
                body = {**body, "record": sign_record(mallory, forged).to_json()}
        log.append(e["type"], body)
    run = tmp_path / "run"
    run.mkdir()
    (run / "verifier").mkdir()
    for f in (r.run_dir / "verifier").iterdir():
        if f.is_file():
            (run / "verifier" / f.name).write_bytes(f.read_bytes())
    (run / "verifier" / "segments").symlink_to(r.run_dir / "verifier" / "segments")
    log.save(run / "verifier" / LOG_FILE)
    verdict, cert = verify_run(run)
    assert not verdict.ok and cert is None
    assert any(f.position == 1 and "forged" in f.reason for f in verdict.failures), verdict.failures

    # 2. live: a verifier built from the manifest refuses a registration under the data owner's key
    vkeys = PartyKeys.load(keys_dir / "verifier", manifest)
    tr = InProcTransport()
    v = build_verifier(manifest, vkeys, tr, state_dir=None)
    reg = Register(
        header=Header(manifest.job_id, "trainer_1", "verifier", 0, 0, 1),
        position=1,
        public_key=mallory.public_key_bytes().hex(),
        wm_key="00" * 32,
    )
    with pytest.raises(ProtocolError, match="not the one in the job manifest"):
        v.handle(reg)

    # 3. over the network, with the data owner's own certificate: it cannot send as trainer_1,
    # nor send a stage record in its own name
    assert forged is not None
    vt = GrpcTransport(
        manifest.roster(), {"verifier": "127.0.0.1:0"}, tls={"verifier": vkeys.tls}, options=FAST
    )
    try:
        build_verifier(manifest, vkeys, vt, state_dir=None)
        for sender in ("trainer_1", "data_owner"):
            msg = StageSealed(
                header=Header(manifest.job_id, sender, "verifier", 0, 0, 10),
                record=sign_record(mallory, forged).to_json(),
                attestations="[]",
            )
            ack = _exchange(own.tls, vt.addresses["verifier"], bytes(encode(msg)))
            assert ack[:1] == b"\x01", ack
    finally:
        vt.close()
    assert vt.refused and not vt.handler_errors


def test_a_party_program_takes_its_acknowledgement_window_from_the_job(tmp_path):
    """`[job] ack_window` reaches each party program's gRPC transport (by default twice the
    micro-batches of a pipelined step); a resume may change it."""
    from clicooper.config import resume_changes
    from clicooper.programs import make_transport

    cfg = _cfg(job={"name": "w", "ack_window": 8})
    manifest, _ = _make(cfg, tmp_path / "keys")
    keys = PartyKeys.load(tmp_path / "keys" / "trainer_1", manifest)
    t = make_transport(manifest, keys, listen="127.0.0.1:0")
    try:
        assert t.options.ack_window == 8
    finally:
        t.close()
    assert resume_changes(cfg, cfg.replace(job={"ack_window": 1})) == [
        {"field": "job.ack_window", "from": 8, "to": 1}
    ]
    # by default: twice a pipelined step's micro-batches; without pipelining 2 while trainers send
    # their upstream gradient first (the default for party programs), else 1
    assert _cfg().link_window() == 2
    assert _cfg(job={"upstream_grad_first": False}).link_window() == 1
    assert _cfg(training={"micro_batches": 4}).link_window() == 8
    assert _cfg(job={"ack_window": 3}, training={"micro_batches": 4}).link_window() == 3


def test_manifest_is_public_and_checked(tmp_path):
    cfg = _cfg(watermark={"enabled": True, "n_bits": 64})
    manifest, _ = _make(cfg, tmp_path / "keys")
    text = (tmp_path / "keys" / "manifest.json").read_text()
    assert "PRIVATE KEY" not in text
    loaded = JobManifest.load(tmp_path / "keys" / "manifest.json")
    assert loaded == manifest and loaded.trainer_names == ["trainer_1", "trainer_2", "trainer_3"]
    with pytest.raises(ManifestError, match="refusing to overwrite"):
        make_job(cfg, tmp_path / "keys", input_shape=(1, 8, 8), num_classes=10)
    # another party's folder, or a folder from another job, does not pass as this one's
    other, _ = _make(cfg, tmp_path / "other")
    with pytest.raises(ManifestError, match="not the one the manifest names"):
        PartyKeys.load(tmp_path / "other" / "trainer_2", manifest)
    data = json.loads(text)
    data["config"]["privacy"]["secret_seed"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="secret_seed"):
        JobManifest.load(tmp_path / "bad.json")


def _serve_trainer_2(job_dir, run_dir, *extra: str) -> subprocess.Popen:
    """`clicooper serve trainer` for trainer_2 of the job in `job_dir`, as its own process, listening
    on a free loopback port (text pipes for stdin, stdout and stderr)."""
    return subprocess.Popen(
        [sys.executable, "-m", "clicooper", "serve", "trainer", str(job_dir / "manifest.json")]
        + ["--identity", str(job_dir / "trainer_2"), "--run-dir", str(run_dir)]
        + ["--listen", "127.0.0.1:0", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _launch_and_kill_trainer_2_in_round_2(manifest_path, run):
    """Launch the job as separate processes, kill -9 trainer_2 shortly after round 1 completes (the
    launcher starts it again), and return the launch result and each party's log."""
    out: dict = {}

    def launch() -> None:
        try:
            out["r"] = launch_local(manifest_path, run_dir=run, job_timeout=JOB_TIMEOUT)
        except LaunchError as e:
            out["error"] = e

    th = threading.Thread(target=launch)
    th.start()
    deadline = time.monotonic() + JOB_TIMEOUT / 2
    while not (run / "data_owner" / "round_0000.json").exists():
        assert time.monotonic() < deadline and th.is_alive(), "round 1 never completed"
        time.sleep(0.05)
    time.sleep(0.3)  # into round 2
    os.kill(json.loads((run / "pids.json").read_text())["trainer_2"], signal.SIGKILL)
    th.join(timeout=JOB_TIMEOUT + 40)
    assert not th.is_alive()
    logs = {p.stem: p.read_text() for p in (run / "logs").glob("*.log")}
    assert "r" in out, (out.get("error"), {name: text[-2000:] for name, text in logs.items()})
    assert out["r"].ok, (out["r"], logs["data_owner"][-3000:])
    assert logs["trainer_2"].count("READY") == 2  # started again
    assert "resuming from the last completed round" in logs["data_owner"]
    return out["r"], logs


def test_a_restarted_trainer_tells_the_data_owner(tmp_path):
    """A trainer killed after acknowledging a frame loses it with its process, and nobody else sees
    a failure: the data owner would wait for the reply. Started again over its folder, the trainer
    tells the data owner (an Abort, which makes it rewind the job). Here the test is the data owner,
    and trainer_2's folder says it ran before."""
    from clicooper.transport.grpc import RemoteAbort

    manifest, _ = _make(_cfg(), tmp_path / "keys")
    do_keys = PartyKeys.load(tmp_path / "keys" / "data_owner", manifest)
    do = GrpcTransport(
        manifest.roster(), {"data_owner": "127.0.0.1:0"}, tls={"data_owner": do_keys.tls}, options=FAST
    )
    do.register("data_owner", None)
    (tmp_path / "run" / "trainer_2").mkdir(parents=True)
    (tmp_path / "run" / "trainer_2" / "incarnation").write_text("1")
    proc = _serve_trainer_2(tmp_path / "keys", tmp_path / "run", "--peers", "-")
    try:
        assert proc.stdout.readline().startswith("READY")
        proc.stdin.write(json.dumps({"data_owner": do.addresses["data_owner"]}) + "\n")
        proc.stdin.flush()
        with pytest.raises(RemoteAbort, match="trainer_2 was restarted"):
            do.receive("data_owner", timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        do.close()


@pytest.mark.timeout(JOB_TIMEOUT + 120)
def test_kill_9_of_a_trainer_mid_run_then_restart_completes(tmp_path):
    """kill -9 of trainer_2 during round 2 of 4: the launcher starts it again on the same address,
    it resumes from its own checkpoint, the data owner pauses, rewinds every party to the last
    completed round and goes on; the job completes, epsilon counts the re-released round, the
    verifier's log records the rewind and the chain verifies, and the model has learned. With DP,
    watermarks, bfloat16 links and a pipelined relay whose links stream (4 micro-batches: an
    acknowledgement window of 8) all at once. (The DP architecture's 16-number release learns under
    per-step noise: 0.57 to 0.72 test accuracy over eight uninterrupted in-process runs of this job,
    0.49 to 0.64 with float32 links, chance being 0.1.)"""
    cfg = _cfg(
        model={"arch": "small-cnn-dp", "n_trainers": 3},
        privacy={"dp": True, "epsilon": 50.0, "clip": 1.0, "release": "per-step", "gamma": 2},
        watermark={"enabled": True, "n_bits": 64},
        training={"epochs": 4, "micro_batches": 4, "optimizer": "adam", "lr": 0.01, "wire_dtype": "bfloat16"},
    )
    assert cfg.link_window() == 8
    _make(cfg, tmp_path / "keys")
    run = tmp_path / "run"
    r, _ = _launch_and_kill_trainer_2_in_round_2(tmp_path / "keys" / "manifest.json", run)
    assert r.summary["epochs"] == 4 and r.verdict["ok"]
    assert any(e["type"] == "rewind" for e in read_log(run / "verifier" / LOG_FILE))
    ledger = json.loads((run / "data_owner" / "privacy_ledger.json").read_text())
    assert ledger["releases"] >= 4
    if ledger["releases"] > 4:  # the interrupted round had released: counted, never reset
        assert r.summary["epsilon"] > 50.0 * 1.0001
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 4
    assert r.summary["test_accuracy"] > 0.3


def test_keys_job_command_and_a_served_party_stops_cleanly_on_sigterm(tmp_path):
    """`clicooper keys --job` writes the manifest and identity folders (never over existing keys);
    `clicooper serve trainer` prints its readiness line, and SIGTERM stops it with exit code 0."""
    from typer.testing import CliRunner

    from clicooper.cli import EXIT_USAGE, app

    toml = tmp_path / "job.toml"
    toml.write_text(
        '[job]\nname = "k"\n[data]\ndataset = "digits"\n[model]\narch = "small-cnn"\nn_trainers = 2\n'
    )
    runner = CliRunner()
    r = runner.invoke(app, ["keys", "--job", str(toml), "--out", str(tmp_path / "job")])
    assert r.exit_code == 0, r.output
    m = JobManifest.load(tmp_path / "job" / "manifest.json")
    assert [p.name for p in m.parties] == [
        "data_owner",
        "trainer_1",
        "trainer_2",
    ]  # no watermark: no verifier
    assert (tmp_path / "job" / "trainer_1" / "identity.pem").stat().st_mode & 0o077 == 0
    r = runner.invoke(app, ["keys", "--job", str(toml), "--out", str(tmp_path / "job")])
    assert r.exit_code == EXIT_USAGE and "refusing to overwrite" in r.output
    r = runner.invoke(app, ["keys"])
    assert r.exit_code == EXIT_USAGE
    proc = _serve_trainer_2(tmp_path / "job", tmp_path / "run")
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["READY"] and line[1].startswith("127.0.0.1:"), line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    # the wrong role's folder is refused with a one-line error
    r = runner.invoke(
        app,
        [
            "serve",
            "trainer",
            str(tmp_path / "job" / "manifest.json"),
            "--identity",
            str(tmp_path / "job" / "data_owner"),
        ],
    )
    assert r.exit_code == EXIT_USAGE and "not of a trainer" in r.output


def test_a_stop_signal_landing_anywhere_in_the_servers_wait_stops_it():
    """A served party's SIGTERM handler may run between any two bytecodes of its main loop, also
    while that thread holds a lock. Emulate the signal at each of the loop's first 80 trace events
    (a thread-local trace function calls the handler there): the loop must end every time. The
    threading.Event this replaced deadlocked at most of those points (the CI run that hung for 60 s
    after SIGTERM)."""
    from clicooper.programs import StopRequest

    def stops_when_signalled_at(k: int) -> bool:
        stop, events = StopRequest(), [0]

        def tracer(frame, event, arg):
            events[0] += 1
            if events[0] == k:
                stop()  # what the signal handler does
            return tracer

        def serve_loop() -> None:
            sys.settrace(tracer)
            try:
                while not stop.wait(0.001):
                    pass
            finally:
                sys.settrace(None)

        th = threading.Thread(target=serve_loop, daemon=True)
        th.start()
        th.join(5)
        return not th.is_alive()

    assert [k for k in range(1, 81) if not stops_when_signalled_at(k)] == []


def test_final_segment_and_rewind_messages_are_checked(tmp_path):
    """In one process: the verifier keeps a delivered segment only if its signed record names it
    (never unpickled: a safetensors blob); a rewound trainer is back at its checkpoint of the round
    before, or at its initial weights for round 0."""
    from safetensors.torch import save as save_safetensors

    from clicooper.build import public_segments, trainer_segments
    from clicooper.transport.messages import FinalSegment, Rewind

    cfg = _cfg(watermark={"enabled": True, "n_bits": 64})
    data = prepare_data(cfg)
    job = ChainJob(cfg, data, tmp_path / "run")
    job.run()
    v, t2 = job.verifier, job.trainers[1]
    delivered = tmp_path / "run" / "verifier" / "segments" / "trainer_2.safetensors"
    assert delivered.exists()

    def final(weights: torch.Tensor, rnd: int = 1) -> FinalSegment:
        final.seq += 1
        return FinalSegment(
            header=Header(job.job_id, "trainer_2", "verifier", rnd, 0, final.seq), weights=weights
        )

    final.seq = 10**15
    blob = lambda sd: torch.frombuffer(bytearray(save_safetensors(sd)), dtype=torch.uint8)  # noqa: E731
    other = {k: v + 1 for k, v in t2.segment.state_dict().items()}
    for msg, why in (
        (final(torch.frombuffer(bytearray(b"garbage" * 10), dtype=torch.uint8)), "not a safetensors"),
        (final(blob(other)), "not the one its round-1 record signs"),
        (final(blob(t2.segment.state_dict()), rnd=5), "without its record"),
    ):
        with pytest.raises(ProtocolError, match=why):
            v.handle(msg)
    v.handle(final(blob(t2.segment.state_dict())))  # the honest one is accepted again

    initial = trainer_segments(*public_segments(job.manifest))[1].state_dict()
    round0, _ = load_state(round_prefix(tmp_path / "run" / "trainer_2", 0))
    seq = 10**15
    for rnd, expected in ((1, {k: round0[f"model.{k}"] for k in initial}), (0, initial)):
        seq += 1
        t2.handle(Rewind(header=Header(job.job_id, "data_owner", "trainer_2", rnd, 0, seq)))
        for k, val in t2.segment.state_dict().items():
            torch.testing.assert_close(val, expected[k])
    v.handle(Rewind(header=Header(job.job_id, "data_owner", "verifier", 1, 0, seq + 1)))
    assert (
        sorted(v.nonces) == [0] and read_log(tmp_path / "run" / "verifier" / LOG_FILE)[-1]["type"] == "rewind"
    )


@pytest.mark.timeout(2 * JOB_TIMEOUT + 120)
def test_kill_9_then_restart_reaches_the_uninterrupted_runs_weights(tmp_path):
    """The accuracy half of crash recovery: on a plain chain (no OS-entropy noise, no verifier
    nonces in the weights) a run whose trainer_2 is killed in round 2 and restarted ends with the
    same weights and test accuracy as the same job run without interruption, so nothing of the
    completed rounds was lost and the replayed round was trained exactly once."""
    cfg = _cfg(training={"epochs": 4})
    manifest, data = _make(cfg, tmp_path / "keys")
    run = tmp_path / "run"
    r, _ = _launch_and_kill_trainer_2_in_round_2(tmp_path / "keys" / "manifest.json", run)
    ref = ChainJob(
        cfg, data, tmp_path / "ref", manifest=manifest, keys=_all_keys(manifest, tmp_path / "keys")
    )
    ref_summary = ref.run()
    assert ref_summary.test_accuracy > 0.3  # the job learns, so equal accuracy means something
    assert r.summary["test_accuracy"] == pytest.approx(ref_summary.test_accuracy, abs=1e-6)
    last = cfg.training.epochs - 1
    for t in ref.trainers:
        got, _ = load_state(round_prefix(run / t.name, last))
        for k, v in t.segment.state_dict().items():
            torch.testing.assert_close(got[f"model.{k}"], v)
