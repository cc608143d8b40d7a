"""Each party as its own program, over gRPC with mutual TLS.

A program reads the public job manifest and its own identity folder only (`PartyKeys.load`
checks that the folder's keys are the ones the manifest names); nothing else of another party's
is ever opened. It listens on its address, prints one readiness line to stdout,

    READY host:port

then, with `peers="-"`, reads the address book (one JSON object {party: "host:port"}) as one line
from stdin; a trainer then registers with the verifier; servers print `SERVING` when they are
ready for the job. Servers (trainers, the verifier) run until SIGTERM or SIGINT, or until the data
owner aborts the job; they then close their links (the verifier first handles every message
already queued, and if every planned round was recorded, checks the job and issues its
certificate) and exit 0 (1 after an abort). The data owner's program runs the job and exits 0
once it is done (1 on a failure it reported to the others, which it tells to stop).

Each party keeps its state in its own folder under `run_dir/<party>`: a trainer's checkpoints
(weights, optimiser, watermark state, sequence counters), the verifier's signed log and delivered
segments, the data owner's checkpoints, privacy ledger and secrets. A trainer started over a folder
with checkpoints resumes from the newest intact one.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from clicooper.allocator import keep_freed_memory
from clicooper.checkpoint import CheckpointError, round_prefix, save_state, saved_rounds
from clicooper.manifest import DATA_OWNER, JobManifest, ManifestError, PartyKeys
from clicooper.threads import apply_threads

log = logging.getLogger("clicooper.programs")


class ProgramError(RuntimeError):
    """A party program cannot start (bad manifest, identity folder, address or data)."""


class _Stop(KeyboardInterrupt):
    """SIGTERM or SIGINT reached the data owner's program."""


class StopRequest:
    """Set by a server's SIGTERM/SIGINT handler; polled by its main loop.

    A plain flag on purpose. Python runs a signal handler on the main thread between any two
    bytecodes, including while that thread holds a lock; `threading.Event.set` takes the lock that
    `Event.wait` holds around its wait, so a signal landing there deadlocks the program (seen as a
    served trainer that never exits after SIGTERM)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, *_) -> None:
        self.requested = True

    def wait(self, poll: float) -> bool:
        """Sleep `poll` seconds (a signal cuts it short only by the handler setting the flag); True
        once a stop was requested."""
        if not self.requested:
            time.sleep(poll)
        return self.requested


def _say(line: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(line + "\n")
    out.flush()


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def load_party(manifest_path: Path, identity: Path, role: str) -> tuple[JobManifest, PartyKeys]:
    """The manifest and this party's own keys, checked against each other."""
    try:
        manifest = JobManifest.load(manifest_path)
        keys = PartyKeys.load(identity, manifest)
    except ManifestError as e:
        raise ProgramError(str(e)) from None
    if keys.role != role:
        raise ProgramError(f"{identity} holds the keys of {keys.name}, a {keys.role}, not of a {role}")
    # `job.threads` when configured; otherwise torch's default, or OMP_NUM_THREADS (launch local: 1)
    apply_threads(manifest.config.job.threads)
    if manifest.config.job.keep_freed_memory:
        keep_freed_memory()
    return manifest, keys


def make_transport(
    manifest: JobManifest,
    keys: PartyKeys,
    *,
    listen: str | None,
    peers: dict[str, str] | None = None,
    insecure: bool = False,
    options=None,
):
    """A gRPC transport hosting only this party, with its own TLS credentials."""
    from clicooper.transport.grpc import GrpcOptions, GrpcTransport

    book = {**manifest.addresses(), **(peers or {})}
    book[keys.name] = listen or book.get(keys.name) or "127.0.0.1:0"
    if keys.tls is None and not insecure:
        raise ProgramError(f"{keys.name} has no TLS credentials (tls/ in its identity folder)")
    tls = {keys.name: keys.tls} if keys.tls is not None else None
    options = options or GrpcOptions(ack_window=manifest.config.link_window())
    return GrpcTransport(manifest.roster(), book, tls=tls, insecure=insecure, options=options)


