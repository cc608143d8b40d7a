"""`clicooper launch local`: a whole job as separate processes on this machine, over loopback mTLS.

The launcher holds no key and opens no party's folder: it starts the verifier and every trainer
(`clicooper serve ...`) and the data owner (`clicooper run MANIFEST --identity ...`), each with
its own identity folder and listening on 127.0.0.1 on a free port, collects their readiness lines
(`READY host:port`), hands every process the address book on stdin, waits until every server says
`SERVING` (trainers have registered with the verifier by then), lets the data owner run the job,
then stops the servers with SIGTERM (the verifier then checks the job and issues its certificate).
Every party's output goes to `run_dir/logs/<party>.log`. SIGTERM or SIGINT to the launcher stops
every party the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from clicooper.checkpoint import atomic_write_json
from clicooper.manifest import MANIFEST_FILE, JobManifest

QUICK_EPOCHS, QUICK_PRETRAIN, QUICK_TRAIN, QUICK_TEST = 2, 1, 20000, 1000


def quick_manifest(manifest: JobManifest) -> JobManifest:
    """`--quick`: at most 2 epochs, 1 epoch of head pre-training, 20,000 training and 1,000 test
    samples (as `clicooper demo --quick`); the roster and keys are unchanged."""
    c = manifest.config

    def cap(value: int | None, limit: int) -> int:
        return limit if value is None else min(value, limit)

    return manifest.with_config(
        training={"epochs": min(c.training.epochs, QUICK_EPOCHS)},
        model={"head_pretrain_epochs": min(c.model.head_pretrain_epochs, QUICK_PRETRAIN)},
        data={
            "train_subset": cap(c.data.train_subset, QUICK_TRAIN),
            "test_subset": cap(c.data.test_subset, QUICK_TEST),
        },
    )


class LaunchError(RuntimeError):
    """A party did not start, did not become ready, or the job failed; the message says which."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    args: list[str] = field(default_factory=list)
    lines: queue.Queue = field(default_factory=queue.Queue)
    log: Path | None = None  # its stderr: where a failure to start is explained

    def expect(self, word: str, timeout: float) -> str:
        """The rest of the next stdout line starting with `word`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                late = f"{self.name} did not print {word} within {timeout:g}s{self._see()}"
                raise LaunchError(late) from None
            if line is None:
                code = self.proc.wait()
                raise LaunchError(f"{self.name} exited (code {code}) before printing {word}{self._see()}")
            if line.startswith(word):
                return line[len(word) :].strip()

    def _see(self) -> str:
        return f" (see {self.log})" if self.log is not None else ""


def _drain(child: _Child, log_file) -> None:
    """Copy a child's stdout into its log and hand each line to the launcher."""
    for line in child.proc.stdout:
        log_file.write(line)
        log_file.flush()
        child.lines.put(line.rstrip("\n"))
    child.lines.put(None)


_PROGRAM = [sys.executable, "-m", "clicooper"]  # what every party runs (tests put a stand-in here)