def read_peers(peers: str | None, stdin: TextIO | None = None) -> dict[str, str]:
    """The address book: from a JSON file, or one JSON line on stdin ("-")."""
    if peers is None:
        return {}
    try:
        text = (stdin or sys.stdin).readline() if peers == "-" else Path(peers).read_text()
        book = json.loads(text)
    except (OSError, ValueError) as e:
        raise ProgramError(f"cannot read the address book from {peers}: {e}") from None
    if not isinstance(book, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in book.items()
    ):
        raise ProgramError("the address book must be a JSON object {party: 'host:port'}")
    return book


def _resume_trainer(trainer, folder: Path) -> int | None:
    """Load the newest intact checkpoint in a trainer's folder; the round loaded, or None."""
    for rnd in sorted(saved_rounds(folder), reverse=True):
        try:
            trainer.load(round_prefix(folder, rnd))
        except (CheckpointError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            log.warning(
                "%s: checkpoint of round %d is damaged (%s); trying the one before", trainer.name, rnd, e
            )
            continue
        return rnd
    return None


def serve(
    role: str,
    manifest_path: Path,
    identity: Path,
    run_dir: Path,
    *,
    listen: str | None = None,
    peers: str | None = None,
    insecure: bool = False,
    stdout: TextIO | None = None,
) -> int:
    """Run a trainer or the verifier until stopped; returns the exit code."""
    from clicooper.build import build_trainer, build_verifier

    _setup_logging()
    manifest, keys = load_party(manifest_path, identity, role)
    folder = run_dir / keys.name
    t = make_transport(manifest, keys, listen=listen, insecure=insecure)
    stop = StopRequest()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        if role == "trainer":
            party = build_trainer(manifest, keys, t, checkpoint_dir=folder)
            rnd = _resume_trainer(party, folder)
            if rnd is not None:
                log.info("%s: resumed from its checkpoint of round %d", keys.name, rnd + 1)
            if party.incarnation > 1:  # started before: it may have missed steps since
                party.wait_for_rewind("restarted from its checkpoint")
                log.info("%s: restarted; waiting for the data owner to rewind the job", keys.name)
        else:
            party = build_verifier(manifest, keys, t, state_dir=folder)
        _say(f"READY {t.addresses[keys.name]}", stdout)
        t.addresses.update(read_peers(peers))
        if role == "trainer":
            party.register_with_verifier()
        # started before over this folder (a trainer already rewound since has nothing to announce)
        restarted = party.awaiting_rewind if role == "trainer" else party.incarnation > 1
        if restarted:
            _announce_restart(party, t)
        _say("SERVING", stdout)
        log.info("%s: serving job %s at %s", keys.name, manifest.job_id, t.addresses[keys.name])
        while not stop.wait(0.2):
            if t.aborts:
                a = t.aborts[0]
                log.error("%s: job aborted by %s: %s", keys.name, a.header.sender, a.reason)
                break
    finally:
        t.close()  # the dispatch thread handles what is already queued, then stops
    if role == "verifier":
        _final_verdict(party, run_dir, stdout)
    log.info("%s: stopped", keys.name)
    return 1 if t.aborts else 0


def _announce_restart(party, transport) -> None:
    """Tell the data owner, from a background thread, that this party was started again over its
    folder. What it had accepted before it died but not finished (a frame acknowledged, then lost
    with the process) is never answered, and the data owner would wait for it; the announcement, an
    `Abort` like any other failure report, makes the data owner rewind the job instead. Best effort
    and never in the way: a data owner that cannot be reached (the job over) costs only the
    thread's connection attempts, and the data owner's receive timeout still bounds its wait."""
    reason = f"{party.name} was restarted (start {party.incarnation}) and lost any step in flight"

    def send() -> None:
        if transport.report(party.name, reason):
            log.info("%s: told %s it was restarted", party.name, party.data_owner)

    threading.Thread(target=send, name=f"announce-restart-{party.name}", daemon=True).start()


def _final_verdict(verifier, run_dir: Path, stdout: TextIO | None) -> None:
    """If every planned round was opened and every trainer's record of it received, check the job
    from the verifier's own folder and issue the certificate (verify_run reads `run_dir/verifier`
    only). A job stopped during a round is unfinished, not rejected: a resume can complete it."""
    from clicooper.parties.verifier import verify_run

    rounds = range(verifier.rounds)
    recorded = all((p, r) in verifier.records for p in verifier.position_of.values() for r in rounds)
    if sorted(verifier.nonces) != list(rounds) or verifier.rounds == 0 or not recorded:
        log.info(
            "verifier: the job is unfinished (rounds %s of %d); no verdict yet",
            sorted(verifier.nonces),
            verifier.rounds,
        )
        return
    verdict, cert = verify_run(run_dir)
    _say(f"VERDICT {'VERIFIED' if verdict.ok else 'REJECTED'}", stdout)
    for f in verdict.failures:
        log.error("verifier: %s", f)


def _drop_stale(t) -> None:
    stale = t.drain(DATA_OWNER)
    if stale:
        log.info("data owner: dropped %d stale message(s)", len(stale))


def run_data_owner(
    manifest_path: Path,
    identity: Path,
    run_dir: Path,
    *,
    data_path: Path | None = None,
    listen: str | None = None,
    peers: str | None = None,
    resume: bool = False,
    insecure: bool = False,
    stdout: TextIO | None = None,
    on_epoch=None,
    recoveries: int = 5,
    pause: float = 2.0,
):
    """The data owner's program: load its data, run the job through the remote parties, and return
    the run summary.

    When a party fails or cannot be reached (a trainer killed, say), the data owner pauses, drops
    stale replies, and resumes from its newest checkpoint, rewinding every other party to the same
    round (`Rewind`); reaching a restarted party is retried with backoff (`GrpcOptions`), so the wait
    is bounded; after `recoveries` failed attempts, or on any other error, it tells every party to
    stop and raises."""
    from clicooper.job import ChainJob, prepare_data
    from clicooper.parties.base import ProtocolError
    from clicooper.transport.base import TransportError

    _setup_logging()
    manifest, keys = load_party(manifest_path, identity, "data_owner")
    cfg = manifest.config
    if data_path is not None:
        cfg = cfg.replace(data={"path": str(data_path)})
    try:
        data = prepare_data(cfg)
    except (ValueError, OSError) as e:
        raise ProgramError(f"cannot load the data: {e}") from None
    t = make_transport(manifest, keys, listen=listen, insecure=insecure)

    def stopped(*_):
        raise _Stop("stopped by a signal")

    old = {sig: signal.signal(sig, stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        job = ChainJob(
            cfg, data, run_dir, transport=t, manifest=manifest, keys={DATA_OWNER: keys}, local={DATA_OWNER}
        )
        initial = run_dir / DATA_OWNER / "initial"  # what a failure before the first checkpoint restores
        if not saved_rounds(run_dir / DATA_OWNER):
            save_state(initial, *job.data_owner.state())
        _say(f"READY {t.addresses[DATA_OWNER]}", stdout)
        t.addresses.update(read_peers(peers))
        # restarted parties announce themselves as they start; announcements that arrived before
        # the job (re)starts are old news that the first round, or the resume's rewind, covers
        _drop_stale(t)
        failures = 0
        while True:
            try:
                summary = job.run(resume=resume or failures > 0, on_epoch=on_epoch)
                break
            except (TransportError, ProtocolError) as e:
                if failures >= recoveries:
                    raise
                failures += 1
                log.warning(
                    "data owner: %s; pausing %.1fs, then resuming from the last completed round "
                    "(recovery %d of %d)",
                    e,
                    pause,
                    failures,
                    recoveries,
                )
                time.sleep(pause)
                _drop_stale(t)
                if not saved_rounds(run_dir / DATA_OWNER):
                    job.data_owner.load(initial)
        _say("SUMMARY " + json.dumps(summary.to_json()), stdout)
        return summary
    except (_Stop, TransportError, ProtocolError, ValueError, RuntimeError) as e:
        told = t.abort_all(DATA_OWNER, f"the data owner stopped: {type(e).__name__}: {e}")
        log.error("data owner: %s; told %s to stop", e, ", ".join(told) or "nobody")
        raise
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        t.close()