def _start(name: str, args: list[str], logs: Path) -> _Child:
    logs.mkdir(parents=True, exist_ok=True)
    log_file = (logs / f"{name}.log").open("a")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(
        [*_PROGRAM, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        env=env,
    )
    child = _Child(name, proc, list(args), log=logs / f"{name}.log")
    threading.Thread(target=_drain, args=(child, log_file), daemon=True, name=f"log-{name}").start()
    pids = logs.parent / "pids.json"
    known = _read_json(pids) or {}
    atomic_write_json(pids, {**known, name: proc.pid})
    return child


def _send_book(child: _Child, book: dict[str, str]) -> None:
    assert child.proc.stdin is not None
    child.proc.stdin.write(json.dumps(book) + "\n")
    child.proc.stdin.flush()


def _stop(children: list[_Child], timeout: float) -> dict[str, int]:
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(OSError, AttributeError):  # one still waiting for its book stops too
                c.proc.stdin.close()
    codes = {}
    for c in children:
        try:
            codes[c.name] = c.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            codes[c.name] = c.proc.wait()
    return codes


@dataclass
class LaunchResult:
    run_dir: Path
    data_owner_code: int
    server_codes: dict[str, int]
    verdict: dict | None  # the verifier's verdict.json (None: no verifier, or no verdict)
    summary: dict | None  # the data owner's summary.json
    has_verifier: bool = False

    @property
    def ok(self) -> bool:
        verified = bool(self.verdict and self.verdict.get("ok")) if self.has_verifier else True
        return self.data_owner_code == 0 and verified and all(c == 0 for c in self.server_codes.values())


def launch_local(
    manifest_path: Path,
    *,
    keys_dir: Path | None = None,
    run_root: Path = Path("runs"),
    quick: bool = False,
    data_path: Path | None = None,
    start_timeout: float = 300.0,
    job_timeout: float | None = None,
    run_dir: Path | None = None,
    max_restarts: int = 3,
) -> LaunchResult:
    """Run the job of `manifest_path` as separate processes; identity folders are `keys_dir/<party>`
    (default: the manifest's folder). `quick`: see `quick_manifest`. A server that dies while the job runs
    is started again (at most `max_restarts` times) on the same address, from its own checkpoints;
    the data owner resumes the job with it. Returns codes, verdict and summary."""
    manifest = JobManifest.load(manifest_path)
    keys_dir = keys_dir or manifest_path.parent
    if quick:
        manifest = quick_manifest(manifest)
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_dir = run_root / f"{manifest.job_id}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    job_manifest = run_dir / MANIFEST_FILE  # what every party of this run reads
    manifest.save(job_manifest)
    logs = run_dir / "logs"
    common = ["--run-dir", str(run_dir), "--listen", "127.0.0.1:0", "--peers", "-"]
    servers: list[_Child] = []
    children: list[_Child] = []

    def on_signal(*_):
        raise KeyboardInterrupt  # takes no lock: it may run while this thread holds one

    main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        if manifest.verifier is not None:
            v = manifest.verifier
            servers.append(
                _start(
                    v,
                    ["serve", "verifier", str(job_manifest), "--identity", str(keys_dir / v), *common],
                    logs,
                )
            )
        for name in manifest.trainer_names:
            servers.append(
                _start(
                    name,
                    ["serve", "trainer", str(job_manifest), "--identity", str(keys_dir / name), *common],
                    logs,
                )
            )
        children.extend(servers)
        do_args = ["run", str(job_manifest), "--identity", str(keys_dir / "data_owner"), *common]
        if data_path is not None:
            do_args += ["--data", str(data_path)]
        owner = _start("data_owner", do_args, logs)
        children.append(owner)
        book = {c.name: c.expect("READY", start_timeout) for c in children}
        for c in servers:
            _send_book(c, book)
        for c in servers:
            c.expect("SERVING", start_timeout)
        _send_book(owner, book)
        do_code = _supervise(owner, servers, children, book, logs, start_timeout, job_timeout, max_restarts)
    except KeyboardInterrupt:
        do_code = _stop(children, 30).get("data_owner", 1) if children else 1
    finally:
        codes = _stop(servers, 60)
        _stop(children, 10)
        for s, h in old.items():
            signal.signal(s, h)
    verdict = _read_json(run_dir / "verifier" / "verdict.json") if manifest.verifier else None
    summary = _read_json(run_dir / "summary.json")
    return LaunchResult(run_dir, do_code, codes, verdict, summary, manifest.verifier is not None)


def _supervise(
    owner: _Child,
    servers: list[_Child],
    children: list[_Child],
    book: dict[str, str],
    logs: Path,
    start_timeout: float,
    job_timeout: float | None,
    max_restarts: int,
) -> int:
    """Wait for the data owner; restart a server that died meanwhile. Returns the data owner's code."""
    deadline = time.monotonic() + job_timeout if job_timeout is not None else None
    restarts: dict[str, int] = {}
    while True:
        try:
            return owner.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if deadline is not None and time.monotonic() > deadline:
            raise LaunchError(f"the data owner did not finish within {job_timeout:g}s")
        for i, c in enumerate(servers):
            code = c.proc.poll()
            if code is None or restarts.get(c.name, 0) >= max_restarts:
                continue
            restarts[c.name] = restarts.get(c.name, 0) + 1
            args = list(c.args)
            args[args.index("--listen") + 1] = book[c.name]  # the address its peers know
            new = _start(c.name, args, logs)
            servers[i] = new
            children[children.index(c)] = new
            try:
                new.expect("READY", start_timeout)
                _send_book(new, book)
                new.expect("SERVING", start_timeout)
            except (LaunchError, OSError):
                if not _exited(new.proc):
                    raise
                # it died again while starting: the next pass starts it again (within max_restarts)


def _exited(proc: subprocess.Popen, grace: float = 5.0) -> bool:
    """Whether `proc` has exited, waiting up to `grace` seconds (one whose output just ended may not
    have been reaped yet)."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return False
    return True


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
